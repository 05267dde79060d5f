//! The content-addressed image store under `<state>/images`:
//! `blobs/sha256/<hex>` (verified before they are renamed into place),
//! `layers/sha256/<diff-id hex>` (unpacked, shared between images), `refs/` (what a
//! reference resolved to). Temporary files and half-unpacked layers from an interrupted
//! pull are removed on open: the store is never left corrupt.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {expected}: the content received has digest {got} ({size} bytes)")]
    DigestMismatch {
        expected: String,
        got: String,
        size: u64,
    },
    #[error("blob {digest}: {got} bytes, the manifest says {want}")]
    SizeMismatch { digest: String, got: u64, want: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared for their whole run, garbage collection exclusively: a
    /// collection never removes what a pull in flight has fetched but not yet recorded.
    pub gc_lock: tokio::sync::RwLock<()>,
    /// Layers in use by containers (diff id → count), never collected.
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

/// Keeps layers from being collected while a container uses them.
#[derive(Debug)]
pub struct Pin {
    layers: Vec<String>,
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

impl Pin {
    /// A pin of nothing (no image store to pin in).
    pub fn none() -> Self {
        Self {
            layers: Vec::new(),
            pins: Arc::default(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut g = match self.pins.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for l in &self.layers {
            if let Some(n) = g.get_mut(l) {
                *n -= 1;
                if *n == 0 {
                    g.remove(l);
                }
            }
        }
    }
}

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub blobs: u64,
    pub layers: u64,
    pub bytes: u64,
    /// Why nothing was collected (an unreadable reference record may name any blob).
    pub skipped: Option<String>,
}

fn tree_bytes(p: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// A blob being written: hashed as it goes, renamed into place only when verified.
#[derive(Debug)]
pub struct Ingest {
    tmp: PathBuf,
    file: fs::File,
    hasher: Sha256,
    written: u64,
}

impl Ingest {
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(data);
        self.written += data.len() as u64;
        self.file.write_all(data).map_err(io(&self.tmp))
    }

    pub fn written(&self) -> u64 {
        self.written
    }
}

impl ImageStore {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join("images");
        for d in ["blobs/sha256", "layers/sha256", "ingest", "refs"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        // Leftovers of an interrupted pull.
        let ingest = root.join("ingest");
        for e in fs::read_dir(&ingest).map_err(io(&ingest))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let layers = root.join("layers/sha256");
        for e in fs::read_dir(&layers).map_err(io(&layers))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".partial") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(Self {
            root,
            locks: Mutex::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            pins: Arc::default(),
        })
    }

    /// Pins `layers` (diff ids) until the returned guard is dropped.
    pub fn pin(&self, layers: &[String]) -> Pin {
        let mut g = match self.pins.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for l in layers {
            *g.entry(l.clone()).or_default() += 1;
        }
        Pin {
            layers: layers.to_vec(),
            pins: self.pins.clone(),
        }
    }

    /// Removes every blob and unpacked layer no recorded reference needs and no container
    /// uses. Call with [`Self::gc_lock`] held exclusively.
    pub fn collect_garbage(&self) -> Collected {
        let mut blobs = std::collections::HashSet::new();
        let mut layers = std::collections::HashSet::new();
        let (refs, quarantined) = self.checked_refs();
        if !quarantined.is_empty() {
            let why = format!(
                "garbage collection skipped: {} unreadable image reference record(s) in {} may name any blob; inspect and remove them",
                quarantined.len(),
                self.quarantine_dir().display()
            );
            tracing::warn!("{why}");
            return Collected {
                skipped: Some(why),
                ..Collected::default()
            };
        }
        for r in refs {
            for k in ["digest", "config"] {
                if let Some(d) = r[k].as_str() {
                    blobs.insert(hex_of(d).to_owned());
                }
            }
            for pair in r["layers"].as_array().into_iter().flatten() {
                if let Some(b) = pair[0].as_str() {
                    blobs.insert(hex_of(b).to_owned());
                }
                if let Some(l) = pair[1].as_str() {
                    layers.insert(hex_of(l).to_owned());
                }
            }
        }
        if let Ok(p) = self.pins.lock() {
            layers.extend(p.keys().map(|d| hex_of(d).to_owned()));
        }
        let mut out = Collected::default();
        for (dir, keep, is_layer) in [
            (self.root.join("blobs/sha256"), &blobs, false),
            (self.layers_dir(), &layers, true),
        ] {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let bytes = tree_bytes(&e.path());
                let removed = if is_layer {
                    fs::remove_dir_all(e.path())
                } else {
                    fs::remove_file(e.path())
                };
                if removed.is_ok() {
                    out.bytes += bytes;
                    if is_layer {
                        out.layers += 1;
                    } else {
                        out.blobs += 1;
                    }
                }
            }
        }
        out
    }

    /// One lock per digest: concurrent pulls of the same blob or layer share the work.
    pub fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = match self.locks.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.entry(key.to_owned()).or_default().clone()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex_of(digest))
    }

    /// Whether the blob is present with the expected size.
    pub fn has_blob(&self, digest: &str, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.len() == size)
    }

    pub fn begin(&self, digest: &str) -> Result<Ingest, StoreError> {
        let tmp =
            self.root
                .join("ingest")
                .join(format!("{}.{}", hex_of(digest), uuid::Uuid::new_v4()));
        let file = fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(Ingest {
            tmp,
            file,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Verifies digest and size, then moves the blob into place.
    pub fn commit(&self, ing: Ingest, digest: &str, size: u64) -> Result<PathBuf, StoreError> {
        let got = format!("sha256:{:x}", ing.hasher.finalize());
        let fail = |e| {
            let _ = fs::remove_file(&ing.tmp);
            e
        };
        if ing.written != size {
            return Err(fail(StoreError::SizeMismatch {
                digest: digest.to_owned(),
                got: ing.written,
                want: size,
            }));
        }
        if got != digest {
            return Err(fail(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                got,
                size,
            }));
        }
        ing.file.sync_all().map_err(io(&ing.tmp))?;
        let dst = self.blob_path(digest);
        fs::rename(&ing.tmp, &dst).map_err(io(&dst))?;
        Ok(dst)
    }

    pub fn abort(&self, ing: Ingest) {
        let _ = fs::remove_file(&ing.tmp);
    }

    /// Writes a small verified blob (a manifest or config) held in memory.
    pub fn put_small(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut ing = self.begin(digest)?;
        ing.write(bytes)?;
        self.commit(ing, digest, bytes.len() as u64).map(|_| ())
    }

    /// Bytes of an unpacked layer (its files' sizes).
    pub fn layer_bytes(&self, diff_id: &str) -> u64 {
        tree_bytes(&self.layer_path(diff_id))
    }

    pub fn layer_path(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers/sha256").join(hex_of(diff_id))
    }

    pub fn partial_layer_path(&self, diff_id: &str) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(format!("{}.partial", hex_of(diff_id)))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", hex_of(&sha256(reference.as_bytes()))))
    }

    /// Writes a reference record atomically and durably (temporary file, fsync, rename,
    /// fsync of the directory): a crash leaves the old record or the new one.
    pub fn put_ref(&self, reference: &str, record: &serde_json::Value) -> Result<(), StoreError> {
        use std::io::Write;
        let p = self.ref_path(reference);
        let tmp = p.with_extension("tmp");
        let data =
            serde_json::to_vec_pretty(record).map_err(|e| io(&tmp)(std::io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &p).map_err(io(&p))?;
        let dir = self.root.join("refs");
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }

    /// Where unreadable reference records are moved (never deleted, never ignored).
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    /// The readable reference records, and the unreadable ones: each of those is moved to
    /// [`Self::quarantine_dir`] and reported (a warning now; [`Self::quarantined`] later).
    pub fn checked_refs(&self) -> (Vec<serde_json::Value>, Vec<String>) {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(v) if v["reference"].is_string() && v["digest"].is_string() => out.push(v),
                other => {
                    let why = match other {
                        Err(e) => e,
                        Ok(_) => "no reference or digest".into(),
                    };
                    let q = self.quarantine_dir();
                    let _ = fs::create_dir_all(&q);
                    let to = q.join(e.file_name());
                    match fs::rename(&path, &to) {
                        Ok(()) => tracing::warn!(
                            record = %path.display(), moved_to = %to.display(),
                            "image reference record is unreadable ({why}): quarantined"
                        ),
                        Err(err) => tracing::warn!(
                            record = %path.display(),
                            "image reference record is unreadable ({why}) and could not be quarantined: {err}"
                        ),
                    }
                }
            }
        }
        out.sort_by(|a, b| a["reference"].as_str().cmp(&b["reference"].as_str()));
        (out, self.quarantined())
    }

    /// Quarantined reference records (file names), for warnings.
    pub fn quarantined(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.quarantine_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The readable reference records (unreadable ones are quarantined).
    pub fn refs(&self) -> Vec<serde_json::Value> {
        self.checked_refs().0
    }

    /// The record of `reference`, if it was pulled.
    pub fn get_ref(&self, reference: &str) -> Option<serde_json::Value> {
        serde_json::from_slice(&fs::read(self.ref_path(reference)).ok()?).ok()
    }

    /// The layer store directory (`layers/sha256`), where unpacked layers are named by
    /// their diff id's hex.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers/sha256")
    }

    pub fn remove_ref(&self, reference: &str) -> bool {
        fs::remove_file(self.ref_path(reference)).is_ok()
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    /// A truncated reference record was skipped silently and the next GC removed the
    /// blobs of the image it named. Now it is quarantined and GC stops until it is gone.
    #[test]
    fn an_unreadable_ref_is_quarantined_and_stops_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let blob = b"blob the truncated record named";
        let digest = format!("sha256:{:x}", Sha256::digest(blob));
        store.put_small(&digest, blob).unwrap();
        store
            .put_ref(
                "r/good:1",
                &serde_json::json!({"reference": "r/good:1", "digest": digest, "layers": []}),
            )
            .unwrap();
        let full = fs::read(store.ref_path("r/good:1")).unwrap();
        fs::write(store.ref_path("r/good:1"), &full[..full.len() / 2]).unwrap();
        let c = store.collect_garbage();
        assert!(c.skipped.is_some(), "{c:?}");
        assert_eq!((c.blobs, c.layers), (0, 0));
        assert!(
            store.blob_path(&digest).exists(),
            "GC deleted a blob a quarantined record may name"
        );
        assert_eq!(store.quarantined().len(), 1);
        assert!(store.refs().is_empty());
        // Once the operator removes the quarantined record, GC runs again.
        fs::remove_dir_all(store.quarantine_dir()).unwrap();
        let c = store.collect_garbage();
        assert!(c.skipped.is_none());
        assert_eq!(c.blobs, 1);
    }
}
