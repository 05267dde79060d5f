//! A VM: built by [`Vm::new`] from a [`VmConfig`], run to its end by [`Vm::run`], stopped
//! from any thread through a [`VmHandle`].
//!
//! Threads: [`Vm::run`] runs on the caller's thread as the VM's controller; it starts one
//! thread per vCPU (`vcpu0`, `vcpu1`, …), waits for the first vCPU to end or for a stop
//! request, then stops the others: it sets a shared flag and sends each vCPU thread
//! [`vcpu_kick_signal`] (SIGRTMIN) until it has ended. The signal's handler does nothing;
//! its only effect is that `KVM_RUN` returns `EINTR` so the thread sees the flag. The kick
//! is repeated every millisecond, so a signal that lands between the flag check and
//! `KVM_RUN` is never lost.

use std::{
    fs::File,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use kvm_bindings::{
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vm_superio::Serial;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use vmm_sys_util::eventfd::EventFd;

use crate::{
    acpi::{self, MmioDeviceInfo},
    boot::{self, BootError},
    config::{self, ConfigError, VmConfig},
    cpu::{self, CpuError},
    devices::{EventFdTrigger, IoAction, PortIo, SERIAL_IRQ},
    layout::{self, MemoryLayout},
    seccomp::{self, Filters, SeccompError},
    snapshot::{self, Snapshot, SnapshotError},
    sys::{self, GuestVm, Vcpu},
    virtio::{MmioBus, MmioTransport, VirtioDevice, block::Block, console::Console, net::Net},
};

/// Why [`Vm::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("allocating {bytes} bytes of guest memory: {source}")]
    Memory {
        /// How much was asked.
        bytes: u64,
        /// The cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// The kernel, initramfs or boot structures could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A device could not be created (an eventfd).
    #[error("creating {what}: {source}")]
    Device {
        /// Which device.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A vCPU thread could not be started.
    #[error("starting vCPU thread: {0}")]
    Thread(std::io::Error),
    /// A drive's image could not be opened.
    #[error("opening drive {path}: {source}")]
    Drive {
        /// The image.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TAP device could not be opened.
    #[error("opening TAP {name}: {source}")]
    Tap {
        /// Its name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A virtio transport could not be built (a queue size out of range).
    #[error("virtio device: {0}")]
    Virtio(virtio_queue::Error),
    /// The seccomp filters could not be compiled.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A snapshot could not be restored.
    #[error("restoring the snapshot: {0}")]
    Restore(#[from] SnapshotError),
}

/// Why a vCPU ended the VM with an error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExitError {
    /// `KVM_RUN` failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: errno {errno}")]
    KvmRun {
        /// Which vCPU.
        vcpu: u8,
        /// The errno.
        errno: i32,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// Which vCPU.
        vcpu: u8,
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// KVM could not emulate an instruction (`KVM_EXIT_INTERNAL_ERROR`).
    #[error("vCPU {vcpu}: KVM internal error {suberror} at rip {rip:#x}, data {data:x?}")]
    Internal {
        /// Which vCPU.
        vcpu: u8,
        /// `KVM_INTERNAL_ERROR_*` (1: emulation failure).
        suberror: u32,
        /// The guest's `rip` then (0 if unreadable).
        rip: u64,
        /// The data words KVM gave.
        data: Vec<u64>,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {what}")]
    Unexpected {
        /// Which vCPU.
        vcpu: u8,
        /// The exit, as text.
        what: String,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {vcpu}: thread panicked")]
    Panicked {
        /// Which vCPU.
        vcpu: u8,
    },
    /// The VM was stopped for a snapshot that could not be written.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A VMM thread could not install its seccomp filter (it then runs no guest code).
    #[error("{thread}: {error}")]
    Seccomp {
        /// The thread's name.
        thread: String,
        /// What failed.
        error: String,
    },
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off: ACPI S5 through the FADT's sleep control register (Linux
    /// `poweroff`), or `KVM_SYSTEM_EVENT_SHUTDOWN`.
    PowerOff,
    /// The guest asked for a reset: i8042 command 0xfe (Linux `reboot`, `poweroff` without
    /// ACPI, with `reboot=k`) or `KVM_SYSTEM_EVENT_RESET`.
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`): the guest crashed beyond its own
    /// exception handling.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// [`VmHandle::stop`] was called.
    Stopped,
    /// [`VmHandle::snapshot`] was called: the VM was stopped and its state written.
    Snapshotted(SnapshotInfo),
    /// A vCPU failed.
    Error(ExitError),
}

/// State shared by the controller, the vCPU threads and the handles.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    io_exits: AtomicU64,
    mmio_exits: AtomicU64,
    devices: PortIo,
    mmio: MmioBus,
}

enum Event {
    Stop,
    Snapshot(SnapshotTarget),
    VcpuEnded(u8, Option<VmExit>),
}

/// Where [`VmHandle::snapshot`] writes.
#[derive(Debug)]
pub struct SnapshotTarget {
    /// The state file (written from its start, then truncated to its length).
    pub state: File,
    /// The memory file (truncated, then written sparse).
    pub memory: File,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The state file's length.
    pub state_bytes: u64,
    /// The memory file's length (guest RAM).
    pub memory_bytes: u64,
    /// From the stop request to both files written.
    pub took: Duration,
}

/// What [`Vm::restore`] needs beyond the snapshot: the devices the guest had, rebuilt on
/// this host (its own drive files and TAP), and where its console goes.
pub struct RestoreConfig {
    /// The decoded state file ([`Snapshot::read`]).
    pub snapshot: Snapshot,
    /// The memory file, mapped `MAP_PRIVATE` (never written).
    pub memory: File,
    /// Where the serial console's output goes from now on.
    pub serial_out: config::SerialSink,
    /// The drives, as many as the snapshot's VM had, in order.
    pub drives: Vec<config::DriveConfig>,
    /// The network device, if the snapshot's VM had one: this VM's own TAP and MAC.
    pub net: Option<config::NetConfig>,
    /// Where the virtio console writes, if the snapshot's VM had one.
    pub console_out: Option<config::SerialSink>,
    /// Per-thread seccomp filters, as [`VmConfig::seccomp`].
    pub seccomp: bool,
}

impl std::fmt::Debug for RestoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreConfig")
            .field("snapshot", &self.snapshot)
            .field("drives", &self.drives)
            .field("net", &self.net)
            .field("console", &self.console_out.is_some())
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// What [`Vm::restore`] did, for the embedder's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreInfo {
    /// From the call to vCPUs ready (memory mapped, not yet read).
    pub took: Duration,
    /// Of which: the VM with its memory mapped, irqchip, PIT, clock and devices.
    pub machine: Duration,
    /// Of which: creating the vCPUs and setting their state.
    pub vcpus: Duration,
    /// The guest's kvmclock was advanced by the time since the snapshot (a kernel with
    /// `KVM_CLOCK_REALTIME`); otherwise it resumes at the snapshot's instant.
    pub clock_advanced: bool,
    /// The steps of the VM's shell first (`ahead: …`: made before `took` began where the
    /// shell was made ahead — in the VMM, beside its jail — and inside it for
    /// [`Vm::restore`]), then every step of the restore, in order, each with its own time
    /// (those add up to `took`, less opening `/dev/kvm` for [`Vm::restore`]).
    pub steps: Vec<(&'static str, Duration)>,
}

/// Times consecutive steps: each [`Laps::lap`] ends one and starts the next. Shown
/// (`Display`) as "step 0.31, next 1.20" in milliseconds, two decimals unless the format
/// says (`{:.1}`). [`Vm::restore`] times its steps with it, and an embedder its own.
#[derive(Clone, Debug)]
pub struct Laps {
    last: std::time::Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Laps {
    /// The first step starts now.
    pub fn start() -> Self {
        Self::start_at(std::time::Instant::now())
    }

    /// The first step started at `at`.
    pub fn start_at(at: std::time::Instant) -> Self {
        Self {
            last: at,
            steps: Vec::with_capacity(16),
        }
    }

    /// Ends the current step, named `step`; the next one starts now.
    pub fn lap(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.steps
            .push((step, now.saturating_duration_since(self.last)));
        self.last = now;
    }

    /// Appends steps timed elsewhere (e.g. [`RestoreInfo::steps`]) as they are.
    pub fn extend(&mut self, steps: impl IntoIterator<Item = (&'static str, Duration)>) {
        self.steps.extend(steps);
    }

    /// Every step so far, in order, with its own time.
    pub fn steps(&self) -> &[(&'static str, Duration)] {
        &self.steps
    }
}

impl std::fmt::Display for Laps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let decimals = f.precision().unwrap_or(2);
        for (i, (step, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {:.decimals$}", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// A cheap, cloneable handle on a VM, usable from any thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Stop => f.write_str("Stop"),
            Event::Snapshot(_) => f.write_str("Snapshot"),
            Event::VcpuEnded(i, e) => write!(f, "VcpuEnded({i}, {e:?})"),
        }
    }
}

impl VmHandle {
    /// Asks the VM to stop; [`Vm::run`] then returns [`VmExit::Stopped`] (unless the guest
    /// ended first). Returns at once; idempotent.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.events.send(Event::Stop);
    }

    /// Stops the VM and writes its snapshot to `target`; [`Vm::run`] then returns
    /// [`VmExit::Snapshotted`] (or an error exit if the files could not be written), unless
    /// the guest ended first. Returns at once.
    pub fn snapshot(&self, target: SnapshotTarget) {
        let _ = self.events.send(Event::Snapshot(target));
        // Woken only by the controller, which sets the stop flag itself: the vCPUs must
        // not see it before the controller knows why they stop.
    }

    /// Time from the VM's start to the guest's first boot-timer write
    /// ([`crate::devices::BOOT_TIMER_MAGIC`] to port [`crate::devices::BOOT_TIMER_PORT`]).
    pub fn boot_time(&self) -> Option<Duration> {
        self.shared.devices.boot_timer().elapsed()
    }

    /// Port-I/O exits handled so far (all vCPUs): a sign of life of guest code.
    pub fn io_exits(&self) -> u64 {
        self.shared.io_exits.load(Ordering::Relaxed)
    }

    /// MMIO exits handled so far (all vCPUs; virtio-mmio register accesses among them).
    pub fn mmio_exits(&self) -> u64 {
        self.shared.mmio_exits.load(Ordering::Relaxed)
    }
}

/// A VM ready to run.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPUs, then the VM (and the irqfd), then the memory.
    vcpus: Vec<Vcpu>,
    guest: GuestVm,
    _serial_irq: EventFdTrigger,
    handle: VmHandle,
    events: mpsc::Receiver<Event>,
    layout: MemoryLayout,
    /// The network device and a handle on its TAP, for the RX thread.
    net: Option<(Arc<Mutex<MmioTransport>>, File)>,
    /// The seccomp programs, when asked for.
    filters: Option<Filters>,
    /// The MSRs a snapshot reads (KVM's list, read while /dev/kvm is open).
    msr_indices: Vec<u32>,
    /// What a snapshot records about the VM's shape and CPU.
    meta: Meta,
}

/// The VM's shape and CPU, for a snapshot's header.
#[derive(Clone, Debug)]
struct Meta {
    cpu_template: String,
    cpu_fingerprint: [u8; 32],
    vcpus: u8,
    mem_bytes: u64,
}

/// The machine without its vCPUs: VM fd with memory, irqchip, PIT, virtio devices.
struct Machine {
    guest: GuestVm,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    infos: Vec<MmioDeviceInfo>,
    net: Option<(Arc<Mutex<MmioTransport>>, File)>,
}

fn dev_err(what: &'static str) -> impl Fn(std::io::Error) -> VmmError {
    move |source| VmmError::Device { what, source }
}

/// The guest memory layout for `mem_bytes` and its RAM ranges (none: the size does not
/// fit this host's address space).
fn layout_of(mem_bytes: u64) -> Result<(MemoryLayout, Vec<(GuestAddress, usize)>), VmmError> {
    let layout = MemoryLayout::new(mem_bytes);
    let ranges = layout
        .ranges()
        .ok_or(VmmError::Config(ConfigError::Memory {
            got: mem_bytes,
            min: config::MIN_MEM_BYTES,
            max: usize::MAX as u64,
        }))?;
    Ok((layout, ranges))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Machine {
    /// The VM with `mem` registered, its TSS, irqchip and PIT, and one virtio-mmio
    /// transport per drive (slots 0..), then the network device, then the console; slot n
    /// has its registers at `mmio_device_addr(n)` and interrupts on GSI
    /// `mmio_device_gsi(n)`.
    fn build(
        vm: kvm_ioctls::VmFd,
        mem: GuestMemoryMmap,
        drives: &[config::DriveConfig],
        net: Option<&config::NetConfig>,
        tap_ahead: Option<(String, File, Vec<u8>)>,
        console_out: Option<config::SerialSink>,
        laps: &mut Laps,
    ) -> Result<Self, VmmError> {
        let kvm_err = |what| move |source| VmmError::Kvm { what, source };
        let guest =
            GuestVm::with_vm(vm, Arc::new(mem)).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        laps.lap("memory regions");
        let vm = guest.fd();

        let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for (i, d) in drives.iter().enumerate() {
            let id = format!("aurae-vd{i}");
            let blk = match &d.opened {
                Some(f) => {
                    f.0.try_clone()
                        .and_then(|file| Block::new(file, d.read_only, &id))
                }
                None => Block::open(&d.path, d.read_only, &id),
            }
            .map_err(|source| VmmError::Drive {
                path: d.path.clone(),
                source,
            })?;
            virtio.push(Box::new(blk));
        }
        laps.lap("drives opened");
        let mut net_tap = None;
        if let Some(n) = net {
            let tap_err = |source| VmmError::Tap {
                name: n.tap.clone(),
                source,
            };
            let (tap, frame) = match tap_ahead.filter(|(name, _, _)| *name == n.tap) {
                Some((_, tap, frame)) => (tap, frame),
                None => (sys::open_tap(&n.tap).map_err(tap_err)?, Vec::new()),
            };
            net_tap = Some(tap.try_clone().map_err(tap_err)?);
            virtio.push(Box::new(Net::with_frame(tap, n.mac, frame)));
            laps.lap("TAP opened");
        }
        if let Some(out) = console_out {
            virtio.push(Box::new(Console::new(out)));
        }
        let mut transports = Vec::with_capacity(virtio.len());
        let mut infos = Vec::with_capacity(virtio.len());
        for (i, dev) in virtio.into_iter().enumerate() {
            let gsi = layout::mmio_device_gsi(i);
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err("virtio eventfd"))?;
            vm.register_irqfd(&irq, gsi)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let t = MmioTransport::new(dev, guest.memory_arc(), irq).map_err(VmmError::Virtio)?;
            transports.push(Arc::new(Mutex::new(t)));
            infos.push(MmioDeviceInfo {
                addr: layout::mmio_device_addr(i),
                len: layout::MMIO_DEVICE_SIZE as u32,
                gsi,
            });
        }
        let net = match net_tap {
            Some(tap) => transports.get(drives.len()).map(|t| (Arc::clone(t), tap)),
            None => None,
        };
        laps.lap("virtio transports and irqfds");
        Ok(Self {
            guest,
            transports,
            infos,
            net,
        })
    }
}

/// The signal that interrupts a vCPU's `KVM_RUN` (SIGRTMIN). Its handler, installed for
/// the whole process by the first [`Vm::run`], does nothing.
pub fn vcpu_kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(vcpu_kick_signal(), on_kick)
            .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// What every VM needs whatever it will be, made before its configuration is known:
/// `/dev/kvm` opened, the VM created with its TSS, in-kernel irqchip and PIT, and what KVM
/// supports read (CPUID, the MSR list). The VMM process makes it on a thread of its own
/// while it receives its configuration and builds its jail: under nested virtualisation
/// each of these ioctls exits to the L1 hypervisor (~11 ms of a ~30 ms restore there).
pub struct VmShell {
    kvm: Kvm,
    vm: kvm_ioctls::VmFd,
    /// vCPU 0 (every VM has one), made before the VM's memory is registered.
    vcpu0: Option<kvm_ioctls::VcpuFd>,
    supported: kvm_bindings::CpuId,
    /// `supported` through the default CPU template, and its fingerprint.
    templated: (kvm_bindings::CpuId, [u8; 32]),
    msr_indices: Vec<u32>,
    /// The TAP named in the configuration, opened ahead, with its device's frame buffer
    /// (made here, on a thread no filter limits yet).
    tap: Option<(String, File, Vec<u8>)>,
    steps: Vec<(&'static str, Duration)>,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl VmShell {
    /// Opens `/dev/kvm` and makes the shell.
    pub fn create() -> Result<Self, VmmError> {
        Self::create_with(Kvm::new().map_err(VmmError::OpenKvm)?)
    }

    /// Opens `/dev/kvm`, and `/dev/net/tun` for `tap`, on this thread (their paths are
    /// resolved here, whatever happens to this process's root meanwhile: a jail needs
    /// neither) and makes the shell on a thread of its own. The thread runs `first`
    /// before anything else (the VMM drops the thread's capabilities there: it attaches
    /// `tap`, the TAP named in the configuration, with no more rights than the jailed VMM
    /// would have).
    pub fn create_on_thread(
        tap: Option<String>,
        first: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<Self, VmmError>>, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let tap = match tap {
            Some(name) => match sys::open_tun() {
                Ok(tun) => Some((name, tun)),
                Err(source) => return Err(VmmError::Tap { name, source }),
            },
            None => None,
        };
        std::thread::Builder::new()
            .name("aurae-vmm-shell".into())
            .stack_size(256 << 10)
            .spawn(move || {
                first().map_err(|e| {
                    VmmError::Thread(std::io::Error::new(
                        e.kind(),
                        format!("the VM's set-up thread: {e}"),
                    ))
                })?;
                let mut shell = Self::create_with(kvm)?;
                if let Some((name, tun)) = tap {
                    let t = std::time::Instant::now();
                    let file = sys::attach_tap(tun, &name).map_err(|source| VmmError::Tap {
                        name: name.clone(),
                        source,
                    })?;
                    let frame = vec![0u8; crate::virtio::net::MAX_FRAME];
                    shell.steps.push(("ahead: TAP opened", t.elapsed()));
                    shell.tap = Some((name, file, frame));
                }
                Ok(shell)
            })
            .map_err(VmmError::Thread)
    }

    /// Makes the shell on an opened `/dev/kvm`.
    pub fn create_with(kvm: Kvm) -> Result<Self, VmmError> {
        let kvm_err = |what| move |source| VmmError::Kvm { what, source };
        let mut laps = Laps::start();
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        laps.lap("ahead: KVM_CREATE_VM");
        vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        laps.lap("ahead: TSS and irqchip");
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        laps.lap("ahead: PIT");
        let vcpu0 = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        laps.lap("ahead: KVM_CREATE_VCPU 0");
        let supported = cpu::supported_cpuid(&kvm)?;
        laps.lap("ahead: supported CPUID");
        let mut with_template = supported.clone();
        crate::CpuTemplate::default().apply(with_template.as_mut_slice());
        let fingerprint = snapshot::cpuid_fingerprint(with_template.as_slice());
        laps.lap("ahead: CPU template and fingerprint");
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        laps.lap("ahead: MSR list");
        Ok(Self {
            kvm,
            vm,
            vcpu0: Some(vcpu0),
            supported,
            templated: (with_template, fingerprint),
            msr_indices,
            tap: None,
            steps: laps.steps,
        })
    }

    /// How long each of its steps took (where they ran).
    pub fn steps(&self) -> &[(&'static str, Duration)] {
        &self.steps
    }

    /// What KVM supports through `template`, and its fingerprint (made ahead for the
    /// default template).
    fn cpuid_for(
        supported: kvm_bindings::CpuId,
        templated: (kvm_bindings::CpuId, [u8; 32]),
        template: crate::CpuTemplate,
    ) -> (kvm_bindings::CpuId, [u8; 32]) {
        if template == crate::CpuTemplate::default() {
            return templated;
        }
        let mut cpuid = supported;
        template.apply(cpuid.as_mut_slice());
        let fingerprint = snapshot::cpuid_fingerprint(cpuid.as_slice());
        (cpuid, fingerprint)
    }
}

/// vCPU `id` of `guest`: the one made ahead for 0, else a new one.
fn vcpu_of(
    guest: &GuestVm,
    ahead: &mut Option<kvm_ioctls::VcpuFd>,
    id: u8,
) -> Result<Vcpu, VmmError> {
    match ahead.take().filter(|_| id == 0) {
        Some(fd) => Ok(guest.adopt_vcpu(fd)),
        None => guest.create_vcpu(id).map_err(|source| VmmError::Kvm {
            what: "KVM_CREATE_VCPU",
            source,
        }),
    }
}

impl Vm {
    /// Builds the VM: checks the configuration (memory capped at the host's), opens
    /// `/dev/kvm`, allocates and registers guest memory, creates the in-kernel irqchip and
    /// PIT, loads the kernel, initramfs and boot structures, wires COM1 to IRQ 4 and creates
    /// and configures the vCPUs. Nothing runs until [`Vm::run`].
    pub fn new(cfg: VmConfig) -> Result<Self, VmmError> {
        // Checked before the shell is made (and again by `new_in`, cheaply).
        let host = config::host_mem_bytes().unwrap_or(config::MAX_MEM_BYTES);
        cfg.validate_with_cap(host)?;
        Self::new_in(VmShell::create()?, cfg)
    }

    /// [`Vm::new`] in a shell made ahead ([`VmShell`]).
    pub fn new_in(shell: VmShell, cfg: VmConfig) -> Result<Self, VmmError> {
        let host = config::host_mem_bytes().unwrap_or(config::MAX_MEM_BYTES);
        cfg.validate_with_cap(host)?;
        let VmShell {
            kvm,
            vm,
            mut vcpu0,
            supported,
            templated,
            msr_indices,
            tap,
            ..
        } = shell;

        let (layout, ranges) = layout_of(cfg.mem_bytes)?;
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmmError::Memory {
            bytes: cfg.mem_bytes,
            source,
        })?;
        // A cold build reports no steps; the laps are only the restore's.
        let mut laps = Laps::start();
        let machine = Machine::build(
            vm,
            mem,
            &cfg.drives,
            cfg.net.as_ref(),
            tap,
            cfg.console_out,
            &mut laps,
        )?;

        let mem = machine.guest.memory();
        let kernel = boot::load_kernel(mem, &cfg.kernel)?;
        let initramfs = match &cfg.initramfs {
            Some(p) => Some(boot::load_initramfs(mem, &layout, p, &kernel)?),
            None => None,
        };
        boot::write_cmdline(mem, &cfg.cmdline)?;
        let tables = acpi::build(cfg.vcpus, &machine.infos)?;
        acpi::write(mem, &tables)?;
        let mut params =
            boot::build_boot_params(kernel.header, &layout, cfg.cmdline.len(), initramfs);
        params.acpi_rsdp_addr = tables.rsdp_addr();
        boot::write_boot_params(mem, &params)?;
        boot::write_gdt(mem)?;
        boot::write_page_tables(mem)?;

        let serial_irq = EventFdTrigger::new().map_err(dev_err("serial eventfd"))?;
        let serial = Serial::new(
            serial_irq.try_clone().map_err(dev_err("serial eventfd"))?,
            cfg.serial_out,
        );

        let (supported, fingerprint) = VmShell::cpuid_for(supported, templated, cfg.cpu_template);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let v = vcpu_of(&machine.guest, &mut vcpu0, id)?;
            cpu::configure_vcpu(v.fd(), id, cfg.vcpus, &supported, kernel.entry)?;
            vcpus.push(v);
        }
        let meta = Meta {
            cpu_template: cfg.cpu_template.name().to_owned(),
            cpu_fingerprint: fingerprint,
            vcpus: cfg.vcpus,
            mem_bytes: cfg.mem_bytes,
        };
        drop(kvm);
        Self::assemble(
            msr_indices,
            machine,
            vcpus,
            serial_irq,
            serial,
            layout,
            cfg.seccomp,
            meta,
            &mut laps,
        )
    }

    /// Brings back a snapshot's VM in this process, stopped where it was: checks the
    /// snapshot against this host (CPU template and the CPUID it gives here, memory file
    /// length), maps the memory file `MAP_PRIVATE` (pages are read from it on first touch
    /// and copied on first write; the file is never written), rebuilds the irqchip, PIT,
    /// clock, serial port and virtio devices (on this VM's own drive files and TAP) and
    /// every vCPU. Nothing runs until [`Vm::run`].
    pub fn restore(cfg: RestoreConfig) -> Result<(Self, RestoreInfo), VmmError> {
        let started = std::time::Instant::now();
        let shell = VmShell::create()?;
        Self::restore_in(shell, cfg, started)
    }

    /// [`Vm::restore`] in a shell made ahead ([`VmShell`]); the restore's time counts from
    /// `started` (this call, or before the shell was made when it is made here). Its
    /// steps list the shell's first, named `ahead: …`.
    pub fn restore_in(
        shell: VmShell,
        cfg: RestoreConfig,
        started: std::time::Instant,
    ) -> Result<(Self, RestoreInfo), VmmError> {
        let mut laps = Laps::start();
        laps.extend(shell.steps.iter().copied());
        let VmShell {
            kvm,
            vm,
            mut vcpu0,
            supported,
            templated,
            msr_indices,
            tap,
            ..
        } = shell;
        let RestoreConfig {
            snapshot: snap,
            memory,
            serial_out,
            drives,
            net,
            console_out,
            seccomp,
        } = cfg;
        let h = &snap.header;

        let template =
            crate::CpuTemplate::from_name(&h.cpu_template).ok_or_else(|| SnapshotError::Cpu {
                what: "template",
                found: h.cpu_template.clone(),
                here: "no such template in this monitor".into(),
            })?;
        let (_, fingerprint) = VmShell::cpuid_for(supported, templated, template);
        laps.lap("CPU template and fingerprint");
        if fingerprint != h.cpu_fingerprint {
            return Err(SnapshotError::Cpu {
                what: "fingerprint",
                found: hex(&h.cpu_fingerprint),
                here: hex(&fingerprint),
            }
            .into());
        }
        VmConfig {
            vcpus: h.vcpus,
            mem_bytes: h.mem_bytes,
            ..Default::default()
        }
        .validate_with_cap(config::host_mem_bytes().unwrap_or(config::MAX_MEM_BYTES))?;
        let wanted = snap.transports.len();
        let have = drives.len() + usize::from(net.is_some()) + usize::from(console_out.is_some());
        let of_type = |ty| {
            snap.transports
                .iter()
                .filter(|t| t.device_type == ty)
                .count()
        };
        let nets = of_type(crate::virtio::net::DEVICE_TYPE);
        let consoles = of_type(crate::virtio::console::DEVICE_TYPE);
        if have != wanted
            || nets != usize::from(net.is_some())
            || consoles != usize::from(console_out.is_some())
        {
            return Err(SnapshotError::Device(format!(
                "the snapshot's VM had {} drive(s), {nets} network device(s) and {consoles} \
                 console(s); {} drive(s), {} network device(s) and {} console(s) given",
                wanted.saturating_sub(nets + consoles),
                drives.len(),
                usize::from(net.is_some()),
                usize::from(console_out.is_some())
            ))
            .into());
        }

        let (layout, ranges) = layout_of(h.mem_bytes)?;
        laps.lap("checks");
        let machine_started = std::time::Instant::now();
        let mem = snapshot::map_memory(&memory, &ranges, h.memory_len)?;
        laps.lap("memory mapped");
        let machine = Machine::build(vm, mem, &drives, net.as_ref(), tap, console_out, &mut laps)?;
        snapshot::restore_vm(machine.guest.fd(), &snap.vm)?;
        laps.lap("irqchip, PIT, clock");
        for (i, (t, s)) in machine.transports.iter().zip(&snap.transports).enumerate() {
            let mut t = t
                .lock()
                .map_err(|_| SnapshotError::Device(format!("virtio slot {i}: poisoned")))?;
            t.restore(s)
                .map_err(|e| SnapshotError::Device(format!("virtio slot {i}: {e}")))?;
        }
        let serial_irq = EventFdTrigger::new().map_err(dev_err("serial eventfd"))?;
        let serial = crate::devices::serial_from_regs(
            &snap.serial,
            serial_irq.try_clone().map_err(dev_err("serial eventfd"))?,
            serial_out,
        )
        .map_err(SnapshotError::Device)?;
        laps.lap("devices' state");
        let machine_took = machine_started.elapsed();
        let vcpus_started = std::time::Instant::now();
        let mut vcpus = Vec::with_capacity(snap.vcpus.len());
        for (id, state) in snap.vcpus.iter().enumerate() {
            let id = id as u8;
            let v = vcpu_of(&machine.guest, &mut vcpu0, id)?;
            laps.lap("KVM_CREATE_VCPU");
            snapshot::restore_vcpu(v.fd(), id, state)?;
            laps.lap("vCPU state");
            vcpus.push(v);
        }
        let vcpus_took = vcpus_started.elapsed();
        let meta = Meta {
            cpu_template: h.cpu_template.clone(),
            cpu_fingerprint: fingerprint,
            vcpus: h.vcpus,
            mem_bytes: h.mem_bytes,
        };
        let clock_advanced = snap.vm.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0;
        drop(kvm);
        let vm = Self::assemble(
            msr_indices,
            machine,
            vcpus,
            serial_irq,
            serial,
            layout,
            seccomp,
            meta,
            &mut laps,
        )?;
        Ok((
            vm,
            RestoreInfo {
                took: started.elapsed(),
                machine: machine_took,
                vcpus: vcpus_took,
                clock_advanced,
                steps: laps.steps,
            },
        ))
    }

    /// The parts shared by [`Vm::new`] and [`Vm::restore`]: the serial IRQ wired, the
    /// filters compiled, the handle made (KVM's MSR list comes from the shell).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        msr_indices: Vec<u32>,
        machine: Machine,
        vcpus: Vec<Vcpu>,
        serial_irq: EventFdTrigger,
        serial: crate::devices::SerialDevice,
        layout: MemoryLayout,
        seccomp: bool,
        meta: Meta,
        laps: &mut Laps,
    ) -> Result<Self, VmmError> {
        let kvm_err = |what| move |source| VmmError::Kvm { what, source };
        machine
            .guest
            .fd()
            .register_irqfd(serial_irq.eventfd(), SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        laps.lap("serial IRQ");
        let filters = seccomp.then(Filters::built);
        laps.lap("seccomp programs");
        let (tx, rx) = mpsc::channel();
        let handle = VmHandle {
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                io_exits: AtomicU64::new(0),
                mmio_exits: AtomicU64::new(0),
                devices: PortIo::new(serial),
                mmio: MmioBus::new(machine.transports),
            }),
            events: tx,
        };
        Ok(Self {
            vcpus,
            guest: machine.guest,
            _serial_irq: serial_irq,
            handle,
            events: rx,
            layout,
            net: machine.net,
            filters,
            msr_indices,
            meta,
        })
    }

    /// A handle to stop the VM or read its boot time from another thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The guest's memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Runs the VM on one thread per vCPU until the guest ends it or
    /// [`VmHandle::stop`] is called; every VMM thread has ended when this returns.
    /// Fails only where a thread cannot be started (the VM is then stopped).
    ///
    /// With [`VmConfig::seccomp`], the controller runs on a thread of its own (`vmm`), so
    /// that the caller's thread is never filtered; each thread installs its filter before
    /// it handles guest input.
    pub fn run(self) -> Result<VmExit, VmmError> {
        install_kick_handler()?;
        if self.filters.is_none() {
            return self.run_controller();
        }
        let t = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || self.run_controller())
            .map_err(VmmError::Thread)?;
        t.join().unwrap_or_else(|_| {
            Err(VmmError::Thread(std::io::Error::other(
                "the vmm thread panicked",
            )))
        })
    }

    fn run_controller(self) -> Result<VmExit, VmmError> {
        let Self {
            vcpus,
            guest,
            _serial_irq,
            handle,
            events,
            layout: _,
            net,
            filters,
            msr_indices,
            meta,
        } = self;
        let shared = Arc::clone(&handle.shared);
        shared.devices.boot_timer().start();

        let mut threads: Vec<(u8, JoinHandle<Vcpu>)> = Vec::with_capacity(vcpus.len());
        let mut spawn_error = None;
        for (id, mut vcpu) in vcpus.into_iter().enumerate() {
            let id = id as u8;
            let shared = Arc::clone(&shared);
            let tx = handle.events.clone();
            let filter = filters.as_ref().map(|f| f.vcpu.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let exit = match filter.as_ref().map(seccomp::install) {
                        Some(Err(e)) => Some(VmExit::Error(ExitError::Seccomp {
                            thread: format!("vcpu{id}"),
                            error: e.to_string(),
                        })),
                        _ => vcpu_loop(&mut vcpu, id, &shared),
                    };
                    let _ = tx.send(Event::VcpuEnded(id, exit));
                    vcpu
                });
            match spawned {
                Ok(t) => threads.push((id, t)),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }

        // The network RX thread: frames from the TAP into the RX queue.
        let mut rx_thread = None;
        if spawn_error.is_none()
            && let Some((transport, tap)) = net
        {
            let stop = EventFd::new(libc::EFD_NONBLOCK).and_then(|e| Ok((e.try_clone()?, e)));
            let filter = filters.as_ref().map(|f| f.net_rx.clone());
            let spawned = stop.and_then(|(stop, stop_here)| {
                std::thread::Builder::new()
                    .name("net-rx".into())
                    .spawn(move || {
                        let Ok(epoll) = crate::virtio::net::rx_epoll(&tap, &stop) else {
                            return;
                        };
                        if let Some(Err(_)) = filter.as_ref().map(seccomp::install) {
                            return;
                        }
                        let _ = crate::virtio::net::rx_loop(&transport, &epoll);
                    })
                    .map(|t| (t, stop_here))
            });
            match spawned {
                Ok(t) => rx_thread = Some(t),
                Err(e) => spawn_error = Some(e),
            }
        }

        let mut snapshot_to = None;
        let mut exit = if spawn_error.is_some() {
            VmExit::Stopped
        } else {
            if let Some(f) = &filters
                && let Err(e) = seccomp::install(&f.vmm)
            {
                shared.stop.store(true, Ordering::SeqCst);
                Some(VmExit::Error(ExitError::Seccomp {
                    thread: "vmm".into(),
                    error: e.to_string(),
                }))
            } else {
                None
            }
            .unwrap_or_else(|| match events.recv() {
                Ok(Event::VcpuEnded(_, Some(exit))) => exit,
                Ok(Event::Snapshot(target)) => {
                    snapshot_to = Some((target, std::time::Instant::now()));
                    VmExit::Stopped
                }
                Ok(Event::VcpuEnded(_, None) | Event::Stop) | Err(_) => VmExit::Stopped,
            })
        };

        // Stop every vCPU: set the flag, kick until each thread has ended.
        shared.stop.store(true, Ordering::SeqCst);
        let signal = vcpu_kick_signal();
        while threads.iter().any(|(_, t)| !t.is_finished()) {
            for (_, t) in threads.iter().filter(|(_, t)| !t.is_finished()) {
                let _ = t.kill(signal);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut stopped = Vec::with_capacity(threads.len());
        for (id, t) in threads {
            match t.join() {
                Ok(v) => stopped.push(v),
                Err(_) if !matches!(exit, VmExit::Error(_)) => {
                    exit = VmExit::Error(ExitError::Panicked { vcpu: id });
                }
                Err(_) => {}
            }
        }
        if let Some((t, stop)) = rx_thread {
            let _ = stop.write(1);
            let _ = t.join();
        }
        // A snapshot asked before the guest ended, with every vCPU back and stopped.
        if let Some((target, asked)) = snapshot_to
            && exit == VmExit::Stopped
        {
            exit = if stopped.len() == usize::from(meta.vcpus) {
                match write_snapshot(&guest, &stopped, &shared, &msr_indices, &meta, &target) {
                    Ok((state_bytes, memory_bytes)) => VmExit::Snapshotted(SnapshotInfo {
                        state_bytes,
                        memory_bytes,
                        took: asked.elapsed(),
                    }),
                    Err(e) => VmExit::Error(ExitError::Snapshot(e.to_string())),
                }
            } else {
                VmExit::Error(ExitError::Snapshot(
                    "a vCPU thread did not come back".into(),
                ))
            };
        }
        drop(stopped);
        shared.devices.flush_serial();
        drop(guest);
        match spawn_error {
            Some(e) => Err(VmmError::Thread(e)),
            None => Ok(exit),
        }
    }
}

/// Captures the stopped VM and writes its two files; returns their lengths.
fn write_snapshot(
    guest: &GuestVm,
    vcpus: &[Vcpu],
    shared: &Shared,
    msr_indices: &[u32],
    meta: &Meta,
    target: &SnapshotTarget,
) -> Result<(u64, u64), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let vm = snapshot::capture_vm(guest.fd())?;
    let mut states = Vec::with_capacity(vcpus.len());
    for (id, v) in vcpus.iter().enumerate() {
        states.push(snapshot::capture_vcpu(v.fd(), id as u8, msr_indices)?);
    }
    let mut transports = Vec::new();
    for (i, t) in shared.mmio.devices().iter().enumerate() {
        let t = t
            .lock()
            .map_err(|_| SnapshotError::Device(format!("virtio slot {i}: poisoned")))?;
        transports.push(t.state());
    }
    let (memory_len, memory_sha256) = snapshot::write_memory(guest.memory(), &target.memory)?;
    let taken_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let snap = Snapshot {
        header: snapshot::Header {
            vmm_version: snapshot::VMM_VERSION.to_owned(),
            cpu_template: meta.cpu_template.clone(),
            cpu_fingerprint: meta.cpu_fingerprint,
            vcpus: meta.vcpus,
            mem_bytes: meta.mem_bytes,
            memory_len,
            memory_sha256,
            taken_unix_ns,
        },
        vm,
        vcpus: states,
        serial: shared.devices.serial_regs(),
        transports,
    };
    let bytes = snap.encode();
    target
        .state
        .write_all_at(&bytes, 0)
        .map_err(SnapshotError::io("writing the state file"))?;
    target
        .state
        .set_len(bytes.len() as u64)
        .map_err(SnapshotError::io("truncating the state file"))?;
    Ok((bytes.len() as u64, memory_len))
}

/// What one exit means for the vCPU loop.
enum Step {
    Continue,
    End(VmExit),
    /// An internal error, whose details are read once the exit's borrow has ended.
    Internal,
}

/// Runs one vCPU until the guest ends the VM (`Some`) or the stop flag is seen (`None`).
fn vcpu_loop(vcpu: &mut Vcpu, id: u8, shared: &Shared) -> Option<VmExit> {
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            // Complete the last exit's I/O (an `in`'s value, an MMIO read's) inside KVM
            // before the state can be read: KVM_RUN with immediate_exit does that and
            // returns EINTR without entering the guest.
            vcpu.set_immediate_exit(true);
            let _ = vcpu.run();
            vcpu.set_immediate_exit(false);
            return None;
        }
        let step = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.io_exits.fetch_add(1, Ordering::Relaxed);
                match shared.devices.write(port, data) {
                    IoAction::None => Step::Continue,
                    IoAction::Reset => Step::End(VmExit::Reset),
                    IoAction::PowerOff => Step::End(VmExit::PowerOff),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.io_exits.fetch_add(1, Ordering::Relaxed);
                shared.devices.read(port, data);
                Step::Continue
            }
            // virtio-mmio windows; anything else reads all ones and drops writes.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio_exits.fetch_add(1, Ordering::Relaxed);
                shared.mmio.read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio_exits.fetch_add(1, Ordering::Relaxed);
                shared.mmio.write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Intr | VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::End(VmExit::TripleFault { vcpu: id }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::End(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                other => VmExit::Error(ExitError::Unexpected {
                    vcpu: id,
                    what: format!("system event {other}"),
                }),
            }),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Step::End(VmExit::Error(ExitError::FailEntry { vcpu: id, reason }))
            }
            Ok(VcpuExit::InternalError) => Step::Internal,
            Ok(other) => Step::End(VmExit::Error(ExitError::Unexpected {
                vcpu: id,
                what: format!("{other:?}"),
            })),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_immediate_exit(false);
                Step::Continue
            }
            Err(e) => Step::End(VmExit::Error(ExitError::KvmRun {
                vcpu: id,
                errno: e.errno(),
            })),
        };
        match step {
            Step::Continue => {}
            Step::End(exit) => return Some(exit),
            Step::Internal => {
                let (suberror, data) = vcpu.internal_error();
                let rip = vcpu.fd().get_regs().map_or(0, |r| r.rip);
                return Some(VmExit::Error(ExitError::Internal {
                    vcpu: id,
                    suberror,
                    rip,
                    data,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_keep_each_steps_own_time_in_order_and_show_in_milliseconds() {
        let start = std::time::Instant::now() - Duration::from_millis(5);
        let mut laps = Laps::start_at(start);
        laps.lap("first");
        laps.lap("second");
        laps.extend([("elsewhere", Duration::from_micros(1_234))]);
        let names: Vec<_> = laps.steps().iter().map(|(s, _)| *s).collect();
        assert_eq!(names, ["first", "second", "elsewhere"]);
        assert!(laps.steps()[0].1 >= Duration::from_millis(5));
        assert!(laps.steps()[1].1 < laps.steps()[0].1);
        let shown = laps.to_string();
        assert!(shown.starts_with("first "), "{shown}");
        assert_eq!(shown.matches(", ").count(), 2, "{shown}");
        assert!(shown.ends_with(", elsewhere 1.23"), "{shown}");
        assert!(format!("{laps:.1}").ends_with(", elsewhere 1.2"));
        assert_eq!(Laps::start().to_string(), "");
    }
}
