//! `Runtime`: the seed's five RPCs. Each authorizes, converts, calls, maps the error.

use aurae_proto::runtime::v0::{self as pb, runtime_server::Runtime};
use tonic::{Request, Response, Status};

use super::{
    Context,
    authz::Caller,
    status::{Capability, invalid, not_built},
};
use crate::{
    cell::CellSpec, executable::ExecutableSpec, instance::InstanceSpec, pod::PodSpec, vm::VmSpec,
};

#[derive(Debug, Clone)]
pub struct RuntimeApi {
    ctx: Context,
}

impl RuntimeApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

/// Privileged options of a cell: sharing host namespaces, running as uid 0.
fn authorize_cell(caller: &Caller, spec: &CellSpec) -> Result<(), Status> {
    let name = spec.name.as_str();
    caller.authorize_name(name)?;
    caller.authorize_privilege(
        !spec.namespaces.shares_host() || caller.grant.allow_host_namespaces,
        "share a host namespace",
        name,
    )?;
    let uid0 = spec.container.as_ref().is_some_and(|c| c.uid == Some(0));
    caller.authorize_privilege(!uid0 || caller.grant.allow_uid_zero, "run as uid 0", name)
}

#[tonic::async_trait]
impl Runtime for RuntimeApi {
    async fn run_executable(
        &self,
        req: Request<pb::Executable>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = ExecutableSpec::try_from(req.into_inner()).map_err(invalid)?;
        caller.authorize_name(spec.cell.as_str())?;
        // No uid means root: it needs the same grant as asking for uid 0.
        caller.authorize_privilege(
            spec.uid.unwrap_or(0) != 0 || caller.grant.allow_uid_zero,
            "run as uid 0 (pass a non-zero uid)",
            spec.cell.as_str(),
        )?;
        Ok(Response::new(self.ctx.cells.run(spec).await?))
    }

    async fn run_cell(&self, req: Request<pb::Cell>) -> Result<Response<pb::CellStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = CellSpec::parse(req.into_inner(), true, self.ctx.cpus).map_err(invalid)?;
        authorize_cell(&caller, &spec)?;
        Err(not_built(&caller.method, Capability::Images))
    }

    async fn run_virtual_machine(
        &self,
        req: Request<pb::VirtualMachine>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = VmSpec::try_from(req.into_inner()).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        Err(not_built(&caller.method, Capability::VirtualMachines))
    }

    async fn spawn(
        &self,
        req: Request<pb::Instance>,
    ) -> Result<Response<pb::InstanceStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = InstanceSpec::parse("", req.into_inner(), None).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        Err(not_built(&caller.method, Capability::Instances))
    }

    async fn run_pod(&self, req: Request<pb::Pod>) -> Result<Response<pb::PodStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = PodSpec::parse(req.into_inner(), self.ctx.cpus).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        caller.authorize_privilege(
            spec.container.uid != Some(0) || caller.grant.allow_uid_zero,
            "run as uid 0",
            spec.name.as_str(),
        )?;
        Err(not_built(&caller.method, Capability::Pods))
    }
}
