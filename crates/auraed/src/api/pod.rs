//! `Pods`: lifecycle of pods and their logs. Not built yet: every verb validates its
//! request and checks the name against the grant, then answers `UNIMPLEMENTED`.

use aurae_proto::runtime::v0::{self as pb, pods_server::Pods};
use tonic::{Request, Response, Status};

use super::{
    shared::{ResponseStream, named, not_built_lifecycle},
    status::Capability,
};

#[derive(Debug, Clone, Default)]
pub struct PodsApi;

not_built_lifecycle!(
    PodsApi,
    Pods,
    pb::PodStatus,
    pb::ListPodsResponse,
    Capability::Pods,
    {
        type LogsStream = ResponseStream<pb::LogChunk>;
        async fn logs(
            &self,
            r: Request<pb::LogsRequest>,
        ) -> Result<Response<Self::LogsStream>, Status> {
            Err(named(&r, &r.get_ref().name, Capability::Pods))
        }
    }
);

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::{super::shared::test_support::request_as, *};

    #[tokio::test]
    async fn logs_and_lists_are_checked_then_unimplemented() {
        let logs = |name: &str| pb::LogsRequest {
            name: name.into(),
            ..Default::default()
        };
        let method = "aurae.runtime.v0.Pods/Logs";
        let api = PodsApi;
        let answer = |name| api.logs(request_as(method, &["web"], logs(name)));
        assert_eq!(
            answer("").await.err().map(|e| e.code()),
            Some(Code::InvalidArgument)
        );
        let e = answer("web").await.err().unwrap();
        assert_eq!(e.code(), Code::Unimplemented);
        assert!(e.message().contains("pods (RunPod)"), "{}", e.message());
        let list = |p: &str| pb::ListRequest {
            name_prefix: p.into(),
        };
        let r = request_as("aurae.runtime.v0.Pods/List", &["web"], list("Web"));
        let e = api.list(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("name_prefix"), "{}", e.message());
    }
}
