//! Virtual machines: one jailed VMM process per VM ([`vmm`], on the aurae-vmm crate), in
//! its own cgroup under `vms/`, with its serial console logged like an executable's output
//! and a control socket through which auraed always knows the VM's true state.

pub mod kernels;
pub mod network;
pub mod record;
pub mod snapshots;
pub mod spec;
pub mod vmm;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aurae_proto::runtime::v0 as pb;

use crate::workload::Phase;
use aurae_sys::{ExitStatus, Namespaces as Ns, Pidfd, SpawnRequest, spawn::Program};
use tokio::sync::watch;
use tracing::{info, warn};

pub use spec::VmSpec;

use self::{
    network::{Lease, Network},
    vmm::{Report, VmmConfig},
};
use crate::{
    events::EventBus,
    reaper::Reaper,
    spec::{CellName, FieldError, Label},
    workload::{
        WorkloadError,
        cgroup::CgroupTree,
        host_path::HostPath,
        layout::VM_GROUP,
        log::{Log, Stream},
        supervise::wait_empty,
    },
};
/// How long a VMM has to report that the VM started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    pub phase: Phase,
    pub boot_time: Option<Duration>,
    /// How the guest ended (the VMM's report), and whether that was clean.
    pub ended: Option<(String, bool)>,
    /// The VMM process's own end (`None` status: it ended after a restart of auraed,
    /// when it was not auraed's child any more).
    pub process: Option<(Option<ExitStatus>, SystemTime)>,
    pub message: String,
    /// Port-I/O and MMIO exits the monitor handled, all vCPUs, as it last reported them
    /// (every second while the guest runs).
    pub exits: Option<VmExits>,
    /// How long the VMM took to restore the VM (restored VMs only).
    pub restore_time: Option<Duration>,
    /// The length of the state file the VMM wrote when asked for a snapshot.
    pub snapshotted: Option<u64>,
}

/// Exits a VM's monitor handled (each one a return from the guest to the VMM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmExits {
    pub io: u64,
    pub mmio: u64,
}

/// One VM and its VMM process.
#[derive(Debug)]
pub struct Vm {
    pub spec: VmSpec,
    pub pid: i32,
    pub pidfd: Arc<Pidfd>,
    pub started_at: SystemTime,
    pub log: Arc<Log>,
    pub state: watch::Sender<VmState>,
    ctl: Arc<OwnedFd>,
    lease: Option<Lease>,
    cgroup: CellName,
    /// Where the holder keeps copies of its control socket and console (see
    /// [`crate::workload::holder`]): a crash of auraed neither stops the guest nor loses
    /// its console.
    held: Option<crate::workload::holder::HeldOutput>,
}

impl Vm {
    /// The guest's addresses (its lease).
    pub fn addresses(&self) -> Vec<String> {
        self.lease.iter().map(|l| l.addr.to_string()).collect()
    }

    pub fn gone(&self) -> bool {
        self.state.borrow().process.is_some()
    }

    /// Waits for the VMM process to end, at most `timeout`.
    pub async fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut rx = self.state.subscribe();
        let w = rx.wait_for(|s| s.process.is_some());
        match timeout {
            Some(t) => tokio::time::timeout(t, w).await.is_ok_and(|r| r.is_ok()),
            None => w.await.is_ok(),
        }
    }
}

/// How a spawned instance's microVM starts ([`Vms::run_for_instance`]).
#[derive(Debug)]
pub enum InstanceBoot {
    /// Boots `kernel` with `initramfs` (a sealed memfd auraed built); `drive`, when
    /// given, is a handover drive (a sealed memfd): an instance template boots with an
    /// empty one.
    Boot {
        kernel: PathBuf,
        initramfs: OwnedFd,
        cmdline: String,
        drive: Option<OwnedFd>,
    },
    /// Restores a template's snapshot (its state and memory files, opened by the
    /// template store); `drive` is this instance's handover (a sealed memfd), put where
    /// the template's empty one was.
    Restore {
        state: std::fs::File,
        memory: std::fs::File,
        drive: OwnedFd,
    },
}

/// The domain service behind `RunVirtualMachine` and the `VirtualMachines` API.
#[derive(Debug)]
pub struct Vms {
    tree: Result<Arc<dyn CgroupTree>, String>,
    reaper: Arc<Reaper>,
    events: Arc<EventBus>,
    logs_dir: PathBuf,
    /// Canonical host directories kernels, initramfs images and drives may come from.
    image_roots: Vec<PathBuf>,
    vms: Mutex<BTreeMap<Label, Arc<Vm>>>,
    ops: tokio::sync::Mutex<()>,
    sealed: Arc<aurae_sys::memfd::SealedSelf>,
    network: Mutex<Network>,
    recorder: crate::workload::record::Recorder,
    holder: Option<Arc<crate::workload::holder::Holder>>,
    /// Where snapshots are stored (`None`: no state directory was usable; reported).
    snapshots: Result<snapshots::SnapshotStore, String>,
    /// The ELFs kept for bzImage kernels (`None`: bzImages boot as given).
    kernels: Option<Arc<kernels::KernelElfs>>,
}

/// How long a VMM has to write a snapshot once asked (a pass over the guest's memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

fn precondition(m: impl Into<String>) -> WorkloadError {
    WorkloadError::Precondition(m.into())
}

/// The flag VM image roots come from.
pub const IMAGE_ROOT_FLAG: &str = "--vm-image-root";

/// Opens `p` once, a regular file below one of `roots` named by its real path (see
/// [`crate::workload::host_path::UnderRoot::open`]), and clones that file's mount into a detached one
/// (read-only unless `write`): the VMM, in a mount namespace of its own, attaches this
/// very file in its jail and boots or serves it from there.
fn allowed_file(
    field: &str,
    p: &Path,
    roots: &[PathBuf],
    write: bool,
) -> Result<OwnedFd, WorkloadError> {
    let (fd, _) = crate::workload::host_path::open_host_path(
        field,
        p,
        HostPath::File { write },
        roots,
        IMAGE_ROOT_FLAG,
    )?;
    aurae_sys::container::clone_mount(fd.as_fd(), !write).map_err(|e| {
        precondition(format!(
            "{field}: {}: cannot clone its mount: {e}",
            p.display()
        ))
    })
}

fn host_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

impl Vms {
    pub fn new(
        tree: Result<Arc<dyn CgroupTree>, String>,
        reaper: Arc<Reaper>,
        events: Arc<EventBus>,
        logs_dir: PathBuf,
        image_roots: Vec<PathBuf>,
        sealed: Arc<aurae_sys::memfd::SealedSelf>,
    ) -> Self {
        Self {
            tree,
            reaper,
            logs_dir,
            image_roots,
            vms: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
            sealed,
            network: Mutex::new(Network::new(
                "aurae0",
                std::net::Ipv4Addr::new(10, 200, 0, 1),
            )),
            recorder: crate::workload::record::Recorder::new(None, events.clone()),
            events,
            holder: None,
            snapshots: Err("no snapshot directory was configured".into()),
            kernels: None,
        }
    }

    /// Boots a bzImage kernel from the ELF inside it once that ELF is kept in `dir` (see
    /// [`kernels`]); what a crashed auraed left half written there is removed and reported.
    pub fn with_kernel_elfs(mut self, dir: PathBuf) -> Self {
        self.kernels = match kernels::KernelElfs::open(dir) {
            Ok((store, removed)) => {
                for name in removed {
                    warn!(file = %name, "removed a kernel ELF a previous auraed left half written");
                }
                Some(Arc::new(store))
            }
            Err(e) => {
                warn!("bzImage kernels boot as given: no place to keep their ELFs: {e}");
                None
            }
        };
        self
    }

    /// The kernel to hand the VMM for `kernel` (a detached mount of the file the caller
    /// named, `name` in messages): a detached mount of the ELF kept for it when there is
    /// one, else `kernel` itself (and the ELF is made for the next boot where it can be).
    fn kernel_to_boot(&self, kernel: OwnedFd, name: &Path) -> OwnedFd {
        let Some(store) = &self.kernels else {
            return kernel;
        };
        // The very file checked and cloned, read through its fd.
        let file = match std::fs::File::open(format!("/proc/self/fd/{}", kernel.as_raw_fd())) {
            Ok(f) => f,
            Err(e) => {
                warn!(kernel = %name.display(), "booted as given: cannot read it: {e}");
                return kernel;
            }
        };
        let Some(elf) = crate::reaper::off_runtime(|| store.elf_for(&file, name)) else {
            return kernel;
        };
        match aurae_sys::container::clone_mount(elf.as_fd(), true) {
            Ok(mount) => {
                info!(kernel = %name.display(), "booting the ELF kept for this bzImage");
                mount
            }
            Err(e) => {
                warn!(kernel = %name.display(), "booted as given: cannot mount its kept ELF: {e}");
                kernel
            }
        }
    }

    /// Stores snapshots in `dir` (created 0700); what a crashed auraed left half written
    /// there is removed and reported.
    pub fn with_snapshots(mut self, dir: PathBuf) -> Self {
        self.snapshots = match snapshots::SnapshotStore::open(dir.clone()) {
            Ok((store, removed)) => {
                for name in removed {
                    warn!(snapshot = %name, "removed a snapshot a previous auraed left half written");
                    self.events.emit(
                        pb::Kind::VirtualMachine,
                        &name,
                        pb::EventType::Freed,
                        "a snapshot left half written by a previous auraed was removed",
                    );
                }
                Ok(store)
            }
            Err(e) => {
                warn!("VM snapshots unavailable: {e}");
                Err(format!("VM snapshots are unavailable here: {e}"))
            }
        };
        self
    }

    /// The snapshot store, or FAILED_PRECONDITION saying why there is none.
    pub fn snapshots(&self) -> Result<&snapshots::SnapshotStore, WorkloadError> {
        self.snapshots
            .as_ref()
            .map_err(|e| WorkloadError::Precondition(e.clone()))
    }

    /// Records every VM in `store` and hands its control socket and console to
    /// `holder`, so a crash of auraed neither stops nor loses it (see [`record`]).
    pub fn with_records(
        mut self,
        store: Option<crate::store::Store>,
        holder: Option<Arc<crate::workload::holder::Holder>>,
    ) -> Self {
        self.recorder = crate::workload::record::Recorder::new(store, self.events.clone());
        self.holder = holder;
        self
    }

    /// Uses another bridge subnet than 10.200.0.1/24 (a spawned instance gets its own,
    /// so its children's addresses never collide with its parent's).
    pub fn with_bridge_gateway(self, gateway: std::net::Ipv4Addr) -> Self {
        if let Ok(mut n) = self.network.lock() {
            *n = Network::new("aurae0", gateway);
        }
        self
    }

    /// The bridge VMs and spawned instances share.
    pub fn network(&self) -> &Mutex<Network> {
        &self.network
    }

    fn tree(&self) -> Result<Arc<dyn CgroupTree>, WorkloadError> {
        self.tree.clone().map_err(WorkloadError::Precondition)
    }

    fn sealed(&self) -> Result<Arc<OwnedFd>, WorkloadError> {
        Ok(self.sealed.get()?)
    }

    pub fn find(&self, name: &Label) -> Result<Arc<Vm>, WorkloadError> {
        self.vms
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .ok_or_else(|| {
                WorkloadError::NotFound(format!(
                    "virtual machine {:?} does not exist",
                    name.as_str()
                ))
            })
    }

    pub fn list(&self, visible: impl Fn(&str) -> bool) -> Vec<Arc<Vm>> {
        self.vms
            .lock()
            .map(|m| {
                m.values()
                    .filter(|v| visible(v.spec.name.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The directories kernels, initramfs images and drives may come from (canonical).
    pub fn image_roots(&self) -> &[PathBuf] {
        &self.image_roots
    }

    /// VMs under the names `within` accepts, and their memory together (for quotas).
    pub fn usage(&self, within: impl Fn(&str) -> bool) -> (usize, u64) {
        self.vms
            .lock()
            .map(|m| {
                m.values()
                    .filter(|v| within(v.spec.name.as_str()))
                    .fold((0, 0u64), |(n, mem), v| {
                        (n + 1, mem.saturating_add(v.spec.memory_bytes))
                    })
            })
            .unwrap_or_default()
    }

    /// Starts a VM: checks, cgroup, network, the VMM process, and its start report.
    pub async fn run(self: &Arc<Self>, spec: VmSpec) -> Result<Arc<Vm>, WorkloadError> {
        let tree = self.tree()?;
        if !Path::new("/dev/kvm").exists() {
            return Err(precondition(
                "this machine has no /dev/kvm: virtual machines need KVM",
            ));
        }
        if spec.macs.len() > 1 {
            return Err(FieldError::new("interfaces", "at most one interface per VM").into());
        }
        if let Some(total) = host_memory()
            && spec.memory_bytes > total
        {
            return Err(FieldError::new(
                "memory_bytes",
                format!(
                    "{} is more than this host's {total} bytes",
                    spec.memory_bytes
                ),
            )
            .into());
        }
        // Each file opened once, here; the VMM gets these fds, never a path to open. A
        // writable drive has been authorized by the caller (see RunVirtualMachine).
        let roots = &self.image_roots;
        let mut files = match &spec.snapshot {
            Some(name) => {
                let (state, memory) = self.snapshots()?.open_files(name)?;
                vec![OwnedFd::from(state), OwnedFd::from(memory)]
            }
            None => {
                let kernel = allowed_file("kernel_path", &spec.kernel, roots, false)?;
                vec![self.kernel_to_boot(kernel, &spec.kernel)]
            }
        };
        if let Some(p) = &spec.initramfs {
            files.push(allowed_file("initramfs_path", p, roots, false)?);
        }
        for (i, d) in spec.drives.iter().enumerate() {
            files.push(allowed_file(
                &format!("drives[{i}].path"),
                &d.path,
                roots,
                d.writable,
            )?);
        }
        let _ops = self.ops.lock().await;
        if self.vms.lock().is_ok_and(|m| m.contains_key(&spec.name)) {
            return Err(WorkloadError::Exists(format!(
                "virtual machine {:?} already exists",
                spec.name.as_str()
            )));
        }
        let group = CellName::parse("name", VM_GROUP)?;
        if !tree.exists(&group) {
            tree.create(&group)?;
        }
        let cgroup = CellName::parse("name", &format!("{VM_GROUP}/{}", spec.name))?;
        tree.create(&cgroup)?;
        let lease = match spec.macs.first() {
            Some(mac) => match self.network.lock().map(|mut n| n.lease(*mac)) {
                Ok(Ok(l)) => Some(l),
                Ok(Err(e)) => {
                    let _ = tree.remove(&cgroup);
                    return Err(precondition(format!("interfaces[0]: {e}")));
                }
                Err(_) => return Err(precondition("network lock poisoned")),
            },
            None => None,
        };
        let mut cmdline = spec.cmdline.clone();
        if let (Some(l), Ok(n), None) = (&lease, self.network.lock(), &spec.snapshot) {
            cmdline = format!("{} {}", cmdline.trim(), n.cmdline(l))
                .trim()
                .to_owned();
        }
        let cfg = VmmConfig {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            cmdline,
            vcpus: u8::try_from(spec.vcpus).unwrap_or(1),
            memory_bytes: spec.memory_bytes,
            drives: spec
                .drives
                .iter()
                .map(|d| (d.path.clone(), !d.writable))
                .collect(),
            net: lease.as_ref().map(|l| (l.tap.clone(), l.mac)),
            initramfs_in_memory: false,
            cpu_template: spec.cpu_template.name().to_owned(),
            restore: spec.snapshot.is_some(),
        };
        let started = self
            .start_vmm(&tree, &spec, &cgroup, cfg, &files, lease.clone(), None)
            .await;
        drop(files);
        match started {
            Ok(vm) => {
                info!(vm = %spec.name, pid = vm.pid, "virtual machine started");
                Ok(vm)
            }
            Err(e) => {
                if let (Some(l), Ok(mut n)) = (&lease, self.network.lock()) {
                    n.release(l);
                }
                let _ = tree.kill(&cgroup);
                wait_empty(tree.as_ref(), &cgroup, Duration::from_secs(5)).await;
                let _ = tree.remove(&cgroup);
                Err(e)
            }
        }
    }

    /// Starts the VM of a spawned instance: like any VM (its own jailed VMM process in
    /// `cgroup`), booted from the operator's kernel and an initramfs auraed built in
    /// memory, or restored from an instance template; on `lease`'s TAP device; neither
    /// listed nor recorded as a VM (the instance is what the API shows). Its console goes
    /// to `console_log`.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_for_instance(
        self: &Arc<Self>,
        name: &Label,
        cgroup: &CellName,
        boot: InstanceBoot,
        vcpus: u32,
        memory_bytes: u64,
        lease: &Lease,
        console_log: PathBuf,
    ) -> Result<Arc<Vm>, WorkloadError> {
        let tree = self.tree()?;
        if !Path::new("/dev/kvm").exists() {
            return Err(precondition(
                "this machine has no /dev/kvm: microVM instances need KVM",
            ));
        }
        let mut spec = VmSpec {
            name: name.clone(),
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            vcpus,
            memory_bytes,
            drives: Vec::new(),
            macs: vec![Some(lease.mac)],
            cpu_template: aurae_vmm::CpuTemplate::default(),
            snapshot: None,
        };
        let handover_drive = || (PathBuf::from("(in memory)"), true);
        let (files, drives, restore) = match boot {
            InstanceBoot::Boot {
                kernel,
                initramfs,
                cmdline,
                drive,
            } => {
                let kernel_fd = std::fs::File::open(&kernel)
                    .map_err(|e| {
                        precondition(format!("--instance-kernel {}: {e}", kernel.display()))
                    })
                    .and_then(|f| {
                        aurae_sys::container::clone_mount(f.as_fd(), true).map_err(|e| {
                            precondition(format!("--instance-kernel {}: {e}", kernel.display()))
                        })
                    })?;
                let kernel_fd = self.kernel_to_boot(kernel_fd, &kernel);
                spec.kernel = kernel;
                spec.initramfs = Some(PathBuf::from("(in memory)"));
                spec.cmdline = cmdline;
                let mut files = vec![kernel_fd, initramfs];
                let drives = match drive {
                    Some(d) => {
                        files.push(d);
                        vec![handover_drive()]
                    }
                    None => Vec::new(),
                };
                (files, drives, false)
            }
            InstanceBoot::Restore {
                state,
                memory,
                drive,
            } => (
                vec![OwnedFd::from(state), OwnedFd::from(memory), drive],
                vec![handover_drive()],
                true,
            ),
        };
        let cfg = VmmConfig {
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            cmdline: spec.cmdline.clone(),
            vcpus: u8::try_from(vcpus).unwrap_or(1),
            memory_bytes,
            drives,
            net: Some((lease.tap.clone(), lease.mac)),
            initramfs_in_memory: !restore,
            cpu_template: spec.cpu_template.name().to_owned(),
            restore,
        };
        self.start_vmm(
            &tree,
            &spec,
            cgroup,
            cfg,
            &files,
            Some(lease.clone()),
            Some(console_log),
        )
        .await
    }

    /// Kills the VM of a spawned instance (its VMM process) and waits for it.
    pub async fn kill_for_instance(&self, vm: &Vm) {
        if !vm.gone() {
            let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
            vm.wait(Some(Duration::from_secs(10))).await;
        }
        self.release(vm);
    }

    /// `hidden_log`: a VM of a spawned instance, logged there, not listed or recorded.
    #[allow(clippy::too_many_arguments)]
    async fn start_vmm(
        self: &Arc<Self>,
        tree: &Arc<dyn CgroupTree>,
        spec: &VmSpec,
        cgroup: &CellName,
        cfg: VmmConfig,
        files: &[OwnedFd],
        lease: Option<Lease>,
        hidden_log: Option<PathBuf>,
    ) -> Result<Arc<Vm>, WorkloadError> {
        let hidden = hidden_log.is_some();
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (ctl, ctl_child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let leaf = tree.leaf_fd(cgroup)?;
        let sealed = self.sealed()?;
        let me = self.clone();
        let child = tokio::task::spawn_blocking(move || {
            let devnull = std::fs::File::open("/dev/null")?;
            let argv: Vec<std::ffi::CString> = ["aurae-vmm", vmm::VMM_ARG]
                .iter()
                .filter_map(|s| std::ffi::CString::new(*s).ok())
                .collect();
            let req = SpawnRequest {
                program: Program::Fd(sealed.as_raw_fd()),
                argv: &argv,
                envp: &[],
                cwd: Some(c"/"),
                uid: None,
                gid: None,
                no_new_privs: true,
                stdio: [devnull.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()],
                controlling_terminal: false,
                pass_fd: Some(ctl_child.as_raw_fd()),
                cgroup: Some(leaf.as_raw_fd()),
                new_namespaces: Ns(Ns::MOUNT | Ns::PID | Ns::IPC | Ns::UTS | Ns::CGROUP),
                pid_namespace_of: None,
                join: None,
                unshare: Ns(0),
                container: None,
                console: None,
            };
            me.reaper
                .spawn(|| aurae_sys::spawn(&req))
                .map_err(|source| WorkloadError::Spawn {
                    what: "starting the VMM".into(),
                    source,
                })
        })
        .await
        .map_err(|e| precondition(format!("VMM spawn task: {e}")))??;
        let held = self.hold(spec.name.as_str(), [&ctl, &out_r]);
        let ctl = Arc::new(ctl);
        let raw: Vec<_> = files.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = vmm::send_with_fds(ctl.as_ref(), &cfg, &raw) {
            // No guest runs yet, the VMM waits for its config: it goes, and the holder
            // lets its channels go (its copy of the control socket would keep the VMM
            // waiting).
            let _ = child.pidfd.send_signal(nix::libc::SIGKILL);
            self.release_held(spec.name.as_str(), held.as_ref());
            return Err(e.into());
        }
        let log = Arc::new(Log::new(Some(hidden_log.unwrap_or_else(|| {
            self.logs_dir.join("vms").join(format!("{}.log", spec.name))
        }))));
        let (state, mut rx) = watch::channel(VmState {
            phase: Phase::Starting,
            boot_time: None,
            ended: None,
            process: None,
            message: String::new(),
            exits: None,
            restore_time: None,
            snapshotted: None,
        });
        let vm = Arc::new(Vm {
            spec: spec.clone(),
            pid: child.pid,
            pidfd: child.pidfd.clone(),
            started_at: SystemTime::now(),
            log: log.clone(),
            state,
            ctl: ctl.clone(),
            lease,
            cgroup: cgroup.clone(),
            held,
        });
        self.pump_console(&vm, out_r);
        if let Err(e) = self.read_reports(&vm, &ctl) {
            let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
            // Its exit, from the reaper (the VM's own watch of it is not started yet).
            let _ = tokio::time::timeout(Duration::from_secs(5), child.exit).await;
            let _ = vm.log.remove_files();
            self.release(&vm);
            return Err(e);
        }
        // The VMM process's end: the truth when it died without a report.
        {
            let vm2 = vm.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                let st = child.exit.await.unwrap_or(ExitStatus::Signal(9));
                // Let the report reader drain what the VMM sent before it exited.
                tokio::time::sleep(Duration::from_millis(20)).await;
                vm2.state.send_modify(|s| {
                    if s.ended.is_none() && s.phase != Phase::Failed {
                        s.phase = Phase::Failed;
                        s.message = format!("the VMM process ended without a report: {st:?}");
                    } else if s.ended.is_none() && s.message.is_empty() {
                        s.message = format!("the VMM process ended: {st:?}");
                    }
                    s.process = Some((Some(st), SystemTime::now()));
                });
                events.emit(
                    pb::Kind::VirtualMachine,
                    vm2.spec.name.as_str(),
                    pb::EventType::Stopped,
                    vm2.state.borrow().message.clone(),
                );
            });
        }
        // Started, failed, or gone.
        let ready = tokio::time::timeout(
            START_TIMEOUT,
            rx.wait_for(|s| s.phase != Phase::Starting || s.process.is_some()),
        )
        .await
        .is_ok();
        let phase = vm.state.borrow().phase;
        if !ready || phase != Phase::Running {
            let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
            vm.wait(Some(Duration::from_secs(5))).await;
            let why = if !ready {
                format!("the VMM did not start the VM within {START_TIMEOUT:?}")
            } else {
                vm.state.borrow().message.clone()
            };
            let _ = vm.log.remove_files();
            self.release(&vm);
            return Err(precondition(format!(
                "virtual machine {:?} could not start: {why}",
                spec.name.as_str()
            )));
        }
        if hidden {
            return Ok(vm);
        }
        if let Ok(mut m) = self.vms.lock() {
            m.insert(spec.name.clone(), vm.clone());
        }
        self.recorder.put(
            pb::Kind::VirtualMachine,
            crate::store::kinds::VIRTUAL_MACHINE,
            spec.name.as_str(),
            &vm.record(),
        );
        self.events.emit(
            pb::Kind::VirtualMachine,
            spec.name.as_str(),
            pb::EventType::Started,
            format!("vmm pid {}", vm.pid),
        );
        Ok(vm)
    }

    /// Gives the holder copies of a VMM's control socket and console read end; `None`
    /// (reported) without a holder or an answer: the VM runs, but a crash of auraed
    /// would stop it.
    fn hold(&self, name: &str, fds: [&OwnedFd; 2]) -> Option<crate::workload::holder::HeldOutput> {
        match self.holder.as_ref()?.hold_all(&fds) {
            Ok(held) => Some(held),
            Err(e) => {
                warn!(vm = name, "the holder did not take the VMM's channels: {e}");
                self.events.emit(
                    pb::Kind::VirtualMachine,
                    name,
                    pb::EventType::Failed,
                    format!("the VM would not survive an auraed crash: the holder did not take its channels ({e})"),
                );
                None
            }
        }
    }

    /// The holder lets go of a VM's channels (it is gone).
    fn release(&self, vm: &Vm) {
        self.release_held(vm.spec.name.as_str(), vm.held.as_ref());
    }

    fn release_held(&self, name: &str, held: Option<&crate::workload::holder::HeldOutput>) {
        if let (Some(h), Some(held)) = (&self.holder, held)
            && let Err(e) = h.release_held(held)
        {
            warn!(vm = name, "releasing the VMM's channels in the holder: {e}");
        }
    }

    /// The serial console into the VM's log.
    fn pump_console(&self, vm: &Arc<Vm>, out_r: OwnedFd) {
        let log = vm.log.clone();
        let events = self.events.clone();
        let id = vm.spec.name.to_string();
        tokio::spawn(async move {
            let report = move |e: String| {
                tracing::warn!(vm = %id, "console log write failed: {e}");
                events.emit(
                    pb::Kind::VirtualMachine,
                    &id,
                    pb::EventType::Failed,
                    "the console is not reaching its log file (the cause is in auraed's log)",
                );
            };
            crate::workload::output::pump(out_r, log.clone(), Stream::Stdout, report).await;
            log.close();
        });
    }

    /// The VMM's reports, on a thread of their own (blocking reads of a seqpacket socket).
    fn read_reports(&self, vm: &Arc<Vm>, ctl: &OwnedFd) -> Result<(), WorkloadError> {
        let vm2 = vm.clone();
        let reader = ctl.try_clone().map_err(WorkloadError::io)?;
        std::thread::Builder::new()
            .name("vm-reports".into())
            .spawn(move || {
                while let Ok(Some(r)) = vmm::recv_msg::<Report>(&reader) {
                    if let Report::Exits { io, mmio } = r {
                        // A figure, not a change of state: waiters are not woken.
                        vm2.state.send_if_modified(|s| {
                            s.exits = Some(VmExits { io, mmio });
                            false
                        });
                        continue;
                    }
                    vm2.state.send_modify(|s| match r {
                        Report::Started => s.phase = Phase::Running,
                        Report::Booted { boot_ns } => {
                            s.boot_time = Some(Duration::from_nanos(boot_ns));
                        }
                        Report::Exited { reason, clean } => {
                            s.phase = if clean { Phase::Exited } else { Phase::Failed };
                            s.message = format!("guest ended: {reason}");
                            s.ended = Some((reason, clean));
                        }
                        Report::Failed { message } => {
                            s.phase = Phase::Failed;
                            s.message = message;
                        }
                        Report::Restored {
                            restore_ns,
                            machine_ns,
                            vcpus_ns,
                            steps,
                        } => {
                            s.restore_time = Some(Duration::from_nanos(restore_ns));
                            info!(
                                vm = %vm2.spec.name,
                                restore_ms = restore_ns as f64 / 1e6,
                                machine_ms = machine_ns as f64 / 1e6,
                                vcpus_ms = vcpus_ns as f64 / 1e6,
                                since_spawn_ms = vm2
                                    .started_at
                                    .elapsed()
                                    .unwrap_or_default()
                                    .as_secs_f64()
                                    * 1e3,
                                steps_ms = %steps,
                                "virtual machine restored"
                            );
                        }
                        Report::Snapshotted {
                            state_bytes,
                            memory_bytes,
                            took_ns,
                        } => {
                            s.snapshotted = Some(state_bytes);
                            info!(
                                vm = %vm2.spec.name,
                                state_bytes,
                                memory_bytes,
                                vmm_ms = took_ns as f64 / 1e6,
                                "the VMM wrote a snapshot"
                            );
                        }
                        Report::Exits { .. } => {}
                    });
                }
            })
            .map_err(WorkloadError::io)?;
        Ok(())
    }

    /// Stops the guest: asks the VMM, then kills it after `grace`.
    pub async fn stop(&self, name: &Label, grace: Duration) -> Result<Arc<Vm>, WorkloadError> {
        let vm = self.find(name)?;
        if !vm.gone() {
            let _ = vmm::send_msg(vm.ctl.as_ref(), &vmm::Command::Stop);
            if !vm.wait(Some(grace)).await {
                warn!(vm = %name, "VMM did not stop within the grace period: killing it");
                let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
                vm.wait(Some(Duration::from_secs(10))).await;
            }
        }
        Ok(vm)
    }

    /// Stops a running VM and stores its snapshot as `snapshot`: the VMM writes both files
    /// into a partial directory auraed made, which is put under its name only once the
    /// VMM has said it wrote them. The VM ends EXITED ("snapshotted").
    pub async fn snapshot(
        &self,
        name: &Label,
        snapshot: &Label,
    ) -> Result<snapshots::SnapshotInfo, WorkloadError> {
        let vm = self.find(name)?;
        let info = Self::snapshot_into(&vm, self.snapshots()?, snapshot).await?;
        info!(vm = %name, snapshot = %snapshot, "snapshot stored");
        self.events.emit(
            pb::Kind::VirtualMachine,
            name.as_str(),
            pb::EventType::Stopped,
            format!("snapshot {snapshot} stored"),
        );
        Ok(info)
    }

    /// The snapshot of `vm` (running), written into `store` as `snapshot` (see
    /// [`Vms::snapshot`]); also how an instance template is made.
    pub async fn snapshot_into(
        vm: &Arc<Vm>,
        store: &snapshots::SnapshotStore,
        snapshot: &Label,
    ) -> Result<snapshots::SnapshotInfo, WorkloadError> {
        let name = &vm.spec.name;
        if vm.gone() || vm.state.borrow().phase != Phase::Running {
            return Err(precondition(format!(
                "virtual machine {:?} is not running",
                name.as_str()
            )));
        }
        let partial = store.begin(snapshot)?;
        let asked = std::time::Instant::now();
        let sent = vmm::send_with_fds(
            vm.ctl.as_ref(),
            &vmm::Command::Snapshot,
            &[partial.state.as_raw_fd(), partial.memory.as_raw_fd()],
        );
        if let Err(e) = sent {
            partial.abort();
            return Err(precondition(format!("asking the VMM for a snapshot: {e}")));
        }
        let mut rx = vm.state.subscribe();
        // Only whether it timed out: the state `wait_for` hands back is a read lock on it,
        // which, held over the `borrow` below, deadlocked this task against the VMM's
        // next report (its writer waiting on the first read, the second read on it).
        let timed_out = tokio::time::timeout(
            SNAPSHOT_TIMEOUT,
            rx.wait_for(|s| s.snapshotted.is_some() || s.process.is_some()),
        )
        .await
        .is_err();
        let written = vm.state.borrow().snapshotted;
        let Some(state_bytes) = written else {
            partial.abort();
            if timed_out {
                let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
            }
            let why = vm.state.borrow().message.clone();
            return Err(precondition(format!(
                "virtual machine {:?}: no snapshot was written{}",
                name.as_str(),
                if timed_out {
                    format!(" within {SNAPSHOT_TIMEOUT:?} (the VMM was killed)")
                } else {
                    format!(": {why}")
                }
            )));
        };
        let info = snapshots::SnapshotInfo {
            name: snapshot.to_string(),
            vm: name.to_string(),
            vcpus: vm.spec.vcpus,
            memory_bytes: vm.spec.memory_bytes,
            drives: vm.spec.drives.len(),
            interfaces: vm.spec.macs.len(),
            state_bytes,
            took_ns: u64::try_from(asked.elapsed().as_nanos()).unwrap_or(u64::MAX),
            created_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cpu_template: vm.spec.cpu_template.name().to_owned(),
        };
        partial.commit(&info)?;
        Ok(info)
    }

    /// Stops (at once) and removes the VM, its TAP device, address and cgroup.
    pub async fn free(&self, name: &Label) -> Result<(), WorkloadError> {
        let _ops = self.ops.lock().await;
        let vm = self.find(name)?;
        if !vm.gone() {
            let _ = vm.pidfd.send_signal(nix::libc::SIGKILL);
            vm.wait(Some(Duration::from_secs(10))).await;
        }
        let tree = self.tree()?;
        let _ = tree.kill(&vm.cgroup);
        if !wait_empty(tree.as_ref(), &vm.cgroup, Duration::from_secs(10)).await {
            return Err(precondition(format!(
                "the VMM of {:?} is still running after a kill",
                name.as_str()
            )));
        }
        tree.remove(&vm.cgroup)?;
        if let (Some(l), Ok(mut n)) = (&vm.lease, self.network.lock()) {
            n.release(l);
        }
        if let Ok(mut m) = self.vms.lock() {
            m.remove(name);
        }
        let _ = vm.log.remove_files();
        self.release(&vm);
        self.recorder.delete(
            pb::Kind::VirtualMachine,
            crate::store::kinds::VIRTUAL_MACHINE,
            name.as_str(),
        );
        self.events.emit(
            pb::Kind::VirtualMachine,
            name.as_str(),
            pb::EventType::Freed,
            "",
        );
        Ok(())
    }

    /// Ordered shutdown: every VM stopped (with `grace`) and freed; the bridge removed.
    pub async fn shutdown(&self, grace: Duration) {
        let names: Vec<Label> = self
            .vms
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for n in names {
            let _ = self.stop(&n, grace).await;
            if let Err(e) = self.free(&n).await {
                warn!(vm = %n, "freeing on shutdown: {e}");
            }
        }
        if let Ok(t) = &self.tree {
            let _ = CellName::parse("name", VM_GROUP).map(|g| t.remove(&g));
        }
        if let Ok(mut n) = self.network.lock() {
            n.shutdown();
        }
    }
}
