//! `runtime.v1.ImageService` over our image store: pulls, lists and removes go through
//! `Images` as the CRI identity, and every lookup sees only the references its grant's
//! registries cover. An image's id is its manifest digest, and that is also the
//! `image_ref` PullImage returns and a container reports (kubelet matches the two to know
//! which images are in use); `repo_digests` are `<registry>/<repository>@<digest>`.

use std::sync::Arc;

use aurae_proto::{
    cri::v1::{self as cri, image_service_server::ImageService},
    runtime::v0::{self as pb, images_server::Images},
    service_names as svc,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{Cri, now_nanos};
use crate::image::reference::ImageRef;

/// The ImageService over the shared CRI state.
#[derive(Debug, Clone)]
pub struct CriImages(pub Arc<Cri>);

/// One stored reference: (reference, manifest digest, size).
fn stored(cri: &Cri) -> Vec<(String, String, u64)> {
    cri.ctx
        .puller
        .store
        .refs()
        .iter()
        .filter_map(|v| {
            Some((
                v["reference"].as_str()?.to_owned(),
                v["digest"].as_str()?.to_owned(),
                v["size"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

fn repo_digest(reference: &str, digest: &str) -> String {
    match ImageRef::parse(reference) {
        Ok(r) => format!("{}/{}@{digest}", r.registry, r.repository),
        Err(_) => format!("{reference}@{digest}"),
    }
}

/// The stored references the CRI identity may see (`Images/List` as it).
pub async fn visible(cri: &Cri) -> Result<std::collections::BTreeSet<String>, Status> {
    Ok(cri
        .images
        .list(cri.call(svc::IMAGES, "List", pb::ListImagesRequest {})?)
        .await?
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.reference)
        .collect())
}

/// The stored reference `image` names among `visible`, and the image's id (its manifest
/// digest): `image` is a reference (as stored), a `<repository>@<digest>` or a bare
/// manifest digest (an image's id). `None`: not stored (or not visible).
pub fn resolve(
    cri: &Cri,
    visible: &std::collections::BTreeSet<String>,
    image: &str,
) -> Result<Option<(String, String)>, Status> {
    let all: Vec<_> = stored(cri)
        .into_iter()
        .filter(|(r, _, _)| visible.contains(r))
        .collect();
    let hit = |pred: &dyn Fn(&(String, String, u64)) -> bool| {
        all.iter()
            .find(|x| pred(x))
            .map(|(r, d, _)| (r.clone(), d.clone()))
    };
    if image.starts_with("sha256:") {
        return Ok(hit(&|(_, d, _)| d == image));
    }
    let r = ImageRef::parse(image).map_err(|e| Status::invalid_argument(format!("image: {e}")))?;
    if let Some(digest) = &r.digest {
        return Ok(hit(&|(s, d, _)| {
            d == digest
                && ImageRef::parse(s)
                    .is_ok_and(|x| x.registry == r.registry && x.repository == r.repository)
        }));
    }
    let want = r.to_string();
    Ok(hit(&|(s, _, _)| *s == want))
}

/// The image an `ImageSpec` names: INVALID_ARGUMENT naming `image.image` when empty.
fn image_of(spec: Option<cri::ImageSpec>) -> Result<String, Status> {
    spec.map(|i| i.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Status::invalid_argument("image.image: is empty"))
}

/// Every stored image as the CRI lists it: one per manifest digest, its references as
/// tags.
fn images(cri: &Cri) -> Vec<cri::Image> {
    let mut by_digest: std::collections::BTreeMap<String, cri::Image> = Default::default();
    for (reference, digest, size) in stored(cri) {
        let e = by_digest
            .entry(digest.clone())
            .or_insert_with(|| cri::Image {
                id: digest.clone(),
                size,
                ..Default::default()
            });
        e.repo_tags.push(reference.clone());
        let rd = repo_digest(&reference, &digest);
        if !e.repo_digests.contains(&rd) {
            e.repo_digests.push(rd);
        }
    }
    by_digest.into_values().collect()
}

#[tonic::async_trait]
impl ImageService for CriImages {
    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let cri = &self.0;
        // Authorized as Images/List is (the grant's registries only).
        let visible = visible(cri).await?;
        let want = r
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let want = match want {
            Some(w) => Some(resolve(cri, &visible, &w)?.map(|(s, _)| s)),
            None => None,
        };
        let images = images(cri)
            .into_iter()
            .filter_map(|mut i| {
                i.repo_tags.retain(|t| visible.contains(t));
                if i.repo_tags.is_empty() {
                    return None;
                }
                match &want {
                    None => Some(i),
                    Some(Some(w)) if i.repo_tags.contains(w) => Some(i),
                    Some(_) => None,
                }
            })
            .collect();
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let cri = &self.0;
        let image = image_of(r.into_inner().image)?;
        // Not stored is an empty answer, not an error (kubelet then pulls).
        let visible = visible(cri).await?;
        let found = resolve(cri, &visible, &image)?.and_then(|(reference, _)| {
            images(cri)
                .into_iter()
                .find(|i| i.repo_tags.contains(&reference))
                .map(|mut i| {
                    i.repo_tags.retain(|t| visible.contains(t));
                    i
                })
        });
        Ok(Response::new(cri::ImageStatusResponse {
            image: found,
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        r: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let cri = &self.0;
        let m = r.into_inner();
        let image = image_of(m.image)?;
        if let Some(a) = &m.auth
            && !(a.username.is_empty()
                && a.password.is_empty()
                && a.auth.is_empty()
                && a.identity_token.is_empty()
                && a.registry_token.is_empty())
        {
            return Err(Status::invalid_argument(
                "auth: credentials per pull are not supported: give auraed the registry's \
                 credentials in its configuration",
            ));
        }
        let reference = ImageRef::parse(&image)
            .map_err(|e| Status::invalid_argument(format!("image.image: {e}")))?
            .to_string();
        let mut progress = cri
            .images
            .pull(cri.call(
                svc::IMAGES,
                "Pull",
                pb::PullImageRequest {
                    image: reference.clone(),
                },
            )?)
            .await?
            .into_inner();
        let mut done = None;
        while let Some(p) = progress.next().await {
            if let Some(i) = p?.image {
                done = Some(i);
            }
        }
        let info = done.ok_or_else(|| {
            Status::internal(format!(
                "pulling {reference}: the pull ended without an image"
            ))
        })?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: info.digest,
        }))
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let cri = &self.0;
        let image = image_of(r.into_inner().image)?;
        // An id or a digest removes every reference to that image; removing what is not
        // stored succeeds (kubelet's garbage collection retries).
        let visible = visible(cri).await?;
        let Some((reference, digest)) = resolve(cri, &visible, &image)? else {
            return Ok(Response::new(cri::RemoveImageResponse {}));
        };
        // A tag removes that reference; an id or a digest every reference to the image.
        let by_tag = !image.starts_with("sha256:")
            && ImageRef::parse(&image).is_ok_and(|r| r.digest.is_none());
        let all: Vec<String> = if by_tag {
            vec![reference]
        } else {
            stored(cri)
                .into_iter()
                .filter(|(s, d, _)| *d == digest && visible.contains(s))
                .map(|(s, _, _)| s)
                .collect()
        };
        for reference in all {
            let req = cri.call(
                svc::IMAGES,
                "Remove",
                pb::RemoveImageRequest { image: reference },
            )?;
            match cri.images.remove(req).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _r: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let dir = self.0.images_dir.clone();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || usage(&dir))
            .await
            .map_err(|e| Status::internal(format!("ImageFsInfo: {e}")))?;
        let fs = cri::FilesystemUsage {
            timestamp: now_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.0.images_dir.to_string_lossy().into_owned(),
            }),
            used_bytes: Some(cri::UInt64Value { value: bytes }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![fs],
        }))
    }
}

/// Bytes (allocated) and inodes under `dir`, not following links nor leaving its
/// filesystem.
fn usage(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = top.dev();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    (bytes, inodes)
}
