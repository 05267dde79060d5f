//! The cells auraed runs, and the executables in them.
//!
//! A cell is a cgroup (see [`crate::workload::cgroup`]) plus namespaces held by its init process
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

use crate::workload::Phase;
use aurae_sys::{Namespaces as Ns, SpawnRequest, spawn::Program};
use tracing::{info, warn};

use super::{
    init::INIT_ARG,
    limits::{check_controllers, limit_writes},
    pool::StartedInit,
    spec::CellSpec,
    state::{Cell, Init, Inner, NsSet, check_narrowing},
};
use crate::{
    events::EventBus,
    executable::Executable,
    spec::{CellName, FieldError},
    workload::{
        WorkloadError,
        cgroup::{CgroupError, CgroupTree},
        layout::VM_GROUP,
        supervise::{oom_kills, wait_empty},
    },
};

/// Most executables (running or exited, not yet freed) per cell.
pub const MAX_EXECUTABLES: usize = 4096;
/// How long a cell init may take to report ready.
pub(super) const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for freed containers' directories to be deleted.
const SHUTDOWN_DELETIONS: Duration = Duration::from_secs(10);
/// How long free waits for a killed cell to empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits on a killed cell's init (on the calling worker) before it looks
/// at `populated` as any drain does.
const FINE_DRAIN: Duration = Duration::from_millis(5);

/// What a set of cells holds (see [`Cells::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cells: usize,
    pub executables: usize,
    pub memory_bytes: u64,
    /// Outermost cells without a memory.max.
    pub unbounded_memory: usize,
}

/// The usage of the cgroup `name` (its whole subtree), from its files; 0 where a
/// controller is missing or a file cannot be read.
pub fn read_stats(tree: &dyn CgroupTree, name: &CellName) -> CellStats {
    let read = |f: &str| tree.read(name, f).unwrap_or_default();
    let kv = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let one = |f: &str| read(f).trim().parse::<u64>().unwrap_or(0);
    let cpu = read("cpu.stat");
    let io = read("io.stat");
    CellStats {
        cpu_usage_usec: kv(&cpu, "usage_usec "),
        cpu_user_usec: kv(&cpu, "user_usec "),
        cpu_system_usec: kv(&cpu, "system_usec "),
        cpu_nr_throttled: kv(&cpu, "nr_throttled "),
        cpu_throttled_usec: kv(&cpu, "throttled_usec "),
        memory_current_bytes: one("memory.current"),
        memory_peak_bytes: one("memory.peak"),
        pids_current: one("pids.current"),
        oom_kills: kv(&read("memory.events"), "oom_kill "),
        io_read_bytes: io_bytes(&io, "rbytes="),
        io_write_bytes: io_bytes(&io, "wbytes="),
    }
}

/// `key` (`rbytes=` or `wbytes=`) summed over the devices of an `io.stat` text (one line
/// per device: `8:0 rbytes=… wbytes=… rios=…`); 0 without the io controller (no file).
pub fn io_bytes(io_stat: &str, key: &str) -> u64 {
    io_stat
        .lines()
        .flat_map(str::split_whitespace)
        .filter_map(|f| f.strip_prefix(key)?.parse::<u64>().ok())
        .fold(0, u64::saturating_add)
}

/// A cell's whole-subtree usage, from its cgroup files (0 where a controller is missing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    pub pids_current: u64,
    pub oom_kills: u64,
    /// io.stat rbytes / wbytes summed over devices (0 without the io controller).
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// A limit the kernel refuses (a cpuset it cannot give, an io.max device that is not
/// there, a value out of range) is the request's fault: INVALID_ARGUMENT naming the field.
pub(super) fn refused_limit(w: &super::limits::LimitWrite, e: CgroupError) -> WorkloadError {
    match &e {
        CgroupError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(
                    nix::libc::EINVAL
                        | nix::libc::ERANGE
                        | nix::libc::ENODEV
                        | nix::libc::EOVERFLOW
                        | nix::libc::ENOENT
                )
            ) =>
        {
            FieldError::new(
                w.field,
                format!("the kernel refused {} = {:?}: {source}", w.file, w.value),
            )
            .into()
        }
        _ => e.into(),
    }
}

/// What [`Cells`] is built from.
#[derive(Debug)]
pub struct CellsDeps {
    /// `Err(reason)` when this auraed has no usable cgroup v2 hierarchy; every cell call
    /// then fails with that reason.
    pub tree: Result<Arc<dyn CgroupTree>, String>,
    pub spawner: Arc<dyn crate::workload::spawner::Spawner>,
    pub events: Arc<EventBus>,
    pub logs_dir: PathBuf,
    /// Containers' private directories (`<state>/containers`).
    pub containers_dir: PathBuf,
    /// Cells' directories (`<state>/cell-dirs`).
    pub cell_dirs: super::dirs::CellDirs,
    pub sealed: Arc<aurae_sys::memfd::SealedSelf>,
    /// Where records go (`None`: nothing is recorded).
    pub store: Option<crate::store::Store>,
    pub images: Option<Arc<crate::image::store::ImageStore>>,
    pub holder: Option<Arc<crate::workload::holder::Holder>>,
}

/// The domain service behind the `Cells` and `Executables` APIs and `RunExecutable`.
#[derive(Debug)]
pub struct Cells {
    pub(super) tree: Result<Arc<dyn CgroupTree>, String>,
    /// Starts cell inits and executables (the reaper; a fake in unit tests).
    pub(super) spawner: Arc<dyn crate::workload::spawner::Spawner>,
    pub(super) events: Arc<EventBus>,
    pub(super) logs_dir: PathBuf,
    /// Containers' private directories (`<state>/containers`).
    pub(super) containers_dir: PathBuf,
    /// Cells' directories, mounted into their containers (see [`super::dirs`]).
    pub(super) cell_dirs: super::dirs::CellDirs,
    pub(super) cells: Mutex<BTreeMap<CellName, Arc<Cell>>>,
    /// Orders allocate/stop/free (executables do not take it): see [`Cells::lock_for`].
    ops: tokio::sync::RwLock<()>,
    /// One lock per top-level cell name with an operation in flight.
    names: Mutex<std::collections::HashMap<CellName, Arc<tokio::sync::Mutex<()>>>>,
    sealed: Arc<aurae_sys::memfd::SealedSelf>,
    pub(super) counter: AtomicU64,
    /// Durable records of cells and executables (see [`super::record`]).
    pub(super) recorder: super::record::Recorder,
    /// The image store, for re-pinning the layers of containers found after a restart.
    pub(super) images: Option<Arc<crate::image::store::ImageStore>>,
    /// Keeps copies of executables' output read ends (see [`crate::workload::holder`]).
    pub(super) holder: Option<Arc<crate::workload::holder::Holder>>,
    /// Why no new work is taken (the state disk takes no writes), if so.
    read_only: Mutex<Option<String>>,
    /// Spare cell inits (see [`super::pool`]).
    pub(super) pool: super::pool::Pool,
}

impl Cells {
    pub fn new(d: CellsDeps) -> Self {
        Self {
            tree: d.tree,
            spawner: d.spawner,
            recorder: super::record::Recorder::new(d.store, d.events.clone()),
            events: d.events,
            logs_dir: d.logs_dir,
            containers_dir: d.containers_dir,
            cell_dirs: d.cell_dirs,
            cells: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::RwLock::new(()),
            names: Mutex::new(Default::default()),
            sealed: d.sealed,
            counter: AtomicU64::new(0),
            images: d.images,
            holder: d.holder,
            read_only: Mutex::new(None),
            pool: Default::default(),
        }
    }

    /// Takes no new work (allocate, run) while `why` is set: what runs keeps running.
    pub fn set_read_only(&self, why: Option<String>) {
        if let Ok(mut r) = self.read_only.lock() {
            *r = why;
        }
    }

    /// FAILED_PRECONDITION with the reason while no new work is taken.
    pub(super) fn check_writable(&self) -> Result<(), WorkloadError> {
        match self.read_only.lock().ok().and_then(|r| r.clone()) {
            Some(why) => Err(WorkloadError::Precondition(why)),
            None => Ok(()),
        }
    }

    /// Whether an executable's output is still held by the holder `h` (a previous one
    /// that must then not be retired).
    pub fn holds_with(&self, h: &crate::workload::holder::ProcRef) -> bool {
        self.snapshot()
            .iter()
            .flat_map(|c| c.executables())
            .any(|e| e.held.as_ref().is_some_and(|held| &held.holder == h))
    }

    /// The directories of the containers this registry holds (for the start-up cleanup).
    pub fn container_dirs(&self) -> Vec<PathBuf> {
        self.snapshot()
            .iter()
            .flat_map(|c| c.executables())
            .filter_map(|e| e.rootfs_path())
            .collect()
    }

    /// Pins `layers` against image garbage collection (a container found again after a
    /// restart); a no-op pin without an image store.
    pub(super) fn pin_layers(&self, layers: &[String]) -> crate::image::store::Pin {
        match &self.images {
            Some(s) => s.pin(layers),
            None => crate::image::store::Pin::none(),
        }
    }

    pub fn controllers(&self) -> Vec<String> {
        self.tree
            .as_ref()
            .map(|t| t.controllers())
            .unwrap_or_default()
    }

    pub(super) fn tree(&self) -> Result<Arc<dyn CgroupTree>, WorkloadError> {
        self.tree.clone().map_err(WorkloadError::Precondition)
    }

    pub(super) fn find(&self, name: &CellName) -> Result<Arc<Cell>, WorkloadError> {
        self.cells
            .lock()
            .ok()
            .and_then(|c| c.get(name).cloned())
            .ok_or_else(|| WorkloadError::NotFound(format!("cell {name:?} does not exist")))
    }

    /// The sealed copy of our binary the cell init is executed from (made once).
    fn sealed(&self) -> Result<Arc<OwnedFd>, WorkloadError> {
        Ok(self.sealed.get()?)
    }

    /// Every cell, in name order, without holding the lock afterwards.
    pub(super) fn snapshot(&self) -> Vec<Arc<Cell>> {
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

    pub fn get(&self, name: &CellName) -> Result<Arc<Cell>, WorkloadError> {
        self.find(name)
    }

    /// Cells whose names pass `visible`, in name order.
    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<Arc<Cell>> {
        self.snapshot()
            .into_iter()
            .filter(|c| visible(c.spec.name.as_str()))
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

    /// Creates a cell: cgroup, limits, namespaces (its init). In a task of its own: a caller
    /// that goes away cannot leave half a cell (a cgroup and an init nobody lists).
    pub async fn allocate(self: &Arc<Self>, spec: CellSpec) -> Result<Arc<Cell>, WorkloadError> {
        let me = self.clone();
        detached("allocate", move |_| async move {
            me.allocate_here(spec, None).await
        })
        .await
    }

    /// [`Cells::allocate`] of a cell made for one kind of workload (`containers`, or plain
    /// executables): the kind is fixed at once, as its first start would fix it (see
    /// `Inner::runs_containers`), and recorded with the cell — that start then writes
    /// the cell's record no second time. In the caller's own task (`InTask`).
    pub async fn allocate_for(
        self: &Arc<Self>,
        spec: CellSpec,
        containers: bool,
        _: InTask,
    ) -> Result<Arc<Cell>, WorkloadError> {
        self.allocate_here(spec, Some(containers)).await
    }

    async fn allocate_here(
        self: &Arc<Self>,
        spec: CellSpec,
        runs_containers: Option<bool>,
    ) -> Result<Arc<Cell>, WorkloadError> {
        let t_call = Instant::now();
        let tree = self.tree()?;
        if spec.namespaces.user_namespace {
            return Err(WorkloadError::Precondition(
                "namespaces.user_namespace: user namespaces for cells are not supported by this auraed yet".into(),
            ));
        }
        for (group, what) in [
            (VM_GROUP, "the cgroups of virtual machines"),
            (
                crate::workload::layout::INSTANCE_GROUP,
                "the cgroups of spawned instances",
            ),
            (crate::workload::layout::POOL_GROUP, "spare cell inits"),
        ] {
            if spec.name.as_str().split('/').next() == Some(group) {
                return Err(WorkloadError::Exists(format!(
                    "name: {group:?} is reserved for {what}"
                )));
            }
        }
        self.check_writable()?;
        let writes = limit_writes(&spec.limits);
        check_controllers(&writes, &tree.controllers())?;
        let _ops = self.lock_for(&spec.name).await;
        let t_locked = t_call.elapsed();
        if self.cells.lock().is_ok_and(|c| c.contains_key(&spec.name)) {
            return Err(WorkloadError::Exists(format!(
                "cell {:?} already exists",
                spec.name.as_str()
            )));
        }
        let parent = match spec.name.parent() {
            None => None,
            Some(p) => {
                let parent = self.find(&p).map_err(|_| {
                    WorkloadError::NotFound(format!(
                        "parent cell {:?} does not exist: allocate it first",
                        p.as_str()
                    ))
                })?;
                if parent.phase() != Phase::Running {
                    return Err(WorkloadError::Precondition(format!(
                        "parent cell {:?} is not running",
                        p.as_str()
                    )));
                }
                check_narrowing(&spec.limits, &parent.spec.limits, p.as_str())?;
                // Every device filter on the path must allow a device: under a parent
                // without /dev/kvm, a child's kvm would be granted and never work.
                if spec.devices.kvm && !parent.spec.devices.kvm {
                    return Err(WorkloadError::Invalid(FieldError::new(
                        "devices.kvm",
                        format!(
                            "parent cell {:?} does not allow /dev/kvm, so no cell below it can",
                            p.as_str()
                        ),
                    )));
                }
                Some(parent)
            }
        };
        // A cell starts with no directories: whatever a free before left under the name
        // (its removal failed, or a start racing it made one again) is not handed on.
        self.discard_dirs(&spec.name);
        tree.create(&spec.name)?;
        let t_created = t_call.elapsed();
        let setup = (|| -> Result<(), WorkloadError> {
            for w in &writes {
                tree.write(&spec.name, w.file, &w.value)
                    .map_err(|e| refused_limit(w, e))?;
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
            // urandom, tty, ptmx and ptys, even for uid 0 with CAP_MKNOD; /dev/kvm too
            // when the cell asked for it (authorized by the grant's allow_kvm before
            // this). Never skipped: a kernel that cannot attach it refuses the cell.
            tree.attach_device_filter(&spec.name, spec.devices)
                .map_err(|e| {
                    WorkloadError::Precondition(format!(
                        "the cell's device filter (cgroup BPF) is not available here: {e}"
                    ))
                })?;
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = tree.remove(&spec.name);
            return Err(e);
        }
        let t_setup = t_call.elapsed();
        let ns = NsSet::of(&spec, parent.is_some());
        let mut pooled_init = false;
        let init = if ns.any() {
            // A spare init from the pool when one fits (a top-level cell with every
            // namespace of its own), else a fresh one; both end the same way (see init.rs).
            let pooled = if parent.is_none() {
                self.pool.take(ns)
            } else {
                None
            };
            let me = self.clone();
            let spec2 = spec.clone();
            let parent2 = parent.clone();
            let tree2 = tree.clone();
            // On this worker (its other tasks handed on: `off_runtime`), not a trip through
            // the blocking pool: the init's start is a few milliseconds of waiting on its
            // socket, and two cross-thread wake-ups less on its path.
            pooled_init = pooled.is_some();
            let started = crate::workload::off_runtime(move || match pooled {
                Some(p) => me.finish_pooled_init(&tree2, &spec2, p),
                None => me
                    .start_init(
                        &tree2,
                        &spec2.name,
                        ns,
                        parent2.as_deref(),
                        spec2.namespaces.share_host_pid,
                        Some(spec2.hostname()),
                    )
                    .and_then(|s| me.finish_init(s, &spec2.name, None)),
            });
            match started {
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
        let t_inited = t_call.elapsed();
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
                phase: Phase::Running,
                message: String::new(),
                executables: BTreeMap::new(),
                // Kept by the top-level cell of a tree (`claim_kind`).
                runs_containers: runs_containers.filter(|_| parent.is_none()),
                mixed: false,
                starting: Default::default(),
                // `allocate_for`: a run call's cell.
                made_for_run: runs_containers.is_some(),
            }),
            oom_kills: AtomicU64::new(0),
            spec,
        });
        if let Ok(mut c) = self.cells.lock() {
            c.insert(cell.spec.name.clone(), cell.clone());
        }
        self.recorder.cell(&cell.record());
        let t_recorded = t_call.elapsed();
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
        tracing::debug!(
            from_pool = pooled_init,
            lock_us = t_locked.as_micros() as u64,
            create_us = (t_created - t_locked).as_micros() as u64,
            setup_us = (t_setup - t_created).as_micros() as u64,
            init_us = (t_inited - t_setup).as_micros() as u64,
            record_us = (t_recorded - t_inited).as_micros() as u64,
            total_us = t_call.elapsed().as_micros() as u64,
            "allocate timings"
        );
        Ok(cell)
    }

    /// Step 1 of a cell init (blocking): clone it into the leaf of `group` with the new
    /// namespaces of `ns` (below `parent`'s, for a nested cell), exec, wait for `ready`.
    /// Its cgroup namespace is the init's own step 2 (see [`super::init`]).
    /// `hostname`: the cell's, for an init that goes on to its step 2 at once (sent with
    /// its start, so the init reads it as soon as step 1 is done: one wake-up of auraed
    /// less); `None` for a spare of the pool.
    pub(super) fn start_init(
        &self,
        tree: &Arc<dyn CgroupTree>,
        group: &CellName,
        ns: NsSet,
        parent: Option<&Cell>,
        share_host_pid: bool,
        hostname: Option<&str>,
    ) -> Result<StartedInit, WorkloadError> {
        let leaf = tree.leaf_fd(group)?;
        let sealed = self.sealed()?;
        let (ctl, theirs) = std::os::unix::net::UnixStream::pair()?;
        let devnull = std::fs::File::open("/dev/null")?;
        let argv: Vec<std::ffi::CString> = ["aurae-cell-init", INIT_ARG, &ns.describe()]
            .iter()
            .filter_map(|s| std::ffi::CString::new(*s).ok())
            .collect();
        let null = devnull.as_raw_fd();
        // The cgroup namespace is made by the init once it is in its cell's cgroup.
        let others = ns.others & !Ns::CGROUP;
        // A top-level cell's init is born with all its new namespaces. A nested cell's init
        // is born in its parent's PID namespace, joins the parent's other namespaces and
        // unshares its own below them (PID namespaces cannot be nested from a thread that
        // entered one: clone(CLONE_NEWPID) there is EINVAL).
        let (pid_ns_of, new_namespaces, join, unshare) = match parent {
            Some(p) => (
                if share_host_pid {
                    None
                } else {
                    p.pid_holder.as_ref().map(|h| h.as_raw_fd())
                },
                Ns(0),
                p.init
                    .as_ref()
                    .filter(|_| p.ns.others != 0)
                    .map(|i| (i.pidfd.as_raw_fd(), Ns(p.ns.others))),
                Ns(others),
            ),
            None => (
                None,
                Ns(others | if ns.pid { Ns::PID } else { 0 }),
                None,
                Ns(0),
            ),
        };
        // A helper of our binary, born in the cell's leaf with its namespaces.
        let req = SpawnRequest {
            cgroup: Some(leaf.as_raw_fd()),
            new_namespaces,
            pid_namespace_of: pid_ns_of,
            join,
            unshare,
            ..SpawnRequest::helper(
                Program::Fd(sealed.as_raw_fd()),
                &argv,
                null,
                theirs.as_raw_fd(),
            )
        };
        let child = self
            .spawner
            .spawn(&req)
            .map_err(|source| WorkloadError::Spawn {
                what: format!("starting a cell init in {:?}", group.as_str()),
                source,
            })?;
        drop(theirs);
        let mut started = StartedInit {
            child,
            ctl,
            pending: Vec::new(),
        };
        if let Some(h) = hostname {
            // Buffered in the socket until the init reads it after its step 1; a write
            // that fails is the init's own failure, reported by its next line.
            let _ = std::io::Write::write_all(&mut started.ctl, format!("{h}\n").as_bytes());
        }
        started.expect(super::init::READY).map_err(|why| {
            WorkloadError::Precondition(format!(
                "a cell init in {:?} failed to start: {why}",
                group.as_str()
            ))
        })?;
        Ok(started)
    }

    /// Step 2 of a cell init (blocking), once it is in the cell's leaf: its cgroup
    /// namespace and hostname (`hostname` is sent here unless [`Cells::start_init`] sent it
    /// with the start: then `None`); then its exit is watched for the cell's events.
    pub(super) fn finish_init(
        &self,
        mut started: StartedInit,
        name: &CellName,
        hostname: Option<&str>,
    ) -> Result<Init, WorkloadError> {
        let sent = match hostname {
            Some(h) => std::io::Write::write_all(&mut started.ctl, format!("{h}\n").as_bytes()),
            None => Ok(()),
        };
        sent.map_err(|e| format!("sending the hostname: {e}"))
            .and_then(|()| started.expect(super::init::OK))
            .map_err(|why| {
                let _ = started.child.pidfd.send_signal(nix::libc::SIGKILL);
                WorkloadError::Precondition(format!(
                    "the init of cell {:?} failed: {why}",
                    name.as_str()
                ))
            })?;
        let StartedInit { child, ctl, .. } = started;
        drop(ctl);
        // The init lives as long as the cell; its exit is an event of the cell.
        let pidfd = child.pidfd.clone();
        let pid = child.pid;
        tokio::runtime::Handle::try_current()
            .map(|h| {
                let name = name.clone();
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
        Ok(Init {
            pid,
            pidfd,
            proc: crate::workload::process::ProcRef::of(pid).ok(),
        })
    }

    /// The lock an operation on the cell `name` (allocate, stop, free) holds. A top-level
    /// cell's family is its own: operations on different top-level cells run at once
    /// (shared [`Cells::ops`] plus the name's own lock, so one name's operations take
    /// turns). A nested cell's operation touches its parent's family too: it excludes
    /// every other (exclusive `ops`), as does shutdown.
    async fn lock_for(&self, name: &CellName) -> OpsGuard<'_> {
        if name.parent().is_some() {
            return OpsGuard::Exclusive(self.ops.write().await);
        }
        let shared = self.ops.read().await;
        let lock = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.clone())
            .or_default()
            .clone();
        let held = lock.clone().lock_owned().await;
        OpsGuard::Shared {
            _shared: shared,
            held: Some(held),
            lock,
            name: name.clone(),
            names: &self.names,
        }
    }

    /// How many top-level names have an operation in flight (their lock is kept).
    #[cfg(test)]
    pub(super) fn names_in_flight(&self) -> usize {
        self.names.lock().map_or(usize::MAX, |m| m.len())
    }

    /// Stops every process of the cell and its children: SIGTERM, grace, cgroup.kill.
    pub async fn stop(
        self: &Arc<Self>,
        name: &CellName,
        grace: Duration,
    ) -> Result<Arc<Cell>, WorkloadError> {
        let (me, name) = (self.clone(), name.clone());
        detached("stop", move |_| async move {
            let _ops = me.lock_for(&name).await;
            me.stop_locked(&name, grace, true).await
        })
        .await
    }

    /// `record`: whether the stopped cells' records are written (not when they are freed
    /// next: their records are deleted, or written after all if a removal fails).
    async fn stop_locked(
        &self,
        name: &CellName,
        grace: Duration,
        record: bool,
    ) -> Result<Arc<Cell>, WorkloadError> {
        let tree = self.tree()?;
        let cell = self.find(name)?;
        if cell.phase() == Phase::Exited {
            return Ok(cell);
        }
        cell.set_phase(Phase::Stopping, "");
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
        let t0 = Instant::now();
        let deadline = t0 + grace;
        for e in &exes {
            let left = deadline.saturating_duration_since(Instant::now());
            e.wait(Some(left)).await;
        }
        let t_grace = t0.elapsed();
        // The inits' mount namespaces, held across their deaths: a namespace's teardown
        // (its mounts undone, an RCU grace period waited for) is then not part of the
        // drain the caller waits for; let go below, off the call's path.
        let mounts: Vec<_> = family
            .iter()
            .filter(|c| c.ns.others & Ns::MOUNT != 0)
            .filter_map(|c| c.init.as_ref())
            .filter_map(|i| crate::workload::supervise::mount_namespace_of(i.pid, &i.pidfd))
            .collect();
        tree.kill(name)?;
        let t_kill = t0.elapsed();
        if let Some(init) = &cell.init {
            // Its exit is the drain's last step (it waits for its PID namespace to
            // empty): seen when it happens, not at the next look at `populated`.
            crate::workload::supervise::exits_within(&init.pidfd, FINE_DRAIN);
        }
        if !wait_empty(tree.as_ref(), name, DRAIN_TIMEOUT).await {
            warn!(cell = %name, "cell still populated after cgroup.kill");
        }
        let t_drain = t0.elapsed();
        if !mounts.is_empty() {
            tokio::task::spawn_blocking(move || drop(mounts));
        }
        for e in &exes {
            e.wait(Some(Duration::from_secs(5))).await;
        }
        let t_exes = t0.elapsed();
        for c in &family {
            c.set_phase(Phase::Exited, "stopped");
            if record {
                self.recorder.cell(&c.record());
            }
        }
        tracing::debug!(
            cell = %name,
            grace_us = t_grace.as_micros() as u64,
            kill_us = (t_kill - t_grace).as_micros() as u64,
            drain_us = (t_drain - t_kill).as_micros() as u64,
            exes_us = (t_exes - t_drain).as_micros() as u64,
            record_us = (t0.elapsed() - t_exes).as_micros() as u64,
            "Stop timings"
        );
        self.events
            .emit(pb::Kind::Cell, name.as_str(), pb::EventType::Stopped, "");
        Ok(cell)
    }

    /// Moves the directories of cell `name` (see [`super::dirs`]) aside at once and
    /// removes them on the deleter thread (`workload::tree::discard`, which shutdown waits
    /// for); failures are logged (a later start removes what is left, as strays).
    fn discard_dirs(&self, name: &CellName) {
        match self.cell_dirs.take(name) {
            Ok(None) => {}
            Ok(Some(trash)) => crate::workload::tree::discard(
                trash,
                format!("the directories of cell {:?}", name.as_str()),
            ),
            Err(e) => warn!(cell = %name, error = %e, "moving the cell's directories aside"),
        }
    }

    /// Kills what is left of the cell and its children and removes them.
    pub async fn free(self: &Arc<Self>, name: &CellName) -> Result<(), WorkloadError> {
        let (me, name) = (self.clone(), name.clone());
        detached("free", move |_| async move {
            let _ops = me.lock_for(&name).await;
            me.free_locked(&name).await
        })
        .await
    }

    /// Frees `cell` if the registry still holds this very cell under its name (not one
    /// freed meanwhile and allocated again by someone else); `Ok` either way.
    pub async fn free_if_same(self: &Arc<Self>, cell: &Arc<Cell>) -> Result<(), WorkloadError> {
        let _ops = self.lock_for(&cell.spec.name).await;
        match self.find(&cell.spec.name) {
            Ok(now) if Arc::ptr_eq(&now, cell) => self.free_locked(&cell.spec.name).await,
            _ => Ok(()),
        }
    }

    async fn free_locked(self: &Arc<Self>, name: &CellName) -> Result<(), WorkloadError> {
        let tree = self.tree()?;
        self.find(name)?;
        let t0 = Instant::now();
        // Its records are deleted below: a record of the stop would be a write for nothing
        // (a crash before the deletion leaves the cell as it was recorded, ended while
        // auraed was down, and freed by a Free again).
        self.stop_locked(name, Duration::ZERO, false).await?;
        let t_stop = t0.elapsed();
        let mut family: Vec<CellName> = self
            .family(name)
            .iter()
            .map(|c| c.spec.name.clone())
            .collect();
        // Deepest first.
        family.sort_by_key(|n| std::cmp::Reverse(n.as_str().matches('/').count()));
        for (i, n) in family.iter().enumerate() {
            if let Err(e) = self.remove_stopped(tree.as_ref(), n).await {
                // What is not removed stays, stopped: its record says so after all.
                for left in &family[i..] {
                    if let Ok(c) = self.find(left) {
                        self.recorder.cell(&c.record());
                    }
                }
                return Err(e);
            }
        }
        tracing::debug!(
            cell = %name,
            stop_us = t_stop.as_micros() as u64,
            remove_us = (t0.elapsed() - t_stop).as_micros() as u64,
            "Free timings"
        );
        Ok(())
    }

    /// Removes the stopped cell `n` (its children gone before it): its cgroup, records,
    /// logs and directories.
    async fn remove_stopped(
        self: &Arc<Self>,
        tree: &dyn CgroupTree,
        n: &CellName,
    ) -> Result<(), WorkloadError> {
        if tree.populated(n).unwrap_or(false) && !wait_empty(tree, n, DRAIN_TIMEOUT).await {
            return Err(WorkloadError::Precondition(format!(
                "cell {:?} still has processes after cgroup.kill",
                n.as_str()
            )));
        }
        let t = Instant::now();
        tree.remove(n)?;
        let rmdir = t.elapsed();
        let removed = self.cells.lock().ok().and_then(|mut c| c.remove(n));
        let mut rootfs = Duration::ZERO;
        for e in removed.iter().flat_map(|c| c.executables()) {
            e.forget_record(&self.recorder);
            // Given up before the cell's log directory goes: output still on its way
            // (a pump draining a pipe) must not make a file, or the directory, again.
            if let Err(err) = e.log.remove_files() {
                warn!(cell = %n, executable = %e.name, error = %err, "removing an executable's log");
            }
            let r = Instant::now();
            e.remove_rootfs();
            rootfs += r.elapsed();
        }
        self.recorder.forget_cell(n);
        let records = t.elapsed() - rmdir - rootfs;
        let _ = std::fs::remove_dir_all(self.logs_dir.join(n.as_str()));
        self.discard_dirs(n);
        tracing::debug!(
            cell = %n,
            rmdir_us = rmdir.as_micros() as u64,
            records_us = records.as_micros() as u64,
            rootfs_us = rootfs.as_micros() as u64,
            files_us = (t.elapsed() - rmdir - records - rootfs).as_micros() as u64,
            "Free remove timings"
        );
        self.events
            .emit(pb::Kind::Cell, n.as_str(), pb::EventType::Freed, "");
        info!(cell = %n, "cell freed");
        Ok(())
    }

    /// Usage of a cell's whole subtree, from its cgroup files.
    /// The usage of a running executable's own group (`None` without one, or once ended:
    /// its group then holds nothing).
    pub fn own_group_stats(&self, exe: &crate::executable::Executable) -> Option<CellStats> {
        let group = exe.own_group()?;
        let tree = self.tree().ok()?;
        (!exe.exited()).then(|| read_stats(tree.as_ref(), &group))
    }

    pub fn stats(&self, name: &CellName) -> Result<CellStats, WorkloadError> {
        let tree = self.tree()?;
        self.find(name)?;
        Ok(read_stats(tree.as_ref(), name))
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
            let _ops = self.ops.write().await;
            let mut stops = tokio::task::JoinSet::new();
            for n in tops.clone() {
                let me = self.clone();
                stops.spawn(async move {
                    if let Err(e) = me.stop_locked(&n, grace, true).await {
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
        self.drain_pool().await;
        // The freed containers' directories deleted, not left for the next start.
        let deleted = tokio::task::spawn_blocking(|| {
            crate::workload::tree::deletions_done(SHUTDOWN_DELETIONS)
        })
        .await
        .unwrap_or(false);
        if !deleted {
            warn!(
                "freed containers' and cells' directories are still being deleted after {}s: the rest goes at the next start",
                SHUTDOWN_DELETIONS.as_secs()
            );
        }
        if let Ok(t) = &self.tree {
            t.release();
        }
        // Nothing is left to hold: a clean stop leaves no holder behind.
        if let Some(h) = &self.holder
            && let Err(e) = h.kill()
        {
            warn!("stopping the output holder: {e}");
        }
    }
}

/// Reports OOM kills in a cell (memory.events), while it exists.
pub(super) async fn watch_oom(cells: Arc<Cells>, cell: Arc<Cell>, tree: Arc<dyn CgroupTree>) {
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

/// Runs the operation `what` in a task of its own, so that the caller going away (a
/// cancelled call) cannot stop it halfway. The operation is given the [`InTask`] that
/// proves it, for the steps it calls that must not stop halfway either.
pub async fn detached<T, F, Fut>(what: &str, f: F) -> Result<T, WorkloadError>
where
    T: Send + 'static,
    F: FnOnce(InTask) -> Fut,
    Fut: std::future::Future<Output = Result<T, WorkloadError>> + Send + 'static,
{
    tokio::spawn(f(InTask(())))
        .await
        .map_err(|e| WorkloadError::Precondition(format!("{what} task: {e}")))?
}

/// Proof that the code holding it runs in a task of its own (only [`detached`] makes
/// one): whoever awaits that task can go away, the task goes on to its end. Operations
/// that must not stop halfway take it instead of starting a task of their own again: a
/// second task is one more hand-off between threads on the call's path (its cost was
/// not measurable apart from this host's noise).
#[derive(Debug, Clone, Copy)]
pub struct InTask(());

/// What [`Cells::lock_for`] holds; dropping it forgets the name's lock when nobody else
/// holds or waits for it.
enum OpsGuard<'a> {
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
    Shared {
        _shared: tokio::sync::RwLockReadGuard<'a, ()>,
        held: Option<tokio::sync::OwnedMutexGuard<()>>,
        lock: Arc<tokio::sync::Mutex<()>>,
        name: CellName,
        names: &'a Mutex<std::collections::HashMap<CellName, Arc<tokio::sync::Mutex<()>>>>,
    },
}

impl Drop for OpsGuard<'_> {
    fn drop(&mut self) {
        if let OpsGuard::Shared {
            held,
            lock,
            name,
            names,
            ..
        } = self
        {
            drop(held.take());
            let mut m = names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The map's reference and ours: nobody else holds or waits for it (others
            // take theirs under this map lock).
            if Arc::strong_count(lock) == 2 {
                m.remove(name);
            }
        }
    }
}
