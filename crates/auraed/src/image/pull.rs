//! Pulling an image: manifest (index resolved to linux/amd64), config and layers, each
//! verified against its digest and size before anything parses or unpacks it; layers
//! already in the store are not fetched again; concurrent pulls of the same blob or layer
//! share the work (one lock per digest).

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::{
    reference::{ImageRef, valid_digest},
    registry::{MANIFEST_TYPES, Registry, RegistryError, read_small},
    store::{ImageStore, StoreError, sha256},
    unpack::{self, UnpackError},
};

/// Largest manifest or config we read.
pub const MAX_JSON: usize = 4 << 20;
/// Most layers in an image.
pub const MAX_LAYERS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("{image}: {reason}")]
    Manifest { image: String, reason: String },
    #[error("{image} does not exist in the registry ({what})")]
    NotFound { image: String, what: String },
}

/// How a pull ended, as the metrics endpoint counts it (a bounded set).
pub const PULL_RESULTS: [&str; 7] = [
    "success",
    "not_found",
    "registry_error",
    "invalid_image",
    "verify_failed",
    "store_error",
    "unpack_error",
];

/// Pulls and fetched bytes of this process (every [`Puller`] together), for the metrics
/// endpoint: pulls by result ([`PULL_RESULTS`]) and bytes received from registries
/// (manifests, configs and layers; cached blobs are not fetched, so not counted).
#[derive(Debug)]
pub struct PullCounters {
    results: [AtomicU64; PULL_RESULTS.len()],
    bytes: AtomicU64,
}

impl PullCounters {
    const fn new() -> Self {
        Self {
            results: [const { AtomicU64::new(0) }; PULL_RESULTS.len()],
            bytes: AtomicU64::new(0),
        }
    }

    /// (result, pulls) for every result, in [`PULL_RESULTS`] order.
    pub fn results(&self) -> Vec<(&'static str, u64)> {
        PULL_RESULTS
            .iter()
            .zip(&self.results)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Bytes received from registries so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn fetched(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn ended(&self, r: &Result<Pulled, PullError>) {
        let result = match r {
            Ok(_) => "success",
            Err(PullError::NotFound { .. }) => "not_found",
            Err(PullError::Registry(_)) => "registry_error",
            Err(PullError::Manifest { .. }) => "invalid_image",
            Err(PullError::Store(
                StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. },
            )) => "verify_failed",
            Err(PullError::Store(_)) => "store_error",
            Err(PullError::Unpack(_)) => "unpack_error",
        };
        if let Some(i) = PULL_RESULTS.iter().position(|r| *r == result)
            && let Some(n) = self.results.get(i)
        {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The counters of every pull in this process.
pub static PULLS: PullCounters = PullCounters::new();

/// A descriptor from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// What a pull produced.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// (layer blob digest, diff id), bottom first.
    pub layers: Vec<(String, String)>,
    pub config: serde_json::Value,
    /// Bytes downloaded by this pull (0 when everything was cached).
    pub fetched_bytes: u64,
}

/// Progress of one pull, for the streaming API.
#[derive(Debug, Clone)]
pub struct Progress {
    pub layer: String,
    pub done: u64,
    pub total: u64,
    pub phase: &'static str,
}

fn descriptor(v: &serde_json::Value, image: &str, what: &str) -> Result<Descriptor, PullError> {
    let bad = |reason: String| PullError::Manifest {
        image: image.to_owned(),
        reason,
    };
    let digest = v["digest"].as_str().unwrap_or_default().to_owned();
    if !valid_digest(&digest) {
        return Err(bad(format!(
            "{what}: digest {digest:?} is not sha256:<hex>"
        )));
    }
    let size = v["size"]
        .as_u64()
        .ok_or_else(|| bad(format!("{what}: no size")))?;
    Ok(Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_owned(),
        digest,
        size,
    })
}

#[derive(Debug, Clone)]
pub struct Puller {
    pub store: Arc<ImageStore>,
    pub registry: Registry,
    pub limits: unpack::Limits,
    pub timeout: Duration,
}

impl Puller {
    async fn manifest(
        &self,
        r: &ImageRef,
        reference: &str,
        from_store: bool,
    ) -> Result<(Vec<u8>, String, Option<String>), PullError> {
        // A loaded image's manifest is in the store already (checked again as it is read).
        // Only for a load: a pull always asks the registry, which decides who may see a
        // manifest (knowing a digest must not be enough to get another's image).
        if from_store
            && reference.starts_with("sha256:")
            && let Ok(bytes) = std::fs::read(self.store.blob_path(reference))
            && bytes.len() <= MAX_JSON
            && sha256(&bytes) == reference
        {
            return Ok((bytes, reference.to_owned(), None));
        }
        let resp = self
            .registry
            .get(
                &r.registry,
                &r.repository,
                &format!("manifests/{reference}"),
                Some(MANIFEST_TYPES),
            )
            .await?;
        if resp.status == http::StatusCode::NOT_FOUND {
            return Err(PullError::NotFound {
                image: r.to_string(),
                what: format!("manifest {reference}"),
            });
        }
        if !resp.status.is_success() {
            return Err(RegistryError::Status {
                registry: r.registry.clone(),
                status: resp.status.as_u16(),
                what: format!("manifest {reference}"),
            }
            .into());
        }
        let ct = resp.content_type.clone();
        let bytes = read_small(resp.body, MAX_JSON, self.timeout, &r.registry).await?;
        PULLS.fetched(bytes.len());
        let digest = sha256(&bytes);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(StoreError::DigestMismatch {
                expected: reference.to_owned(),
                got: digest,
                size: bytes.len() as u64,
            }
            .into());
        }
        Ok((bytes, digest, ct))
    }

    async fn fetch_small(&self, r: &ImageRef, d: &Descriptor) -> Result<Vec<u8>, PullError> {
        if self.store.has_blob(&d.digest, d.size) {
            return Ok(
                std::fs::read(self.store.blob_path(&d.digest)).map_err(|source| {
                    StoreError::Io {
                        path: self.store.blob_path(&d.digest),
                        source,
                    }
                })?,
            );
        }
        let resp = self.open_blob(r, d).await?;
        let bytes = read_small(resp.body, MAX_JSON, self.timeout, &r.registry).await?;
        PULLS.fetched(bytes.len());
        let got = sha256(&bytes);
        if got != d.digest || bytes.len() as u64 != d.size {
            return Err(StoreError::DigestMismatch {
                expected: d.digest.clone(),
                got,
                size: bytes.len() as u64,
            }
            .into());
        }
        self.store.put_small(&d.digest, &bytes)?;
        Ok(bytes)
    }

    /// GETs a blob; anything but success is an error naming the blob.
    async fn open_blob(
        &self,
        r: &ImageRef,
        d: &Descriptor,
    ) -> Result<super::registry::Response, PullError> {
        let resp = self
            .registry
            .get(
                &r.registry,
                &r.repository,
                &format!("blobs/{}", d.digest),
                None,
            )
            .await?;
        if !resp.status.is_success() {
            return Err(RegistryError::Status {
                registry: r.registry.clone(),
                status: resp.status.as_u16(),
                what: format!("blob {}", d.digest),
            }
            .into());
        }
        Ok(resp)
    }

    /// Streams a layer blob into the store (verified), unless present.
    async fn fetch_blob(
        &self,
        r: &ImageRef,
        d: &Descriptor,
        progress: &(impl Fn(Progress) + Sync),
    ) -> Result<u64, PullError> {
        let lock = self.store.lock_for(&d.digest);
        let _g = lock.lock().await;
        if self.store.has_blob(&d.digest, d.size) {
            progress(Progress {
                layer: d.digest.clone(),
                done: d.size,
                total: d.size,
                phase: "cached",
            });
            return Ok(0);
        }
        let resp = self.open_blob(r, d).await?;
        let mut body = resp.body;
        let mut ing = self.store.begin(&d.digest)?;
        loop {
            let frame =
                match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), body.frame())
                    .await
                {
                    Err(_) => {
                        self.store.abort(ing);
                        return Err(RegistryError::Timeout {
                            registry: r.registry.clone(),
                            secs: self.timeout.as_secs().max(1),
                            what: format!("blob {}", d.digest),
                        }
                        .into());
                    }
                    Ok(f) => f,
                };
            match frame {
                None => break,
                Some(Err(e)) => {
                    self.store.abort(ing);
                    return Err(RegistryError::Transport {
                        registry: r.registry.clone(),
                        message: e.to_string(),
                    }
                    .into());
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        PULLS.fetched(data.len());
                        if ing.written() + data.len() as u64 > d.size {
                            let got = ing.written() + data.len() as u64;
                            self.store.abort(ing);
                            return Err(StoreError::SizeMismatch {
                                digest: d.digest.clone(),
                                got,
                                want: d.size,
                            }
                            .into());
                        }
                        ing.write(&data)?;
                        progress(Progress {
                            layer: d.digest.clone(),
                            done: ing.written(),
                            total: d.size,
                            phase: "downloading",
                        });
                    }
                }
            }
        }
        self.store.commit(ing, &d.digest, d.size)?;
        Ok(d.size)
    }

    /// Unpacks a verified layer blob into the shared layer store, checking its diff id.
    async fn unpack_layer(&self, d: &Descriptor, diff_id: &str) -> Result<(), PullError> {
        let lock = self.store.lock_for(diff_id);
        let _g = lock.lock().await;
        if self.store.layer_path(diff_id).exists() {
            return Ok(());
        }
        let gzip = match d.media_type.as_str() {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => true,
            "application/vnd.oci.image.layer.v1.tar" | "" => false,
            other => {
                return Err(PullError::Manifest {
                    image: d.digest.clone(),
                    reason: format!("layer media type {other} is not supported"),
                });
            }
        };
        let blob = self.store.blob_path(&d.digest);
        let partial = self.store.partial_layer_path(diff_id);
        let final_path = self.store.layer_path(diff_id);
        let limits = self.limits;
        let diff_id = diff_id.to_owned();
        tokio::task::spawn_blocking(move || -> Result<(), PullError> {
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial).map_err(|source| StoreError::Io {
                path: partial.clone(),
                source,
            })?;
            let file = std::fs::File::open(&blob).map_err(|source| StoreError::Io {
                path: blob.clone(),
                source,
            })?;
            let raw: Box<dyn Read> = if gzip {
                Box::new(unpack::gunzip(std::io::BufReader::new(file)))
            } else {
                Box::new(std::io::BufReader::new(file))
            };
            let mut hashing = Hashing {
                inner: raw,
                hasher: Sha256::new(),
            };
            let result =
                unpack::unpack(&mut hashing, &partial, &limits, &unpack::Policy::default());
            // Hash what the tar reader left (end-of-archive padding) to get the diff id.
            let drained = std::io::copy(&mut hashing, &mut std::io::sink());
            let got = format!("sha256:{:x}", hashing.hasher.finalize());
            let fail = |e: PullError| {
                let _ = std::fs::remove_dir_all(&partial);
                e
            };
            result.map_err(|e| fail(e.into()))?;
            drained.map_err(|e| {
                fail(PullError::Manifest {
                    image: diff_id.clone(),
                    reason: format!("layer stream: {e}"),
                })
            })?;
            if got != diff_id {
                return Err(fail(
                    StoreError::DigestMismatch {
                        expected: diff_id.clone(),
                        got,
                        size: 0,
                    }
                    .into(),
                ));
            }
            std::fs::rename(&partial, &final_path).map_err(|source| StoreError::Io {
                path: final_path.clone(),
                source,
            })?;
            Ok(())
        })
        .await
        .map_err(|e| PullError::Manifest {
            image: d.digest.clone(),
            reason: format!("unpack task: {e}"),
        })?
    }

    /// Pulls `r` into the store.
    pub async fn pull(
        &self,
        r: &ImageRef,
        progress: impl Fn(Progress) + Sync,
    ) -> Result<Pulled, PullError> {
        // No garbage collection while this pull has blobs it has not recorded yet.
        let _gc = self.store.gc_lock.read().await;
        let pulled = self.pull_holding_gc(r, progress, false).await;
        PULLS.ended(&pulled);
        pulled
    }

    /// [`Puller::pull`] for a caller that already holds the store's `gc_lock` (read);
    /// `from_store`: a load, whose manifest is in the store already.
    pub(super) async fn pull_holding_gc(
        &self,
        r: &ImageRef,
        progress: impl Fn(Progress) + Sync,
        from_store: bool,
    ) -> Result<Pulled, PullError> {
        let image = r.to_string();
        let bad = |reason: String| PullError::Manifest {
            image: image.clone(),
            reason,
        };
        let (mut bytes, mut digest, ct) = self.manifest(r, r.reference(), from_store).await?;
        let mut doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
        let media = doc["mediaType"]
            .as_str()
            .map(str::to_owned)
            .or(ct)
            .unwrap_or_default();
        if media.contains("index") || media.contains("manifest.list") || doc["manifests"].is_array()
        {
            let entry = doc["manifests"]
                .as_array()
                .and_then(|m| {
                    m.iter().find(|e| {
                        e["platform"]["os"] == "linux" && e["platform"]["architecture"] == "amd64"
                    })
                })
                .ok_or_else(|| bad("the index has no linux/amd64 manifest".into()))?;
            let d = descriptor(entry, &image, "index entry")?;
            (bytes, digest, _) = self.manifest(r, &d.digest, from_store).await?;
            doc = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
        }
        self.store.put_small(&digest, &bytes)?;
        let config_d = descriptor(&doc["config"], &image, "config")?;
        let layers: Vec<Descriptor> = doc["layers"]
            .as_array()
            .ok_or_else(|| bad("manifest has no layers".into()))?
            .iter()
            .enumerate()
            .map(|(i, l)| descriptor(l, &image, &format!("layers[{i}]")))
            .collect::<Result<_, _>>()?;
        if layers.len() > MAX_LAYERS {
            return Err(bad(format!(
                "{} layers, more than {MAX_LAYERS}",
                layers.len()
            )));
        }
        let config_bytes = self.fetch_small(r, &config_d).await?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("config is not JSON: {e}")))?;
        if config["os"] != "linux" || !(config["architecture"] == "amd64") {
            return Err(bad(format!(
                "image is for {}/{}, not linux/amd64",
                config["os"], config["architecture"]
            )));
        }
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != layers.len() || !diff_ids.iter().all(|d| valid_digest(d)) {
            return Err(bad(format!(
                "config lists {} diff ids for {} layers",
                diff_ids.len(),
                layers.len()
            )));
        }
        let mut fetched = 0;
        for (l, diff) in layers.iter().zip(&diff_ids) {
            fetched += self.fetch_blob(r, l, &progress).await?;
            progress(Progress {
                layer: l.digest.clone(),
                done: l.size,
                total: l.size,
                phase: "unpacking",
            });
            self.unpack_layer(l, diff).await?;
            progress(Progress {
                layer: l.digest.clone(),
                done: l.size,
                total: l.size,
                phase: "done",
            });
        }
        let pulled = Pulled {
            reference: image.clone(),
            manifest_digest: digest,
            config_digest: config_d.digest,
            layers: layers
                .iter()
                .map(|l| l.digest.clone())
                .zip(diff_ids)
                .collect(),
            config,
            fetched_bytes: fetched,
        };
        self.store.put_ref(
            &image,
            &serde_json::json!({
                "reference": image,
                "digest": pulled.manifest_digest,
                "config": pulled.config_digest,
                "layers": pulled.layers,
                "size": layers.iter().map(|l| l.size).sum::<u64>(),
            }),
        )?;
        Ok(pulled)
    }
}

/// Hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
