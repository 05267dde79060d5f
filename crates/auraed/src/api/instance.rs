//! `Instances`: lifecycle of the instances `Spawn` started, and their SVID renewals.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, instances_server::Instances as InstancesService};
use tonic::{Request, Response, Status};

use super::{
    authz::Caller,
    convert,
    shared::{authorized, grace, timeout, visible},
    status::invalid,
};
use crate::{
    instance::{Instance, Instances},
    spec::Label,
};

#[derive(Debug, Clone)]
pub struct InstancesApi {
    instances: Arc<Instances>,
}

impl InstancesApi {
    pub fn new(instances: Arc<Instances>) -> Self {
        Self { instances }
    }

    /// Validates and authorizes an instance's name, and finds it.
    fn find<T>(&self, r: &Request<T>, name: &str) -> Result<Arc<Instance>, Status> {
        let (_, name) = authorized(r, Label::parse("name", name), Label::as_str)?;
        Ok(self.instances.find(&name)?)
    }
}

#[tonic::async_trait]
impl InstancesService for InstancesApi {
    async fn get(&self, r: Request<pb::NameRef>) -> Result<Response<pb::InstanceStatus>, Status> {
        Ok(Response::new(convert::instance(
            self.find(&r, &r.get_ref().name)?.as_ref(),
        )))
    }
    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        let instances = self.instances.list(show);
        Ok(Response::new(pb::ListInstancesResponse {
            instances: instances.iter().map(|i| convert::instance(i)).collect(),
        }))
    }
    async fn stop(
        &self,
        r: Request<pb::StopRequest>,
    ) -> Result<Response<pb::InstanceStatus>, Status> {
        let g = grace("grace_period", r.get_ref().grace_period.as_ref()).map_err(invalid)?;
        let inst = self.find(&r, &r.get_ref().name)?;
        Ok(Response::new(convert::instance(
            self.instances.stop(&inst.spec.name, g).await?.as_ref(),
        )))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::InstanceStatus>, Status> {
        let inst = self.find(&r, &r.get_ref().name)?;
        if inst.wait(timeout(r.get_ref().timeout.as_ref())?).await {
            Ok(Response::new(convert::instance(&inst)))
        } else {
            Err(Status::deadline_exceeded(format!(
                "instance {} is still running",
                inst.spec.name
            )))
        }
    }
    async fn free(&self, r: Request<pb::NameRef>) -> Result<Response<pb::Freed>, Status> {
        let inst = self.find(&r, &r.get_ref().name)?;
        self.instances.free(&inst.spec.name).await?;
        Ok(Response::new(pb::Freed {
            name: inst.spec.name.to_string(),
        }))
    }
    async fn renew(
        &self,
        r: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = Caller::of(&r)?;
        let m = r.into_inner();
        if m.csr_pem.is_empty() {
            return Err(Status::invalid_argument("csr_pem: is missing"));
        }
        if m.signer_csr_pem.is_empty() {
            return Err(Status::invalid_argument("signer_csr_pem: is missing"));
        }
        let (cert, signer, expires) =
            self.instances
                .renew(&caller.id, &m.csr_pem, &m.signer_csr_pem)?;
        Ok(Response::new(pb::RenewResponse {
            cert_chain_pem: cert,
            signer_chain_pem: signer,
            expires_at: Some(expires.into()),
        }))
    }
    async fn list_templates(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListInstanceTemplatesResponse>, Status> {
        let show = visible(&r, "name_prefix", &r.get_ref().name_prefix)?;
        let t = self.instances.templates();
        let templates = t
            .list(|i| t.is_current(i))
            .into_iter()
            .filter(|t| show(&t.info.name))
            .map(|t| pb::InstanceTemplate {
                name: t.info.name,
                vcpus: t.info.vcpus,
                memory_bytes: t.info.memory_bytes,
                created_at: Some(
                    (std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.info.created_unix_s))
                        .into(),
                ),
                state_bytes: t.info.state_bytes,
                memory_disk_bytes: t.memory_disk_bytes,
                current: t.current,
                build_time: prost_types::Duration::try_from(std::time::Duration::from_nanos(
                    t.info.took_ns,
                ))
                .ok(),
            })
            .collect();
        Ok(Response::new(pb::ListInstanceTemplatesResponse {
            templates,
        }))
    }
    async fn remove_template(
        &self,
        r: Request<pb::NameRef>,
    ) -> Result<Response<pb::Freed>, Status> {
        let (_, name) = authorized(&r, Label::parse("name", &r.get_ref().name), Label::as_str)?;
        let t = self.instances.templates();
        let _one = t.building.lock().await;
        t.remove(&name)?;
        tracing::info!(template = %name, "instance template removed");
        Ok(Response::new(pb::Freed {
            name: name.to_string(),
        }))
    }
}
