//! `Instances`: lifecycle of spawned instances. Not built yet: every verb validates its
//! request and checks the name against the grant, then answers `UNIMPLEMENTED`.

use aurae_proto::runtime::v0::{self as pb, instances_server::Instances};

use super::{shared::not_built_lifecycle, status::Capability};

#[derive(Debug, Clone, Default)]
pub struct InstancesApi;

not_built_lifecycle!(
    InstancesApi,
    Instances,
    pb::InstanceStatus,
    pb::ListInstancesResponse,
    Capability::Instances,
    {}
);

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::{super::shared::test_support::request_as, *};

    async fn stop(name: &str, seconds: Option<i64>) -> tonic::Status {
        let grace_period = seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 });
        let m = pb::StopRequest {
            name: name.into(),
            grace_period,
        };
        let r = request_as("aurae.runtime.v0.Instances/Stop", &["team-a"], m);
        InstancesApi.stop(r).await.err().unwrap()
    }

    #[tokio::test]
    async fn a_verb_checks_first_then_answers_unimplemented() {
        assert_eq!(stop("team-a", Some(-1)).await.code(), Code::InvalidArgument);
        assert_eq!(stop("team-b", Some(1)).await.code(), Code::PermissionDenied);
        let e = stop("team-a", None).await;
        assert_eq!(e.code(), Code::Unimplemented);
        assert!(e.message().contains("Instances/Stop"), "{}", e.message());
        assert!(e.message().contains("(Spawn)"), "{}", e.message());
    }
}
