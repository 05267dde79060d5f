//! An image as a container needs it: its config and its unpacked layers, from the store,
//! pulled first when the store does not hold all of it.

use std::path::PathBuf;

use super::{
    pull::{PullError, Puller},
    reference::{ImageRef, valid_digest},
    store::{ImageStore, hex_of},
};

/// An image whose layers are all unpacked in the store.
#[derive(Debug, Clone)]
pub struct LocalImage {
    pub reference: String,
    /// The manifest digest.
    pub digest: String,
    /// The image config (the OCI `config` object is under `"config"`).
    pub config: serde_json::Value,
    /// Diff ids of the unpacked layers, bottom first (names under [`ImageStore::layers_dir`]).
    pub layers: Vec<String>,
}

impl LocalImage {
    /// The layer directories, bottom first.
    pub fn layer_dirs(&self, store: &ImageStore) -> Vec<PathBuf> {
        self.layers.iter().map(|d| store.layer_path(d)).collect()
    }
}

/// `reference` from the store, if the store holds its config and every layer.
pub fn lookup(store: &ImageStore, reference: &str) -> Option<LocalImage> {
    let rec = store.get_ref(reference)?;
    let config_digest = rec["config"].as_str()?;
    if !valid_digest(config_digest) {
        return None;
    }
    let bytes = std::fs::read(store.blob_path(config_digest)).ok()?;
    // The blob was verified against its digest when it was stored.
    let config: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let layers: Vec<String> = rec["layers"]
        .as_array()?
        .iter()
        .map(|pair| pair[1].as_str().map(str::to_owned))
        .collect::<Option<_>>()?;
    if layers.is_empty()
        || !layers
            .iter()
            .all(|d| valid_digest(d) && store.layer_path(d).is_dir())
    {
        return None;
    }
    Some(LocalImage {
        reference: reference.to_owned(),
        digest: rec["digest"].as_str()?.to_owned(),
        config,
        layers,
    })
}

/// The image from the store, pulling it first if the store lacks any part of it.
pub async fn ensure(puller: &Puller, r: &ImageRef) -> Result<(LocalImage, bool), PullError> {
    let reference = r.to_string();
    if let Some(img) = lookup(&puller.store, &reference) {
        return Ok((img, false));
    }
    let pulled = puller.pull(r, |_| {}).await?;
    Ok((
        LocalImage {
            reference,
            digest: pulled.manifest_digest,
            config: pulled.config,
            layers: pulled.layers.into_iter().map(|(_, diff)| diff).collect(),
        },
        true,
    ))
}

/// The short directory name of a layer under the layer store.
pub fn layer_name(diff_id: &str) -> &str {
    hex_of(diff_id)
}
