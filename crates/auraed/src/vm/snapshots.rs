//! Where VM snapshots live: `<state dir>/vm-snapshots/<name>/` holding `state` (the
//! monitor's state file), `memory` (guest RAM, sparse) and `info.json` (what the API
//! shows). Only auraed writes there (the directory is 0700 and root's).
//!
//! A snapshot is written into `.<name>.partial` and renamed into place once both files
//! and the info are complete, so a crash mid-way never leaves a half snapshot under its
//! name: the next auraed removes the partial directories it finds (and says so). A
//! restore opens the files once (no symlink followed) and hands those open files to the
//! VMM.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{spec::Label, workload::WorkloadError};

/// What is known about a stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// How many drives and network interfaces the VM had (a restore gives as many).
    pub drives: usize,
    pub interfaces: usize,
    pub state_bytes: u64,
    /// From the request to both files written.
    pub took_ns: u64,
    /// Seconds since the Unix epoch.
    pub created_unix_s: u64,
    pub cpu_template: String,
}

/// The directory of stored snapshots.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// A snapshot being written: its directory and its two files, open for writing.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    target: PathBuf,
    pub state: File,
    pub memory: File,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> WorkloadError {
    move |e| WorkloadError::Precondition(format!("{what}: {e}"))
}

const PARTIAL_SUFFIX: &str = ".partial";

impl SnapshotStore {
    /// Opens (creating it, 0700) the store; removes what a crashed auraed left half
    /// written and returns their names.
    pub fn open(dir: PathBuf) -> Result<(Self, Vec<String>), WorkloadError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX) {
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(name);
            }
        }
        Ok((Self { dir }, removed))
    }

    fn path(&self, name: &Label) -> PathBuf {
        self.dir.join(name.as_str())
    }

    /// Starts writing snapshot `name`: ALREADY_EXISTS if it is stored or being written.
    pub fn begin(&self, name: &Label) -> Result<Partial, WorkloadError> {
        let target = self.path(name);
        if target.exists() {
            return Err(WorkloadError::Exists(format!(
                "snapshot {:?} already exists",
                name.as_str()
            )));
        }
        let dir = self.dir.join(format!(".{}{PARTIAL_SUFFIX}", name.as_str()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    WorkloadError::Exists(format!("snapshot {:?} is being written", name.as_str()))
                }
                _ => WorkloadError::Precondition(format!("creating {}: {e}", dir.display())),
            })?;
        let create = |f: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc_flags())
                .open(dir.join(f))
                .map_err(io(format!("creating the snapshot's {f} file")))
        };
        let made = create("state").and_then(|s| Ok((s, create("memory")?)));
        match made {
            Ok((state, memory)) => Ok(Partial {
                dir,
                target,
                state,
                memory,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// A stored snapshot's info; NOT_FOUND if there is none.
    pub fn info(&self, name: &Label) -> Result<SnapshotInfo, WorkloadError> {
        let p = self.path(name).join("info.json");
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(WorkloadError::NotFound(format!(
                    "snapshot {:?} does not exist",
                    name.as_str()
                )));
            }
            Err(e) => return Err(io(format!("reading {}", p.display()))(e)),
        };
        serde_json::from_slice(&text).map_err(|e| {
            WorkloadError::Precondition(format!(
                "snapshot {:?}: unreadable info: {e}",
                name.as_str()
            ))
        })
    }

    /// A stored snapshot's two files (state, memory), opened once, read-only, without
    /// following a symlink; NOT_FOUND if there is no such snapshot.
    pub fn open_files(&self, name: &Label) -> Result<(File, File), WorkloadError> {
        let open = |f: &str| {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc_flags())
                .open(self.path(name).join(f))
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => WorkloadError::NotFound(format!(
                        "snapshot {:?} does not exist",
                        name.as_str()
                    )),
                    _ => io(format!("snapshot {:?}: its {f} file", name.as_str()))(e),
                })
        };
        Ok((open("state")?, open("memory")?))
    }

    /// Every stored snapshot, by name (an unreadable one is skipped with a warning).
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(label) = Label::parse("name", &name) else {
                continue;
            };
            match self.info(&label) {
                Ok(i) => out.push(i),
                Err(err) => tracing::warn!(snapshot = %name, "unreadable snapshot: {err}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Removes a stored snapshot; NOT_FOUND if there is none.
    pub fn remove(&self, name: &Label) -> Result<(), WorkloadError> {
        self.info(name)?;
        let p = self.path(name);
        std::fs::remove_dir_all(&p).map_err(io(format!("removing {}", p.display())))
    }

    /// The directory (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// No symlink followed at the last component, close-on-exec.
fn libc_flags() -> i32 {
    nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC
}

impl Partial {
    /// Writes the info and puts the snapshot under its name.
    pub fn commit(self, info: &SnapshotInfo) -> Result<(), WorkloadError> {
        let r = self.put(info);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        r
    }

    fn put(&self, info: &SnapshotInfo) -> Result<(), WorkloadError> {
        let text = serde_json::to_vec_pretty(info)
            .map_err(|e| WorkloadError::Precondition(format!("snapshot info: {e}")))?;
        let p = self.dir.join("info.json");
        std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))?;
        for f in [&self.state, &self.memory] {
            f.sync_all()
                .map_err(io("syncing the snapshot's files".to_owned()))?;
        }
        std::fs::rename(&self.dir, &self.target).map_err(io(format!(
            "renaming {} to {}",
            self.dir.display(),
            self.target.display()
        )))
    }

    /// Removes what was written.
    pub fn abort(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn info(name: &str) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            vm: "v1".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            drives: 0,
            interfaces: 0,
            state_bytes: 10,
            took_ns: 1,
            created_unix_s: 1,
            cpu_template: "normalized".into(),
        }
    }

    #[test]
    fn a_snapshot_appears_only_once_committed() {
        let d = tempfile::tempdir().unwrap();
        let (store, removed) = SnapshotStore::open(d.path().join("s")).unwrap();
        assert!(removed.is_empty());
        let n = Label::parse("name", "snap1").unwrap();
        let p = store.begin(&n).unwrap();
        assert!(matches!(store.info(&n), Err(WorkloadError::NotFound(_))));
        assert!(store.list().is_empty());
        assert!(matches!(store.begin(&n), Err(WorkloadError::Exists(_))));
        p.commit(&info("snap1")).unwrap();
        assert_eq!(store.info(&n).unwrap(), info("snap1"));
        assert_eq!(store.list(), vec![info("snap1")]);
        assert!(matches!(store.begin(&n), Err(WorkloadError::Exists(_))));
        store.open_files(&n).unwrap();
        store.remove(&n).unwrap();
        assert!(matches!(store.remove(&n), Err(WorkloadError::NotFound(_))));
    }

    #[test]
    fn a_crash_mid_write_leaves_nothing_under_the_name() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("s");
        let (store, _) = SnapshotStore::open(dir.clone()).unwrap();
        let n = Label::parse("name", "snap1").unwrap();
        let p = store.begin(&n).unwrap();
        std::mem::forget(p); // as if auraed died here
        let (store, removed) = SnapshotStore::open(dir).unwrap();
        assert_eq!(removed, vec![".snap1.partial".to_owned()]);
        assert!(store.begin(&n).is_ok());
    }

    #[test]
    fn a_symlinked_file_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = SnapshotStore::open(d.path().join("s")).unwrap();
        let n = Label::parse("name", "snap1").unwrap();
        store.begin(&n).unwrap().commit(&info("snap1")).unwrap();
        let state = store.path(&n).join("state");
        std::fs::remove_file(&state).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &state).unwrap();
        assert!(store.open_files(&n).is_err());
    }
}
