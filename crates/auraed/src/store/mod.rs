//! The durable store: what auraed runs, recorded under its state directory so a restarted
//! auraed can re-adopt it.
//!
//! One JSON file per record, `<state>/store/<kind>/<key>.json`, written atomically (write a
//! temporary file, fsync it, rename over the old one, fsync the directory; records of
//! running processes unsynced and swapped in place: [`Store::put_atomic`]): a crash of
//! auraed leaves either the old or the new record, never a torn one (a power loss can
//! empty an unsynced one: see there). Leftover temporary files from a crash are removed on
//! open.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state store key {0:?} is not a resource name")]
    Key(String),
    #[error(
        "state directory {dir} is in use by another auraed ({holder}): one auraed per state directory; stop it or pass another --state-dir"
    )]
    Locked { dir: PathBuf, holder: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Record kinds, one directory each.
pub mod kinds {
    pub const DAEMON: &str = "daemon";
    pub const CELL: &str = "cell";
    pub const EXECUTABLE: &str = "executable";
    pub const VIRTUAL_MACHINE: &str = "vm";
    pub const INSTANCE: &str = "instance";
    pub const POD: &str = "pod";
    /// The CRI's sandboxes and containers, and how far each container's CRI log got.
    pub const CRI_SANDBOX: &str = "cri-sandbox";
    pub const CRI_CONTAINER: &str = "cri-container";
    pub const CRI_LOG_OFFSET: &str = "cri-log-offset";
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// `<state>/lock`, held with an exclusive `flock` for the life of the daemon (the
    /// kernel drops it when the process dies, even by SIGKILL).
    _lock: std::sync::Arc<fs::File>,
}

/// Takes `<state_dir>/lock` exclusively (without waiting) and writes our pid into it.
fn lock_state_dir(state_dir: &Path) -> Result<fs::File, StoreError> {
    use std::io::{Read, Seek};
    let path = state_dir.join("lock");
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    if let Err(e) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "pid unknown".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(StoreError::Locked {
                dir: state_dir.to_owned(),
                holder,
            });
        }
        return Err(io(&path)(e.into()));
    }
    // The pid is for the message a second auraed gives; on a full disk the lock still
    // holds without it.
    let wrote = f
        .set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| writeln!(f, "{}", std::process::id()))
        .and_then(|()| f.sync_all());
    if let Err(e) = wrote {
        tracing::warn!(lock = %path.display(), "writing auraed's pid into the lock file: {e}");
    }
    Ok(f)
}

/// Resource names are `[a-z0-9-]` labels joined by '/'; '/' becomes '.', which no label
/// contains, so the mapping is one-to-one and no key can leave its directory.
fn file_name(key: &str) -> Result<String, StoreError> {
    if key.is_empty()
        || key.len() > 600
        || !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'/')
        || key.starts_with('/')
        || key.ends_with('/')
        || key.contains("//")
    {
        return Err(StoreError::Key(key.to_owned()));
    }
    let name = format!("{}.json", key.replace('/', "."));
    // Past the file-name limit (255 bytes) a long path is named by its hash: the record
    // holds its own names, so nothing reads the key back from the file name.
    if name.len() > 240 {
        use sha2::Digest;
        return Ok(format!("h-{:x}.json", sha2::Sha256::digest(key.as_bytes())));
    }
    Ok(name)
}

impl Store {
    /// Opens (creating, mode 0700) the store under `state_dir`, after taking the state
    /// directory's lock: a second auraed on the same directory is refused here, before it
    /// touches anything (the first one's containers, logs and records).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let lock = std::sync::Arc::new(lock_state_dir(state_dir)?);
        let root = state_dir.join("store");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io(&root))?;
        for kind in [
            kinds::DAEMON,
            kinds::CELL,
            kinds::EXECUTABLE,
            kinds::VIRTUAL_MACHINE,
            kinds::INSTANCE,
            kinds::POD,
            kinds::CRI_SANDBOX,
            kinds::CRI_CONTAINER,
            kinds::CRI_LOG_OFFSET,
        ] {
            let dir = root.join(kind);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(&dir))?;
            for entry in fs::read_dir(&dir).map_err(io(&dir))? {
                let p = entry.map_err(io(&dir))?.path();
                if p.extension().is_some_and(|e| e == "tmp") {
                    fs::remove_file(&p).map_err(io(&p))?;
                }
            }
        }
        Ok(Self { root, _lock: lock })
    }

    fn path(&self, kind: &str, key: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join(kind).join(file_name(key)?))
    }

    /// Writes a record atomically and durably (the file and its directory are synced: it
    /// survives a power loss).
    pub fn put<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Result<(), StoreError> {
        self.write(kind, key, value, true)
    }

    /// Writes a record atomically (temporary file, swapped in with `RENAME_EXCHANGE`): a
    /// crash of auraed leaves the old record or the new one, never a torn one. Not synced: for
    /// records of running processes, which do not outlive the machine either (after a
    /// reboot their records name nothing: boot ids differ). Two fewer fsyncs on every
    /// start and exit. After a power loss a record written shortly before can come back
    /// empty (its data never reached the disk): it is then quarantined and reported at
    /// the next start, as an unreadable record is.
    pub fn put_atomic<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.write(kind, key, value, false)
    }

    fn write<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StoreError> {
        let path = self.path(kind, key)?;
        // One temporary file per write: two writes of one key never share one.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{seq}.tmp", std::process::id()));
        let data = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let written = f
            .write_all(&data)
            .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        if !durable {
            return replace(&tmp, &path);
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        let dir = self.root.join(kind);
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }

    pub fn get<T: DeserializeOwned>(&self, kind: &str, key: &str) -> Result<Option<T>, StoreError> {
        let path = self.path(kind, key)?;
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    pub fn delete(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let path = self.path(kind, key)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// Puts the (complete, unsynced) file `tmp` in place of `path`, atomically: readers and a
/// crash see the old record or the new one. An existing record is swapped with the new
/// one (`RENAME_EXCHANGE`) and then unlinked under the temporary name, rather than
/// replaced by `rename(2)`: ext4 (`auto_da_alloc`, the default) flushes the new file's
/// data on a rename that replaces another file — block allocation and a write submitted
/// on the caller's thread, ~0.1–0.2 ms on every start and exit of a process — and an
/// unsynced record needs none of that. A crash between the swap and the unlink leaves a
/// `.tmp` file holding the old record, removed by the next [`Store::open`]. Where the
/// swap is not there (no record yet, or a file system without it) a plain rename.
fn replace(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, tmp, CWD, path, RenameFlags::EXCHANGE) {
        Ok(()) => {
            // The old record, now under the temporary name. Left behind only if this
            // fails, and swept at the next start then.
            if let Err(e) = fs::remove_file(tmp) {
                tracing::warn!(
                    "state store: the replaced record {} stays until the next start: {e}",
                    tmp.display()
                );
            }
            Ok(())
        }
        Err(_) => fs::rename(tmp, path).map_err(|e| {
            let _ = fs::remove_file(tmp);
            io(path)(e)
        }),
    }
}

/// The readable records of a kind, and what was wrong with the others.
#[derive(Debug)]
pub struct Loaded<T> {
    pub records: Vec<(String, T)>,
    /// One line per record that could not be read: it was moved to `quarantine/<kind>/`
    /// (never deleted, never ignored in silence).
    pub quarantined: Vec<String>,
}

impl Store {
    /// Every record of `kind`; an unreadable one is moved to `<store>/quarantine/<kind>/`
    /// and reported, and the others still load.
    pub fn load<T: DeserializeOwned>(&self, kind: &str) -> Loaded<T> {
        let dir = self.root.join(kind);
        let mut loaded = Loaded {
            records: Vec::new(),
            quarantined: Vec::new(),
        };
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                loaded
                    .quarantined
                    .push(format!("{}: cannot be listed: {e}", dir.display()));
                return loaded;
            }
        };
        for entry in entries.flatten() {
            let p = entry.path();
            let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let key = stem.replace('.', "/");
            let why = match self.get::<T>(kind, &key) {
                Ok(Some(v)) => {
                    loaded.records.push((key, v));
                    continue;
                }
                Ok(None) => continue,
                Err(e) => e.to_string(),
            };
            loaded.quarantined.push(match self.quarantine(kind, &p) {
                Ok(q) => format!(
                    "record {kind}/{key} is unreadable ({why}): moved to {}",
                    q.display()
                ),
                Err(e) => format!(
                    "record {kind}/{key} is unreadable ({why}) and could not be quarantined: {e}"
                ),
            });
        }
        loaded.records.sort_by(|a, b| a.0.cmp(&b.0));
        loaded
    }
}

impl Store {
    /// Moves the unreadable record `from` of `kind` into `quarantine/<kind>/` (made mode
    /// 0700 if missing; returned) under its own name, or `<name>.1`, `<name>.2`, … when a
    /// record of that name was quarantined before: never over one (each is kept for
    /// whoever looks into why).
    fn quarantine(&self, kind: &str, from: &Path) -> std::io::Result<PathBuf> {
        let dir = self.root.join("quarantine").join(kind);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let name = from.file_name().unwrap_or_default();
        quarantine_into(from, &dir, name)?;
        Ok(dir)
    }
}

/// [`Store::quarantine`]'s move: a rename that never replaces.
fn quarantine_into(from: &Path, dir: &Path, name: &std::ffi::OsStr) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    for n in 0..1000u32 {
        let mut to = name.to_owned();
        if n > 0 {
            to.push(format!(".{n}"));
        }
        match renameat_with(CWD, from, CWD, dir.join(&to), RenameFlags::NOREPLACE) {
            Err(rustix::io::Errno::EXIST) => {}
            r => return r.map_err(std::io::Error::from),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{} holds 1000 records named {name:?}", dir.display()),
    ))
}

/// What the store records about each start of auraed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootRecord {
    /// How many times auraed has started with this state directory.
    pub boots: u64,
    pub version: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

impl Store {
    /// Records this start and returns the record (boots counts every start so far).
    ///
    /// An unreadable previous record is quarantined (as [`Store::load`] does) and the
    /// count starts again, with a note saying so (the second value): it never keeps
    /// auraed from taking writes at every start.
    pub fn record_boot(
        &self,
        version: &str,
        pid: u32,
        started_at: u64,
    ) -> Result<(BootRecord, Option<String>), StoreError> {
        let (prev, note) = match self.get::<BootRecord>(kinds::DAEMON, "boot") {
            Ok(prev) => (prev, None),
            Err(StoreError::Corrupt { path, source }) => {
                let note = match self.quarantine(kinds::DAEMON, &path) {
                    Ok(q) => format!(
                        "the boot record {} is unreadable ({source}): moved to {}; boots are counted from 1 again",
                        path.display(),
                        q.display()
                    ),
                    Err(e) => format!(
                        "the boot record {} is unreadable ({source}) and could not be quarantined ({e}); it is written anew",
                        path.display()
                    ),
                };
                (None, Some(note))
            }
            Err(e) => return Err(e),
        };
        let rec = BootRecord {
            boots: prev.map_or(1, |p| p.boots + 1),
            version: version.to_owned(),
            pid,
            started_at,
        };
        self.put(kinds::DAEMON, "boot", &rec)?;
        Ok((rec, note))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        s.put(kinds::CELL, "web/api", &42u32).unwrap();
        s.put(kinds::CELL, "web", &7u32).unwrap();
        assert_eq!(s.get::<u32>(kinds::CELL, "web/api").unwrap(), Some(42));
        let all: Vec<(String, u32)> = s.load(kinds::CELL).records;
        assert_eq!(all, vec![("web".into(), 7), ("web/api".into(), 42)]);
        s.delete(kinds::CELL, "web").unwrap();
        s.delete(kinds::CELL, "web").unwrap();
        assert_eq!(s.get::<u32>(kinds::CELL, "web").unwrap(), None);
    }

    #[test]
    fn an_unsynced_write_swaps_the_record_and_leaves_one_file() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        s.put_atomic(kinds::EXECUTABLE, "c/e", &1u32).unwrap();
        let path = tmp.path().join("store/executable/c.e.json");
        let first = fs::metadata(&path).unwrap().ino();
        // Held open across the swap: the old record stays whole for a reader that has it.
        let mut reader = fs::File::open(&path).unwrap();
        for n in 2..=5u32 {
            s.put_atomic(kinds::EXECUTABLE, "c/e", &n).unwrap();
            assert_eq!(s.get::<u32>(kinds::EXECUTABLE, "c/e").unwrap(), Some(n));
        }
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            first,
            "a new file each write"
        );
        let mut old = String::new();
        std::io::Read::read_to_string(&mut reader, &mut old).unwrap();
        assert_eq!(old.trim(), "1");
        let names: Vec<_> = fs::read_dir(tmp.path().join("store/executable"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("c.e.json")],
            "no temporary file left"
        );
        // The durable path and the unsynced one agree on the record.
        s.put(kinds::EXECUTABLE, "c/e", &6u32).unwrap();
        s.put_atomic(kinds::EXECUTABLE, "c/e", &7u32).unwrap();
        assert_eq!(s.get::<u32>(kinds::EXECUTABLE, "c/e").unwrap(), Some(7));
    }

    #[test]
    fn keys_cannot_escape_and_leftovers_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        for bad in ["", "../x", "a.b", "A", "/abs", "a/", "a//b"] {
            assert!(s.put(kinds::CELL, bad, &1u8).is_err(), "{bad:?}");
        }
        let leftover = tmp.path().join("store/cell/x.tmp");
        fs::write(&leftover, b"torn").unwrap();
        drop(s);
        Store::open(tmp.path()).unwrap();
        assert!(!leftover.exists());
    }

    /// A second auraed on the same state directory is refused, naming the holder; the
    /// lock goes with the holder.
    #[test]
    fn one_store_per_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Store::open(tmp.path()).unwrap();
        let err = Store::open(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("in use by another auraed")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        Store::open(tmp.path()).unwrap();
    }

    #[test]
    fn corrupt_records_are_reported_not_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("store/cell/web.json"), b"{not json").unwrap();
        assert!(matches!(
            s.get::<u32>(kinds::CELL, "web"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_long_name_is_stored_under_its_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        let key = vec!["a".repeat(63); 8].join("/");
        s.put(kinds::CELL, &key, &5u32).unwrap();
        assert_eq!(s.get::<u32>(kinds::CELL, &key).unwrap(), Some(5));
        assert_eq!(s.load::<u32>(kinds::CELL).records.len(), 1);
        s.delete(kinds::CELL, &key).unwrap();
        assert_eq!(s.get::<u32>(kinds::CELL, &key).unwrap(), None);
    }

    #[test]
    fn an_unreadable_record_is_quarantined_and_the_rest_load() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(tmp.path()).unwrap();
        s.put(kinds::CELL, "a", &1u32).unwrap();
        s.put(kinds::CELL, "b", &2u32).unwrap();
        fs::write(tmp.path().join("store/cell/c.json"), b"{trunc").unwrap();
        let l = s.load::<u32>(kinds::CELL);
        assert_eq!(l.records, vec![("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(l.quarantined.len(), 1, "{:?}", l.quarantined);
        assert!(l.quarantined[0].contains("cell/c"), "{:?}", l.quarantined);
        assert!(tmp.path().join("store/quarantine/cell/c.json").exists());
        assert!(!tmp.path().join("store/cell/c.json").exists());
        // Another unreadable record of that name later is kept beside the first.
        fs::write(tmp.path().join("store/cell/c.json"), b"{again").unwrap();
        let l = s.load::<u32>(kinds::CELL);
        assert_eq!(l.quarantined.len(), 1, "{:?}", l.quarantined);
        let q = tmp.path().join("store/quarantine/cell");
        assert_eq!(fs::read(q.join("c.json")).unwrap(), b"{trunc");
        assert_eq!(fs::read(q.join("c.json.1")).unwrap(), b"{again");
    }

    #[test]
    fn boots_are_counted_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            Store::open(tmp.path())
                .unwrap()
                .record_boot("0.1.0", 1, 0)
                .unwrap()
                .0
                .boots,
            1
        );
        assert_eq!(
            Store::open(tmp.path())
                .unwrap()
                .record_boot("0.1.0", 2, 1)
                .unwrap()
                .0
                .boots,
            2
        );
        // An unreadable boot record is quarantined and the count starts again (it kept
        // auraed read-only at every start).
        fs::write(tmp.path().join("store/daemon/boot.json"), b"{").unwrap();
        let (b, note) = Store::open(tmp.path())
            .unwrap()
            .record_boot("0.1.0", 3, 2)
            .unwrap();
        assert_eq!(b.boots, 1);
        assert!(note.is_some_and(|n| n.contains("unreadable")));
        assert_eq!(
            fs::read(tmp.path().join("store/quarantine/daemon/boot.json")).unwrap(),
            b"{"
        );
        let (b, note) = Store::open(tmp.path())
            .unwrap()
            .record_boot("0.1.0", 4, 3)
            .unwrap();
        assert_eq!((b.boots, note), (2, None));
    }
}
