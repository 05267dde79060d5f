//! `runtime.v1.RuntimeService`: sandboxes as cells, containers as executables in them.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use aurae_proto::{
    cri::v1::{self as cri, runtime_service_server::RuntimeService},
    runtime::v0 as pb,
    service_names as svc,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    ContainerRecord, ContainerRun, Cri, Ended, Modes, RUNTIME_API_VERSION, RUNTIME_NAME, Resources,
    SandboxRecord, new_id, now_nanos, selected, unix_nanos,
};

/// The RuntimeService over the shared CRI state.
#[derive(Debug, Clone)]
pub struct CriRuntime(pub Arc<Cri>);

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn unimplemented(what: &str, why: &str) -> Status {
    Status::unimplemented(format!("{what} is not built yet in auraed: {why}"))
}

fn to_btree(m: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn to_hash(m: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The runtime handlers served: "" (the default) and "aurae" make a sandbox a cell here;
/// [`VM_HANDLER`] a cell in an instance spawned for the sandbox.
const HANDLERS: [&str; 3] = ["", "aurae", VM_HANDLER];
/// The handler that puts a sandbox in an instance of its own (a microVM where this
/// machine boots one, else an isolated cell: Spawn's choice).
pub(super) const VM_HANDLER: &str = "aurae-vm";

/// A namespace mode of a sandbox's options, checked.
fn mode(field: &str, m: i32, allowed: &[cri::NamespaceMode]) -> Result<i32, Status> {
    match cri::NamespaceMode::try_from(m) {
        Ok(x) if allowed.contains(&x) => Ok(m),
        Ok(x) => Err(invalid(
            field,
            format!("{} is not supported for a sandbox here", x.as_str_name()),
        )),
        Err(_) => Err(invalid(field, format!("{m} is not a NamespaceMode"))),
    }
}

/// An id from an `Int64Value`: what the kernel will take as a uid or gid (-1, i.e.
/// 4294967295, means "unchanged" to the kernel: refused).
fn id_of(field: &str, v: Option<&cri::Int64Value>) -> Result<Option<u32>, Status> {
    match v {
        None => Ok(None),
        Some(v) if (0..i64::from(u32::MAX)).contains(&v.value) => Ok(Some(v.value as u32)),
        Some(v) => Err(invalid(
            field,
            format!("{} is outside 0..=4294967294", v.value),
        )),
    }
}

/// The container a record describes, as our API's message (kubelet's mounts as volumes;
/// the pod's DNS settings when given).
fn container_of(c: &ContainerRecord, dns: Option<&crate::container::spec::Dns>) -> pb::Container {
    let run = &c.run;
    pb::Container {
        image: c.image_reference.clone(),
        entrypoint: run.entrypoint.clone(),
        args: run.args.clone(),
        env: to_hash(&run.env),
        working_dir: run.working_dir.clone(),
        uid: run.uid,
        gid: run.gid,
        read_only_root: run.read_only_root,
        volumes: run
            .volumes
            .iter()
            .map(|(h, p, ro)| pb::Volume {
                host_path: h.clone(),
                container_path: p.clone(),
                read_only: *ro,
            })
            .collect(),
        no_new_privileges: run.no_new_privileges,
        dns: dns.map(|d| pb::ContainerDns {
            servers: d.servers.iter().map(ToString::to_string).collect(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
        files: Vec::new(),
        cell_directories: Vec::new(),
    }
}

/// The CRI identity as the caller of `method` of our Runtime service (its grant looked
/// up, the call audited).
fn cri_caller(cri: &Cri, method: &str) -> Result<crate::api::authz::Caller, Status> {
    cri.call(svc::RUNTIME, method, ())?
        .extensions()
        .get::<crate::api::authz::Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("a CRI call without its caller"))
}

/// How often the directories kubelet mounts into an `aurae-vm` pod's containers are read
/// again (kubelet itself refreshes them about once a minute; a token rotates at 80 % of
/// its life, at least ten minutes).
const MOUNT_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Cell limits from a sandbox's pod-level resources (zero fields are unset).
fn limits(r: Option<&cri::LinuxContainerResources>) -> Result<Option<pb::CellLimits>, Status> {
    limits_of("config.linux.resources", r)
}

/// A container's resources (`field`), checked: what it keeps (see [`Resources`]) and the
/// limits of its executable's own group they become. Of `unified`, `memory.oom.group`
/// ("0" or "1") is applied; the rest is not (documented).
fn container_resources(
    field: &str,
    r: Option<&cri::LinuxContainerResources>,
) -> Result<(Resources, pb::CellLimits), Status> {
    let Some(r) = r else {
        return Ok(Default::default());
    };
    let mut l = limits_of(field, Some(r))?.unwrap_or_default();
    let memory_oom_group = match r.unified.get("memory.oom.group").map(String::as_str) {
        None => None,
        Some("1") => Some(true),
        Some("0") => Some(false),
        Some(v) => {
            return Err(invalid(
                &format!("{field}.unified[\"memory.oom.group\"]"),
                format!("{v:?} is not \"0\" or \"1\""),
            ));
        }
    };
    l.memory_oom_group = memory_oom_group;
    // Checked as auraed checks an executable's limits (ranges, the cpu list format),
    // the field named as the CRI names it.
    crate::executable::spec::own_limits(field, Some(l.clone())).map_err(|e| {
        let cri_name = [
            ("memory_max_bytes", "memory_limit_in_bytes"),
            ("cpu_max.period_us", "cpu_period"),
            ("cpu_max.quota_us", "cpu_quota"),
            ("cpu_max", "cpu_quota"),
            ("cpu_weight", "cpu_shares"),
        ]
        .iter()
        .find_map(|(ours, theirs)| {
            (e.field == format!("{field}.{ours}")).then(|| format!("{field}.{theirs}"))
        });
        invalid(&cri_name.unwrap_or(e.field), e.reason)
    })?;
    let kept = Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        memory_oom_group,
    };
    Ok((kept, l))
}

/// The limits a container's kept resources become (at its start).
fn limits_of_kept(r: &Resources) -> Result<pb::CellLimits, Status> {
    let (_, l) = container_resources("config.linux.resources", Some(&cri_resources(r)))?;
    Ok(l)
}

/// Kept resources as the CRI's message (a status's `resources`).
fn cri_resources(r: &Resources) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit_in_bytes: r.memory_limit_in_bytes,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        unified: r
            .memory_oom_group
            .map(|on| {
                [(
                    "memory.oom.group".to_owned(),
                    if on { "1" } else { "0" }.to_owned(),
                )]
                .into()
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

impl Resources {
    /// Takes what an update sets (its non-zero fields); keeps the rest.
    fn merge(&mut self, u: &Resources) {
        for (into, from) in [
            (&mut self.cpu_period, u.cpu_period),
            (&mut self.cpu_quota, u.cpu_quota),
            (&mut self.cpu_shares, u.cpu_shares),
            (&mut self.memory_limit_in_bytes, u.memory_limit_in_bytes),
        ] {
            if from != 0 {
                *into = from;
            }
        }
        for (into, from) in [
            (&mut self.cpuset_cpus, &u.cpuset_cpus),
            (&mut self.cpuset_mems, &u.cpuset_mems),
        ] {
            if !from.is_empty() {
                into.clone_from(from);
            }
        }
        if u.memory_oom_group.is_some() {
            self.memory_oom_group = u.memory_oom_group;
        }
    }
}

/// Cell limits from CRI resources (`field`; zero fields are unset).
fn limits_of(
    field: &str,
    r: Option<&cri::LinuxContainerResources>,
) -> Result<Option<pb::CellLimits>, Status> {
    let Some(r) = r else { return Ok(None) };
    let mut l = pb::CellLimits::default();
    let mut any = false;
    if r.memory_limit_in_bytes < 0 || r.cpu_quota < -1 || r.cpu_period < 0 || r.cpu_shares < 0 {
        return Err(invalid(field, "negative values are not limits"));
    }
    if r.memory_limit_in_bytes > 0 {
        l.memory_max_bytes = Some(r.memory_limit_in_bytes as u64);
        any = true;
    }
    if r.cpu_quota == -1 {
        // The CRI's "no quota": cpu.max "max".
        l.cpu_max = Some(pb::CpuMax {
            quota_us: 0,
            period_us: if r.cpu_period > 0 {
                r.cpu_period as u64
            } else {
                100_000
            },
        });
        any = true;
    }
    if r.cpu_quota > 0 {
        l.cpu_max = Some(pb::CpuMax {
            quota_us: r.cpu_quota as u64,
            period_us: if r.cpu_period > 0 {
                r.cpu_period as u64
            } else {
                100_000
            },
        });
        any = true;
    }
    if r.cpu_shares > 0 {
        // cgroup v1 shares 2..=262144 → v2 weight 1..=10000, as runc converts them.
        let shares = (r.cpu_shares as u64).clamp(2, 262_144);
        l.cpu_weight = Some(1 + ((shares - 2) * 9_999) / 262_142);
        any = true;
    }
    if !r.cpuset_cpus.is_empty() {
        l.cpuset_cpus = r.cpuset_cpus.clone();
        any = true;
    }
    if !r.cpuset_mems.is_empty() {
        l.cpuset_mems = r.cpuset_mems.clone();
        any = true;
    }
    Ok(any.then_some(l))
}

impl CriRuntime {
    fn cri(&self) -> &Arc<Cri> {
        &self.0
    }

    /// The CRI status of a container: its record and, once started, its executable.
    async fn status_of(&self, c: &ContainerRecord) -> cri::ContainerStatus {
        let mut state = cri::ContainerState::ContainerCreated;
        let (mut started_at, mut finished_at, mut exit_code) = (0, 0, 0);
        let (mut reason, mut message) = (String::new(), String::new());
        if let Some(s) = c.started_at {
            started_at = s;
            let ended = match &c.ended {
                Some(e) => Some(e.clone()),
                None => self.observe(c).await,
            };
            match ended {
                None => state = cri::ContainerState::ContainerRunning,
                Some(e) => {
                    state = if e.reason == "Unknown" {
                        cri::ContainerState::ContainerUnknown
                    } else {
                        cri::ContainerState::ContainerExited
                    };
                    finished_at = e.finished_at;
                    exit_code = e.exit_code;
                    reason = e.reason;
                    message = e.message;
                }
            }
        } else if let Some(e) = &c.ended {
            // It never started (StartContainer failed).
            state = cri::ContainerState::ContainerExited;
            finished_at = e.finished_at;
            exit_code = e.exit_code;
            reason = e.reason.clone();
            message = e.message.clone();
        }
        cri::ContainerStatus {
            id: c.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt: c.attempt,
            }),
            state: state as i32,
            created_at: c.created_at,
            started_at,
            finished_at,
            exit_code,
            image: Some(cri::ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            image_ref: c.image_ref.clone(),
            reason,
            message,
            labels: to_hash(&c.labels),
            annotations: to_hash(&c.annotations),
            mounts: c
                .run
                .volumes
                .iter()
                .map(|(h, p, ro)| cri::Mount {
                    host_path: h.clone(),
                    container_path: p.clone(),
                    readonly: *ro,
                    ..Default::default()
                })
                .collect(),
            log_path: c.log_path.clone(),
            resources: Some(cri::ContainerResources {
                linux: Some(cri_resources(&c.run.resources)),
                ..Default::default()
            }),
            image_id: c.image_ref.clone(),
            user: c.run.uid.map(|uid| cri::ContainerUser {
                linux: Some(cri::LinuxContainerUser {
                    uid: i64::from(uid),
                    gid: i64::from(c.run.gid.unwrap_or(uid)),
                    supplemental_groups: Vec::new(),
                }),
            }),
        }
    }

    /// The end of a started container, from its executable (recorded once seen): `None`
    /// while it runs.
    async fn observe(&self, c: &ContainerRecord) -> Option<Ended> {
        let cri = self.cri();
        let sb = cri.sandbox(&c.sandbox_id).ok()?;
        let got = match cri.place(&sb).await {
            Ok(p) => {
                p.exe_get(pb::ExecutableRef {
                    cell: sb.cell.clone(),
                    name: c.executable.clone(),
                })
                .await
            }
            Err(e) => Err(e),
        };
        let ended = match got {
            Ok(s) => {
                let exit = s.exit?;
                let (code, signal) = match exit.how {
                    Some(pb::exit_status::How::Code(c)) => (c, None),
                    Some(pb::exit_status::How::Signal(s)) => (128 + s, Some(s)),
                    None => (255, None),
                };
                let reason = if exit.oom_killed {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                Ended {
                    exit_code: code,
                    finished_at: exit
                        .exited_at
                        .and_then(|t| std::time::SystemTime::try_from(t).ok())
                        .map_or_else(now_nanos, unix_nanos),
                    reason: reason.to_owned(),
                    message: signal
                        .map(|s| format!("killed by signal {s}"))
                        .unwrap_or(s.message),
                }
            }
            Err(e) if e.code() == tonic::Code::NotFound => Ended {
                exit_code: 255,
                finished_at: now_nanos(),
                reason: "Unknown".to_owned(),
                message: format!(
                    "its executable {}/{} is gone: {}",
                    sb.cell,
                    c.executable,
                    e.message()
                ),
            },
            Err(e) => {
                warn!(container = %c.id, "CRI status: {}", e.message());
                return None;
            }
        };
        // In place, and only if no end was recorded meanwhile (nor the record removed).
        let recorded = cri.update_container(&c.id, |r| {
            if r.ended.is_some() {
                return false;
            }
            r.ended = Some(ended.clone());
            true
        });
        match recorded {
            Ok(Some(r)) => r.ended.or(Some(ended)),
            Ok(None) => Some(ended),
            Err(e) => {
                warn!(container = %c.id, "{}", e.message());
                Some(ended)
            }
        }
    }

    /// `Some` when the container has ended (recorded or seen now).
    async fn observe_if_running(&self, c: &ContainerRecord) -> Option<Ended> {
        match &c.ended {
            Some(e) => Some(e.clone()),
            None => self.observe(c).await,
        }
    }

    /// A container that runs now, and its sandbox (else FAILED_PRECONDITION; an unknown
    /// id NOT_FOUND).
    async fn running(&self, id: &str) -> Result<(ContainerRecord, SandboxRecord), Status> {
        let cri = self.cri();
        let c = cri.container(id)?;
        if c.started_at.is_none() || self.observe_if_running(&c).await.is_some() {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let sb = cri.sandbox(&c.sandbox_id)?;
        Ok((c, sb))
    }

    /// Whether the sandbox's cell still runs.
    async fn sandbox_ready(&self, sb: &SandboxRecord) -> bool {
        if sb.stopped {
            return false;
        }
        let Ok(p) = self.cri().place(sb).await else {
            return false;
        };
        p.cell_get(&sb.cell)
            .await
            .is_ok_and(|s| s.phase == pb::Phase::Running as i32)
    }

    fn sandbox_status(&self, sb: &SandboxRecord, ready: bool) -> cri::PodSandboxStatus {
        cri::PodSandboxStatus {
            id: sb.id.clone(),
            metadata: Some(metadata(sb)),
            state: if ready {
                cri::PodSandboxState::SandboxReady
            } else {
                cri::PodSandboxState::SandboxNotready
            } as i32,
            created_at: sb.created_at,
            network: Some(match &sb.network {
                Some(n) => cri::PodSandboxNetworkStatus {
                    ip: n.ips.first().cloned().unwrap_or_default(),
                    additional_ips: n
                        .ips
                        .iter()
                        .skip(1)
                        .map(|ip| cri::PodIp { ip: ip.clone() })
                        .collect(),
                },
                // A sandbox in an instance has the instance's addresses.
                None => self
                    .cri()
                    .instance_of(sb)
                    .map(|i| cri::PodSandboxNetworkStatus {
                        ip: i.addr.to_string(),
                        additional_ips: vec![cri::PodIp {
                            ip: i.addr6.to_string(),
                        }],
                    })
                    .unwrap_or_default(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: sb.modes.network,
                        pid: sb.modes.pid,
                        ipc: sb.modes.ipc,
                        ..Default::default()
                    }),
                }),
            }),
            labels: to_hash(&sb.labels),
            annotations: to_hash(&sb.annotations),
            runtime_handler: sb.runtime_handler.clone(),
        }
    }

    /// Stops a started container's executable: SIGTERM, SIGKILL after `grace_s`; with no
    /// grace at all, SIGKILL at once (as containerd does for a timeout of 0).
    async fn stop_executable(
        &self,
        sb: &SandboxRecord,
        c: &ContainerRecord,
        grace_s: i64,
    ) -> Result<(), Status> {
        let cri = self.cri();
        let exe = || {
            Some(pb::ExecutableRef {
                cell: sb.cell.clone(),
                name: c.executable.clone(),
            })
        };
        let seconds = |s: i64| {
            Some(prost_types::Duration {
                seconds: s.min(crate::spec::MAX_GRACE.as_secs() as i64),
                nanos: 0,
            })
        };
        let place = match cri.place(sb).await {
            Ok(p) => p,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let done = if grace_s <= 0 {
            let signal = pb::SignalExecutableRequest {
                executable: exe(),
                signal: 9,
            };
            // Killed, or it had already exited: either way, wait for its end.
            match place.exe_signal(signal).await {
                Err(e) if e.code() != tonic::Code::FailedPrecondition => Err(e),
                _ => place
                    .exe_wait(pb::WaitExecutableRequest {
                        executable: exe(),
                        timeout: seconds(10),
                    })
                    .await
                    .map(|_| ()),
            }
        } else {
            place
                .exe_stop(pb::StopExecutableRequest {
                    executable: exe(),
                    grace_period: seconds(grace_s),
                })
                .await
                .map(|_| ())
        };
        match done {
            Ok(()) => {}
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        cri.logs.finish(&c.id).await;
        self.observe(c).await;
        Ok(())
    }

    async fn remove_container_record(&self, c: &ContainerRecord) -> Result<(), Status> {
        let cri = self.cri();
        if let Ok(sb) = cri.sandbox(&c.sandbox_id)
            && c.started_at.is_some()
        {
            self.stop_executable(&sb, c, 0).await?;
            let freed = match cri.place(&sb).await {
                Ok(p) => {
                    p.exe_free(pb::ExecutableRef {
                        cell: sb.cell.clone(),
                        name: c.executable.clone(),
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            match freed {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        cri.logs.finish(&c.id).await;
        cri.forget_log_offset(&c.id);
        cri.delete_container(&c.id);
        self.emit(
            &c.id,
            &c.sandbox_id,
            cri::ContainerEventType::ContainerDeletedEvent,
        )
        .await;
        Ok(())
    }
}

impl CriRuntime {
    /// Tells GetContainerEvents' subscribers (kubelet's evented PLEG) that `id` (a
    /// container, or a sandbox for sandbox events, as containerd reports them) changed:
    /// with its sandbox's status and all its containers' as they are now.
    async fn emit(&self, id: &str, sandbox_id: &str, kind: cri::ContainerEventType) {
        let cri = self.cri();
        if cri.events.receiver_count() == 0 {
            return;
        }
        let (pod_sandbox_status, containers_statuses) = match cri.sandbox(sandbox_id) {
            Ok(sb) => {
                let ready = self.sandbox_ready(&sb).await;
                let mut cs = Vec::new();
                for c in cri.containers_of(&sb.id) {
                    cs.push(self.status_of(&c).await);
                }
                (Some(self.sandbox_status(&sb, ready)), cs)
            }
            Err(_) => (None, Vec::new()),
        };
        let _ = cri.events.send(cri::ContainerEventResponse {
            container_id: id.to_owned(),
            container_event_type: kind as i32,
            created_at: now_nanos(),
            pod_sandbox_status,
            containers_statuses,
        });
    }

    /// Keeps the read-only directories kubelet mounts into a container of an `aurae-vm`
    /// pod (a service account's token, a ConfigMap, a Secret) as kubelet keeps them: its
    /// copies inside the instance are written again (`Executables/UpdateFiles`, all at once
    /// for a reader) whenever what is on this machine changed, checked every
    /// [`MOUNT_REFRESH`], until the container ends. Failures are logged and tried again.
    /// `fresh`: the container was just started with what is there now (nothing to send
    /// until it changes); after a restart it may have changed meanwhile: sent once.
    pub(super) fn keep_mounts_fresh(&self, id: String, fresh: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            let cri = me.cri().clone();
            let (Ok(c), Ok(sb)) = (
                cri.container(&id),
                cri.container(&id).and_then(|c| cri.sandbox(&c.sandbox_id)),
            ) else {
                return;
            };
            if sb.runtime_handler != VM_HANDLER || !c.run.volumes.iter().any(|(_, _, ro)| *ro) {
                return;
            }
            let volumes = match me.dir_volumes(&c, &sb.uid).await {
                Ok(v) if !v.is_empty() => v,
                Ok(_) => return,
                Err(e) => {
                    warn!(container = %id, "CRI: its mounts will not be refreshed: {}", e.message());
                    return;
                }
            };
            let executable = pb::ExecutableRef {
                cell: sb.cell.clone(),
                name: c.executable.clone(),
            };
            let read = |v: Vec<crate::container::Volume>| async move {
                // (No emptyDir among them: see dir_volumes.)
                match tokio::task::spawn_blocking(move || copy_volumes(&v, "")).await {
                    Ok(r) => r.map(|(files, _)| files),
                    Err(e) => Err(Status::internal(format!("reading task: {e}"))),
                }
            };
            let mut sent: Option<Vec<pb::ContainerFile>> = None;
            if fresh {
                sent = read(volumes.clone()).await.ok();
            }
            loop {
                tokio::time::sleep(MOUNT_REFRESH).await;
                match cri.container(&id) {
                    Ok(c) if c.ended.is_none() => {}
                    _ => return,
                }
                let files = match read(volumes.clone()).await {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(container = %id, "CRI: reading its mounts again: {}", e.message());
                        continue;
                    }
                };
                if sent.as_ref() == Some(&files) {
                    continue;
                }
                let update = pb::UpdateFilesRequest {
                    executable: Some(executable.clone()),
                    files: files.clone(),
                };
                let written = match cri.place(&sb).await {
                    Ok(place) => place.exe_update_files(update).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match written {
                    Ok(()) => sent = Some(files),
                    Err(e) => {
                        warn!(container = %id, "CRI: writing its mounts again in its instance: {}", e.message());
                    }
                }
            }
        });
    }

    /// The read-only directories among a container's mounts, opened as its start opened
    /// them (below the volume roots, within the CRI identity's grant).
    async fn dir_volumes(
        &self,
        c: &ContainerRecord,
        pod_uid: &str,
    ) -> Result<Vec<crate::container::Volume>, Status> {
        let cri = self.cri();
        let caller = cri_caller(cri, "RunExecutable")?;
        let spec = crate::container::ContainerSpec::parse("container", Some(container_of(c, None)))
            .map_err(|e| invalid(&e.field, e.reason))?;
        let plan = cri.runtime.plan(&caller, &spec).await?;
        Ok(plan
            .volumes
            .iter()
            .filter(|v| {
                !v.file
                    && v.read_only
                    && empty_dir_name(&v.sent.to_string_lossy(), pod_uid).is_none()
            })
            .cloned()
            .collect())
    }

    /// Waits for a started container's end, records it and reports it (STOPPED, once per
    /// start); ends without a word when the container is removed first.
    pub(super) fn watch(&self, id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let cri = me.cri();
                // (An end already recorded by a status call is still reported: the wait
                // below returns at once.)
                let Ok(c) = cri.container(&id) else { return };
                let Ok(sb) = cri.sandbox(&c.sandbox_id) else {
                    return;
                };
                let waited = match cri.place(&sb).await {
                    Ok(p) => p
                        .exe_wait(pb::WaitExecutableRequest {
                            executable: Some(pb::ExecutableRef {
                                cell: sb.cell.clone(),
                                name: c.executable.clone(),
                            }),
                            timeout: Some(prost_types::Duration {
                                seconds: 60,
                                nanos: 0,
                            }),
                        })
                        .await
                        .map(|_| ()),
                    Err(e) => Err(e),
                };
                match waited {
                    Err(e) if e.code() == tonic::Code::DeadlineExceeded => continue,
                    Err(e) if e.code() != tonic::Code::NotFound => {
                        warn!(container = %id, "CRI: watching the container's end: {}", e.message());
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                    _ => {}
                }
                // Ended (or its executable is gone): recorded, then told.
                let Ok(c) = cri.container(&id) else { return };
                if me.observe_if_running(&c).await.is_some() {
                    me.emit(
                        &id,
                        &c.sandbox_id,
                        cri::ContainerEventType::ContainerStoppedEvent,
                    )
                    .await;
                    return;
                }
            }
        });
    }

    /// A container's executable made fit for the sandbox's instance: its image planned
    /// here (the CRI identity's registries, the ids it will really run as against its
    /// grant), handed to the instance by the digest checked here, and sent with those ids
    /// and its privileges explicitly (the instance serves this auraed as its parent).
    async fn for_instance(
        &self,
        place: &super::place::Place,
        sb: &SandboxRecord,
        mut msg: pb::Executable,
    ) -> Result<pb::Executable, Status> {
        let cri = self.cri();
        let Some(client) = place.client() else {
            return Ok(msg);
        };
        let caller = cri_caller(cri, "RunExecutable")?;
        caller.authorize_name(&sb.cell)?;
        let mut c = msg.container.take().unwrap_or_default();
        let spec = crate::container::ContainerSpec::parse("container", Some(c.clone()))
            .map_err(|e| invalid(&e.field, e.reason))?;
        let plan = cri.runtime.plan(&caller, &spec).await?;
        let ids = (plan.process.uid, plan.process.gid);
        crate::api::runtime::authorize_ids(&caller, Some(ids.0), Some(ids.1), &sb.cell)?;
        let image = crate::api::image::parse("container.image", &spec.image)?;
        let store = cri.ctx.puller.store.clone();
        let (s2, digest) = (store.clone(), plan.image.digest.clone());
        let (by_digest, blobs) =
            tokio::task::spawn_blocking(move || crate::image::load::blobs_of(&s2, &image, &digest))
                .await
                .map_err(|e| Status::internal(format!("listing the image's blobs: {e}")))??;
        {
            // No collection of our store while its blobs are read out.
            let _gc = store.gc_lock.read().await;
            crate::compose::run_pod::load(client, &by_digest, blobs)
                .await
                .map_err(|e| {
                    Status::from(crate::compose::run_pod::step(
                        "handing the image to the sandbox's instance",
                        e,
                    ))
                })?;
        }
        // Its mounts are on this machine: copied into the container's files (read from
        // what the plan opened, below the volume roots and within the grant).
        let (volumes, uid) = (plan.volumes.clone(), sb.uid.clone());
        let (files, dirs) = tokio::task::spawn_blocking(move || copy_volumes(&volumes, &uid))
            .await
            .map_err(|e| Status::internal(format!("copying the mounts: {e}")))??;
        drop(plan);
        c.volumes.clear();
        c.files = files;
        c.cell_directories = dirs;
        c.image = by_digest.to_string();
        (c.uid, c.gid) = (Some(ids.0), Some(ids.1));
        c.no_new_privileges |= !caller.grant.allow_new_privileges;
        msg.container = Some(c);
        Ok(msg)
    }

    /// UpdateContainerResources, in a task of its own: a container not started yet has
    /// its record changed (its start applies them); a running one its executable's own
    /// group (here, or in its sandbox's instance) first, then its record; an exited one
    /// FAILED_PRECONDITION.
    async fn update_resources(
        &self,
        m: cri::UpdateContainerResourcesRequest,
    ) -> Result<(), Status> {
        if m.windows.is_some() {
            return Err(invalid("windows", "this is a Linux runtime"));
        }
        let (update, limits) = container_resources("linux", m.linux.as_ref())?;
        let cri = self.cri().clone();
        let c = cri.container(&m.container_id)?;
        let sb = cri.sandbox(&c.sandbox_id)?;
        let place = cri.place(&sb).await?;
        self.within_the_pods_limits(&place, &sb, &c, &update)
            .await?;
        let mut merged = false;
        cri.update_container(&c.id, |r| {
            if r.started_at.is_some() || r.starting || r.ended.is_some() {
                return false;
            }
            r.run.resources.merge(&update);
            merged = true;
            true
        })?;
        if merged {
            return Ok(());
        }
        // As it is now (it may have started since it was read above).
        let c = cri.container(&m.container_id)?;
        if c.ended.is_some() || c.started_at.is_none() {
            return Err(Status::failed_precondition(format!(
                "container {} has exited or is still starting: nothing to update",
                c.id
            )));
        }
        place
            .exe_update(pb::UpdateExecutableRequest {
                executable: Some(pb::ExecutableRef {
                    cell: sb.cell.clone(),
                    name: c.executable.clone(),
                }),
                limits: Some(limits),
            })
            .await?;
        cri.update_container(&c.id, |r| {
            r.run.resources.merge(&update);
            true
        })?;
        Ok(())
    }

    /// The pod's own limits (RunPodSandbox's resources, its cell's memory.max and
    /// cpu.max) bound its containers together: an update that would take the sum of its
    /// containers' limits past them is refused (FAILED_PRECONDITION naming the field and
    /// both figures) rather than reported applied and never reached. (kubelet resizes the
    /// pod first through UpdatePodSandboxResources, which this CRI version lacks.)
    async fn within_the_pods_limits(
        &self,
        place: &super::place::Place,
        sb: &SandboxRecord,
        c: &ContainerRecord,
        update: &Resources,
    ) -> Result<(), Status> {
        if update.memory_limit_in_bytes <= 0 && update.cpu_quota <= 0 {
            return Ok(());
        }
        let Some(pod) = place.cell_get(&sb.cell).await?.limits else {
            return Ok(());
        };
        let mut after = c.run.resources.clone();
        after.merge(update);
        let others: Vec<Resources> = self
            .cri()
            .containers_of(&sb.id)
            .into_iter()
            .filter(|o| o.id != c.id && o.ended.is_none())
            .map(|o| o.run.resources)
            .chain([after])
            .collect();
        if let Some(max) = pod.memory_max_bytes
            && update.memory_limit_in_bytes > 0
        {
            let sum: u64 = others
                .iter()
                .map(|r| u64::try_from(r.memory_limit_in_bytes).unwrap_or(0))
                .sum();
            if sum > max {
                return Err(Status::failed_precondition(format!(
                    "linux.memory_limit_in_bytes: the pod's containers would have {sum} bytes \
                     together, more than the pod's own limit of {max}"
                )));
            }
        }
        if let Some(cpu) = pod.cpu_max.filter(|c| c.quota_us > 0)
            && update.cpu_quota > 0
        {
            // In CPUs: each quota over its period.
            let cpus = |q: i64, p: i64| q.max(0) as f64 / if p > 0 { p as f64 } else { 100_000.0 };
            let sum: f64 = others.iter().map(|r| cpus(r.cpu_quota, r.cpu_period)).sum();
            let max = cpu.quota_us as f64 / cpu.period_us.max(1) as f64;
            if sum > max + 1e-9 {
                return Err(Status::failed_precondition(format!(
                    "linux.cpu_quota: the pod's containers would have {sum:.3} CPUs together, \
                     more than the pod's own limit of {max:.3}"
                )));
            }
        }
        Ok(())
    }

    /// StartContainer, in a task of its own: the container is marked starting first (a
    /// second start is refused; a removal meanwhile stops what may have started).
    async fn start(&self, m: cri::StartContainerRequest) -> Result<(), Status> {
        let cri = self.cri().clone();
        let c = cri.container(&m.container_id)?;
        let sb = cri.sandbox(&c.sandbox_id)?;
        if !self.sandbox_ready(&sb).await {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is not ready (stopped or its cell is gone)",
                sb.id
            )));
        }
        let file = if c.log_path.is_empty() {
            None
        } else {
            Some(super::log::open(&cri.log_root, Path::new(&c.log_path))?)
        };
        let mut won = false;
        cri.update_container(&c.id, |r| {
            if r.starting || r.started_at.is_some() || r.ended.is_some() {
                return false;
            }
            r.starting = true;
            won = true;
            true
        })?;
        if !won {
            return Err(Status::failed_precondition(format!(
                "container {} was started before (a container starts once)",
                c.id
            )));
        }
        let run = &c.run;
        let msg = pb::Executable {
            cell: sb.cell.clone(),
            name: c.executable.clone(),
            container: Some(container_of(&c, sb.dns.as_ref())),
            interactive: (run.stdin || run.tty).then_some(pb::Interactive {
                stdin: run.stdin,
                stdin_once: run.stdin_once,
                tty: run.tty,
            }),
            // Always a cgroup of its own (its usage, its OOM kills, its limits, changed by
            // UpdateContainerResources), limits or not.
            limits: Some(limits_of_kept(&run.resources)?),
            ..Default::default()
        };
        let started = async {
            let place = cri.place(&sb).await?;
            let msg = match place.instance() {
                Some(_) => self.for_instance(&place, &sb, msg).await?,
                None => msg,
            };
            // Its start time is the executable's own: the clock read after the call
            // returned could come after a quick process's exit.
            place.run_executable(msg).await.map(|r| {
                r.started_at
                    .and_then(|t| std::time::SystemTime::try_from(t).ok())
                    .map_or_else(now_nanos, unix_nanos)
            })
        }
        .await;
        let now = match started {
            Ok(at) => at,
            Err(e) => {
                // As containerd does: a container that cannot start has exited, and says why.
                let ended = Ended {
                    exit_code: 128,
                    finished_at: now_nanos(),
                    reason: "StartError".to_owned(),
                    message: e.message().to_owned(),
                };
                cri.update_container(&c.id, |r| {
                    r.starting = false;
                    r.ended = Some(ended);
                    true
                })?;
                return Err(e);
            }
        };
        let rec = cri.update_container(&c.id, |r| {
            r.starting = false;
            r.started_at = Some(now);
            true
        })?;
        self.keep_mounts_fresh(c.id.clone(), true);
        match (rec, file) {
            (Some(rec), Some(file)) => {
                let (place, logs) = cri.logs_request(&rec).await?;
                cri.logs.start(&rec.id, file, place, logs, cri.clone());
            }
            (Some(_), None) => {}
            // Removed while it started: what started goes too.
            (None, _) => {
                let _ = self.remove_container_record(&c).await;
                return Ok(());
            }
        }
        self.emit(
            &c.id,
            &c.sandbox_id,
            cri::ContainerEventType::ContainerStartedEvent,
        )
        .await;
        self.watch(c.id.clone());
        Ok(())
    }
}

impl CriRuntime {
    // The changing calls, run by their trait methods in a task of their own.

    async fn run_pod_sandbox_now(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        if !HANDLERS.contains(&m.runtime_handler.as_str()) {
            return Err(invalid(
                "runtime_handler",
                format!(
                    "{:?} is not a handler of this runtime (\"\", \"aurae\" or \"{VM_HANDLER}\")",
                    m.runtime_handler
                ),
            ));
        }
        let config = m.config.ok_or_else(|| invalid("config", "is missing"))?;
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| invalid("config.metadata", "is missing"))?;
        dns_subdomain("config.metadata.name", &md.name)?;
        dns_subdomain("config.metadata.namespace", &md.namespace)?;
        if md.uid.is_empty()
            || md.uid.len() > 128
            || !md
                .uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "config.metadata.uid",
                format!("{:?} is not 1..=128 of [A-Za-z0-9._-]", md.uid),
            ));
        }
        if config.windows.is_some() {
            return Err(invalid("config.windows", "this is a Linux runtime"));
        }
        let linux = config.linux.clone().unwrap_or_default();
        if !linux.sysctls.is_empty() {
            return Err(invalid("config.linux.sysctls", "sysctls are not supported"));
        }
        let sec = linux.security_context.clone().unwrap_or_default();
        if sec.privileged {
            return Err(invalid(
                "config.linux.security_context.privileged",
                "privileged sandboxes are not supported",
            ));
        }
        let ns = sec.namespace_options.clone().unwrap_or_default();
        use cri::NamespaceMode as M;
        let modes = Modes {
            network: mode(
                "config.linux.security_context.namespace_options.network",
                ns.network,
                &[M::Pod, M::Node],
            )?,
            // Containers of a sandbox share its PID namespace (a cell's): CONTAINER is
            // served as POD, and the status says POD.
            pid: match mode(
                "config.linux.security_context.namespace_options.pid",
                ns.pid,
                &[M::Pod, M::Container, M::Node],
            )? {
                x if x == M::Node as i32 => x,
                _ => M::Pod as i32,
            },
            ipc: mode(
                "config.linux.security_context.namespace_options.ipc",
                ns.ipc,
                &[M::Pod, M::Node],
            )?,
        };
        if ns
            .userns_options
            .as_ref()
            .is_some_and(|u| u.mode != M::Node as i32)
        {
            return Err(invalid(
                "config.linux.security_context.namespace_options.userns_options",
                "user namespaces are not supported",
            ));
        }
        let in_instance = m.runtime_handler == VM_HANDLER;
        if in_instance {
            // The sandbox is its instance: nothing of this machine's is shared.
            for (field, m) in [
                ("network", modes.network),
                ("pid", modes.pid),
                ("ipc", modes.ipc),
            ] {
                if m == M::Node as i32 {
                    return Err(invalid(
                        &format!("config.linux.security_context.namespace_options.{field}"),
                        format!(
                            "NODE: a sandbox of the {VM_HANDLER:?} handler is an instance of \
                             its own and shares nothing of the node"
                        ),
                    ));
                }
            }
        }
        let host_net = modes.network == M::Node as i32;
        let hostname = if host_net {
            String::new()
        } else if config.hostname.is_empty() {
            crate::spec::Label::sanitized(&md.name, 63, "pod").to_string()
        } else {
            crate::cell::parse_hostname("config.hostname", &config.hostname)
                .map_err(|e| invalid(&e.field, e.reason))?
        };
        if !config.log_directory.is_empty() {
            below(&cri.log_root, "config.log_directory", &config.log_directory)?;
        }
        let limits = limits(linux.resources.as_ref())?;
        // kubelet sends the pod's DNS policy worked out (cluster DNS, or the node's
        // resolv.conf for `Default`); nothing in it: the image's own file.
        let dns = match &config.dns_config {
            Some(d) if !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()) => {
                Some(
                    crate::container::spec::Dns::parse(
                        "config.dns_config",
                        &pb::ContainerDns {
                            servers: d.servers.clone(),
                            searches: d.searches.clone(),
                            options: d.options.clone(),
                        },
                    )
                    .map_err(|e| invalid(&e.field, e.reason))?,
                )
            }
            _ => None,
        };
        let mut port_mappings = Vec::new();
        for (i, p) in config.port_mappings.iter().enumerate() {
            let f = |n: &str| format!("config.port_mappings[{i}].{n}");
            let proto = match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Tcp) => "tcp",
                Ok(cri::Protocol::Udp) => "udp",
                Ok(cri::Protocol::Sctp) => "sctp",
                Err(_) => {
                    return Err(invalid(
                        &f("protocol"),
                        format!("{} is not a protocol", p.protocol),
                    ));
                }
            };
            if !(1..=65535).contains(&p.container_port) {
                return Err(invalid(
                    &f("container_port"),
                    format!("{} is outside 1..=65535", p.container_port),
                ));
            }
            if !(0..=65535).contains(&p.host_port) {
                return Err(invalid(
                    &f("host_port"),
                    format!("{} is outside 0..=65535", p.host_port),
                ));
            }
            if !p.host_ip.is_empty() && p.host_ip.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    &f("host_ip"),
                    format!("{:?} is not an IP address", p.host_ip),
                ));
            }
            if p.host_port > 0 && in_instance {
                return Err(invalid(
                    &f("host_port"),
                    format!(
                        "a sandbox of the {VM_HANDLER:?} handler has its instance's own address: \
                         reach its ports there, not through the node's"
                    ),
                ));
            }
            if p.host_port > 0 {
                port_mappings.push(serde_json::json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": proto,
                    "hostIP": p.host_ip,
                }));
            }
        }
        let key = format!("{}\0{}\0{}\0{}", md.namespace, md.name, md.uid, md.attempt);
        let one = cri.creating(&key);
        let _one = one.lock().await;
        // kubelet retries: the same metadata is the same sandbox.
        let existing = cri
            .lock()
            .sandboxes
            .values()
            .find(|s| {
                s.name == md.name
                    && s.namespace == md.namespace
                    && s.uid == md.uid
                    && s.attempt == md.attempt
            })
            .map(|s| s.id.clone());
        if let Some(id) = existing {
            return Ok(Response::new(cri::RunPodSandboxResponse {
                pod_sandbox_id: id,
            }));
        }
        // Bounded before anything is made (a concurrent one may pass with it: the bound
        // is the records' size, not a quota; the CRI identity's cell quota is that).
        let n = cri.lock().sandboxes.len();
        if n >= super::MAX_SANDBOXES {
            return Err(Status::resource_exhausted(format!(
                "auraed holds {n} sandbox records, its most: remove stopped sandboxes first \
                 (kubelet's garbage collection does)"
            )));
        }
        let id = new_id();
        let cell = format!("k8s-{}", &id[..16]);
        let mut rec = SandboxRecord {
            id: id.clone(),
            name: md.name,
            uid: md.uid,
            namespace: md.namespace,
            attempt: md.attempt,
            cell: cell.clone(),
            hostname: hostname.clone(),
            log_directory: config.log_directory,
            labels: to_btree(&config.labels),
            annotations: to_btree(&config.annotations),
            runtime_handler: m.runtime_handler,
            created_at: now_nanos(),
            modes,
            stopped: false,
            network: None,
            port_mappings: serde_json::Value::Array(port_mappings),
            dns,
        };
        let cell_msg = pb::Cell {
            name: cell.clone(),
            namespaces: Some(if in_instance {
                // The instance's own network is the pod's (its address is the pod's IP).
                pb::CellNamespaces {
                    share_host_net: true,
                    ..Default::default()
                }
            } else {
                pb::CellNamespaces {
                    share_host_net: host_net,
                    share_host_uts: host_net,
                    share_host_pid: modes.pid == M::Node as i32,
                    share_host_ipc: modes.ipc == M::Node as i32,
                    ..Default::default()
                }
            }),
            hostname: hostname.clone(),
            limits,
            ..Default::default()
        };
        let made = async {
            if in_instance {
                cri.spawn_instance(&rec, cell_msg.limits.as_ref()).await?;
            }
            let place = cri.place(&rec).await?;
            place.cell_allocate(cell_msg).await?;
            let attached = if host_net || in_instance {
                Ok(None)
            } else {
                match (cri.cni.config(), cri.netns_of(&cell)) {
                    (Ok(conf), Some(netns)) => cri
                        .cni
                        .add(conf, netns, &Cri::cni_target(&rec))
                        .await
                        .map(Some)
                        .map_err(|e| Status::unavailable(format!("pod network: {e}"))),
                    (Ok(_), None) => Err(Status::internal(format!(
                        "pod network: the init of cell {cell} is gone"
                    ))),
                    (Err(why), _) => {
                        warn!(pod = %rec.name, "CRI sandbox without a pod network (loopback only): {why}");
                        Ok(None)
                    }
                }
            };
            attached.and_then(|net| {
                rec.network = net;
                cri.insert_sandbox(&rec)
            })
        }
        .await;
        if let Err(e) = made {
            // Nothing stays behind a sandbox we could not record.
            if let Some(net) = rec.network.take() {
                let netns = cri.netns_of(&cell).map(Arc::new);
                if let Err(d) = cri
                    .cni
                    .del(&net.conf, Some(&net.result), netns, &Cri::cni_target(&rec))
                    .await
                {
                    warn!(sandbox = %id, "undoing the pod network of a sandbox that failed: {d}");
                }
            }
            if in_instance {
                if let Err(f) = cri.free_instance(&rec).await {
                    warn!(sandbox = %id, "removing the instance of a sandbox that failed: {}", f.message());
                }
            } else {
                let _ = super::place::Place::Here(cri.clone())
                    .cell_free(&cell)
                    .await;
            }
            return Err(e);
        }
        info!(sandbox = %id, cell = %rec.cell, pod = %rec.name, namespace = %rec.namespace, "CRI sandbox running");
        self.emit(&id, &id, cri::ContainerEventType::ContainerCreatedEvent)
            .await;
        self.emit(&id, &id, cri::ContainerEventType::ContainerStartedEvent)
            .await;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox_now(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let cri = self.cri().clone();
        let mut sb = cri.sandbox(&r.get_ref().pod_sandbox_id)?;
        for c in cri.containers_of(&sb.id) {
            if c.started_at.is_some() && c.ended.is_none() {
                self.stop_executable(&sb, &c, 0).await?;
            }
        }
        cri.detach_network(&mut sb).await?;
        let stopped = match cri.place(&sb).await {
            Ok(p) => {
                p.cell_stop(pb::StopRequest {
                    name: sb.cell.clone(),
                    grace_period: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    }),
                })
                .await
            }
            Err(e) => Err(e),
        };
        match stopped {
            Ok(()) => {}
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(e),
        }
        // An instance's resources (its memory, its address) go with the stop, as a
        // stopped sandbox's network does.
        cri.free_instance(&sb).await?;
        let mut newly = false;
        cri.update_sandbox(&sb.id, |r| {
            newly = !r.stopped;
            r.stopped = true;
            newly
        })?;
        if newly {
            self.emit(
                &sb.id,
                &sb.id,
                cri::ContainerEventType::ContainerStoppedEvent,
            )
            .await;
        }
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox_now(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let cri = self.cri().clone();
        // Removing what is gone succeeds (kubelet retries removals).
        let mut sb = match cri.sandbox(&r.get_ref().pod_sandbox_id) {
            Ok(sb) => sb,
            Err(e) if e.code() == tonic::Code::NotFound => {
                return Ok(Response::new(cri::RemovePodSandboxResponse {}));
            }
            Err(e) => return Err(e),
        };
        for c in cri.containers_of(&sb.id) {
            self.remove_container_record(&c).await?;
        }
        cri.detach_network(&mut sb).await?;
        let freed = match cri.place(&sb).await {
            Ok(p) => p.cell_free(&sb.cell).await,
            Err(e) => Err(e),
        };
        match freed {
            Ok(()) => {}
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(e),
        }
        cri.free_instance(&sb).await?;
        // Told with the sandbox's last status (it is gone from the records after).
        self.emit(
            &sb.id,
            &sb.id,
            cri::ContainerEventType::ContainerDeletedEvent,
        )
        .await;
        cri.delete_sandbox(&sb.id);
        info!(sandbox = %sb.id, cell = %sb.cell, "CRI sandbox removed");
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn stop_container_now(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let cri = self.cri().clone();
        let c = cri.container(&r.get_ref().container_id)?;
        if c.started_at.is_some() && c.ended.is_none() {
            let sb = cri.sandbox(&c.sandbox_id)?;
            self.stop_executable(&sb, &c, r.get_ref().timeout).await?;
        }
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container_now(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let cri = self.cri().clone();
        match cri.container(&r.get_ref().container_id) {
            Ok(c) => self.remove_container_record(&c).await?,
            Err(e) if e.code() == tonic::Code::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }
}

/// Runs `f` in a task of its own: a caller that goes away (or a deadline it set) cannot
/// stop it halfway and leave a cell, an address or a process behind unrecorded.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(f)
        .await
        .map_err(|e| Status::internal(format!("CRI task: {e}")))?
}

/// A DNS-1123 subdomain (a pod's name, a namespace): labels of [a-z0-9-] joined by '.', at
/// most 253 characters. Also keeps `;`, `=` and NUL out of CNI_ARGS.
fn dns_subdomain(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 253 {
        return Err(invalid(field, format!("{v:?} is not 1..=253 characters")));
    }
    for label in v.split('.') {
        if let Some(r) = crate::spec::label_reason(label) {
            return Err(invalid(
                field,
                format!("{v:?}: label {label:?} {r} (a DNS-1123 subdomain)"),
            ));
        }
    }
    Ok(())
}

/// `path` as an absolute path below `root`, without `.` or `..` components.
fn below(root: &Path, field: &str, path: &str) -> Result<(), Status> {
    let p = Path::new(path);
    let clean = p.is_absolute()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !clean || !p.starts_with(root) || p == root {
        return Err(invalid(
            field,
            format!(
                "{path:?} must be an absolute path below --cri-log-root {} (no '.' or '..')",
                root.display()
            ),
        ));
    }
    Ok(())
}

fn metadata(sb: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: sb.name.clone(),
        uid: sb.uid.clone(),
        namespace: sb.namespace.clone(),
        attempt: sb.attempt,
    }
}

/// The volume name of the pod's emptyDir that kubelet mounts from `host`
/// (`…/pods/<pod uid>/volumes/kubernetes.io~empty-dir/<name>`), when `host` is one of the
/// pod `pod_uid`'s; `None` for anything else (another pod's, a subPath's bind, a hostPath).
fn empty_dir_name<'a>(host: &'a str, pod_uid: &str) -> Option<&'a str> {
    let mut parts = host.rsplit('/');
    let name = parts.next()?;
    let ok = parts.next() == Some("kubernetes.io~empty-dir")
        && parts.next() == Some("volumes")
        && parts.next() == Some(pod_uid)
        && parts.next() == Some("pods")
        && host.starts_with('/')
        && crate::spec::label_reason(name).is_none();
    ok.then_some(name)
}

/// The volume name when `host` is kubelet's bind of a `subPath` of the pod `pod_uid`'s
/// emptyDir (`…/pods/<uid>/volume-subpaths/<name>/<container>/<index>`, the emptyDir
/// `…/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>` there on this machine).
fn empty_dir_subpath(host: &str, pod_uid: &str) -> Option<String> {
    let parts: Vec<&str> = host.split('/').collect();
    let n = parts.len();
    if n < 6
        || parts[n - 6] != "pods"
        || parts[n - 5] != pod_uid
        || parts[n - 4] != "volume-subpaths"
    {
        return None;
    }
    let name = parts[n - 3];
    let pod = parts[..n - 4].join("/");
    Path::new(&format!("{pod}/volumes/kubernetes.io~empty-dir/{name}"))
        .is_dir()
        .then(|| name.to_owned())
}

/// The mounts of a container of an `aurae-vm` sandbox as files for its instance
/// (`Container.files`), read from the volumes its plan opened; one too large, or a
/// writable directory, is refused naming its mount.
///
/// The pod's emptyDirs (see [`empty_dir_name`]) are not copied: each becomes a directory of
/// the pod's cell in the instance (`Container.cell_directories`), shared by the pod's
/// containers there as the node's is here.
fn copy_volumes(
    volumes: &[crate::container::Volume],
    pod_uid: &str,
) -> Result<(Vec<pb::ContainerFile>, Vec<pb::CellDirectory>), Status> {
    use crate::container::copy::{Budget, Copied, copy};
    let mut budget = Budget::default();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        if !v.file
            && let Some(name) = empty_dir_name(&v.sent.to_string_lossy(), pod_uid)
        {
            dirs.push(pb::CellDirectory {
                name: name.to_owned(),
                path: v.target.display().to_string(),
                read_only: v.read_only,
            });
            continue;
        }
        let copied = copy(&v.source, v.file, &mut budget).map_err(|e| {
            Status::failed_precondition(format!(
                "{field}: copying {} into the sandbox's instance: {e}",
                v.sent.display()
            ))
        })?;
        let path = v.target.display().to_string();
        files.push(match copied {
            Copied::File(content, mode) => pb::ContainerFile {
                path,
                content,
                mode,
                read_only: v.read_only,
                entries: Vec::new(),
                directory: false,
            },
            Copied::Dir(_) if !v.read_only => {
                return Err(invalid(
                    &format!("{field}.readonly"),
                    "a writable directory other than the pod's emptyDir cannot be shared into \
                     an instance: mount it read-only",
                ));
            }
            Copied::Dir(entries) => pb::ContainerFile {
                path,
                read_only: true,
                directory: true,
                entries: entries
                    .into_iter()
                    .map(|(name, content, mode)| pb::DirectoryEntry {
                        name: name.display().to_string(),
                        content,
                        mode,
                    })
                    .collect(),
                ..Default::default()
            },
        });
    }
    Ok((files, dirs))
}

/// The container's run from its CRI config; every field we cannot honour is refused,
/// naming it, never dropped in silence (see SPECIFICATION.md for what is accepted and
/// not applied).
fn container_run(c: &cri::ContainerConfig) -> Result<ContainerRun, Status> {
    let mut run = ContainerRun {
        entrypoint: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone(),
        ..Default::default()
    };
    for (i, kv) in c.envs.iter().enumerate() {
        if kv.key.is_empty() || kv.key.contains('=') || kv.key.contains('\0') {
            return Err(invalid(
                &format!("config.envs[{i}].key"),
                format!("{:?} is not an environment variable name", kv.key),
            ));
        }
        run.env.insert(kv.key.clone(), kv.value.clone());
    }
    for (i, m) in c.mounts.iter().enumerate() {
        let f = |n: &str| format!("config.mounts[{i}].{n}");
        if !Path::new(&m.host_path).is_absolute() {
            return Err(invalid(
                &f("host_path"),
                format!("{:?} is not absolute", m.host_path),
            ));
        }
        if !Path::new(&m.container_path).is_absolute() {
            return Err(invalid(
                &f("container_path"),
                format!("{:?} is not absolute", m.container_path),
            ));
        }
        if m.propagation != cri::MountPropagation::PropagationPrivate as i32 {
            return Err(invalid(
                &f("propagation"),
                "only PROPAGATION_PRIVATE is supported (a container's mounts never propagate)",
            ));
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(invalid(
                &f("uid_mappings"),
                "id-mapped mounts are not supported",
            ));
        }
        if m.image.is_some() {
            return Err(invalid(&f("image"), "image volumes are not supported"));
        }
        run.volumes.push((
            m.host_path.clone(),
            m.container_path.clone(),
            m.readonly || m.recursive_read_only,
        ));
    }
    if !c.devices.is_empty() {
        return Err(invalid(
            "config.devices",
            "host devices in a container are not supported",
        ));
    }
    if !c.cdi_devices.is_empty() {
        return Err(invalid(
            "config.cdi_devices",
            "CDI devices are not supported",
        ));
    }
    if c.stdin_once && !c.stdin {
        return Err(invalid(
            "config.stdin_once",
            "closes a kept-open stdin: set config.stdin too",
        ));
    }
    run.stdin = c.stdin;
    run.stdin_once = c.stdin_once;
    run.tty = c.tty;
    run.resources = container_resources(
        "config.linux.resources",
        c.linux.as_ref().and_then(|l| l.resources.as_ref()),
    )?
    .0;
    if let Some(l) = &c.linux
        && let Some(s) = &l.security_context
    {
        let f = |n: &str| format!("config.linux.security_context.{n}");
        if s.privileged {
            return Err(invalid(
                &f("privileged"),
                "privileged containers are not supported",
            ));
        }
        if let Some(caps) = &s.capabilities
            && !(caps.add_capabilities.is_empty()
                && caps.drop_capabilities.is_empty()
                && caps.add_ambient_capabilities.is_empty())
        {
            return Err(invalid(
                &f("capabilities"),
                "changing a container's capabilities is not supported (it keeps the default set)",
            ));
        }
        if !s.run_as_username.is_empty() {
            return Err(invalid(
                &f("run_as_username"),
                "a user name is not supported: give run_as_user (a number)",
            ));
        }
        if !s.supplemental_groups.is_empty() {
            return Err(invalid(&f("supplemental_groups"), "not supported"));
        }
        if let Some(p) = &s.seccomp
            && p.profile_type == cri::security_profile::ProfileType::Localhost as i32
        {
            return Err(invalid(
                &f("seccomp"),
                "Localhost profiles are not supported (every container gets auraed's default filter)",
            ));
        }
        if let Some(ns) = &s.namespace_options
            && ns.pid == cri::NamespaceMode::Target as i32
        {
            return Err(invalid(
                &f("namespace_options.pid"),
                "TARGET is not supported",
            ));
        }
        run.uid = id_of(&f("run_as_user"), s.run_as_user.as_ref())?;
        run.gid = id_of(&f("run_as_group"), s.run_as_group.as_ref())?;
        if run.gid.is_some() && run.uid.is_none() {
            return Err(invalid(&f("run_as_group"), "needs run_as_user"));
        }
        run.read_only_root = s.readonly_rootfs;
        run.no_new_privileges = s.no_new_privs;
    }
    Ok(run)
}

#[tonic::async_trait]
impl RuntimeService for CriRuntime {
    async fn version(
        &self,
        _r: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".to_owned(),
            runtime_name: RUNTIME_NAME.to_owned(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            runtime_api_version: RUNTIME_API_VERSION.to_owned(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let me = self.clone();
        detached(async move { me.run_pod_sandbox_now(r).await }).await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let me = self.clone();
        detached(async move { me.stop_pod_sandbox_now(r).await }).await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let me = self.clone();
        detached(async move { me.remove_pod_sandbox_now(r).await }).await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let cri = self.cri().clone();
        let sb = cri.sandbox(&r.get_ref().pod_sandbox_id)?;
        let ready = self.sandbox_ready(&sb).await;
        let mut containers_statuses = Vec::new();
        for c in cri.containers_of(&sb.id) {
            containers_statuses.push(self.status_of(&c).await);
        }
        let mut info = std::collections::HashMap::new();
        if r.get_ref().verbose {
            info.insert(
                "info".to_owned(),
                serde_json::json!({
                    "cell": sb.cell,
                    "hostname": sb.hostname,
                    "log_directory": sb.log_directory,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(self.sandbox_status(&sb, ready)),
            info,
            containers_statuses,
            timestamp: now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let cri = self.cri().clone();
        let filter = r.into_inner().filter.unwrap_or_default();
        let all: Vec<SandboxRecord> = cri.lock().sandboxes.values().cloned().collect();
        let mut items = Vec::new();
        for sb in all {
            if !filter.id.is_empty() && !sb.id.starts_with(&filter.id) {
                continue;
            }
            if !selected(&sb.labels, &filter.label_selector) {
                continue;
            }
            let ready = self.sandbox_ready(&sb).await;
            let s = self.sandbox_status(&sb, ready);
            if filter.state.as_ref().is_some_and(|f| f.state != s.state) {
                continue;
            }
            items.push(cri::PodSandbox {
                id: s.id,
                metadata: s.metadata,
                state: s.state,
                created_at: s.created_at,
                labels: s.labels,
                annotations: s.annotations,
                runtime_handler: s.runtime_handler,
            });
        }
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        let sb = cri.sandbox(&m.pod_sandbox_id)?;
        let config = m.config.ok_or_else(|| invalid("config", "is missing"))?;
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| invalid("config.metadata", "is missing"))?;
        if let Some(r) = crate::spec::label_reason(&md.name) {
            return Err(invalid(
                "config.metadata.name",
                format!("{:?} {r} (a container name is a DNS label)", md.name),
            ));
        }
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| invalid("config.image.image", "is empty"))?;
        let run = container_run(&config)?;
        if sb.runtime_handler == VM_HANDLER {
            // Its mounts are copied into the instance when it starts: a file (kubelet's
            // /etc/hosts, a termination log) or a read-only directory (a service
            // account's token, a ConfigMap); the pod's emptyDir is a directory of the
            // pod's cell there. Another writable directory (a hostPath) would be a copy of
            // its own in each container, its writes never reaching this machine: refused.
            for (i, (host, _, ro)) in run.volumes.iter().enumerate() {
                if let Some(name) = empty_dir_subpath(host, &sb.uid) {
                    // Its copy would be of the node's emptyDir, which stays empty: the
                    // pod's is in the instance.
                    return Err(invalid(
                        &format!("config.mounts[{i}].host_path"),
                        format!(
                            "a subPath of the pod's emptyDir {name:?} cannot be mounted in an \
                             {VM_HANDLER:?} sandbox (its emptyDir lives in the instance): mount \
                             the whole volume"
                        ),
                    ));
                }
                if !ro && Path::new(host).is_dir() && empty_dir_name(host, &sb.uid).is_none() {
                    return Err(invalid(
                        &format!("config.mounts[{i}].readonly"),
                        format!(
                            "a writable directory other than the pod's emptyDir cannot be \
                             shared into an {VM_HANDLER:?} sandbox's instance (its mounts are \
                             copies made at the start): mount it read-only"
                        ),
                    ));
                }
            }
        }
        if config.windows.is_some() {
            return Err(invalid("config.windows", "this is a Linux runtime"));
        }
        let log_path = if config.log_path.is_empty() {
            String::new()
        } else {
            let rel = Path::new(&config.log_path);
            if sb.log_directory.is_empty() {
                return Err(invalid(
                    "config.log_path",
                    "the sandbox has no log_directory to put it in",
                ));
            }
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(invalid(
                    "config.log_path",
                    format!(
                        "{:?} must be relative to the sandbox's log_directory, without '..'",
                        config.log_path
                    ),
                ));
            }
            Path::new(&sb.log_directory)
                .join(rel)
                .to_string_lossy()
                .into_owned()
        };
        if !self.sandbox_ready(&sb).await {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is not ready (stopped or its cell is gone)",
                sb.id
            )));
        }
        let visible = super::image::visible(&cri).await?;
        let (reference, image_ref) =
            super::image::resolve(&cri, &visible, &image)?.ok_or_else(|| {
                Status::not_found(format!(
                    "config.image.image: {image:?} is not in the image store (PullImage first)"
                ))
            })?;
        let id = new_id();
        let rec = ContainerRecord {
            executable: format!("c-{}", &id[..16]),
            id: id.clone(),
            sandbox_id: sb.id.clone(),
            name: md.name,
            attempt: md.attempt,
            image,
            image_reference: reference,
            image_ref,
            labels: to_btree(&config.labels),
            annotations: to_btree(&config.annotations),
            log_path,
            run,
            created_at: now_nanos(),
            starting: false,
            started_at: None,
            ended: None,
        };
        cri.insert_container(&rec)?;
        self.emit(
            &rec.id,
            &rec.sandbox_id,
            cri::ContainerEventType::ContainerCreatedEvent,
        )
        .await;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let me = self.clone();
        detached(async move { me.start(r.into_inner()).await }).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let me = self.clone();
        detached(async move { me.stop_container_now(r).await }).await
    }

    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let me = self.clone();
        detached(async move { me.remove_container_now(r).await }).await
    }

    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let cri = self.cri().clone();
        let filter = r.into_inner().filter.unwrap_or_default();
        let all: Vec<ContainerRecord> = cri.lock().containers.values().cloned().collect();
        let mut containers = Vec::new();
        for c in all {
            if !filter.id.is_empty() && !c.id.starts_with(&filter.id) {
                continue;
            }
            if !filter.pod_sandbox_id.is_empty()
                && !c.sandbox_id.starts_with(&filter.pod_sandbox_id)
            {
                continue;
            }
            if !selected(&c.labels, &filter.label_selector) {
                continue;
            }
            let s = self.status_of(&c).await;
            if filter.state.as_ref().is_some_and(|f| f.state != s.state) {
                continue;
            }
            containers.push(cri::Container {
                id: s.id,
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: s.metadata,
                image: s.image,
                image_ref: s.image_ref,
                state: s.state,
                created_at: s.created_at,
                labels: s.labels,
                annotations: s.annotations,
                image_id: s.image_id,
            });
        }
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let cri = self.cri().clone();
        let c = cri.container(&r.get_ref().container_id)?;
        let mut info = std::collections::HashMap::new();
        if r.get_ref().verbose {
            let sb = cri.sandbox(&c.sandbox_id)?;
            info.insert(
                "info".to_owned(),
                serde_json::json!({
                    "cell": sb.cell,
                    "executable": c.executable,
                    "image_reference": c.image_reference,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(self.status_of(&c).await),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let me = self.clone();
        detached(async move { me.update_resources(r.into_inner()).await }).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let cri = self.cri().clone();
        let c = cri.container(&r.get_ref().container_id)?;
        cri.logs.reopen(&c.id, &cri.log_root)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        r: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        let (c, sb) = self.running(&m.container_id).await?;
        if m.timeout < 0 {
            return Err(invalid("timeout", "is negative"));
        }
        let msg = pb::ExecRequest {
            executable: Some(pb::ExecutableRef {
                cell: sb.cell.clone(),
                name: c.executable.clone(),
            }),
            argv: m.cmd,
            // 0: no timeout of kubelet's; ours is 10 minutes.
            timeout: Some(prost_types::Duration {
                seconds: if m.timeout == 0 {
                    600
                } else {
                    m.timeout.min(600)
                },
                nanos: 0,
            }),
        };
        let out = cri.place(&sb).await?.exe_exec(msg).await?;
        let exit_code = match out.exit.and_then(|e| e.how) {
            Some(pb::exit_status::How::Code(c)) => c,
            Some(pb::exit_status::How::Signal(s)) => 128 + s,
            None => 255,
        };
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code,
        }))
    }

    async fn exec(
        &self,
        r: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        // An unknown id is NOT_FOUND before anything else is looked at.
        cri.container(&m.container_id)?;
        if !(m.stdin || m.stdout || m.stderr) {
            return Err(invalid(
                "stdin",
                "one of stdin, stdout and stderr must be asked for",
            ));
        }
        if m.cmd.is_empty() || m.cmd[0].is_empty() {
            return Err(invalid("cmd", "is empty: give the command to run"));
        }
        let (c, sb) = self.running(&m.container_id).await?;
        // In an instance, it runs through the instance's interactive exec.
        let place = cri.place(&sb).await?;
        let instance = place.client().cloned().map(Box::new);
        // Authorized now, as the CRI identity (in an instance, its name too: here the
        // adapter checks the names when it runs); run when kubelet connects to the URL.
        let request = place.call(
            svc::EXECUTABLES,
            "Exec",
            pb::ExecRequest {
                executable: Some(pb::ExecutableRef {
                    cell: sb.cell.clone(),
                    name: c.executable.clone(),
                }),
                argv: m.cmd,
                timeout: None,
            },
        )?;
        let url = cri.streams()?.issue(super::stream::Pending::Exec {
            request,
            instance,
            stdin: m.stdin,
            stdout: m.stdout,
            stderr: m.stderr,
            tty: m.tty,
        })?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        r: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        // An unknown id is NOT_FOUND before anything else is looked at.
        cri.container(&m.container_id)?;
        if !(m.stdin || m.stdout || m.stderr) {
            return Err(invalid(
                "stdout",
                "one of stdin, stdout and stderr must be asked for",
            ));
        }
        let (c, sb) = self.running(&m.container_id).await?;
        if m.tty && !c.run.tty {
            return Err(invalid(
                "tty",
                "the container has no terminal (it was created without config.tty)",
            ));
        }
        if m.stdin && !c.run.stdin {
            return Err(invalid(
                "stdin",
                "the container's stdin is /dev/null (it was created without config.stdin)",
            ));
        }
        // Its output from where its CRI log writer got to, followed once kubelet
        // connects, and its input: authorized now as Executables/Attach of its executable
        // (here the adapter checks the names when it runs; for an instance,
        // `Place::call` now).
        let place = cri.place(&sb).await?;
        let start = pb::AttachStart {
            executable: Some(pb::ExecutableRef {
                cell: sb.cell.clone(),
                name: c.executable.clone(),
            }),
            stdin: m.stdin,
            from_offset: Some(cri.log_reached(&c.id)),
            size: None,
        };
        let request = place.call(svc::EXECUTABLES, "Attach", start)?;
        let instance = place.client().cloned().map(Box::new);
        let url = cri.streams()?.issue(super::stream::Pending::Attach {
            request,
            instance,
            stdin: m.stdin,
            stdout: m.stdout,
            stderr: m.stderr,
            tty: c.run.tty,
        })?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let cri = self.cri().clone();
        let m = r.into_inner();
        let sb = cri.sandbox(&m.pod_sandbox_id)?;
        for (i, p) in m.port.iter().enumerate() {
            if !(1..=65535).contains(p) {
                return Err(invalid(
                    &format!("port[{i}]"),
                    format!("{p} is outside 1..=65535"),
                ));
            }
        }
        if !self.sandbox_ready(&sb).await {
            return Err(Status::failed_precondition(format!(
                "sandbox {} is not ready",
                sb.id
            )));
        }
        // A port-forward reaches the pod's loopback: no further than an exec in it could,
        // so it takes the same grant on the sandbox's cell.
        let request = cri.call(svc::EXECUTABLES, "Exec", ())?;
        let caller = request
            .extensions()
            .get::<crate::api::authz::Caller>()
            .ok_or_else(|| Status::internal("a CRI call without its caller"))?;
        caller.authorize_name(&sb.cell)?;
        // A sandbox in an instance is reached at the instance's address (its network is
        // the pod's); one here through its cell's network namespace.
        let to =
            match cri.place(&sb).await?.instance() {
                Some(inst) => super::stream::Dial::Addr(std::net::IpAddr::V4(inst.addr)),
                None => super::stream::Dial::Netns(Arc::new(cri.netns_of(&sb.cell).ok_or_else(
                    || Status::failed_precondition(format!("the init of cell {} is gone", sb.cell)),
                )?)),
            };
        let url = cri.streams()?.issue(super::stream::Pending::PortForward {
            sandbox: sb.id.clone(),
            to,
        })?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let cri = self.cri().clone();
        let c = cri.container(&r.get_ref().container_id)?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(self.container_stats_of(&c).await),
        }))
    }

    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let cri = self.cri().clone();
        let filter = r.into_inner().filter.unwrap_or_default();
        let all: Vec<ContainerRecord> = cri.lock().containers.values().cloned().collect();
        let mut stats = Vec::new();
        for c in all {
            if (!filter.id.is_empty() && !c.id.starts_with(&filter.id))
                || (!filter.pod_sandbox_id.is_empty()
                    && !c.sandbox_id.starts_with(&filter.pod_sandbox_id))
                || !selected(&c.labels, &filter.label_selector)
            {
                continue;
            }
            stats.push(self.container_stats_of(&c).await);
        }
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let cri = self.cri().clone();
        let sb = cri.sandbox(&r.get_ref().pod_sandbox_id)?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(self.sandbox_stats_of(&sb).await?),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let cri = self.cri().clone();
        let filter = r.into_inner().filter.unwrap_or_default();
        let all: Vec<SandboxRecord> = cri.lock().sandboxes.values().cloned().collect();
        let mut stats = Vec::new();
        for sb in all {
            if (!filter.id.is_empty() && !sb.id.starts_with(&filter.id))
                || !selected(&sb.labels, &filter.label_selector)
            {
                continue;
            }
            match self.sandbox_stats_of(&sb).await {
                Ok(s) => stats.push(s),
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let cidr = r
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        if !cidr.is_empty() {
            info!(pod_cidr = %cidr, "CRI: the pod CIDR kubelet gave is kept (not used: the CNI configuration's IPAM decides addresses)");
        }
        *self
            .cri()
            .pod_cidr
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = cidr;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        r: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let cri = self.cri();
        let mut info = std::collections::HashMap::new();
        if r.get_ref().verbose {
            let pod_cidr = cri
                .pod_cidr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            info.insert(
                "config".to_owned(),
                serde_json::json!({
                    "identity": cri.identity.to_string(),
                    "pod_cidr": pod_cidr,
                    "mode": cri.ctx.mode,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![
                    cri::RuntimeCondition {
                        r#type: "RuntimeReady".to_owned(),
                        status: true,
                        reason: String::new(),
                        message: String::new(),
                    },
                    match cri.cni.config() {
                        Ok(_) => cri::RuntimeCondition {
                            r#type: "NetworkReady".to_owned(),
                            status: true,
                            reason: String::new(),
                            message: String::new(),
                        },
                        Err(why) => cri::RuntimeCondition {
                            r#type: "NetworkReady".to_owned(),
                            status: false,
                            reason: "NetworkPluginNotReady".to_owned(),
                            message: format!(
                                "no usable CNI network ({why}): a sandbox gets its own \
                                 network namespace with loopback only"
                            ),
                        },
                    },
                ],
            }),
            info,
            runtime_handlers: HANDLERS
                .iter()
                .map(|h| cri::RuntimeHandler {
                    name: (*h).to_owned(),
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: false,
                        user_namespaces: false,
                    }),
                })
                .collect(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _r: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented(
            "CheckpointContainer",
            "container checkpoints",
        ))
    }

    type GetContainerEventsStream = crate::api::ResponseStream<cri::ContainerEventResponse>;

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        // Events from now on; a subscriber that falls EVENTS_BUFFERED behind has its
        // stream ended with the count it missed (kubelet relists and subscribes again).
        let mut rx = self.cri().events.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let next = tokio::select! {
                    n = rx.recv() => n,
                    // The subscriber left.
                    () = tx.closed() => return,
                };
                let item = match next {
                    Ok(e) => Ok(e),
                    Err(RecvError::Lagged(n)) => Err(Status::aborted(format!(
                        "{n} container events were dropped (this subscriber fell behind): list again and subscribe anew"
                    ))),
                    Err(RecvError::Closed) => return,
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented(
            "ListMetricDescriptors",
            "CRI metrics (use the stats calls)",
        ))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented(
            "ListPodSandboxMetrics",
            "CRI metrics (use the stats calls)",
        ))
    }

    async fn runtime_config(
        &self,
        _r: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

impl CriRuntime {
    async fn container_stats_of(&self, c: &ContainerRecord) -> cri::ContainerStats {
        let cri = self.cri();
        let now = now_nanos();
        let mut out = cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: c.id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: c.name.clone(),
                    attempt: c.attempt,
                }),
                labels: to_hash(&c.labels),
                annotations: to_hash(&c.annotations),
            }),
            ..Default::default()
        };
        let Ok(sb) = cri.sandbox(&c.sandbox_id) else {
            return out;
        };
        if c.started_at.is_none() {
            return out;
        }
        let Ok(place) = cri.place(&sb).await else {
            return out;
        };
        if let Ok(s) = place
            .exe_stats(pb::ExecutableRef {
                cell: sb.cell.clone(),
                name: c.executable.clone(),
            })
            .await
        {
            out.cpu = Some(cri::CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: Some(cri::UInt64Value {
                    value: s.cpu_usage_usec.saturating_mul(1000),
                }),
                usage_nano_cores: None,
            });
            out.memory = Some(cri::MemoryUsage {
                timestamp: now,
                working_set_bytes: Some(cri::UInt64Value {
                    value: s.memory_current_bytes,
                }),
                usage_bytes: Some(cri::UInt64Value {
                    value: s.memory_current_bytes,
                }),
                ..Default::default()
            });
        }
        out
    }

    async fn sandbox_stats_of(&self, sb: &SandboxRecord) -> Result<cri::PodSandboxStats, Status> {
        let cri = self.cri();
        let now = now_nanos();
        let (cpu_usec, memory, pids) = cri.place(sb).await?.sandbox_usage(&sb.cell).await?;
        let mut containers = Vec::new();
        for c in cri.containers_of(&sb.id) {
            containers.push(self.container_stats_of(&c).await);
        }
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: sb.id.clone(),
                metadata: Some(metadata(sb)),
                labels: to_hash(&sb.labels),
                annotations: to_hash(&sb.annotations),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: now,
                    usage_core_nano_seconds: Some(cri::UInt64Value {
                        value: cpu_usec.saturating_mul(1000),
                    }),
                    usage_nano_cores: None,
                }),
                memory: Some(cri::MemoryUsage {
                    timestamp: now,
                    working_set_bytes: Some(cri::UInt64Value { value: memory }),
                    usage_bytes: Some(cri::UInt64Value { value: memory }),
                    ..Default::default()
                }),
                network: None,
                process: Some(cri::ProcessUsage {
                    timestamp: now,
                    process_count: Some(cri::UInt64Value { value: pids }),
                }),
                containers,
            }),
            windows: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pods_own_empty_dirs_are_shared_as_its_cells_directories() {
        let uid = "6f1f1a4e-0b9d-4a36-9a0c-1b2c3d4e5f60";
        let at = |rest: &str| format!("/var/lib/kubelet/pods/{uid}/volumes/{rest}");
        assert_eq!(
            empty_dir_name(&at("kubernetes.io~empty-dir/cache"), uid),
            Some("cache")
        );
        for (host, why) in [
            (at("kubernetes.io~empty-dir/cache"), "another pod's"),
            (at("kubernetes.io~configmap/cache"), "not an emptyDir"),
            (at("kubernetes.io~empty-dir/Cache_1"), "not a DNS label"),
            (at("kubernetes.io~empty-dir/cache/sub"), "below one"),
            (
                format!("/var/lib/kubelet/pods/{uid}/volume-subpaths/cache/web/0"),
                "a subPath's bind",
            ),
            (
                format!("pods/{uid}/volumes/kubernetes.io~empty-dir/cache"),
                "relative",
            ),
        ] {
            let pod = if why == "another pod's" { "other" } else { uid };
            assert_eq!(empty_dir_name(&host, pod), None, "{why}: {host}");
        }
        // A subPath of the pod's emptyDir (there on this machine) is known as one; of
        // another volume, or another pod's, it is not.
        let tmp = tempfile::tempdir().unwrap();
        let pod = tmp.path().join(format!("pods/{uid}"));
        std::fs::create_dir_all(pod.join("volumes/kubernetes.io~empty-dir/cache")).unwrap();
        let sub = |vol: &str| format!("{}/volume-subpaths/{vol}/web/0", pod.display());
        assert_eq!(
            empty_dir_subpath(&sub("cache"), uid).as_deref(),
            Some("cache")
        );
        assert_eq!(empty_dir_subpath(&sub("config"), uid), None);
        assert_eq!(empty_dir_subpath(&sub("cache"), "other"), None);
    }

    #[test]
    fn ids_the_kernel_reads_as_unchanged_are_refused() {
        let v = |x| Some(cri::Int64Value { value: x });
        assert_eq!(id_of("u", v(0).as_ref()).unwrap(), Some(0));
        assert_eq!(
            id_of("u", v(4_294_967_294).as_ref()).unwrap(),
            Some(4_294_967_294)
        );
        for bad in [-1, 4_294_967_295, 1 << 40] {
            let e = id_of("run_as_user", v(bad).as_ref()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("run_as_user:"), "{}", e.message());
        }
    }

    #[test]
    fn pod_resources_become_cell_limits() {
        assert_eq!(limits(None).unwrap(), None);
        assert_eq!(limits(Some(&Default::default())).unwrap(), None);
        let l = limits(Some(&cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            cpu_shares: 1024,
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(l.memory_max_bytes, Some(64 << 20));
        assert_eq!(l.cpu_max.unwrap().quota_us, 50_000);
        assert_eq!(l.cpu_weight, Some(39));
        assert!(
            limits(Some(&cri::LinuxContainerResources {
                memory_limit_in_bytes: -5,
                ..Default::default()
            }))
            .is_err()
        );
    }

    /// A container's resources: kept as given (its status reports them), applied as its
    /// own group's limits (shares → weight, the oom group from `unified`); an update
    /// takes only what it sets; bad values name their field.
    #[test]
    fn container_resources_are_kept_as_given_and_become_limits() {
        let kubelet = cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_shares: 2,
            cpu_period: 100_000,
            cpuset_cpus: "0".into(),
            unified: [
                ("memory.oom.group".to_owned(), "1".to_owned()),
                ("memory.high".to_owned(), "max".to_owned()),
            ]
            .into(),
            oom_score_adj: 1000,
            ..Default::default()
        };
        let (kept, l) = container_resources("config.linux.resources", Some(&kubelet)).unwrap();
        assert_eq!(
            (
                l.memory_max_bytes,
                l.cpu_weight,
                l.cpu_max,
                l.memory_oom_group
            ),
            (Some(64 << 20), Some(1), None, Some(true))
        );
        assert_eq!(l.cpuset_cpus, "0");
        assert_eq!(
            limits_of_kept(&kept).unwrap(),
            l,
            "the start applies what was kept"
        );
        let back = cri_resources(&kept);
        assert_eq!(
            (back.memory_limit_in_bytes, back.cpu_shares, back.cpu_period),
            (64 << 20, 2, 100_000)
        );
        assert_eq!(back.unified.len(), 1, "only what is applied is reported");
        // An update of the memory alone keeps the rest.
        let (update, _) = container_resources(
            "linux",
            Some(&cri::LinuxContainerResources {
                memory_limit_in_bytes: 96 << 20,
                ..Default::default()
            }),
        )
        .unwrap();
        let mut merged = kept.clone();
        merged.merge(&update);
        assert_eq!(
            (
                merged.memory_limit_in_bytes,
                merged.cpu_shares,
                merged.cpuset_cpus.as_str()
            ),
            (96 << 20, 2, "0")
        );
        assert_eq!(merged.memory_oom_group, Some(true));
        // Nothing given: a group of its own without limits.
        let (none, l) = container_resources("config.linux.resources", None).unwrap();
        assert_eq!((none, l), (Resources::default(), pb::CellLimits::default()));
        for (bad, field) in [
            (
                cri::LinuxContainerResources {
                    cpu_quota: -2,
                    ..Default::default()
                },
                "linux",
            ),
            (
                cri::LinuxContainerResources {
                    unified: [("memory.oom.group".to_owned(), "yes".to_owned())].into(),
                    ..Default::default()
                },
                "linux.unified[\"memory.oom.group\"]",
            ),
            (
                cri::LinuxContainerResources {
                    cpuset_mems: "1-0".into(),
                    ..Default::default()
                },
                "linux.cpuset_mems",
            ),
            (
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: 4096,
                    ..Default::default()
                },
                "linux.memory_limit_in_bytes",
            ),
        ] {
            let err = container_resources("linux", Some(&bad)).unwrap_err();
            assert!(err.message().starts_with(field), "{field}: {err:?}");
        }
    }

    #[test]
    fn container_configs_we_cannot_honour_are_refused_by_field() {
        let base = cri::ContainerConfig {
            command: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert!(container_run(&base).is_ok());
        let run = container_run(&cri::ContainerConfig {
            stdin: true,
            stdin_once: true,
            tty: true,
            ..base.clone()
        })
        .unwrap();
        assert!(run.stdin && run.stdin_once && run.tty);
        let cases: Vec<(cri::ContainerConfig, &str)> = vec![
            (
                cri::ContainerConfig {
                    stdin_once: true,
                    ..base.clone()
                },
                "config.stdin_once",
            ),
            (
                cri::ContainerConfig {
                    devices: vec![cri::Device::default()],
                    ..base.clone()
                },
                "config.devices",
            ),
            (
                cri::ContainerConfig {
                    envs: vec![cri::KeyValue {
                        key: "A=B".into(),
                        value: "x".into(),
                    }],
                    ..base.clone()
                },
                "config.envs[0].key",
            ),
            (
                cri::ContainerConfig {
                    mounts: vec![cri::Mount {
                        host_path: "rel".into(),
                        container_path: "/x".into(),
                        ..Default::default()
                    }],
                    ..base.clone()
                },
                "config.mounts[0].host_path",
            ),
            (
                cri::ContainerConfig {
                    mounts: vec![cri::Mount {
                        host_path: "/a".into(),
                        container_path: "/x".into(),
                        propagation: cri::MountPropagation::PropagationBidirectional as i32,
                        ..Default::default()
                    }],
                    ..base.clone()
                },
                "config.mounts[0].propagation",
            ),
            (
                cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            privileged: true,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                "config.linux.security_context.privileged",
            ),
            (
                cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            run_as_user: Some(cri::Int64Value { value: -1 }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                "config.linux.security_context.run_as_user",
            ),
        ];
        for (c, field) in cases {
            let e = container_run(&c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}");
            assert!(
                e.message().starts_with(&format!("{field}:")),
                "{field}: {}",
                e.message()
            );
        }
    }
}
