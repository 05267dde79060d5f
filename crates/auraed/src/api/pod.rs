//! `Pods`: lifecycle of the pods `RunPod` made, their usage on both levels and their
//! container's output (from the instance).

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, pods_server::Pods as PodsService};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{
    convert,
    shared::{ResponseStream, authorized, grace, timeout, visible},
    status::invalid,
};
use crate::{
    pod::{Pod, Pods},
    spec::Label,
};

#[derive(Debug, Clone)]
pub struct PodsApi {
    pods: Arc<Pods>,
}

impl PodsApi {
    pub fn new(pods: Arc<Pods>) -> Self {
        Self { pods }
    }

    /// Validates and authorizes a pod's name, and finds it.
    fn find<T>(&self, r: &Request<T>, name: &str) -> Result<Arc<Pod>, Status> {
        let (_, name) = authorized(r, Label::parse("name", name), Label::as_str)?;
        Ok(self.pods.find(&name)?)
    }
}

#[tonic::async_trait]
impl PodsService for PodsApi {
    async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<pb::PodStatus>, Status> {
        let pod = self.find(&r, &r.get_ref().name)?;
        let usage = self.pods.usage(&pod).await;
        Ok(Response::new(convert::pod(&pod, Some(&usage))))
    }

    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListPodsResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        // No call into every instance: a list shows the pods as this auraed knows them.
        Ok(Response::new(pb::ListPodsResponse {
            pods: self
                .pods
                .list(show)
                .iter()
                .map(|p| convert::pod(p, None))
                .collect(),
        }))
    }

    async fn stop(&self, r: Request<pb::StopRequest>) -> Result<Response<pb::PodStatus>, Status> {
        let g = grace("grace_period", r.get_ref().grace_period.as_ref()).map_err(invalid)?;
        let pod = self.find(&r, &r.get_ref().name)?;
        let pod = self.pods.stop(&pod.name, g).await?;
        Ok(Response::new(convert::pod(&pod, None)))
    }

    async fn wait(&self, r: Request<pb::WaitRequest>) -> Result<Response<pb::PodStatus>, Status> {
        let t = timeout(r.get_ref().timeout.as_ref())?;
        let pod = self.find(&r, &r.get_ref().name)?;
        if pod.wait(t).await {
            Ok(Response::new(convert::pod(&pod, None)))
        } else {
            Err(Status::deadline_exceeded(format!(
                "pod {} is still running",
                pod.name
            )))
        }
    }

    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        let pod = self.find(&r, &r.get_ref().name)?;
        self.pods.free(&pod.name).await?;
        Ok(Response::new(pb::Freed {
            name: pod.name.to_string(),
        }))
    }

    type LogsStream = ResponseStream<pb::LogChunk>;

    async fn logs(
        &self,
        r: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let pod = self.find(&r, &r.get_ref().name)?;
        let m = r.into_inner();
        let s = self.pods.logs(&pod, m.follow, m.from_offset).await?;
        // The instance's chunks as they come; its error (if any) ends the stream.
        Ok(Response::new(Box::pin(s.map(|c| {
            c.map_err(|e| Status::new(e.code(), format!("the pod's instance: {}", e.message())))
        }))))
    }
}
