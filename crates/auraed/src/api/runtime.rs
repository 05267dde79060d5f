//! `Runtime`: the seed's five RPCs. Each authorizes, converts, calls, maps the error.

use aurae_proto::runtime::v0::{self as pb, runtime_server::Runtime};
use tonic::{Request, Response, Status};

use super::{
    Context,
    authz::Caller,
    status::{Capability, invalid, not_built},
};
use crate::{
    cell::{CellSpec, ContainerSpec},
    container::Plan,
    executable::ExecutableSpec,
    instance::InstanceSpec,
    pod::PodSpec,
    spec::Label,
    vm::VmSpec,
};

#[derive(Debug, Clone)]
pub struct RuntimeApi {
    ctx: Context,
}

impl RuntimeApi {
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }

    /// The image (pulled if the store lacks it) and the container's process and volumes.
    async fn plan(&self, c: &ContainerSpec) -> Result<Plan, Status> {
        let r = super::image::parse("container.image", &c.image)?;
        let (image, pulled) = crate::image::local::ensure(&self.ctx.puller, &r).await?;
        if pulled {
            tracing::info!(image = %r, digest = %image.digest, "pulled for a container");
        }
        let store = self.ctx.puller.store.clone();
        let roots = self.ctx.volume_roots.clone();
        let c = c.clone();
        // Reads /etc/passwd from the layers and resolves volume paths: blocking I/O.
        tokio::task::spawn_blocking(move || Plan::new(&c, image, &store, &roots))
            .await
            .map_err(|e| Status::internal(format!("container plan: {e}")))?
            .map_err(Status::from)
    }
}

/// No uid means root: it needs the same grant as asking for uid 0.
fn authorize_uid(caller: &Caller, uid: Option<u32>, name: &str) -> Result<(), Status> {
    caller.authorize_privilege(
        uid.unwrap_or(0) != 0 || caller.grant.allow_uid_zero,
        "run as uid 0 (pass a non-zero uid)",
        name,
    )
}

/// The container's executable name in a RunCell cell: the image's last path component.
fn container_name(image: &str) -> Label {
    let base: String = image
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .split([':', '@'])
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    Label::parse("name", base.trim_matches('-'))
        .or_else(|_| Label::parse("name", "container"))
        .unwrap_or_else(|_| unreachable_label())
}

#[allow(clippy::panic)]
fn unreachable_label() -> Label {
    // "container" is a valid label; this is never reached.
    panic!("\"container\" is not a label")
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
        let mut spec = ExecutableSpec::try_from(req.into_inner()).map_err(invalid)?;
        caller.authorize_name(spec.cell.as_str())?;
        let plan = match &spec.container {
            Some(c) => Some(self.plan(c).await?),
            None => None,
        };
        if let Some(p) = &plan {
            p.apply(&mut spec);
        }
        authorize_uid(&caller, spec.uid, spec.cell.as_str())?;
        Ok(Response::new(self.ctx.cells.run(spec, plan).await?))
    }

    async fn run_cell(&self, req: Request<pb::Cell>) -> Result<Response<pb::CellStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = CellSpec::parse(req.into_inner(), true, self.ctx.cpus).map_err(invalid)?;
        authorize_cell(&caller, &spec)?;
        let Some(container) = spec.container.clone() else {
            return Err(Status::invalid_argument("container: is missing"));
        };
        let t0 = std::time::Instant::now();
        let plan = self.plan(&container).await?;
        let t_plan = t0.elapsed();
        authorize_uid(&caller, Some(plan.process.uid), spec.name.as_str())?;
        let name = spec.name.clone();
        let mut exe = ExecutableSpec {
            cell: name.clone(),
            name: Some(container_name(&container.image)),
            argv: Vec::new(),
            env: Vec::new(),
            working_dir: "/".into(),
            uid: None,
            gid: None,
            stdin: Vec::new(),
            container: Some(container),
        };
        plan.apply(&mut exe);
        self.ctx.cells.allocate(spec).await?;
        let t_alloc = t0.elapsed();
        if let Err(e) = self.ctx.cells.run(exe, Some(plan)).await {
            // Nothing stays behind from a container that could not start.
            if let Err(free) = self.ctx.cells.free(&name).await {
                tracing::warn!(cell = %name, "freeing after a failed RunCell: {free}");
            }
            return Err(e.into());
        }
        tracing::debug!(
            cell = %name,
            plan_us = t_plan.as_micros() as u64,
            allocate_us = (t_alloc - t_plan).as_micros() as u64,
            start_us = (t0.elapsed() - t_alloc).as_micros() as u64,
            "RunCell timings"
        );
        Ok(Response::new(self.ctx.cells.get(&name)?))
    }

    async fn run_virtual_machine(
        &self,
        req: Request<pb::VirtualMachine>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = VmSpec::try_from(req.into_inner()).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        Ok(Response::new(self.ctx.vms.run(spec).await?))
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
