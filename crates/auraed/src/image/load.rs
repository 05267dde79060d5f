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

/// The blobs of the image whose manifest is `manifest` (a digest) in `store`: the
/// manifest first, then its config and layers, read from the manifest itself (so what is
/// sent is exactly the image that was checked, whatever a tag names meanwhile); and the
/// reference to load them under (`<registry>/<repository>@<manifest>`).
pub fn blobs_of(
    store: &ImageStore,
    r: &ImageRef,
    manifest: &str,
) -> Result<(ImageRef, Vec<Blob>), PullError> {
    let image = format!("{}/{}@{manifest}", r.registry, r.repository);
    if !valid_digest(manifest) {
        return Err(bad(&image, format!("manifest digest {manifest:?}")));
    }
    let bytes = std::fs::read(store.blob_path(manifest))
        .map_err(|_| bad(&image, "its manifest is not in the store"))?;
    if bytes.len() > MAX_JSON || sha256(&bytes) != manifest {
        return Err(bad(&image, "its manifest in the store is not intact"));
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(&image, format!("manifest is not JSON: {e}")))?;
    let mut digests = vec![manifest.to_owned()];
    for d in std::iter::once(&doc["config"]).chain(doc["layers"].as_array().into_iter().flatten()) {
        digests.push(d["digest"].as_str().unwrap_or_default().to_owned());
    }
    let mut blobs = Vec::with_capacity(digests.len());
    for d in digests {
        if !valid_digest(&d) {
            return Err(bad(&image, format!("its manifest names blob {d:?}")));
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
    let by_digest = ImageRef::parse(&image).map_err(|e| bad(&image, e.to_string()))?;
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
    /// What the manifest (the first blob) names: digest → size.
    named: Option<std::collections::HashMap<String, u64>>,
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
            named: None,
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
            // The manifest comes first; after it, only what it names, at its size.
            match &self.named {
                None if digest != self.image.reference() => {
                    return Err(bad(
                        &image,
                        format!("blob {digest} came before the manifest (send the manifest first)"),
                    ));
                }
                None if size > MAX_JSON as u64 => {
                    return Err(bad(&image, format!("a manifest of {size} bytes")));
                }
                Some(named) if named.get(digest) != Some(&size) => {
                    return Err(bad(
                        &image,
                        format!("blob {digest} of {size} bytes is not named by the manifest"),
                    ));
                }
                _ => {}
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
        if self.named.is_none() {
            self.named = Some(self.manifest_names()?);
        }
        self.done.push(c.digest);
        Ok(())
    }

    /// The blobs the manifest (now in the store, verified) names; an index is refused.
    fn manifest_names(&self) -> Result<std::collections::HashMap<String, u64>, PullError> {
        let image = self.image.to_string();
        let bytes = std::fs::read(self.store.blob_path(self.image.reference()))
            .map_err(|e| bad(&image, format!("reading the manifest back: {e}")))?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&image, format!("manifest is not JSON: {e}")))?;
        if doc["manifests"].is_array() {
            return Err(bad(
                &image,
                "is an index: load the platform's manifest, not the index",
            ));
        }
        Ok(std::iter::once(&doc["config"])
            .chain(doc["layers"].as_array().into_iter().flatten())
            .filter_map(|d| Some((d["digest"].as_str()?.to_owned(), d["size"].as_u64()?)))
            .collect())
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
        puller.pull_holding_gc(&self.image, |_| {}, true).await
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::image::{
        registry::{Registry, RegistryConfig},
        unpack::Limits,
    };

    /// A one-layer image (uncompressed tar): (manifest, config, layer) bytes.
    fn image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        let data = b"hello\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &data[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha256(&layer), "size": layer.len()}],
        }))
        .unwrap();
        (manifest, config, layer)
    }

    fn puller(dir: &std::path::Path) -> Puller {
        Puller {
            store: Arc::new(ImageStore::open(dir).unwrap()),
            // Nothing listens there: a load that reached a registry would fail.
            registry: Registry::new(RegistryConfig {
                timeout: Duration::from_millis(200),
                ..Default::default()
            }),
            limits: Limits::default(),
            timeout: Duration::from_millis(200),
        }
    }

    fn reference(manifest: &[u8]) -> ImageRef {
        ImageRef::parse(&format!("127.0.0.1:9/aurae/x@{}", sha256(manifest))).unwrap()
    }

    fn send(l: &mut Load, blob: &[u8]) -> Result<(), PullError> {
        l.chunk(&sha256(blob), blob.len() as u64, blob)
    }

    #[tokio::test]
    async fn a_loaded_image_is_verified_unpacked_and_found_by_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = puller(dir.path());
        let (m, c, layer) = image();
        let r = reference(&m);
        let mut l = Load::new(p.store.clone(), r.clone()).unwrap();
        send(&mut l, &m).unwrap();
        send(&mut l, &c).unwrap();
        // A layer in two chunks.
        let d = sha256(&layer);
        let n = layer.len() as u64;
        l.chunk(&d, n, &layer[..100]).unwrap();
        l.chunk(&d, n, &layer[100..]).unwrap();
        let pulled = l.finish(&p).await.unwrap();
        assert_eq!(pulled.manifest_digest, sha256(&m));
        assert_eq!(pulled.fetched_bytes, 0, "nothing came from a registry");
        let local = crate::image::local::lookup(&p.store, &r.to_string()).unwrap();
        assert!(
            local.layer_dirs(&p.store)[0].join("hello.txt").exists(),
            "the layer is unpacked"
        );
        // What the parent sends back out of this store is the same image.
        let (again, blobs) = blobs_of(&p.store, &r, &sha256(&m)).unwrap();
        assert_eq!(again.to_string(), r.to_string());
        assert_eq!(
            blobs.iter().map(|b| b.digest.clone()).collect::<Vec<_>>(),
            [sha256(&m), sha256(&c), sha256(&layer)]
        );
        // Only a digest reference is ever loaded: a tag never answers with loaded content.
        let tag = ImageRef::parse("127.0.0.1:9/aurae/x:latest").unwrap();
        assert!(Load::new(p.store.clone(), tag).is_err());
        assert!(crate::image::local::lookup(&p.store, "127.0.0.1:9/aurae/x:latest").is_none());
    }

    #[tokio::test]
    async fn a_load_refuses_what_does_not_verify_or_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = puller(dir.path());
        let (m, c, layer) = image();
        let r = reference(&m);
        let new = || Load::new(p.store.clone(), r.clone()).unwrap();
        // Bytes that are not the blob they claim to be.
        let mut l = new();
        l.chunk(&sha256(&m), c.len() as u64, &c).unwrap();
        let e = l.finish(&p).await.unwrap_err();
        assert!(
            matches!(e, PullError::Store(StoreError::DigestMismatch { .. })),
            "{e}"
        );
        // Anything before the manifest, or not named by it, or at another size.
        let mut l = new();
        let e = send(&mut l, &c).unwrap_err();
        assert!(e.to_string().contains("before the manifest"), "{e}");
        let mut l = new();
        send(&mut l, &m).unwrap();
        let e = send(&mut l, b"a blob nobody named").unwrap_err();
        assert!(e.to_string().contains("not named"), "{e}");
        let e = l.chunk(&sha256(&c), 3, &c[..3]).unwrap_err();
        assert!(e.to_string().contains("not named"), "{e}");
        // More bytes than the size said.
        let mut l = new();
        send(&mut l, &m).unwrap();
        let e = l.chunk(
            &sha256(&c),
            c.len() as u64,
            &[c.clone(), c.clone()].concat(),
        );
        assert!(e.is_err());
        // Chunks that disagree on the size.
        let mut l = new();
        send(&mut l, &m).unwrap();
        let d = sha256(&layer);
        l.chunk(&d, layer.len() as u64, &layer[..10]).unwrap();
        assert!(l.chunk(&d, 5, &layer[10..]).is_err());
        // A blob sent twice.
        let mut l = new();
        send(&mut l, &m).unwrap();
        send(&mut l, &c).unwrap();
        send(&mut l, &layer).unwrap();
        let e = send(&mut l, &c).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        // A bad digest.
        let mut l = new();
        assert!(l.chunk("sha256:../../etc", 1, b"x").is_err());
        // The manifest names a layer that was not sent (and the store lacks).
        let dir2 = tempfile::tempdir().unwrap();
        let p2 = puller(dir2.path());
        let mut l = Load::new(p2.store.clone(), r.clone()).unwrap();
        send(&mut l, &m).unwrap();
        send(&mut l, &c).unwrap();
        let e = l.finish(&p2).await.unwrap_err();
        assert!(e.to_string().contains("was not sent"), "{e}");
        // No manifest at all.
        let dir3 = tempfile::tempdir().unwrap();
        let p3 = puller(dir3.path());
        let l = Load::new(p3.store.clone(), r.clone()).unwrap();
        let e = l.finish(&p3).await.unwrap_err();
        assert!(e.to_string().contains("was not sent"), "{e}");
        // An index is refused: the platform's manifest is what a parent sends.
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"digest": sha256(&m), "size": m.len(),
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }))
        .unwrap();
        let dir4 = tempfile::tempdir().unwrap();
        let p4 = puller(dir4.path());
        let mut l = Load::new(p4.store.clone(), reference(&index)).unwrap();
        send(&mut l, &index).unwrap();
        let e = l.finish(&p4).await.unwrap_err();
        assert!(e.to_string().contains("index"), "{e}");
        // Nothing half-written stays in the ingest directory.
        let ingest = dir.path().join("images/ingest");
        assert_eq!(std::fs::read_dir(ingest).unwrap().count(), 0);
    }
}
