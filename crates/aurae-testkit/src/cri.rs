//! Clients of auraed's Kubernetes CRI (`--cri-socket`): plain gRPC over the Unix socket,
//! as kubelet connects.

use std::path::Path;

use aurae_proto::cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// The CRI's runtime and image clients on one connection to the socket at `path`.
pub async fn clients(
    path: &Path,
) -> anyhow::Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
    let path = path.to_owned();
    let ch = tonic::transport::Endpoint::from_static("http://cri.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await?;
    Ok((
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    ))
}
