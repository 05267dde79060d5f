//! The cells auraed runs, and the executables in them.
//!
//! A cell is a cgroup (see [`super::cgroup`]) plus namespaces held by its init process
//! (see [`super::init`]). Executables are started by auraed itself with `clone3` straight
//! into the cell's leaf cgroup and PID namespace, joining the init's other namespaces, so
//! they are auraed's children: their exit status comes through their pidfd, and every
//! signal goes through it too.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use aurae_proto::runtime::v0 as pb;
use aurae_sys::{ExitStatus, Namespaces as Ns, Pidfd, SpawnError, SpawnRequest, spawn::Program};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    cgroup::{CgroupError, CgroupTree, check_controllers, limit_writes},
    init::INIT_ARG,
    spec::{CellSpec, Limits},
};
use crate::{
    events::EventBus,
    executable::{
        self, Executable, ExecutableSpec, Exit, Prepared, State,
        logs::{Log, Stream},
    },
    reaper::Reaper,
    spec::{CellName, FieldError, Label},
};

/// Most executables (running or exited, not yet freed) per cell.
pub const MAX_EXECUTABLES: usize = 4096;
/// How long a cell init may take to report ready.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long free waits for a killed cell to empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: SpawnError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CellError {
    pub fn io(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// The namespaces a cell has of its own.
#[derive(Debug, Clone, Copy, Default)]
struct NsSet {
    /// New namespaces other than PID.
    others: i32,
    pid: bool,
}

impl NsSet {
    /// A nested cell shares its parent's PID namespace (so the parent sees and reaps
    /// below it) and gets its own others.
    fn of(spec: &CellSpec, nested: bool) -> Self {
        let n = &spec.namespaces;
        let mut others = 0;
        for (shared, flag) in [
            (n.share_host_mount, Ns::MOUNT),
            (n.share_host_uts, Ns::UTS),
            (n.share_host_ipc, Ns::IPC),
            (n.share_host_net, Ns::NET),
            (n.share_host_cgroup, Ns::CGROUP),
        ] {
            if !shared {
                others |= flag;
            }
        }
        Self {
            others,
            pid: !n.share_host_pid && !nested,
        }
    }

    fn any(self) -> bool {
        self.pid || self.others != 0
    }

    /// The init's setup list: "pid,mnt,uts,net".
    fn describe(self) -> String {
        let mut v = Vec::new();
        for (flag, name) in [
            (Ns::MOUNT, "mnt"),
            (Ns::UTS, "uts"),
            (Ns::IPC, "ipc"),
            (Ns::NET, "net"),
            (Ns::CGROUP, "cgroup"),
        ] {
            if self.others & flag != 0 {
                v.push(name);
            }
        }
        if self.pid {
            v.push("pid");
        }
        v.join(",")
    }
}

#[derive(Debug)]
struct Init {
    pid: i32,
    pidfd: Arc<Pidfd>,
}

#[derive(Debug)]
struct Inner {
    phase: pb::Phase,
    message: String,
    executables: BTreeMap<Label, Arc<Executable>>,
    /// Of a top-level cell: whether its tree (one PID namespace) runs containers
    /// (`Some(true)`) or plain executables (`Some(false)`); fixed by the first start.
    /// A container must never share a PID namespace with a plain executable of the same
    /// uid: its `/proc/<pid>/root` would lead out of the container to the host's files.
    runs_containers: Option<bool>,
}

/// One cell.
#[derive(Debug)]
pub struct Cell {
    pub spec: CellSpec,
    pub created_at: SystemTime,
    ns: NsSet,
    init: Option<Init>,
    /// The process whose PID namespace the cell's processes are born in: its own init
    /// (top-level cell), its parent's holder (nested cell), none (host PID namespace).
    pid_holder: Option<Arc<Pidfd>>,
    inner: Mutex<Inner>,
    oom_kills: AtomicU64,
}

impl Cell {
    fn phase(&self) -> pb::Phase {
        self.inner.lock().map_or(pb::Phase::Failed, |i| i.phase)
    }

    fn set_phase(&self, phase: pb::Phase, message: &str) {
        if let Ok(mut i) = self.inner.lock() {
            i.phase = phase;
            message.clone_into(&mut i.message);
        }
    }

    fn executables(&self) -> Vec<Arc<Executable>> {
        self.inner
            .lock()
            .map(|i| i.executables.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> pb::CellStatus {
        let (phase, message) = self
            .inner
            .lock()
            .map_or((pb::Phase::Failed, String::new()), |i| {
                (i.phase, i.message.clone())
            });
        pb::CellStatus {
            name: self.spec.name.to_string(),
            phase: phase as i32,
            limits: Some(limits_to_proto(&self.spec.limits)),
            namespaces: Some(pb::CellNamespaces {
                share_host_pid: self.spec.namespaces.share_host_pid,
                share_host_net: self.spec.namespaces.share_host_net,
                share_host_ipc: self.spec.namespaces.share_host_ipc,
                share_host_uts: self.spec.namespaces.share_host_uts,
                share_host_mount: self.spec.namespaces.share_host_mount,
                share_host_cgroup: self.spec.namespaces.share_host_cgroup,
                user_namespace: self.spec.namespaces.user_namespace,
            }),
            executables: self.executables().iter().map(|e| e.status()).collect(),
            // The cell's first container's image (RunCell starts it with the cell).
            image_digest: self
                .executables()
                .iter()
                .find_map(|e| e.image_digest.clone())
                .unwrap_or_default(),
            created_at: Some(self.created_at.into()),
            message,
        }
    }

    /// The init's pid (host namespace), if the cell has one.
    pub fn init_pid(&self) -> Option<i32> {
        self.init.as_ref().map(|i| i.pid)
    }
}

fn limits_to_proto(l: &Limits) -> pb::CellLimits {
    pb::CellLimits {
        cpu_weight: l.cpu_weight,
        cpu_max: l.cpu_max.map(|c| pb::CpuMax {
            quota_us: c.quota_us.unwrap_or(0),
            period_us: c.period_us,
        }),
        cpuset_cpus: l.cpuset_cpus.clone().unwrap_or_default(),
        cpuset_mems: l.cpuset_mems.clone().unwrap_or_default(),
        memory_min_bytes: l.memory_min,
        memory_low_bytes: l.memory_low,
        memory_high_bytes: l.memory_high,
        memory_max_bytes: l.memory_max,
        memory_swap_max_bytes: l.memory_swap_max,
        pids_max: l.pids_max,
        io_weight: l.io_weight,
        io_max: l
            .io_max
            .iter()
            .map(|m| pb::IoMax {
                device: format!("{}:{}", m.major, m.minor),
                rbps: m.rbps.unwrap_or(0),
                wbps: m.wbps.unwrap_or(0),
                riops: m.riops.unwrap_or(0),
                wiops: m.wiops.unwrap_or(0),
            })
            .collect(),
        memory_oom_group: Some(l.memory_oom_group),
    }
}

/// A child may only narrow its parent's limits.
fn check_narrowing(child: &Limits, parent: &Limits, parent_name: &str) -> Result<(), FieldError> {
    let pairs = [
        (
            "limits.memory_max_bytes",
            child.memory_max,
            parent.memory_max,
        ),
        (
            "limits.memory_high_bytes",
            child.memory_high,
            parent.memory_high,
        ),
        (
            "limits.memory_swap_max_bytes",
            child.memory_swap_max,
            parent.memory_swap_max,
        ),
        ("limits.pids_max", child.pids_max, parent.pids_max),
    ];
    for (field, c, p) in pairs {
        if let (Some(c), Some(p)) = (c, p)
            && c > p
        {
            return Err(FieldError::new(
                field,
                format!("{c} is more than parent cell {parent_name:?} allows ({p})"),
            ));
        }
    }
    if let (Some(c), Some(p)) = (child.cpu_max, parent.cpu_max)
        && let (Some(cq), Some(pq)) = (c.quota_us, p.quota_us)
    {
        // Compare CPU shares of time: cq/cp > pq/pp.
        if u128::from(cq) * u128::from(p.period_us) > u128::from(pq) * u128::from(c.period_us) {
            return Err(FieldError::new(
                "limits.cpu_max",
                format!(
                    "{cq}/{} is more CPU than parent cell {parent_name:?} allows ({pq}/{})",
                    c.period_us, p.period_us
                ),
            ));
        }
    }
    Ok(())
}

/// What a set of cells holds (see [`Cells::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cells: usize,
    pub executables: usize,
    pub memory_bytes: u64,
    /// Outermost cells without a memory.max.
    pub unbounded_memory: usize,
}

/// The domain service behind the `Cells` and `Executables` APIs and `RunExecutable`.
#[derive(Debug)]
pub struct Cells {
    tree: Result<Arc<dyn CgroupTree>, String>,
    reaper: Arc<Reaper>,
    events: Arc<EventBus>,
    logs_dir: PathBuf,
    /// Containers' private directories (`<state>/containers`).
    containers_dir: PathBuf,
    cells: Mutex<BTreeMap<CellName, Arc<Cell>>>,
    /// Serializes allocate/stop/free (executables do not take it).
    ops: tokio::sync::Mutex<()>,
    sealed: Arc<aurae_sys::memfd::SealedSelf>,
    counter: AtomicU64,
}

impl Cells {
    /// `tree` is `Err(reason)` when this auraed has no usable cgroup v2 hierarchy; every
    /// cell call then fails with that reason.
    pub fn new(
        tree: Result<Arc<dyn CgroupTree>, String>,
        reaper: Arc<Reaper>,
        events: Arc<EventBus>,
        logs_dir: PathBuf,
        containers_dir: PathBuf,
        sealed: Arc<aurae_sys::memfd::SealedSelf>,
    ) -> Self {
        Self {
            tree,
            reaper,
            events,
            logs_dir,
            containers_dir,
            cells: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
            sealed,
            counter: AtomicU64::new(0),
        }
    }

    pub fn controllers(&self) -> Vec<String> {
        self.tree
            .as_ref()
            .map(|t| t.controllers())
            .unwrap_or_default()
    }

    fn tree(&self) -> Result<Arc<dyn CgroupTree>, CellError> {
        self.tree.clone().map_err(CellError::Precondition)
    }

    fn find(&self, name: &CellName) -> Result<Arc<Cell>, CellError> {
        self.cells
            .lock()
            .ok()
            .and_then(|c| c.get(name).cloned())
            .ok_or_else(|| CellError::NotFound(format!("cell {name:?} does not exist")))
    }

    /// The sealed copy of our binary the cell init is executed from (made once).
    fn sealed(&self) -> Result<Arc<OwnedFd>, CellError> {
        Ok(self.sealed.get()?)
    }

    /// Every cell, in name order, without holding the lock afterwards.
    fn snapshot(&self) -> Vec<Arc<Cell>> {
        self.cells
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A cell and every cell below it.
    fn family(&self, name: &CellName) -> Vec<Arc<Cell>> {
        let below = format!("{name}/");
        self.snapshot()
            .into_iter()
            .filter(|c| c.spec.name == *name || c.spec.name.as_str().starts_with(&below))
            .collect()
    }

    pub fn get(&self, name: &CellName) -> Result<pb::CellStatus, CellError> {
        Ok(self.find(name)?.status())
    }

    /// Cells whose names pass `visible`, in name order.
    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<pb::CellStatus> {
        let cells = self.snapshot();
        cells
            .iter()
            .filter(|c| visible(c.spec.name.as_str()))
            .map(|c| c.status())
            .collect()
    }

    /// What lives under the names `within` accepts, for quotas: cells, executables not
    /// yet freed (exited ones still hold their logs), and the memory.max of the outermost
    /// of those cells (a nested cell is bounded by its parent's), `None` where one has no
    /// memory.max.
    pub fn usage(&self, within: impl Fn(&str) -> bool) -> Usage {
        let mut u = Usage::default();
        for c in self.snapshot() {
            let name = c.spec.name.as_str();
            if !within(name) {
                continue;
            }
            u.cells += 1;
            u.executables += c.executables().len();
            let outermost = c.spec.name.parent().is_none_or(|p| !within(p.as_str()));
            if outermost {
                match c.spec.limits.memory_max {
                    Some(m) => u.memory_bytes = u.memory_bytes.saturating_add(m),
                    None => u.unbounded_memory += 1,
                }
            }
        }
        u
    }

    /// Creates a cell: cgroup, limits, namespaces (its init).
    pub async fn allocate(self: &Arc<Self>, spec: CellSpec) -> Result<pb::CellStatus, CellError> {
        let tree = self.tree()?;
        if spec.namespaces.user_namespace {
            return Err(CellError::Precondition(
                "namespaces.user_namespace: user namespaces for cells are not supported by this auraed yet".into(),
            ));
        }
        if spec.name.as_str().split('/').next() == Some(crate::vm::CGROUP_GROUP) {
            return Err(CellError::Exists(format!(
                "name: {:?} is reserved for the cgroups of virtual machines",
                crate::vm::CGROUP_GROUP
            )));
        }
        let writes = limit_writes(&spec.limits);
        check_controllers(&writes, &tree.controllers())?;
        let _ops = self.ops.lock().await;
        if self.cells.lock().is_ok_and(|c| c.contains_key(&spec.name)) {
            return Err(CellError::Exists(format!(
                "cell {:?} already exists",
                spec.name.as_str()
            )));
        }
        let parent = match spec.name.parent() {
            None => None,
            Some(p) => {
                let parent = self.find(&p).map_err(|_| {
                    CellError::NotFound(format!(
                        "parent cell {:?} does not exist: allocate it first",
                        p.as_str()
                    ))
                })?;
                if parent.phase() != pb::Phase::Running {
                    return Err(CellError::Precondition(format!(
                        "parent cell {:?} is not running",
                        p.as_str()
                    )));
                }
                check_narrowing(&spec.limits, &parent.spec.limits, p.as_str())?;
                Some(parent)
            }
        };
        tree.create(&spec.name)?;
        let setup = (|| -> Result<(), CellError> {
            for w in &writes {
                tree.write(&spec.name, w.file, &w.value)?;
            }
            if tree.controllers().iter().any(|c| c == "memory") {
                tree.write(
                    &spec.name,
                    "memory.oom.group",
                    if spec.limits.memory_oom_group {
                        "1"
                    } else {
                        "0"
                    },
                )?;
            }
            // Every cell, containers or plain executables, own or host namespaces: no
            // block device and no character device beyond null, zero, full, random,
            // urandom, tty, ptmx and ptys, even for uid 0 with CAP_MKNOD. Host devices
            // for a cell would be a future, explicit grant. Never skipped: a kernel that
            // cannot attach it refuses the cell.
            tree.attach_device_filter(&spec.name).map_err(|e| {
                CellError::Precondition(format!(
                    "the cell's device filter (cgroup BPF) is not available here: {e}"
                ))
            })?;
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = tree.remove(&spec.name);
            return Err(e);
        }
        let ns = NsSet::of(&spec, parent.is_some());
        let init = if ns.any() {
            let me = self.clone();
            let spec2 = spec.clone();
            let parent2 = parent.clone();
            let tree2 = tree.clone();
            let spawned = tokio::task::spawn_blocking(move || {
                me.spawn_init(&tree2, &spec2, ns, parent2.as_deref())
            })
            .await
            .map_err(|e| CellError::Precondition(format!("cell init task: {e}")))?;
            match spawned {
                Ok(i) => Some(i),
                Err(e) => {
                    let _ = tree.kill(&spec.name);
                    wait_empty(tree.as_ref(), &spec.name, DRAIN_TIMEOUT).await;
                    let _ = tree.remove(&spec.name);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let pid_holder = match (&parent, &init) {
            (Some(p), _) if !spec.namespaces.share_host_pid => p.pid_holder.clone(),
            (None, Some(i)) if ns.pid => Some(i.pidfd.clone()),
            _ => None,
        };
        let cell = Arc::new(Cell {
            created_at: SystemTime::now(),
            ns,
            init,
            pid_holder,
            inner: Mutex::new(Inner {
                phase: pb::Phase::Running,
                message: String::new(),
                executables: BTreeMap::new(),
                runs_containers: None,
            }),
            oom_kills: AtomicU64::new(0),
            spec,
        });
        if let Ok(mut c) = self.cells.lock() {
            c.insert(cell.spec.name.clone(), cell.clone());
        }
        info!(cell = %cell.spec.name, init_pid = ?cell.init_pid(), namespaces = %ns.describe(), "cell allocated");
        self.events.emit(
            pb::Kind::Cell,
            cell.spec.name.as_str(),
            pb::EventType::Created,
            "",
        );
        if tree.controllers().iter().any(|c| c == "memory") {
            tokio::spawn(watch_oom(self.clone(), cell.clone(), tree.clone()));
        }
        Ok(cell.status())
    }

    /// Starts the cell init (blocking: clone, exec, wait for its readiness report).
    fn spawn_init(
        &self,
        tree: &Arc<dyn CgroupTree>,
        spec: &CellSpec,
        ns: NsSet,
        parent: Option<&Cell>,
    ) -> Result<Init, CellError> {
        let leaf = tree.leaf_fd(&spec.name)?;
        let sealed = self.sealed()?;
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let devnull = std::fs::File::open("/dev/null")?;
        let hostname = spec
            .name
            .as_str()
            .rsplit('/')
            .next()
            .unwrap_or("cell")
            .to_owned();
        let argv: Vec<std::ffi::CString> = ["aurae-cell-init", INIT_ARG, &hostname, &ns.describe()]
            .iter()
            .filter_map(|s| std::ffi::CString::new(*s).ok())
            .collect();
        let null = devnull.as_raw_fd();
        // A top-level cell's init is born with all its new namespaces. A nested cell's init
        // is born in its parent's PID namespace, joins the parent's other namespaces and
        // unshares its own below them (PID namespaces cannot be nested from a thread that
        // entered one: clone(CLONE_NEWPID) there is EINVAL).
        let (pid_ns_of, new_namespaces, join, unshare) = match parent {
            Some(p) => (
                if spec.namespaces.share_host_pid {
                    None
                } else {
                    p.pid_holder.as_ref().map(|h| h.as_raw_fd())
                },
                Ns(0),
                p.init
                    .as_ref()
                    .filter(|_| p.ns.others != 0)
                    .map(|i| (i.pidfd.as_raw_fd(), Ns(p.ns.others))),
                Ns(ns.others),
            ),
            None => (
                None,
                Ns(ns.others | if ns.pid { Ns::PID } else { 0 }),
                None,
                Ns(0),
            ),
        };
        let req = SpawnRequest {
            program: Program::Fd(sealed.as_raw_fd()),
            argv: &argv,
            envp: &[],
            cwd: Some(c"/"),
            uid: None,
            gid: None,
            no_new_privs: true,
            stdio: [null, null, null],
            pass_fd: Some(ready_w.as_raw_fd()),
            cgroup: Some(leaf.as_raw_fd()),
            new_namespaces,
            pid_namespace_of: pid_ns_of,
            join,
            unshare,
            container: None,
        };
        let child = self
            .reaper
            .spawn(|| aurae_sys::spawn(&req))
            .map_err(|source| CellError::Spawn {
                what: format!("starting the init of cell {:?}", spec.name.as_str()),
                source,
            })?;
        drop(ready_w);
        let report = read_report(ready_r, INIT_TIMEOUT);
        if report.trim() != "ok" {
            let _ = child.pidfd.send_signal(nix::libc::SIGKILL);
            return Err(CellError::Precondition(format!(
                "the init of cell {:?} failed: {}",
                spec.name.as_str(),
                if report.is_empty() {
                    "no report within 10 s".to_owned()
                } else {
                    report.trim().to_owned()
                }
            )));
        }
        // The init lives as long as the cell; its exit is noticed by `watch_init`.
        let pidfd = child.pidfd.clone();
        let pid = child.pid;
        tokio::runtime::Handle::try_current()
            .map(|h| {
                let name = spec.name.clone();
                let events = self.events.clone();
                h.spawn(async move {
                    if let Ok(status) = child.exit.await {
                        events.emit(
                            pb::Kind::Cell,
                            name.as_str(),
                            pb::EventType::Stopped,
                            format!("cell init exited: {status:?}"),
                        );
                    }
                })
            })
            .ok();
        Ok(Init { pid, pidfd })
    }

    /// Starts an executable in its cell; with a `container` plan (already applied to
    /// `spec`), in a container root of its own.
    pub async fn run(
        self: &Arc<Self>,
        spec: ExecutableSpec,
        container: Option<crate::container::Plan>,
    ) -> Result<pb::ExecutableStatus, CellError> {
        if spec.container.is_some() != container.is_some() {
            return Err(CellError::Precondition(
                "a container executable needs its resolved image".into(),
            ));
        }
        let tree = self.tree()?;
        let cell = self.find(&spec.cell).map_err(|_| {
            CellError::NotFound(format!(
                "cell {:?} does not exist: allocate it first (aer cell allocate {})",
                spec.cell.as_str(),
                spec.cell.as_str()
            ))
        })?;
        if cell.phase() != pb::Phase::Running {
            return Err(CellError::Precondition(format!(
                "cell {:?} is not running; free it and allocate it again",
                spec.cell.as_str()
            )));
        }
        let name = match &spec.name {
            Some(n) => n.clone(),
            None => self.generated_name(&spec.argv[0])?,
        };
        {
            let inner = cell
                .inner
                .lock()
                .map_err(|_| CellError::Precondition("cell lock poisoned".into()))?;
            if inner.executables.contains_key(&name) {
                return Err(CellError::Exists(format!(
                    "executable {:?} already exists in cell {:?}",
                    name.as_str(),
                    spec.cell.as_str()
                )));
            }
            if inner.executables.len() >= MAX_EXECUTABLES {
                return Err(CellError::Exhausted(format!(
                    "cell {:?} holds {MAX_EXECUTABLES} executables: free exited ones first",
                    spec.cell.as_str()
                )));
            }
        }
        self.claim_kind(&spec)?;
        let prepared = Prepared::new(&spec)?;
        let has_memory = tree.controllers().iter().any(|c| c == "memory");
        let oom = has_memory.then(|| {
            (
                tree.clone(),
                spec.cell.clone(),
                oom_kills(tree.as_ref(), &spec.cell),
            )
        });
        let uid = spec.uid.unwrap_or(0);
        let gid = spec.gid.unwrap_or(uid);
        let allow_new_privileges = spec.allow_new_privileges;
        let me = self.clone();
        let cell2 = cell.clone();
        let containers_dir = self.containers_dir.clone();
        let image_digest = container.as_ref().map(|p| p.image.digest.clone());
        let t_spawn = Instant::now();
        let (prepared, child, rootfs) = tokio::task::spawn_blocking(move || {
            let mut rootfs = None;
            let r = (|| {
                let t = Instant::now();
                let leaf = tree.leaf_fd(&cell2.spec.name)?;
                let init = cell2.init.as_ref();
                let args = match &container {
                    Some(plan) => {
                        let r =
                            crate::container::Rootfs::create(&containers_dir, plan.pin.clone())?;
                        let a = crate::container::Args::new(plan, &r)?;
                        rootfs = Some(r);
                        Some(a)
                    }
                    None => None,
                };
                let setup = args
                    .as_ref()
                    .map(|a| a.setup(cell2.ns.others & Ns::CGROUP != 0))
                    .transpose()?;
                let req = SpawnRequest {
                    program: Program::Path(&prepared.argv[0]),
                    argv: &prepared.argv,
                    envp: &prepared.envp,
                    cwd: Some(&prepared.cwd),
                    uid: Some(uid),
                    gid: Some(gid),
                    no_new_privs: !allow_new_privileges,
                    stdio: prepared.stdio(),
                    pass_fd: None,
                    cgroup: Some(leaf.as_raw_fd()),
                    new_namespaces: Ns(0),
                    pid_namespace_of: cell2.pid_holder.as_ref().map(|h| h.as_raw_fd()),
                    join: init
                        .filter(|_| cell2.ns.others != 0)
                        .map(|i| (i.pidfd.as_raw_fd(), Ns(cell2.ns.others))),
                    unshare: Ns(if setup.is_some() { Ns::MOUNT } else { 0 }),
                    container: setup.as_ref(),
                };
                let t_prep = t.elapsed();
                let r = me
                    .reaper
                    .spawn(|| aurae_sys::spawn(&req))
                    .map_err(|source| container_error(args.as_ref(), source));
                tracing::debug!(
                    prepare_us = t_prep.as_micros() as u64,
                    clone_to_exec_us = (t.elapsed() - t_prep).as_micros() as u64,
                    "spawn timings"
                );
                r
            })();
            (prepared, r, rootfs)
        })
        .await
        .map_err(|e| CellError::Precondition(format!("spawn task: {e}")))?;
        // On failure `rootfs` is dropped here, and its directories with it.
        let child = child?;
        tracing::debug!(
            total_us = t_spawn.elapsed().as_micros() as u64,
            "run timings"
        );
        let Prepared {
            stdin,
            stdin_data,
            stdout,
            stderr,
            argv,
            ..
        } = prepared;
        drop((stdin, stdout.1, stderr.1));
        let _ = argv;
        let log = Arc::new(Log::new(Some(
            self.logs_dir
                .join(spec.cell.as_str())
                .join(format!("{name}.log")),
        )));
        let pumps = [
            tokio::spawn(executable::pump(
                stdout.0,
                log.clone(),
                Stream::Stdout,
                log_failure(&self.events, &spec.cell, &name),
            )),
            tokio::spawn(executable::pump(
                stderr.0,
                log.clone(),
                Stream::Stderr,
                log_failure(&self.events, &spec.cell, &name),
            )),
        ];
        if let Some((w, data)) = stdin_data {
            tokio::spawn(executable::feed(w, data));
        }
        {
            let log = log.clone();
            tokio::spawn(async move {
                for p in pumps {
                    let _ = p.await;
                }
                log.close();
            });
        }
        let exe = Arc::new(Executable {
            cell: spec.cell.clone(),
            name: name.clone(),
            argv: spec.argv.clone(),
            pid: child.pid,
            pidfd: child.pidfd.clone(),
            rootfs,
            image_digest,
            started_at: SystemTime::now(),
            log,
            state: watch::channel(State {
                phase: pb::Phase::Running,
                exit: None,
            })
            .0,
        });
        if let Ok(mut inner) = cell.inner.lock() {
            inner.executables.insert(name.clone(), exe.clone());
        }
        let id = format!("{}/{}", spec.cell, name);
        self.events.emit(
            pb::Kind::Executable,
            &id,
            pb::EventType::Started,
            format!("pid {}", child.pid),
        );
        tokio::spawn(supervise(
            self.events.clone(),
            oom,
            exe.clone(),
            child.exit,
            id,
        ));
        Ok(exe.status())
    }

    /// Fixes (or checks) whether the cell's tree runs containers or plain executables;
    /// see `Inner::runs_containers`. `spec.allow_mixed_cell` skips the check.
    fn claim_kind(&self, spec: &ExecutableSpec) -> Result<(), CellError> {
        if spec.allow_mixed_cell {
            return Ok(());
        }
        let top = spec.cell.as_str().split('/').next().unwrap_or_default();
        let top = CellName::parse("cell", top)?;
        let root = self.find(&top)?;
        let container = spec.container.is_some();
        let mut inner = root
            .inner
            .lock()
            .map_err(|_| CellError::Precondition("cell lock poisoned".into()))?;
        match inner.runs_containers {
            None => inner.runs_containers = Some(container),
            Some(c) if c != container => {
                let (has, wants) = if c {
                    ("containers", "a plain executable")
                } else {
                    ("plain executables", "a container")
                };
                return Err(CellError::Precondition(format!(
                    "cell {:?} runs {has}: {wants} in the same PID namespace would let a container reach the host's files through /proc/<pid>/root; use another cell (mixing needs a grant that allows host namespaces)",
                    top.as_str()
                )));
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn generated_name(&self, argv0: &str) -> Result<Label, CellError> {
        let base: String = argv0
            .rsplit('/')
            .next()
            .unwrap_or("exe")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let base = base.trim_matches('-');
        let base = if base.is_empty() { "exe" } else { base };
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Label::parse("name", &format!("{base}-{n}"))?)
    }

    pub fn executable(&self, r: &executable::ExecutableRef) -> Result<Arc<Executable>, CellError> {
        let cell = self.find(&r.cell)?;
        let inner = cell
            .inner
            .lock()
            .map_err(|_| CellError::Precondition("cell lock poisoned".into()))?;
        inner.executables.get(&r.name).cloned().ok_or_else(|| {
            CellError::NotFound(format!(
                "executable {:?} does not exist in cell {:?}",
                r.name.as_str(),
                r.cell.as_str()
            ))
        })
    }

    pub fn executables(&self, visible: impl Fn(&str) -> bool) -> Vec<pb::ExecutableStatus> {
        let cells = self.snapshot();
        cells
            .iter()
            .filter(|c| visible(c.spec.name.as_str()))
            .flat_map(|c| c.executables())
            .map(|e| e.status())
            .collect()
    }

    /// Forgets an exited executable.
    pub fn free_executable(&self, r: &executable::ExecutableRef) -> Result<(), CellError> {
        let exe = self.executable(r)?;
        if !exe.exited() {
            return Err(CellError::Precondition(format!(
                "executable {}/{} is still running: stop it first",
                r.cell.as_str(),
                r.name.as_str()
            )));
        }
        let cell = self.find(&r.cell)?;
        if let Ok(mut inner) = cell.inner.lock() {
            inner.executables.remove(&r.name);
        }
        let _ = exe.log.remove_files();
        Ok(())
    }

    /// Stops every process of the cell and its children: SIGTERM, grace, cgroup.kill.
    pub async fn stop(
        self: &Arc<Self>,
        name: &CellName,
        grace: Duration,
    ) -> Result<pb::CellStatus, CellError> {
        let _ops = self.ops.lock().await;
        self.stop_locked(name, grace).await
    }

    async fn stop_locked(
        &self,
        name: &CellName,
        grace: Duration,
    ) -> Result<pb::CellStatus, CellError> {
        let tree = self.tree()?;
        let cell = self.find(name)?;
        if cell.phase() == pb::Phase::Exited {
            return Ok(cell.status());
        }
        cell.set_phase(pb::Phase::Stopping, "");
        let family = self.family(name);
        let exes: Vec<Arc<Executable>> = family.iter().flat_map(|c| c.executables()).collect();
        for e in &exes {
            let _ = e.signal(nix::libc::SIGTERM);
        }
        for c in &family {
            if let Some(i) = &c.init {
                // The init forwards SIGTERM to every process of its PID namespace.
                let _ = i.pidfd.send_signal(nix::libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for e in &exes {
            let left = deadline.saturating_duration_since(Instant::now());
            e.wait(Some(left)).await;
        }
        tree.kill(name)?;
        if !wait_empty(tree.as_ref(), name, DRAIN_TIMEOUT).await {
            warn!(cell = %name, "cell still populated after cgroup.kill");
        }
        for e in &exes {
            e.wait(Some(Duration::from_secs(5))).await;
        }
        for c in &family {
            c.set_phase(pb::Phase::Exited, "stopped");
        }
        self.events
            .emit(pb::Kind::Cell, name.as_str(), pb::EventType::Stopped, "");
        Ok(cell.status())
    }

    /// Kills what is left of the cell and its children and removes them.
    pub async fn free(self: &Arc<Self>, name: &CellName) -> Result<(), CellError> {
        let _ops = self.ops.lock().await;
        let tree = self.tree()?;
        self.find(name)?;
        let t0 = Instant::now();
        self.stop_locked(name, Duration::ZERO).await?;
        let t_stop = t0.elapsed();
        let mut family: Vec<CellName> = self
            .family(name)
            .iter()
            .map(|c| c.spec.name.clone())
            .collect();
        // Deepest first.
        family.sort_by_key(|n| std::cmp::Reverse(n.as_str().matches('/').count()));
        for n in family {
            if tree.populated(&n).unwrap_or(false)
                && !wait_empty(tree.as_ref(), &n, DRAIN_TIMEOUT).await
            {
                return Err(CellError::Precondition(format!(
                    "cell {:?} still has processes after cgroup.kill",
                    n.as_str()
                )));
            }
            tree.remove(&n)?;
            if let Ok(mut c) = self.cells.lock() {
                c.remove(&n);
            }
            let _ = std::fs::remove_dir_all(self.logs_dir.join(n.as_str()));
            self.events
                .emit(pb::Kind::Cell, n.as_str(), pb::EventType::Freed, "");
            info!(cell = %n, "cell freed");
        }
        tracing::debug!(
            cell = %name,
            stop_us = t_stop.as_micros() as u64,
            remove_us = (t0.elapsed() - t_stop).as_micros() as u64,
            "Free timings"
        );
        Ok(())
    }

    /// Usage of a cell's whole subtree, from its cgroup files.
    pub fn stats(&self, name: &CellName) -> Result<pb::ResourceStats, CellError> {
        let tree = self.tree()?;
        self.find(name)?;
        let read = |f: &str| tree.read(name, f).unwrap_or_default();
        let kv = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let one = |f: &str| read(f).trim().parse::<u64>().unwrap_or(0);
        let cpu = read("cpu.stat");
        Ok(pb::ResourceStats {
            cpu_usage_usec: kv(&cpu, "usage_usec "),
            cpu_user_usec: kv(&cpu, "user_usec "),
            cpu_system_usec: kv(&cpu, "system_usec "),
            cpu_nr_throttled: kv(&cpu, "nr_throttled "),
            cpu_throttled_usec: kv(&cpu, "throttled_usec "),
            memory_current_bytes: one("memory.current"),
            memory_peak_bytes: one("memory.peak"),
            pids_current: one("pids.current"),
            oom_kills: kv(&read("memory.events"), "oom_kill "),
        })
    }

    /// Ordered shutdown: every top-level cell stopped (with `grace`) and freed.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        let tops: Vec<CellName> = self
            .cells
            .lock()
            .map(|c| c.keys().filter(|n| n.parent().is_none()).cloned().collect())
            .unwrap_or_default();
        // Every cell at once: one grace period in all (plus the kill), not one per cell.
        // Each top-level stop covers its whole family; free removes children first.
        {
            let _ops = self.ops.lock().await;
            let mut stops = tokio::task::JoinSet::new();
            for n in tops.clone() {
                let me = self.clone();
                stops.spawn(async move {
                    if let Err(e) = me.stop_locked(&n, grace).await {
                        warn!(cell = %n, "stopping on shutdown: {e}");
                    }
                });
            }
            while stops.join_next().await.is_some() {}
        }
        for n in tops {
            if let Err(e) = self.free(&n).await {
                warn!(cell = %n, "freeing on shutdown: {e}");
            }
        }
        if let Ok(t) = &self.tree {
            t.release();
        }
    }
}

/// Reports a failed log write of executable `cell/name` as a FAILED event (the process
/// keeps running; its status message says so too).
fn log_failure(
    events: &Arc<EventBus>,
    cell: &CellName,
    name: &Label,
) -> impl Fn(String) + Send + 'static {
    let events = events.clone();
    let id = format!("{cell}/{name}");
    move |e| {
        warn!(executable = %id, "log write failed: {e}");
        events.emit(
            pb::Kind::Executable,
            &id,
            pb::EventType::Failed,
            format!("output is not reaching the log file: {e}"),
        );
    }
}

/// Reads the init's readiness report, waiting at most `timeout`.
/// A failed spawn; for a container, the failing item named in the message.
fn container_error(args: Option<&crate::container::Args>, source: SpawnError) -> CellError {
    let what = match (&source, args) {
        (
            SpawnError::Child {
                step,
                index: Some(i),
                ..
            },
            Some(a),
        ) => match a.describe(step, *i) {
            Some(item) => format!("starting the container ({item})"),
            None => "starting the container".into(),
        },
        (_, Some(_)) => "starting the container".into(),
        _ => "starting the executable".into(),
    };
    CellError::Spawn { what, source }
}

fn read_report(fd: OwnedFd, timeout: Duration) -> String {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Read;
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(&fd),
        PollFlags::POLLIN,
    )];
    if !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
        return String::new();
    }
    let mut s = String::new();
    let _ = std::fs::File::from(fd).read_to_string(&mut s);
    s
}

/// Polls `populated` until the cell is empty; `false` on timeout.
pub async fn wait_empty(tree: &dyn CgroupTree, name: &CellName, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !tree.populated(name).unwrap_or(false) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        // cgroup.kill is synchronous for signal delivery; exits follow within a few
        // hundred microseconds, so poll finely.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn oom_kills(tree: &dyn CgroupTree, name: &CellName) -> u64 {
    tree.read(name, "memory.events")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Reports OOM kills in a cell (memory.events), while it exists.
async fn watch_oom(cells: Arc<Cells>, cell: Arc<Cell>, tree: Arc<dyn CgroupTree>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if cells.find(&cell.spec.name).is_err() {
            return;
        }
        let now = oom_kills(tree.as_ref(), &cell.spec.name);
        let before = cell.oom_kills.swap(now, Ordering::SeqCst);
        if now > before {
            cells.events.emit(
                pb::Kind::Cell,
                cell.spec.name.as_str(),
                pb::EventType::OomKilled,
                format!(
                    "{} OOM kill(s) in the cell (memory.events oom_kill {now})",
                    now - before
                ),
            );
        }
    }
}

/// Waits for an executable's exit and records it. A SIGKILL while the cell's OOM-kill
/// counter (memory.events) moved since the executable started is attributed to the OOM
/// killer, and the event names the victim.
async fn supervise(
    events: Arc<EventBus>,
    oom: Option<(Arc<dyn CgroupTree>, CellName, u64)>,
    exe: Arc<Executable>,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    id: String,
) {
    let status = exit.await.unwrap_or(ExitStatus::Signal(nix::libc::SIGKILL));
    let oom_killed = status == ExitStatus::Signal(nix::libc::SIGKILL)
        && oom.is_some_and(|(tree, cell, before)| oom_kills(tree.as_ref(), &cell) > before);
    let e = Exit {
        status,
        oom_killed,
        at: SystemTime::now(),
    };
    exe.state.send_replace(State {
        phase: pb::Phase::Exited,
        exit: Some(e),
    });
    let (ty, msg) = if oom_killed {
        (
            pb::EventType::OomKilled,
            format!("OOM-killed: pid {} {:?}", exe.pid, exe.argv),
        )
    } else {
        (pb::EventType::Exited, format!("{status:?}"))
    };
    events.publish(pb::Event {
        kind: pb::Kind::Executable as i32,
        name: id,
        r#type: ty as i32,
        exit: Some(e.to_proto()),
        victim_pid: if oom_killed { exe.pid } else { 0 },
        victim_command: if oom_killed {
            exe.argv.join(" ")
        } else {
            String::new()
        },
        message: msg,
        ..Default::default()
    });
}
