//! `Images`: pull (streaming progress), list, remove. Authorization is per method: image
//! references are not cell names, so the policy's name prefixes do not apply here.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, images_server::Images};
use tonic::{Request, Response, Status};

use super::{authz::Caller, shared::ResponseStream, status::internal};
use crate::image::{
    load::{CHUNK, Load},
    pull::{PullError, Puller},
    reference::ImageRef,
    registry::RegistryError,
    store::StoreError,
};

#[derive(Debug, Clone)]
pub struct ImagesApi {
    puller: Arc<Puller>,
    /// The parent that spawned this auraed, the only caller `Load` answers.
    parent: Option<String>,
}

impl ImagesApi {
    pub fn new(puller: Arc<Puller>, parent: Option<String>) -> Self {
        Self { puller, parent }
    }
}

impl From<PullError> for Status {
    fn from(e: PullError) -> Self {
        match &e {
            PullError::NotFound { .. } => Status::not_found(e.to_string()),
            PullError::Registry(
                RegistryError::Timeout { .. } | RegistryError::Transport { .. },
            ) => Status::unavailable(e.to_string()),
            PullError::Registry(_) | PullError::Manifest { .. } => {
                Status::failed_precondition(e.to_string())
            }
            PullError::Store(
                StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. },
            ) => Status::data_loss(e.to_string()),
            PullError::Unpack(_) => Status::failed_precondition(e.to_string()),
            PullError::Store(_) => internal(e),
        }
    }
}

fn info(v: &serde_json::Value) -> pb::ImageInfo {
    pb::ImageInfo {
        reference: v["reference"].as_str().unwrap_or_default().to_owned(),
        digest: v["digest"].as_str().unwrap_or_default().to_owned(),
        size_bytes: v["size"].as_u64().unwrap_or(0),
        layers: v["layers"]
            .as_array()
            .map_or(0, |l| u32::try_from(l.len()).unwrap_or(u32::MAX)),
        fetched_bytes: 0,
    }
}

pub(crate) fn parse(field: &str, s: &str) -> Result<ImageRef, Status> {
    ImageRef::parse(s).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl Images for ImagesApi {
    type PullStream = ResponseStream<pb::PullImageProgress>;

    async fn pull(
        &self,
        r: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let caller = Caller::of(&r)?;
        let image = parse("image", &r.get_ref().image)?;
        super::runtime::authorize_image(&caller, &image)?;
        tracing::info!(peer_id = %caller.id, image = %image, "pulling");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let puller = self.puller.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let report = move |p: crate::image::pull::Progress| {
                let _ = progress_tx.try_send(Ok(pb::PullImageProgress {
                    layer: p.layer,
                    done_bytes: p.done,
                    total_bytes: p.total,
                    phase: p.phase.to_owned(),
                    image: None,
                }));
            };
            let last = match puller.pull(&image, report).await {
                Ok(p) => Ok(pb::PullImageProgress {
                    phase: "done".into(),
                    image: Some(pb::ImageInfo {
                        reference: p.reference,
                        digest: p.manifest_digest,
                        size_bytes: 0,
                        layers: u32::try_from(p.layers.len()).unwrap_or(u32::MAX),
                        fetched_bytes: p.fetched_bytes,
                    }),
                    ..Default::default()
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn load(
        &self,
        r: Request<tonic::Streaming<pb::ImageBlob>>,
    ) -> Result<Response<pb::ImageInfo>, Status> {
        use tokio_stream::StreamExt;
        let caller = Caller::of(&r)?;
        // A load brings content no registry vouched for: only the parent that spawned us
        // (handing a pod its image) may do it. A grant's `registries` still bound a
        // tenant's images everywhere else.
        if self.parent.as_deref() != Some(caller.id.to_string().as_str()) {
            return Err(Status::permission_denied(format!(
                "{} may not load images: Images/Load is how a parent auraed hands a pod's \
                 image to its instance, and only that parent may call it",
                caller.id
            )));
        }
        let mut stream = r.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("image: the stream is empty"))??;
        let image = parse("image", &first.image)?;
        if !image.reference().starts_with("sha256:") {
            return Err(Status::invalid_argument(format!(
                "image: {image} is not a digest reference (<repository>@sha256:<hex>): \
                 a loaded image never answers for a tag"
            )));
        }
        super::runtime::authorize_image(&caller, &image)?;
        let mut load = Load::new(self.puller.store.clone(), image.clone())?;
        let named = first.image.clone();
        let mut next = Some(first);
        let mut sent = 0u64;
        while let Some(m) = next {
            if m.data.len() > CHUNK {
                return Err(Status::invalid_argument(format!(
                    "data: {} bytes in one chunk, more than {CHUNK}",
                    m.data.len()
                )));
            }
            if !m.image.is_empty() && m.image != named {
                return Err(Status::invalid_argument(
                    "image: only the first message names the image",
                ));
            }
            sent += m.data.len() as u64;
            // What the sender got wrong is bad input, named: the digest, size or bytes.
            load.chunk(&m.digest, m.size, &m.data)
                .map_err(|e| match e {
                    PullError::Manifest { .. }
                    | PullError::Store(StoreError::SizeMismatch { .. }) => {
                        Status::invalid_argument(format!("digest/size/data: {e}"))
                    }
                    e => Status::from(e),
                })?;
            next = stream.next().await.transpose()?;
        }
        let pulled = load.finish(&self.puller).await?;
        tracing::info!(peer_id = %caller.id, image = %image, bytes = sent, "image loaded");
        Ok(Response::new(pb::ImageInfo {
            reference: pulled.reference,
            digest: pulled.manifest_digest,
            size_bytes: sent,
            layers: u32::try_from(pulled.layers.len()).unwrap_or(u32::MAX),
            fetched_bytes: 0,
        }))
    }

    async fn list(
        &self,
        r: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let caller = Caller::of(&r)?;
        // Only the images of the registries (and repositories) the grant covers.
        let images = self
            .puller
            .store
            .refs()
            .iter()
            .filter(|v| {
                v["reference"]
                    .as_str()
                    .and_then(|s| ImageRef::parse(s).ok())
                    .is_some_and(|r| caller.grant.allows_registry(&r.registry, &r.repository))
            })
            .map(info)
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    async fn remove(
        &self,
        r: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemovedImage>, Status> {
        let caller = Caller::of(&r)?;
        let image = parse("image", &r.get_ref().image)?;
        // Removing is for the images of the registries the grant covers.
        super::runtime::authorize_image(&caller, &image)?;
        let image = image.to_string();
        let store = self.puller.store.clone();
        let _gc = store.gc_lock.write().await;
        if !store.remove_ref(&image) {
            return Err(Status::not_found(format!(
                "image {image} is not in the store"
            )));
        }
        let store2 = store.clone();
        let freed = tokio::task::spawn_blocking(move || store2.collect_garbage())
            .await
            .unwrap_or_default();
        tracing::info!(image = %image, blobs = freed.blobs, layers = freed.layers, bytes = freed.bytes, skipped = ?freed.skipped, "image removed");
        Ok(Response::new(pb::RemovedImage {
            reference: image,
            freed_blobs: freed.blobs,
            freed_layers: freed.layers,
            freed_bytes: freed.bytes,
        }))
    }
}
