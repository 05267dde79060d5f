//! The Kubernetes Container Runtime Interface (CRI `runtime.v1`) on a local Unix socket.
//!
//! kubelet's calls become calls of our own API, made as the configured CRI identity
//! (`--cri-identity`): every one passes the same checks, grants and quotas as a call
//! from `aer` would (the identity's grant in the policy decides which methods, names,
//! uids, volumes and registries the CRI may use). A pod sandbox is a cell named
//! `k8s-<16 hex of its id>`; a container is an executable `c-<16 hex of its id>` in it,
//! a container of our own (RunCell's machinery). What the CRI has and our API does not
//! (metadata, labels, annotations, the created-but-not-started state, log paths) is kept
//! in durable records (`<state>/records/cri-sandbox`, `cri-container`) and re-adopted
//! with the cells after a restart.
//!
//! A sandbox of the `aurae-vm` handler is an instance spawned for it, its cell inside
//! (see `place`). Pod networks come from CNI ([`cni`]); ExecSync runs through
//! `Executables/Exec`; Exec and PortForward through the streaming server ([`stream`]).
//! Not built yet, answered UNIMPLEMENTED with the reason: Attach, a streamed exec in an
//! instance, container resource updates, checkpoints, metric descriptors. Container events come from the
//! calls that change something and from a watcher of each started container's end.
//!
//! Calls that change something run in a task of their own (a kubelet that gives up cannot
//! leave a cell or an address half-made), records change in place under one lock (a
//! concurrent remove is never undone by a late write), and a sandbox is made once per
//! metadata at a time (kubelet's retries find the first one).

pub mod cni;
pub mod image;
pub mod log;
mod place;
pub mod runtime;
pub mod stream;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use aurae_identity::SpiffeId;
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::{
    api::{
        Context, authz::Caller, cell::CellsApi, executable::ExecutablesApi, image::ImagesApi,
        runtime::RuntimeApi,
    },
    identity::policy::Policy,
    instance::Instance,
    store::Store,
};

use crate::store::kinds::{
    CRI_CONTAINER as CONTAINER_KIND, CRI_LOG_OFFSET as LOG_OFFSET_KIND, CRI_SANDBOX as SANDBOX_KIND,
};

/// Events kept for a GetContainerEvents subscriber that lags; one that falls further
/// behind has its stream ended (kubelet then relists).
const EVENTS_BUFFERED: usize = 1024;

/// Room for the images of an `aurae-vm` sandbox sized from its pod's memory limit: its
/// containers' images are unpacked in the instance's memory.
const IMAGES_IN_INSTANCE: u64 = 256 << 20;

/// How long an `aurae-vm` sandbox's instance may take to become ready: a microVM boot
/// under nested virtualisation is tens of seconds; kubelet gives RunPodSandbox two
/// minutes (`--runtime-request-timeout`), so the answer comes inside that.
const INSTANCE_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(110);

/// Nanoseconds since the epoch, as the CRI counts time.
pub(crate) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub(crate) fn now_nanos() -> i64 {
    unix_nanos(SystemTime::now())
}

/// A new id: 64 hex digits, as kubelet and crictl expect.
fn new_id() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The namespace modes a sandbox really runs with (CRI `NamespaceMode` numbers).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Modes {
    pub network: i32,
    pub pid: i32,
    pub ipc: i32,
}

/// A pod sandbox: a cell, and what the CRI knows of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub cell: String,
    pub hostname: String,
    pub log_directory: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
    pub created_at: i64,
    pub modes: Modes,
    /// StopPodSandbox was called (or its cell is gone): NOTREADY from then on.
    pub stopped: bool,
    /// The pod network CNI attached (until StopPodSandbox detaches it); absent: none
    /// (host network, or no CNI configuration when it was made).
    #[serde(default)]
    pub network: Option<cni::Attached>,
    /// The sandbox's port mappings as CNI's `runtimeConfig.portMappings`.
    #[serde(default)]
    pub port_mappings: serde_json::Value,
    /// The pod's DNS settings: every container's `/etc/resolv.conf`. None: the image's.
    #[serde(default)]
    pub dns: Option<crate::container::spec::Dns>,
}

/// What a container runs: the parts of its CRI config our containers take.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ContainerRun {
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    /// (host path, container path, read-only)
    pub volumes: Vec<(String, String, bool)>,
    /// Its stdin kept open for Attach (`config.stdin`), closed after the first attach
    /// (`config.stdin_once`); a terminal of its own (`config.tty`).
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    #[serde(default)]
    pub tty: bool,
    /// Its resources as kubelet gave them (at CreateContainer, changed by
    /// UpdateContainerResources): applied to its executable's own cgroup, reported in its
    /// status.
    #[serde(default)]
    pub resources: Resources,
}

/// A container's resources as kubelet gives them (`LinuxContainerResources`): the fields
/// auraed applies, in the CRI's own units (0 = unset), so its status reports them as
/// given (kubelet compares them when it resizes a pod in place).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit_in_bytes: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    /// `unified["memory.oom.group"]` (kubelet sets "1" on cgroup v2 nodes).
    pub memory_oom_group: Option<bool>,
}

/// How a container ended, once seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ended {
    pub exit_code: i32,
    pub finished_at: i64,
    pub reason: String,
    pub message: String,
}

/// A container: an executable of its sandbox's cell once started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    /// The executable's name in the sandbox's cell.
    pub executable: String,
    /// The image as the request named it.
    pub image: String,
    /// The stored reference it resolved to (what the executable runs).
    pub image_reference: String,
    /// `<registry>/<repository>@<manifest digest>`.
    pub image_ref: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The CRI log file (absolute), empty for none.
    pub log_path: String,
    pub run: ContainerRun,
    pub created_at: i64,
    /// StartContainer is starting it (its executable may exist): no second start, and a
    /// removal stops and frees what may be there.
    #[serde(default)]
    pub starting: bool,
    /// Set once StartContainer started it.
    pub started_at: Option<i64>,
    pub ended: Option<Ended>,
}

/// Most sandbox records auraed keeps (stopped ones included, until removed).
pub const MAX_SANDBOXES: usize = 4096;
/// Most container records of one sandbox (exited ones included, until removed: kubelet
/// keeps one dead container per container for its restarts).
pub const MAX_CONTAINERS_PER_SANDBOX: usize = 256;
/// Most container records auraed keeps.
pub const MAX_CONTAINERS: usize = 16_384;

/// The records, by id.
#[derive(Debug, Default)]
struct State {
    sandboxes: BTreeMap<String, SandboxRecord>,
    containers: BTreeMap<String, ContainerRecord>,
}

/// The CRI's adapters and records.
#[derive(Debug)]
pub struct Cri {
    identity: SpiffeId,
    policy: Arc<Policy>,
    ctx: Context,
    runtime: RuntimeApi,
    cells: CellsApi,
    executables: ExecutablesApi,
    images: ImagesApi,
    store: Option<Store>,
    state: Mutex<State>,
    /// One RunPodSandbox per metadata at a time (kubelet's retries of one request must
    /// find the first one's record); others run at once.
    creating: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The directory every sandbox's log directory must lie below.
    log_root: PathBuf,
    logs: log::Writers,
    /// The pod CIDR kubelet gave (UpdateRuntimeConfig); kept for a CNI to come.
    pod_cidr: Mutex<String>,
    /// Where the image store lives (ImageFsInfo).
    images_dir: PathBuf,
    cni: cni::Cni,
    /// The streaming server (Exec, PortForward), once it listens.
    streams: std::sync::OnceLock<Arc<stream::Streams>>,
    /// Container and sandbox events for GetContainerEvents' subscribers.
    events: tokio::sync::broadcast::Sender<aurae_proto::cri::v1::ContainerEventResponse>,
    /// Clients of `aurae-vm` sandboxes' instances, by sandbox id (with the instance they
    /// reach: one spawned again under the name gets a client of its own).
    clients: Mutex<std::collections::HashMap<String, (Arc<Instance>, aurae_client::Client)>>,
    /// How far each container's CRI log writer has read its output (where an Attach
    /// starts following it).
    reached: Mutex<std::collections::HashMap<String, u64>>,
}

impl Cri {
    /// The CRI over `ctx`, its records loaded from `store` (unreadable ones quarantined
    /// and returned as warnings).
    pub fn new(
        identity: SpiffeId,
        policy: Arc<Policy>,
        ctx: Context,
        store: Option<Store>,
        images_dir: PathBuf,
        cni: cni::Cni,
        log_root: PathBuf,
    ) -> (Arc<Self>, Vec<String>) {
        let mut warnings = Vec::new();
        let mut state = State::default();
        if let Some(s) = &store {
            let sb = s.load::<SandboxRecord>(SANDBOX_KIND);
            warnings.extend(sb.quarantined);
            for (_, r) in sb.records {
                state.sandboxes.insert(r.id.clone(), r);
            }
            let cs = s.load::<ContainerRecord>(CONTAINER_KIND);
            warnings.extend(cs.quarantined);
            for (_, r) in cs.records {
                if state.sandboxes.contains_key(&r.sandbox_id) {
                    state.containers.insert(r.id.clone(), r);
                } else {
                    warnings.push(format!(
                        "CRI container {} names sandbox {} which has no record: dropped",
                        r.id, r.sandbox_id
                    ));
                    let _ = s.delete(CONTAINER_KIND, &r.id);
                }
            }
        }
        let cri = Arc::new(Self {
            runtime: RuntimeApi::new(ctx.clone()),
            cells: CellsApi::new(ctx.cpus, ctx.cells.clone(), ctx.quotas.clone()),
            executables: ExecutablesApi::new(ctx.cells.clone()),
            images: ImagesApi::new(ctx.puller.clone(), None),
            identity,
            policy,
            ctx,
            store,
            state: Mutex::new(state),
            creating: Mutex::new(std::collections::HashMap::new()),
            log_root,
            logs: log::Writers::default(),
            pod_cidr: Mutex::new(String::new()),
            images_dir,
            cni,
            streams: std::sync::OnceLock::new(),
            events: tokio::sync::broadcast::channel(EVENTS_BUFFERED).0,
            clients: Mutex::new(std::collections::HashMap::new()),
            reached: Mutex::new(std::collections::HashMap::new()),
        });
        (cri, warnings)
    }

    /// After a restart: the log writers of the containers that still run, continued where
    /// the last auraed left them.
    pub async fn readopt(self: &Arc<Self>) {
        // Cells a sandbox was being made in when the last auraed died (no record): freed.
        let recorded: std::collections::BTreeSet<String> = self
            .lock()
            .sandboxes
            .values()
            .map(|s| s.cell.clone())
            .collect();
        let orphans: Vec<String> = self
            .ctx
            .cells
            .list(|n| n.starts_with("k8s-") && !n.contains('/'))
            .iter()
            .map(|c| c.spec.name.to_string())
            .filter(|n| !recorded.contains(n))
            .collect();
        for name in orphans {
            match place::Place::Here(self.clone()).cell_free(&name).await {
                Ok(()) => {
                    warn!(cell = %name, "CRI: a sandbox's cell without a record (its RunPodSandbox never finished) was freed")
                }
                Err(e) => {
                    warn!(cell = %name, "CRI: freeing a sandbox's cell without a record: {}", e.message())
                }
            }
        }
        // Instances a sandbox was being made in when the last auraed died: freed.
        let orphans: Vec<_> = self
            .ctx
            .instances
            .list(|n| n.starts_with("k8s-"))
            .into_iter()
            .filter(|i| !recorded.contains(i.spec.name.as_str()))
            .collect();
        for inst in orphans {
            match self.ctx.instances.free_exact(&inst).await {
                Ok(()) => {
                    warn!(instance = %inst.spec.name, "CRI: a sandbox's instance without a record (its RunPodSandbox never finished) was freed")
                }
                Err(e) => {
                    warn!(instance = %inst.spec.name, "CRI: freeing a sandbox's instance without a record: {e}")
                }
            }
        }
        // Containers whose start was cut: started if their executable is there.
        let starting: Vec<ContainerRecord> = self
            .lock()
            .containers
            .values()
            .filter(|c| c.starting)
            .cloned()
            .collect();
        for c in starting {
            let exists = match self.sandbox(&c.sandbox_id) {
                Ok(sb) => match self.place(&sb).await {
                    Ok(p) => p
                        .exe_get(aurae_proto::runtime::v0::ExecutableRef {
                            cell: sb.cell.clone(),
                            name: c.executable.clone(),
                        })
                        .await
                        .is_ok(),
                    Err(_) => false,
                },
                Err(_) => false,
            };
            let now = now_nanos();
            let _ = self.update_container(&c.id, |r| {
                r.starting = false;
                if exists {
                    r.started_at = Some(now);
                }
                true
            });
        }
        self.resume_logs().await;
        // Their ends reported again as they come (GetContainerEvents).
        let running: Vec<String> = self
            .lock()
            .containers
            .values()
            .filter(|c| c.started_at.is_some() && c.ended.is_none())
            .map(|c| c.id.clone())
            .collect();
        let rt = runtime::CriRuntime(self.clone());
        for id in running {
            rt.keep_mounts_fresh(id.clone(), false);
            rt.watch(id);
        }
    }

    /// The log followers of the containers that still run, continued where the last
    /// auraed left them.
    async fn resume_logs(self: &Arc<Self>) {
        let running: Vec<ContainerRecord> = self
            .lock()
            .containers
            .values()
            .filter(|c| c.started_at.is_some() && c.ended.is_none() && !c.log_path.is_empty())
            .cloned()
            .collect();
        for c in running {
            if let Err(e) = self.start_log(&c).await {
                warn!(container = %c.id, "CRI log of a re-adopted container: {}", e.message());
            }
        }
        let n = self.lock().sandboxes.len();
        if n > 0 {
            info!(sandboxes = n, "CRI sandboxes re-adopted");
        }
    }

    /// Where the sandbox's cell is: here, or in its instance (`aurae-vm`; NOT_FOUND once
    /// the instance is gone, UNAVAILABLE while it does not answer).
    async fn place(self: &Arc<Self>, sb: &SandboxRecord) -> Result<place::Place, Status> {
        if sb.runtime_handler != runtime::VM_HANDLER {
            return Ok(place::Place::Here(self.clone()));
        }
        let gone = || {
            Status::not_found(format!(
                "the instance {} of sandbox {} is gone",
                sb.cell, sb.id
            ))
        };
        let inst = self.instance_of(sb).ok_or_else(gone)?;
        let cached = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&sb.id)
            .filter(|(i, _)| Arc::ptr_eq(i, &inst))
            .map(|(_, c)| c.clone());
        let client = match cached {
            Some(c) => c,
            None => {
                let c = self.ctx.instances.connect(&inst).await.map_err(|e| {
                    Status::unavailable(format!("the instance of sandbox {}: {e}", sb.id))
                })?;
                self.clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sb.id.clone(), (inst.clone(), c.clone()));
                c
            }
        };
        Ok(place::Place::Instance {
            cri: self.clone(),
            inst,
            client,
        })
    }

    /// Spawns the instance of an `aurae-vm` sandbox (named as its cell), as the CRI
    /// identity: Spawn's checks, grant and quota apply. Its memory: the pod's limit and
    /// the instance's own share beside room for images, or Spawn's default.
    async fn spawn_instance(
        &self,
        sb: &SandboxRecord,
        limits: Option<&aurae_proto::runtime::v0::CellLimits>,
    ) -> Result<(), Status> {
        use aurae_proto::runtime::v0::runtime_server::Runtime as _;
        let memory_bytes = limits.and_then(|l| l.memory_max_bytes).map_or(0, |max| {
            max.saturating_add(crate::pod::spec::VM_OVERHEAD)
                .saturating_add(IMAGES_IN_INSTANCE)
                .next_multiple_of(2 << 20)
        });
        let r = self.call(
            aurae_proto::service_names::RUNTIME,
            "Spawn",
            aurae_proto::runtime::v0::Instance {
                name: sb.cell.clone(),
                memory_bytes,
                ready_timeout: prost_types::Duration::try_from(INSTANCE_READY_TIMEOUT).ok(),
                ..Default::default()
            },
        )?;
        let st = self.runtime.spawn(r).await?.into_inner();
        info!(sandbox = %sb.id, instance = %sb.cell, addresses = ?st.addresses, "CRI sandbox's instance ready");
        Ok(())
    }

    /// Frees the instance of an `aurae-vm` sandbox (and with it all that ran in it);
    /// nothing when it is gone or the sandbox is a cell here.
    async fn free_instance(&self, sb: &SandboxRecord) -> Result<(), Status> {
        if sb.runtime_handler != runtime::VM_HANDLER {
            return Ok(());
        }
        self.forget_client(&sb.id);
        self.call(
            aurae_proto::service_names::INSTANCES,
            "Free",
            aurae_proto::runtime::v0::NameRef {
                name: sb.cell.clone(),
            },
        )?;
        let Ok(name) = crate::spec::Label::parse("cell", &sb.cell) else {
            return Ok(());
        };
        match self.ctx.instances.free(&name).await {
            Ok(()) | Err(crate::workload::WorkloadError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The instance of an `aurae-vm` sandbox, while it exists.
    fn instance_of(&self, sb: &SandboxRecord) -> Option<Arc<Instance>> {
        if sb.runtime_handler != runtime::VM_HANDLER {
            return None;
        }
        let name = crate::spec::Label::parse("cell", &sb.cell).ok()?;
        self.ctx.instances.find(&name).ok().filter(|i| !i.gone())
    }

    /// Forgets the client of a sandbox's instance (it was freed).
    fn forget_client(&self, sandbox: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sandbox);
    }

    /// The network namespace of a sandbox's cell, opened from its init (`None`: the
    /// cell or its init is gone).
    fn netns_of(&self, cell: &str) -> Option<std::os::fd::OwnedFd> {
        let name = crate::spec::CellName::parse("cell", cell).ok()?;
        let pid = self.ctx.cells.get(&name).ok()?.init_pid()?;
        std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(std::os::fd::OwnedFd::from)
    }

    /// Starts the streaming server on `addr` (Exec and PortForward answer its URLs).
    pub async fn start_streaming(
        &self,
        addr: std::net::SocketAddr,
        shutdown: tokio::sync::watch::Receiver<Option<std::time::Duration>>,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let s = stream::start(addr, self.executables.clone(), shutdown).await?;
        let bound = s.addr();
        let _ = self.streams.set(s);
        Ok(bound)
    }

    fn streams(&self) -> Result<&Arc<stream::Streams>, Status> {
        self.streams
            .get()
            .ok_or_else(|| Status::unavailable("the CRI streaming server is not listening"))
    }

    /// What the CNI plugins are told about a sandbox.
    fn cni_target(sb: &SandboxRecord) -> cni::Target<'_> {
        cni::Target {
            container_id: &sb.id,
            pod_name: &sb.name,
            pod_namespace: &sb.namespace,
            pod_uid: &sb.uid,
            port_mappings: sb.port_mappings.clone(),
        }
    }

    /// Detaches the sandbox's pod network (CNI DEL), recorded; nothing when it has none.
    async fn detach_network(&self, sb: &mut SandboxRecord) -> Result<(), Status> {
        let Some(net) = sb.network.clone() else {
            return Ok(());
        };
        let netns = self.netns_of(&sb.cell).map(Arc::new);
        self.cni
            .del(&net.conf, Some(&net.result), netns, &Self::cni_target(sb))
            .await
            .map_err(|e| Status::unavailable(format!("pod network of sandbox {}: {e}", sb.id)))?;
        sb.network = None;
        self.update_sandbox(&sb.id, |r| {
            r.network = None;
            true
        })
        .map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request to one of our own services, as the CRI identity: its grant for `method`
    /// is looked up in the policy exactly as the authorization layer does.
    fn call<T>(&self, service: &str, method: &str, msg: T) -> Result<Request<T>, Status> {
        let full = format!("{service}/{method}");
        let grant = self
            .policy
            .authorize(&self.identity, &full)
            .ok_or_else(|| {
                info!(target: "aurae::audit", peer_id = %self.identity, method = %full, resource = "-", via = "cri", decision = "deny");
                Status::permission_denied(format!(
                    "the CRI identity {} may not call {full}: grant it in the policy",
                    self.identity
                ))
            })?;
        info!(target: "aurae::audit", peer_id = %self.identity, method = %full, resource = "-", via = "cri", decision = "allow");
        let mut r = Request::new(msg);
        r.extensions_mut().insert(Caller {
            id: self.identity.clone(),
            grant,
            method: Arc::from(full.as_str()),
            request_id: uuid::Uuid::new_v4(),
        });
        Ok(r)
    }

    /// Records are written atomically, not synced: like the records of cells and
    /// executables, they describe processes that do not outlive the machine. Written
    /// under the state lock, so the store and the map never disagree.
    fn write(&self, kind: &str, id: &str, value: &impl Serialize) -> Result<(), Status> {
        match &self.store {
            Some(s) => s
                .put_atomic(kind, id, value)
                .map_err(|e| Status::internal(format!("recording {kind} {id}: {e}"))),
            None => Ok(()),
        }
    }

    /// A new sandbox's record.
    fn insert_sandbox(&self, r: &SandboxRecord) -> Result<(), Status> {
        let mut st = self.lock();
        self.write(SANDBOX_KIND, &r.id, r)?;
        st.sandboxes.insert(r.id.clone(), r.clone());
        Ok(())
    }

    /// A new container's record, if its sandbox still exists and has no container of
    /// that name and attempt.
    fn insert_container(&self, r: &ContainerRecord) -> Result<(), Status> {
        let mut st = self.lock();
        if !st.sandboxes.contains_key(&r.sandbox_id) {
            return Err(Status::not_found(format!(
                "sandbox {} does not exist (removed meanwhile)",
                r.sandbox_id
            )));
        }
        if st
            .containers
            .values()
            .any(|c| c.sandbox_id == r.sandbox_id && c.name == r.name && c.attempt == r.attempt)
        {
            return Err(Status::already_exists(format!(
                "config.metadata: sandbox {} already has a container {:?} attempt {}",
                r.sandbox_id, r.name, r.attempt
            )));
        }
        let in_sandbox = st
            .containers
            .values()
            .filter(|c| c.sandbox_id == r.sandbox_id)
            .count();
        if in_sandbox >= MAX_CONTAINERS_PER_SANDBOX || st.containers.len() >= MAX_CONTAINERS {
            return Err(Status::resource_exhausted(format!(
                "sandbox {} holds {in_sandbox} container records and auraed {} (at most \
                 {MAX_CONTAINERS_PER_SANDBOX} and {MAX_CONTAINERS}): remove exited \
                 containers first (kubelet's garbage collection does)",
                r.sandbox_id,
                st.containers.len()
            )));
        }
        self.write(CONTAINER_KIND, &r.id, r)?;
        st.containers.insert(r.id.clone(), r.clone());
        Ok(())
    }

    /// Changes the sandbox's record in place: `f` says whether it changed anything.
    /// `None`: there is no such record any more (removed meanwhile): nothing is written.
    fn update_sandbox(
        &self,
        id: &str,
        f: impl FnOnce(&mut SandboxRecord) -> bool,
    ) -> Result<Option<SandboxRecord>, Status> {
        let mut st = self.lock();
        let Some(r) = st.sandboxes.get_mut(id) else {
            return Ok(None);
        };
        let mut next = r.clone();
        if f(&mut next) {
            self.write(SANDBOX_KIND, id, &next)?;
            *r = next.clone();
        }
        Ok(Some(next))
    }

    /// [`Cri::update_sandbox`] for a container's record.
    fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord) -> bool,
    ) -> Result<Option<ContainerRecord>, Status> {
        let mut st = self.lock();
        let Some(r) = st.containers.get_mut(id) else {
            return Ok(None);
        };
        let mut next = r.clone();
        if f(&mut next) {
            self.write(CONTAINER_KIND, id, &next)?;
            *r = next.clone();
        }
        Ok(Some(next))
    }

    /// The lock of one sandbox metadata (RunPodSandbox runs once per metadata at a time).
    fn creating(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_owned()).or_default().clone()
    }

    fn delete_container(&self, id: &str) {
        let mut st = self.lock();
        if let Some(s) = &self.store
            && let Err(e) = s.delete(CONTAINER_KIND, id)
        {
            warn!(container = id, "removing the CRI container's record: {e}");
        }
        st.containers.remove(id);
    }

    fn delete_sandbox(&self, id: &str) {
        let mut st = self.lock();
        if let Some(s) = &self.store
            && let Err(e) = s.delete(SANDBOX_KIND, id)
        {
            warn!(sandbox = id, "removing the CRI sandbox's record: {e}");
        }
        st.sandboxes.remove(id);
    }

    /// The sandbox with this id, or the one whose id it is a unique prefix of (crictl
    /// shows and takes short ids).
    fn sandbox(&self, id: &str) -> Result<SandboxRecord, Status> {
        let st = self.lock();
        find(&st.sandboxes, "pod_sandbox_id", "sandbox", id).cloned()
    }

    fn container(&self, id: &str) -> Result<ContainerRecord, Status> {
        let st = self.lock();
        find(&st.containers, "container_id", "container", id).cloned()
    }

    fn containers_of(&self, sandbox: &str) -> Vec<ContainerRecord> {
        self.lock()
            .containers
            .values()
            .filter(|c| c.sandbox_id == sandbox)
            .cloned()
            .collect()
    }

    /// Starts (or restarts, reopened) the CRI log writer of a started container.
    async fn start_log(self: &Arc<Self>, c: &ContainerRecord) -> Result<(), Status> {
        if c.log_path.is_empty() {
            return Ok(());
        }
        let file = log::open(&self.log_root, Path::new(&c.log_path))?;
        let (place, logs) = self.logs_request(c).await?;
        self.logs.start(&c.id, file, place, logs, self.clone());
        Ok(())
    }

    /// Where a container's output is followed from, and the request that follows it.
    async fn logs_request(
        self: &Arc<Self>,
        c: &ContainerRecord,
    ) -> Result<
        (
            place::Place,
            aurae_proto::runtime::v0::ExecutableLogsRequest,
        ),
        Status,
    > {
        let sb = self.sandbox(&c.sandbox_id)?;
        let place = self.place(&sb).await?;
        Ok((
            place,
            aurae_proto::runtime::v0::ExecutableLogsRequest {
                executable: Some(aurae_proto::runtime::v0::ExecutableRef {
                    cell: sb.cell.clone(),
                    name: c.executable.clone(),
                }),
                follow: true,
                from_offset: 0,
            },
        ))
    }

    /// Where the log writer of `id` got to in its executable's log (kept so a restarted
    /// auraed continues there).
    fn log_offset(&self, id: &str) -> u64 {
        self.store
            .as_ref()
            .and_then(|s| s.get::<u64>(LOG_OFFSET_KIND, id).ok().flatten())
            .unwrap_or(0)
    }

    /// Where container `id`'s output has been read to: what its log writer reached, or
    /// the last offset it recorded.
    fn log_reached(&self, id: &str) -> u64 {
        let reached = self
            .reached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied();
        reached.unwrap_or_else(|| self.log_offset(id))
    }

    fn set_log_reached(&self, id: &str, offset: u64) {
        self.reached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), offset);
    }

    fn set_log_offset(&self, id: &str, offset: u64) {
        if let Some(s) = &self.store
            && let Err(e) = s.put_atomic(LOG_OFFSET_KIND, id, &offset)
        {
            warn!(container = id, "recording the CRI log offset: {e}");
        }
    }

    fn forget_log_offset(&self, id: &str) {
        self.reached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(s) = &self.store {
            let _ = s.delete(LOG_OFFSET_KIND, id);
        }
    }
}

/// `id` in `map`, exactly or as the unique prefix of one key.
fn find<'a, T>(
    map: &'a BTreeMap<String, T>,
    field: &str,
    what: &str,
    id: &str,
) -> Result<&'a T, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is empty")));
    }
    if let Some(v) = map.get(id) {
        return Ok(v);
    }
    let mut hits = map
        .range(id.to_owned()..)
        .take_while(|(k, _)| k.starts_with(id));
    match (hits.next(), hits.next()) {
        (Some((_, v)), None) => Ok(v),
        (Some(_), Some(_)) => Err(Status::invalid_argument(format!(
            "{field}: {id:?} is the prefix of more than one {what} id"
        ))),
        _ => Err(Status::not_found(format!("{what} {id:?} does not exist"))),
    }
}

/// Whether `labels` has every pair of `selector`.
fn selected(
    labels: &BTreeMap<String, String>,
    selector: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Serves the CRI on `socket` (0600, a directory only root enters) until `shutdown`.
/// Only peers with auraed's own uid (root) are served, whatever the file's mode.
pub async fn serve(
    socket: PathBuf,
    cri: Arc<Cri>,
    mut shutdown: tokio::sync::watch::Receiver<Option<std::time::Duration>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;

    use anyhow::Context as _;
    use aurae_proto::cri::v1::{
        image_service_server::ImageServiceServer, runtime_service_server::RuntimeServiceServer,
    };
    crate::api::prepare_socket(&socket, "--cri-socket")?;
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding --cri-socket {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let own_uid = rustix::process::getuid().as_raw();
    let incoming = async_stream_of(listener, own_uid);
    let server = tonic::transport::Server::builder()
        .add_service(
            RuntimeServiceServer::new(runtime::CriRuntime(cri.clone()))
                .max_decoding_message_size(crate::api::MAX_REQUEST_BYTES)
                .max_encoding_message_size(crate::api::MAX_RESPONSE_BYTES),
        )
        .add_service(
            ImageServiceServer::new(image::CriImages(cri.clone()))
                .max_decoding_message_size(crate::api::MAX_REQUEST_BYTES)
                .max_encoding_message_size(crate::api::MAX_RESPONSE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            while shutdown.borrow().is_none() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        });
    info!(cri_socket = %socket.display(), identity = %cri.identity, "serving the Kubernetes CRI (runtime.v1)");
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!("the CRI server stopped: {e}");
        }
        cri.logs.stop_all();
        if let Err(e) = std::fs::remove_file(&socket) {
            warn!(cri_socket = %socket.display(), "could not remove the CRI socket: {e}");
        }
    }))
}

/// The accepted connections of `listener` whose peer runs as `uid`; others are closed
/// (and logged).
fn async_stream_of(
    listener: tokio::net::UnixListener,
    uid: u32,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let peer = s.peer_cred().map(|c| c.uid());
                    if peer.as_ref().is_ok_and(|p| *p == uid) {
                        if tx.send(Ok(s)).await.is_err() {
                            return;
                        }
                    } else {
                        warn!(peer_uid = ?peer.ok(), "CRI socket: a peer that is not auraed's uid was refused");
                    }
                }
                Err(e) => {
                    warn!("CRI socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The CRI's name for our runtime and the API version it serves.
pub const RUNTIME_NAME: &str = "auraed";
pub const RUNTIME_API_VERSION: &str = "v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_whole_or_by_a_unique_prefix() {
        let mut m = BTreeMap::new();
        m.insert("abc1".to_owned(), 1);
        m.insert("abc2".to_owned(), 2);
        m.insert("def".to_owned(), 3);
        assert_eq!(*find(&m, "id", "x", "abc1").unwrap(), 1);
        assert_eq!(*find(&m, "id", "x", "d").unwrap(), 3);
        let e = find(&m, "id", "x", "abc").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("more than one"), "{}", e.message());
        assert_eq!(
            find(&m, "id", "x", "zz").unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            find(&m, "id", "x", "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(new_id().len(), 64);
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn label_selectors_need_every_pair() {
        let labels: BTreeMap<String, String> = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]
        .into();
        let sel = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<std::collections::HashMap<_, _>>()
        };
        assert!(selected(&labels, &sel(&[])));
        assert!(selected(&labels, &sel(&[("a", "1")])));
        assert!(!selected(&labels, &sel(&[("a", "1"), ("c", "3")])));
        assert!(!selected(&labels, &sel(&[("a", "2")])));
    }
}
