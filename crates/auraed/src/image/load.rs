//! Images handed over instead of pulled: a parent auraed sends a pod's image to the
//! instance it spawned for it, blob by blob, from its own store ([`blobs_of`]); the
//! instance writes each blob through the same verified ingest as a pull ([`Load`]) and
//! then runs the pull itself, which finds every blob in the store and reaches no registry.
//! Only digest references are loaded, so loaded content never answers for a tag.

use std::{path::PathBuf, sync::Arc};

use super::{
    pull::{MAX_JSON, MAX_LAYERS, PullError, Pulled, Puller},
    reference::{ImageRef, valid_digest},
    store::{ImageStore, Ingest, StoreError, sha256},
};

/// Largest chunk of a blob in one message.
pub const CHUNK: usize = 512 << 10;

/// One blob of an image in a store, as [`blobs_of`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

fn bad(image: &str, reason: impl Into<String>) -> PullError {
    PullError::Manifest {
        image: image.to_owned(),
        reason: reason.into(),
    }
}

/// The blobs of `reference` in `store`, manifest first, then config, then layers; and the
/// reference to load them under (`<registry>/<repository>@<manifest digest>`).
pub fn blobs_of(store: &ImageStore, r: &ImageRef) -> Result<(ImageRef, Vec<Blob>), PullError> {
    let image = r.to_string();
    let rec = store
        .get_ref(&image)
        .ok_or_else(|| bad(&image, "is not in the store"))?;
    let digest = rec["digest"].as_str().unwrap_or_default();
    let config = rec["config"].as_str().unwrap_or_default();
    let mut digests = vec![digest.to_owned(), config.to_owned()];
    for pair in rec["layers"].as_array().into_iter().flatten() {
        digests.push(pair[0].as_str().unwrap_or_default().to_owned());
    }
    let mut blobs = Vec::with_capacity(digests.len());
    for d in digests {
        if !valid_digest(&d) {
            return Err(bad(&image, format!("its record names blob {d:?}")));
        }
        let path = store.blob_path(&d);
        let size = std::fs::metadata(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        blobs.push(Blob {
            digest: d,
            size,
            path,
        });
    }
    let by_digest = ImageRef::parse(&format!("{}/{}@{digest}", r.registry, r.repository))
        .map_err(|e| bad(&image, e.to_string()))?;
    Ok((by_digest, blobs))
}

/// An image being loaded: blobs written one after another, each verified against its
/// digest and size when it is complete (the same ingest a pull uses).
#[derive(Debug)]
pub struct Load {
    store: Arc<ImageStore>,
    image: ImageRef,
    current: Option<Current>,
    done: Vec<String>,
}

#[derive(Debug)]
struct Current {
    digest: String,
    size: u64,
    /// None when the store had the blob already: its bytes are only counted.
    ingest: Option<Ingest>,
    seen: u64,
}

impl Load {
    /// A load of `image`, which must be a digest reference.
    pub fn new(store: Arc<ImageStore>, image: ImageRef) -> Result<Self, PullError> {
        if !image.reference().starts_with("sha256:") {
            return Err(bad(
                &image.to_string(),
                "only a digest reference (<repository>@sha256:<hex>) can be loaded",
            ));
        }
        Ok(Self {
            store,
            image,
            current: None,
            done: Vec::new(),
        })
    }

    /// The next bytes of blob `digest` (of `size` bytes in all).
    pub fn chunk(&mut self, digest: &str, size: u64, data: &[u8]) -> Result<(), PullError> {
        let image = self.image.to_string();
        if self.current.as_ref().is_none_or(|c| c.digest != digest) {
            self.finish_blob()?;
            if !valid_digest(digest) {
                return Err(bad(
                    &image,
                    format!("digest {digest:?} is not sha256:<hex>"),
                ));
            }
            if self.done.iter().any(|d| d == digest) {
                return Err(bad(&image, format!("blob {digest} was sent twice")));
            }
            if self.done.len() >= MAX_LAYERS + 2 {
                return Err(bad(&image, format!("more than {} blobs", MAX_LAYERS + 2)));
            }
            let ingest = if self.store.has_blob(digest, size) {
                None
            } else {
                Some(self.store.begin(digest)?)
            };
            self.current = Some(Current {
                digest: digest.to_owned(),
                size,
                ingest,
                seen: 0,
            });
        }
        let Some(c) = self.current.as_mut() else {
            return Ok(());
        };
        if c.size != size {
            let e = bad(
                &image,
                format!("blob {digest}: its chunks say {} and {size} bytes", c.size),
            );
            self.abort();
            return Err(e);
        }
        c.seen += data.len() as u64;
        if c.seen > c.size {
            let e = StoreError::SizeMismatch {
                digest: digest.to_owned(),
                got: c.seen,
                want: c.size,
            };
            self.abort();
            return Err(e.into());
        }
        if let Some(ing) = c.ingest.as_mut()
            && let Err(e) = ing.write(data)
        {
            self.abort();
            return Err(e.into());
        }
        Ok(())
    }

    fn abort(&mut self) {
        if let Some(Current {
            ingest: Some(ing), ..
        }) = self.current.take()
        {
            self.store.abort(ing);
        }
    }

    /// Verifies and commits the blob being written, if any.
    fn finish_blob(&mut self) -> Result<(), PullError> {
        let Some(c) = self.current.take() else {
            return Ok(());
        };
        match c.ingest {
            // A pull of the same blob may be writing it too: each writes its own
            // temporary file and renames it into place only once verified.
            Some(ing) => {
                self.store.commit(ing, &c.digest, c.size)?;
            }
            None if c.seen != c.size => {
                return Err(StoreError::SizeMismatch {
                    digest: c.digest,
                    got: c.seen,
                    want: c.size,
                }
                .into());
            }
            None => {}
        }
        self.done.push(c.digest);
        Ok(())
    }

    /// Ends the load: the manifest must name only blobs that were sent (or were in the
    /// store already); then the image is unpacked and recorded as a pull would.
    pub async fn finish(mut self, puller: &Puller) -> Result<Pulled, PullError> {
        self.finish_blob()?;
        let image = self.image.to_string();
        // No collection between the last blob written and the reference recorded.
        let _gc = self.store.gc_lock.read().await;
        let manifest = self.image.reference().to_owned();
        let bytes = std::fs::read(self.store.blob_path(&manifest))
            .map_err(|_| bad(&image, format!("manifest {manifest} was not sent")))?;
        if bytes.len() > MAX_JSON || sha256(&bytes) != manifest {
            return Err(bad(&image, format!("manifest {manifest} is not intact")));
        }
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&image, format!("manifest is not JSON: {e}")))?;
        if doc["manifests"].is_array() {
            return Err(bad(
                &image,
                "is an index: load the platform's manifest, not the index",
            ));
        }
        let named = std::iter::once(&doc["config"])
            .chain(doc["layers"].as_array().into_iter().flatten())
            .map(|d| (d["digest"].as_str().unwrap_or_default(), d["size"].as_u64()));
        for (digest, size) in named {
            let present =
                valid_digest(digest) && size.is_some_and(|size| self.store.has_blob(digest, size));
            if !present {
                return Err(bad(
                    &image,
                    format!("blob {digest:?} named by the manifest was not sent"),
                ));
            }
        }
        // Every blob is here: the pull reads them from the store, reaching no registry.
        puller.pull_holding_gc(&self.image, |_| {}).await
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.abort();
    }
}
