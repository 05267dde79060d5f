//! `Runtime`: the seed's five RPCs. Each authorizes, converts, calls, maps the error.

use aurae_proto::runtime::v0::{self as pb, runtime_server::Runtime};
use tonic::{Request, Response, Status};

use super::{Context, authz::Caller, convert, quota::Demand, shared::run_options, status::invalid};
use crate::{
    cell::CellSpec,
    compose::{
        run_cell::Workload,
        run_to_end::{self, RunOptions},
    },
    container::{ContainerSpec, Plan},
    executable::ExecutableSpec,
    instance::InstanceSpec,
    pod::PodSpec,
    spec::FieldError,
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
    /// Every cheap check is done before this: it may reach a registry.
    pub(crate) async fn plan(&self, caller: &Caller, c: &ContainerSpec) -> Result<Plan, Status> {
        // Volumes against the grant, by their names alone: before anything is opened
        // (a caller learns nothing of paths it may not use) or pulled.
        for (i, (host, _, _)) in c.volumes.iter().enumerate() {
            let field = format!("container.volumes[{i}].host_path");
            let u = crate::workload::host_path::under_root(
                &field,
                host,
                &self.ctx.volume_roots,
                "--volume-root",
            )
            .map_err(Status::from)?;
            caller.authorize_privilege(
                u.rels.iter().all(|rel| caller.grant.allows_volume(rel)),
                &format!(
                    "mount {field} {} (outside the volumes its grant allows)",
                    host.display()
                ),
                &host.display().to_string(),
            )?;
        }
        let r = super::image::parse("container.image", &c.image)?;
        authorize_image(caller, &r)?;
        let (image, pulled) = crate::image::local::ensure(&self.ctx.puller, &r).await?;
        if pulled {
            tracing::info!(peer_id = %caller.id, image = %r, digest = %image.digest, "pulled for a container");
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

impl RuntimeApi {
    /// RunCell of a plain process (`Cell.executable`): the cell's checks, the process's
    /// (its ids against the grant), one quota admission for both.
    async fn run_cell_process(
        &self,
        caller: &Caller,
        spec: CellSpec,
        name: &str,
        e: pb::Executable,
        run: RunOptions,
    ) -> Result<Response<pb::CellStatus>, Status> {
        let within = |f: FieldError| FieldError::new(format!("executable.{}", f.field), f.reason);
        if !(e.cell.is_empty() || e.cell == name) {
            return Err(invalid(FieldError::new(
                "executable.cell",
                format!("must be empty or this cell's name {name:?}"),
            )));
        }
        for (field, given) in [
            ("executable.container", e.container.is_some()),
            ("executable.run", e.run.is_some()),
        ] {
            if given {
                return Err(invalid(FieldError::new(
                    field,
                    "must be unset: use the cell's container and run",
                )));
            }
        }
        let exe = ExecutableSpec::try_from(pb::Executable {
            cell: name.to_owned(),
            ..e
        })
        .map_err(|f| invalid(within(f)))?;
        caller.authorize_privilege(
            !spec.devices.kvm || caller.grant.allow_kvm,
            "open /dev/kvm (devices.kvm needs allow_kvm)",
            spec.name.as_str(),
        )?;
        authorize_ids(caller, exe.uid, exe.gid, spec.name.as_str())?;
        if self.ctx.cells.get(&spec.name).is_ok() {
            return Err(Status::already_exists(format!(
                "cell {:?} already exists",
                spec.name.as_str()
            )));
        }
        let mut demand = Demand::cell(caller, &spec);
        demand.executables = 1;
        let admitted = self.ctx.quotas.admit(caller, demand).await?;
        let options = run_cell_options(caller);
        let started = run_to_end::run_cell(
            &self.ctx.cells,
            spec,
            Workload::Process(exe),
            options,
            run,
            admitted,
        )
        .await?;
        finish_run_cell(started, run)
    }
}

/// The reply to RunCell once its workload started: at once, or (`run.wait`) once it
/// ended and (`run.remove`) the cell is freed.
fn finish_run_cell(
    (cell, exe, ended): (
        std::sync::Arc<crate::cell::Cell>,
        std::sync::Arc<crate::executable::Executable>,
        run_to_end::Ended,
    ),
    run: RunOptions,
) -> Result<Response<pb::CellStatus>, Status> {
    timed_out(&exe, run, ended)?;
    let mut status = convert::cell(&cell);
    if run.wait && run.output {
        for s in status
            .executables
            .iter_mut()
            .filter(|s| s.name == exe.name.as_str())
        {
            s.output = convert::output(&exe);
        }
    }
    Ok(Response::new(status))
}

/// What the caller's grant allows RunCell's workload (never from the request).
fn run_cell_options(caller: &Caller) -> crate::compose::run_cell::Options {
    crate::compose::run_cell::Options {
        allow_new_privileges: caller.grant.allow_new_privileges,
        allow_mixed_cell: caller.grant.allow_host_namespaces,
        free_on_exit: None,
    }
}

/// DEADLINE_EXCEEDED naming run.timeout when a run call's wait ran out.
fn timed_out(
    exe: &crate::executable::Executable,
    run: RunOptions,
    ended: run_to_end::Ended,
) -> Result<(), Status> {
    match ended {
        run_to_end::Ended::Done => Ok(()),
        run_to_end::Ended::TimedOut(t) => Err(Status::deadline_exceeded(format!(
            "run.timeout: {}/{} is still running after {} ms; it keeps running{}",
            exe.cell,
            exe.name,
            t.as_millis(),
            if run.remove {
                " and is freed when it ends (run.remove)"
            } else {
                ""
            }
        ))),
    }
}

/// The ids a workload will actually run as, against the grant: no uid means root, no
/// gid means the uid's number (as the spawn does).
pub(crate) fn authorize_ids(
    caller: &Caller,
    uid: Option<u32>,
    gid: Option<u32>,
    name: &str,
) -> Result<(), Status> {
    let uid = uid.unwrap_or(0);
    let gid = gid.unwrap_or(uid);
    caller.authorize_privilege(
        caller.grant.allows_uid(uid),
        &format!(
            "run as uid {uid} (outside the uids its grant allows; uid 0 needs allow_uid_zero)"
        ),
        name,
    )?;
    caller.authorize_privilege(
        caller.grant.allows_gid(gid),
        &format!(
            "run as gid {gid} (outside the gids its grant allows; gid 0 needs allow_uid_zero)"
        ),
        name,
    )
}

/// Images come only from the registries (and repositories) the grant lists; checked
/// before any network I/O, and for images already in the store too.
pub(super) fn authorize_image(
    caller: &Caller,
    r: &crate::image::reference::ImageRef,
) -> Result<(), Status> {
    caller.authorize_privilege(
        caller.grant.allows_registry(&r.registry, &r.repository),
        &format!(
            "use images from {}/{} (outside the registries its grant allows)",
            r.registry, r.repository
        ),
        &r.to_string(),
    )
}

/// Options of an executable that come from the grant, never from the request.
fn grant_options(caller: &Caller, spec: &mut ExecutableSpec) {
    spec.allow_new_privileges = caller.grant.allow_new_privileges
        && !spec.container.as_ref().is_some_and(|c| c.no_new_privileges);
    spec.allow_mixed_cell = caller.grant.allow_host_namespaces;
}

/// Privileged options of a cell: sharing host namespaces, the container's explicit ids.
fn authorize_cell(caller: &Caller, spec: &CellSpec) -> Result<(), Status> {
    let name = spec.name.as_str();
    caller.authorize_name(name)?;
    caller.authorize_privilege(
        !spec.namespaces.shares_host() || caller.grant.allow_host_namespaces,
        "share a host namespace",
        name,
    )?;
    if let Some(c) = &spec.container
        && (c.uid.is_some() || c.gid.is_some())
    {
        authorize_ids(caller, c.uid, c.gid.or(c.uid), name)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Runtime for RuntimeApi {
    async fn run_executable(
        &self,
        req: Request<pb::Executable>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let caller = Caller::of(&req)?;
        let mut m = req.into_inner();
        let run = run_options(m.run.take().as_ref()).map_err(invalid)?;
        let mut spec = ExecutableSpec::try_from(m).map_err(invalid)?;
        caller.authorize_name(spec.cell.as_str())?;
        grant_options(&caller, &mut spec);
        // Cheap checks first: ids asked for explicitly, the cell, the quota; only then
        // the image (which may reach a registry).
        if let Some(c) = &spec.container
            && (c.uid.is_some() || c.gid.is_some())
        {
            authorize_ids(&caller, c.uid, c.gid.or(c.uid), spec.cell.as_str())?;
        }
        if spec.container.is_none() {
            authorize_ids(&caller, spec.uid, spec.gid, spec.cell.as_str())?;
        }
        self.ctx.cells.get(&spec.cell).map_err(|_| {
            Status::not_found(format!(
                "cell {:?} does not exist: allocate it first",
                spec.cell.as_str()
            ))
        })?;
        // Checked before the pull (cheap) and again, held, until the start.
        drop(self.ctx.quotas.admit(&caller, Demand::executable()).await?);
        let plan = match &spec.container {
            Some(c) => Some(self.plan(&caller, c).await?),
            None => None,
        };
        let admitted = self.ctx.quotas.admit(&caller, Demand::executable()).await?;
        if let Some(p) = &plan {
            spec.apply_plan(p);
        }
        // What the process will really run as (the image's user included).
        authorize_ids(&caller, spec.uid, spec.gid, spec.cell.as_str())?;
        let (exe, ended) =
            run_to_end::run_executable(&self.ctx.cells, spec, plan, run, admitted).await?;
        timed_out(&exe, run, ended)?;
        let mut status = convert::executable(&exe);
        if run.wait && run.output {
            status.output = convert::output(&exe);
        }
        Ok(Response::new(status))
    }

    async fn run_cell(&self, req: Request<pb::Cell>) -> Result<Response<pb::CellStatus>, Status> {
        let caller = Caller::of(&req)?;
        let mut m = req.into_inner();
        let run = run_options(m.run.take().as_ref()).map_err(invalid)?;
        let plain = m.executable.take();
        if plain.is_some() && m.container.is_some() {
            return Err(invalid(FieldError::new(
                "executable",
                "give a container or a plain executable, not both",
            )));
        }
        let name = m.name.clone();
        let spec = CellSpec::parse(m, plain.is_none(), self.ctx.cpus).map_err(invalid)?;
        authorize_cell(&caller, &spec)?;
        if let Some(e) = plain {
            return self.run_cell_process(&caller, spec, &name, e, run).await;
        }
        let Some(container) = spec.container.clone() else {
            return Err(Status::invalid_argument("container: is missing"));
        };
        if self.ctx.cells.get(&spec.name).is_ok() {
            return Err(Status::already_exists(format!(
                "cell {:?} already exists",
                spec.name.as_str()
            )));
        }
        let mut demand = Demand::cell(&caller, &spec);
        demand.executables = 1;
        // Checked before the pull (cheap) and again, held, until the start.
        drop(self.ctx.quotas.admit(&caller, demand).await?);
        let t0 = std::time::Instant::now();
        let plan = self.plan(&caller, &container).await?;
        let t_plan = t0.elapsed();
        let admitted = self.ctx.quotas.admit(&caller, demand).await?;
        authorize_ids(
            &caller,
            Some(plan.process.uid),
            Some(plan.process.gid),
            spec.name.as_str(),
        )?;
        let options = run_cell_options(&caller);
        let started = run_to_end::run_cell(
            &self.ctx.cells,
            spec,
            Workload::Container(container, Box::new(plan)),
            options,
            run,
            admitted,
        )
        .await?;
        tracing::debug!(plan_us = t_plan.as_micros() as u64, "RunCell plan timing");
        finish_run_cell(started, run)
    }

    async fn run_virtual_machine(
        &self,
        req: Request<pb::VirtualMachine>,
    ) -> Result<Response<pb::VirtualMachineStatus>, Status> {
        let caller = Caller::of(&req)?;
        let mut spec = VmSpec::try_from(req.into_inner()).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        // A snapshot holds its VM's memory: restoring one is authorized by its name like a
        // VM's, and its size counts against the caller's quota like a booted VM's.
        if let Some(snap) = spec.snapshot.clone() {
            caller.authorize_name(snap.as_str())?;
            let info = self.ctx.vms.snapshots()?.info(&snap)?;
            spec = spec.restoring(&info).map_err(invalid)?;
        }
        // Every host file a VM uses (kernel, initramfs, drives) must lie under the grant's
        // volumes (relative to its image root): another tenant's disk is not readable
        // through a read-only drive. A writable drive also needs allow_writable_drives.
        // Checked by name before anything is opened.
        let kernel = spec
            .snapshot
            .is_none()
            .then(|| ("kernel_path".to_owned(), &spec.kernel, false));
        let files = kernel
            .into_iter()
            .chain(
                spec.initramfs
                    .iter()
                    .map(|p| ("initramfs_path".to_owned(), p, false)),
            )
            .chain(
                spec.drives
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (format!("drives[{i}].path"), &d.path, d.writable)),
            );
        for (field, path, writable) in files {
            if writable {
                caller.authorize_privilege(
                    caller.grant.allow_writable_drives,
                    &format!(
                        "attach {field} {} writable (needs allow_writable_drives)",
                        path.display()
                    ),
                    spec.name.as_str(),
                )?;
            }
            let u = crate::workload::host_path::under_root(
                &field,
                path,
                self.ctx.vms.image_roots(),
                crate::vm::IMAGE_ROOT_FLAG,
            )
            .map_err(Status::from)?;
            caller.authorize_privilege(
                u.rels.iter().all(|rel| caller.grant.allows_volume(rel)),
                &format!(
                    "use {field} {} (outside the volumes its grant allows)",
                    path.display()
                ),
                spec.name.as_str(),
            )?;
        }
        let demand = Demand {
            vms: 1,
            memory_bytes: Some(spec.memory_bytes),
            ..Demand::default()
        };
        let admitted = self.ctx.quotas.admit(&caller, demand).await?;
        let status = self.ctx.vms.run(spec).await?;
        drop(admitted);
        Ok(Response::new(convert::vm(&status)))
    }

    async fn spawn(
        &self,
        req: Request<pb::Instance>,
    ) -> Result<Response<pb::InstanceStatus>, Status> {
        let caller = Caller::of(&req)?;
        let spec = InstanceSpec::parse("", req.into_inner(), None).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        if spec.kernel.is_some() || spec.initramfs.is_some() {
            return Err(Status::invalid_argument(
                "kernel_path: an instance boots the kernel its parent was configured with \
                 (--instance-kernel); a request cannot choose another",
            ));
        }
        // A pod's instance takes the pod's name: one being made or freed holds it.
        if self.ctx.pods.holds(&spec.name) {
            return Err(Status::already_exists(format!(
                "name: a pod named {:?} exists (its instance takes that name)",
                spec.name.as_str()
            )));
        }
        let demand = Demand {
            instances: 1,
            memory_bytes: Some(spec.memory_bytes),
            ..Demand::default()
        };
        let admitted = self.ctx.quotas.admit(&caller, demand).await?;
        let inst = self
            .ctx
            .instances
            .spawn(spec, (&caller.id, &caller.grant), admitted)
            .await?;
        Ok(Response::new(convert::instance(&inst)))
    }

    async fn run_pod(&self, req: Request<pb::Pod>) -> Result<Response<pb::PodStatus>, Status> {
        let caller = Caller::of(&req)?;
        let mut spec = PodSpec::parse(req.into_inner(), self.ctx.cpus).map_err(invalid)?;
        caller.authorize_name(spec.name.as_str())?;
        if spec.container.uid.is_some() || spec.container.gid.is_some() {
            authorize_ids(
                &caller,
                spec.container.uid,
                spec.container.gid.or(spec.container.uid),
                spec.name.as_str(),
            )?;
        }
        // A pod is an instance here: counted and sized as one.
        let demand = |memory| Demand {
            instances: 1,
            memory_bytes: Some(memory),
            ..Demand::default()
        };
        // Checked before the pull (cheap) and again, held, until the instance exists.
        drop(
            self.ctx
                .quotas
                .admit(&caller, demand(spec.instance.memory_bytes))
                .await?,
        );
        self.ctx.pods.reserve(&spec.name)?;
        // The image is pulled here, with this auraed's registries and credentials, and
        // verified; the instance gets exactly the manifest planned here, by digest (see
        // compose::run_pod).
        let image = super::image::parse("container.image", &spec.container.image)?;
        let plan = self.plan(&caller, &spec.container).await?;
        // What the container will really run as (the image's user included): checked,
        // and sent to the instance as such.
        let ids = (plan.process.uid, plan.process.gid);
        authorize_ids(&caller, Some(ids.0), Some(ids.1), spec.name.as_str())?;
        // The blobs of exactly the manifest checked here (handed to the instance as they
        // are listed now); the image lives in the instance's memory too (its blobs and
        // unpacked layers).
        let store = self.ctx.puller.store.clone();
        let (s2, r2, m2, layers) = (
            store.clone(),
            image.clone(),
            plan.image.digest.clone(),
            plan.image.layers.clone(),
        );
        let (by_digest, blobs, footprint) = tokio::task::spawn_blocking(move || {
            crate::image::load::blobs_of(&s2, &r2, &m2).map(|(by_digest, blobs)| {
                let footprint = blobs.iter().map(|b| b.size).sum::<u64>()
                    + layers.iter().map(|d| s2.layer_bytes(d)).sum::<u64>();
                (by_digest, blobs, footprint)
            })
        })
        .await
        .map_err(|e| Status::internal(format!("sizing the image: {e}")))??;
        spec.fit_image(footprint).map_err(invalid)?;
        let admitted = self
            .ctx
            .quotas
            .admit(&caller, demand(spec.instance.memory_bytes))
            .await?;
        let run = crate::compose::run_pod::PodRun {
            spec,
            image: by_digest,
            blobs,
            ids,
            store,
            spawner: (caller.id.clone(), caller.grant.clone()),
            no_new_privileges: !caller.grant.allow_new_privileges,
        };
        // In a task of its own: a caller that goes away (or a deadline it set) cannot
        // stop RunPod halfway and leave an instance behind.
        let pods = self.ctx.pods.clone();
        let pin = plan.pin.clone();
        let pod = tokio::spawn(async move {
            let _layers = pin;
            crate::compose::run_pod::run_pod(pods, run, admitted).await
        })
        .await
        .map_err(|e| Status::internal(format!("RunPod: {e}")))??;
        let usage = self.ctx.pods.usage(&pod).await;
        Ok(Response::new(convert::pod(&pod, Some(&usage))))
    }
}
