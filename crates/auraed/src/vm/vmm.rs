//! The VMM process: auraed re-executed from its sealed copy with the hidden first argument
//! [`VMM_ARG`], one process per VM, never inside auraed itself.
//!
//! auraed starts it with `clone3` into the VM's own cgroup and new mount, PID, IPC, UTS and
//! cgroup namespaces (it shares the host network namespace, where its TAP device is), with
//! its serial console on stdout (a pipe auraed logs) and a `SOCK_SEQPACKET` control socket
//! on fd 3. The protocol is one JSON message per packet: auraed sends the [`VmmConfig`],
//! with the open kernel, initramfs and drives attached (`SCM_RIGHTS`), then at any time
//! [`Command`]s; the VMM sends [`Report`]s.
//!
//! The VMM never opens a kernel, initramfs or drive by a host path: auraed resolved each
//! once, below its image root without following symlinks, and the file it checked is the
//! file the VMM uses.
//!
//! The jail, before any guest code runs: every mount private; the drives (and a restore's
//! state and memory files) opened again from auraed's fds through `/proc/self/fd`
//! (read-write only for a writable drive) and used as open files; a tmpfs root (`nodev`)
//! holding only the kernel and initramfs, moved in from auraed's fds, and no device at all
//! (`/dev/kvm` and `/dev/net/tun` are opened before, by the VM's shell); `pivot_root` into
//! it, old root detached;
//! every capability dropped, `no_new_privs`; and each of the VMM's own threads (vCPUs,
//! controller, network RX) installs its seccomp allowlist on itself (aurae-vmm).

use std::{
    io::Write,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::socket::{MsgFlags, recv, send},
};
use serde::{Deserialize, Serialize};

/// The hidden first argument that selects this mode.
pub const VMM_ARG: &str = "__aurae-vmm";
/// Largest control message.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What auraed asks the VMM to run. The paths are the host paths as the caller sent them,
/// for messages only: the files come as fds with the message ([`send_with_fds`]: kernel,
/// initramfs if any, then the drives), each a detached mount of the one file auraed
/// opened and checked (read-only unless a drive is writable).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// (host path, read-only), in order.
    pub drives: Vec<(PathBuf, bool)>,
    /// TAP device name and guest MAC.
    pub net: Option<(String, [u8; 6])>,
    /// The initramfs fd is a sealed memfd auraed built (a spawned instance's), not a
    /// detached mount: the jail copies it into a tmpfs of its own size.
    #[serde(default)]
    pub initramfs_in_memory: bool,
    /// The CPU template's name (`aurae_vmm::CpuTemplate::name`); absent = the default.
    #[serde(default)]
    pub cpu_template: String,
    /// Restore a snapshot instead of booting: the fds are then the state file, the memory
    /// file and the drives (no kernel, no initramfs; `cmdline`, `vcpus`, `memory_bytes`
    /// and the template come from the snapshot).
    #[serde(default)]
    pub restore: bool,
}

/// auraed → VMM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Stop the guest now (its vCPUs are halted; the VMM then exits).
    Stop,
    /// Stop the guest and write its snapshot to the two files attached (state, memory;
    /// opened for writing by auraed); the VMM reports [`Report::Snapshotted`] and exits.
    Snapshot,
}

/// VMM → auraed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Report {
    /// The jail is up and the guest's vCPUs are about to run.
    Started,
    /// The guest wrote the boot-timer port this long after the VMM started it.
    Booted { boot_ns: u64 },
    /// The guest ended: `poweroff`, `reset`, `stopped`, `triple_fault`, or an error.
    Exited { reason: String, clean: bool },
    /// The VM could not be set up (bad kernel, no /dev/kvm, …).
    Failed { message: String },
    /// The exits the monitor handled so far, all vCPUs (sent every second while the guest
    /// runs, and once more before `Exited`).
    Exits { io: u64, mmio: u64 },
    /// The VM was restored from a snapshot in this long (before `Started`): in all, of
    /// which the VM with its memory mapped and devices, and the vCPUs' state.
    Restored {
        restore_ns: u64,
        #[serde(default)]
        machine_ns: u64,
        #[serde(default)]
        vcpus_ns: u64,
        /// Every step with its time in ms, for the log: the VMM process's own from its
        /// `main` (configuration received, jail, …), then the VM shell's (`ahead: …`,
        /// beside the jail), then the restore's ("CPU template and fingerprint 0.31, …").
        #[serde(default)]
        steps: String,
    },
    /// The snapshot asked for was written (before `Exited`).
    Snapshotted {
        state_bytes: u64,
        memory_bytes: u64,
        took_ns: u64,
    },
}

/// A duration in a report: whole nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How often the VMM reports its exit counts.
const EXITS_EVERY: Duration = Duration::from_secs(1);

fn exits_report(h: &aurae_vmm::VmHandle) -> Report {
    Report::Exits {
        io: h.io_exits(),
        mmio: h.mmio_exits(),
    }
}

pub fn send_msg<T: Serialize>(fd: &impl AsRawFd, msg: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    send(fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// [`send_msg`] that never waits: a message that does not fit now is dropped (for
/// figures whose next report carries the total; while auraed is down its reports queue
/// in the socket, and a full queue must not hold the VMM).
fn send_msg_or_drop<T: Serialize>(fd: &impl AsRawFd, msg: &T) {
    if let Ok(bytes) = serde_json::to_vec(msg) {
        let _ = send(
            fd.as_raw_fd(),
            &bytes,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        );
    }
}

impl VmmConfig {
    /// How many fds come with the configuration.
    pub fn fds(&self) -> usize {
        if self.restore {
            return 2 + self.drives.len();
        }
        1 + usize::from(self.initramfs.is_some()) + self.drives.len()
    }
}

/// Most fds one message carries (kernel, initramfs, drives).
const MAX_FDS: usize = 2 + super::spec::MAX_DRIVES;

/// `msg` with `fds` attached (`SCM_RIGHTS`: the receiver gets its own copies).
pub fn send_with_fds<T: Serialize>(
    fd: &impl AsRawFd,
    msg: &T,
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!("more than {MAX_FDS} fds")));
    }
    crate::workload::fdpass::send_json(fd, msg, fds)
}

/// One message and the fds that came with it (close-on-exec), or `None` at end of stream.
/// The fds are raw: this process owns them and uses them only through `/proc/self/fd`
/// before closing them.
pub fn recv_with_fds<T: for<'de> Deserialize<'de>>(
    fd: &impl AsRawFd,
) -> std::io::Result<Option<(T, Vec<std::os::fd::RawFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let r = crate::workload::fdpass::recv(fd, &mut buf)?;
    if r.len == 0 {
        return Ok(None);
    }
    serde_json::from_slice(&buf[..r.len])
        .map(|m| Some((m, r.fds)))
        .map_err(std::io::Error::other)
}

/// One message, or `None` at end of stream.
pub fn recv_msg<T: for<'de> Deserialize<'de>>(fd: &impl AsRawFd) -> std::io::Result<Option<T>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = loop {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => {}
            r => break r?,
        }
    };
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_slice(&buf[..n])
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Entry point of the VMM process.
pub fn main() -> ExitCode {
    let entered = std::time::Instant::now();
    let _ = nix::sys::prctl::set_name(c"aurae-vmm");
    let Some(ctl) = aurae_sys::fd::take_passed() else {
        let _ = writeln!(std::io::stderr(), "aurae-vmm: no control socket on fd 3");
        return ExitCode::FAILURE;
    };
    let (cfg, fds) = match recv_with_fds::<VmmConfig>(&ctl) {
        Ok(Some((c, fds))) if fds.len() == c.fds() => (c, fds),
        Ok(Some((c, fds))) => {
            let _ = send_msg(
                &ctl,
                &Report::Failed {
                    message: format!(
                        "auraed sent {} files for a VM that needs {}",
                        fds.len(),
                        c.fds()
                    ),
                },
            );
            return ExitCode::FAILURE;
        }
        other => {
            let _ = send_msg(
                &ctl,
                &Report::Failed {
                    message: format!("no configuration from auraed: {other:?}"),
                },
            );
            return ExitCode::FAILURE;
        }
    };
    match run(cfg, &fds, ctl.try_clone().ok().map(Arc::new), &ctl, entered) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            let _ = send_msg(&ctl, &Report::Failed { message });
            ExitCode::FAILURE
        }
    }
}

/// Where things are inside the jail.
const JAIL: &str = "/tmp";

/// A snapshot's two files, opened in the VMM before its jail closes what auraed sent.
struct SnapshotFiles {
    state: std::fs::File,
    memory: std::fs::File,
}

/// What the jail leaves the VMM: its configuration with the paths inside, and the files
/// it uses open.
struct Jailed {
    inside: VmmConfig,
    snapshot: Option<SnapshotFiles>,
    /// The drives, in order.
    drives: Vec<std::fs::File>,
}

/// `files`: auraed's fds of the kernel, initramfs (if any) and drives, in that order; for
/// a restore, of the snapshot's state and memory files, then the drives.
fn jail(
    cfg: &VmmConfig,
    files: &[std::os::fd::RawFd],
    laps: &mut aurae_vmm::Laps,
) -> Result<Jailed, String> {
    use std::fs::{File, OpenOptions};
    fn e(what: &str) -> impl FnOnce(nix::errno::Errno) -> String + '_ {
        move |err| format!("jail: {what}: {err}")
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(e("making mounts private"))?;
    laps.lap("jail: mounts private");
    // The VM's files are detached mounts auraed cloned from the files it checked, moved
    // into place through /proc/self/fd (a mount of auraed's namespace could not be bound
    // here): nothing is resolved twice. No device: /dev/kvm and /dev/net/tun were opened
    // before (aurae_vmm::VmShell::create_on_thread), so the jail holds none.
    if files.len() != cfg.fds() {
        return Err(format!(
            "jail: {} files for a VM that needs {}",
            files.len(),
            cfg.fds()
        ));
    }
    let all = files;
    // Opened again through /proc/self/fd before the jail closes auraed's fds (read-write
    // only where asked): a file used as an open file, never by a path.
    let again = |fd: &std::os::fd::RawFd, write: bool, what: &str| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(format!("/proc/self/fd/{fd}"))
            .map_err(|err| format!("jail: {what}: {err}"))
    };
    // A restore's state and memory files, read-only.
    let (snapshot, files) = if cfg.restore {
        (
            Some(SnapshotFiles {
                state: again(&files[0], false, "the snapshot's state file")?,
                memory: again(&files[1], false, "the snapshot's memory file")?,
            }),
            &files[2..],
        )
    } else {
        (None, files)
    };
    // The drives (the last fds), read-write only if writable: the jail holds none.
    let (files, drive_fds) = files.split_at(files.len() - cfg.drives.len());
    let drives = drive_fds
        .iter()
        .zip(&cfg.drives)
        .enumerate()
        .map(|(i, (fd, (_, ro)))| again(fd, !ro, &format!("drive {i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = Vec::new();
    if !cfg.restore {
        names.push(("kernel".to_owned(), true));
    }
    if cfg.initramfs.is_some() && !cfg.restore {
        names.push(("initramfs".into(), true));
    }
    // (fd, name in the jail, read-only)
    let binds: Vec<(std::os::fd::RawFd, String, bool)> = files
        .iter()
        .zip(names)
        .filter(|(_, (name, _))| !(cfg.initramfs_in_memory && name == "initramfs"))
        .map(|(fd, (name, ro))| (*fd, name, ro))
        .collect();
    let in_memory = if cfg.initramfs_in_memory {
        files.get(1).copied()
    } else {
        None
    };
    mount(
        Some("tmpfs"),
        JAIL,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
        Some("mode=0700,size=64k"),
    )
    .map_err(e("mounting the jail's tmpfs"))?;
    for (fd, name, ro) in &binds {
        let target = format!("{JAIL}/{name}");
        File::create(&target).map_err(|err| format!("jail: {target}: {err}"))?;
        let src = format!("/proc/self/fd/{fd}");
        mount(
            Some(src.as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(e(&format!("moving {name} in")))?;
        let mut flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if *ro {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            None::<&str>,
            target.as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(e(&format!("restricting {name}")))?;
    }
    // An initramfs auraed built in memory: copied into a tmpfs of its size, read-only.
    if let Some(fd) = in_memory {
        copy_into_tmpfs(fd, "boot", "initramfs")?;
    }
    laps.lap("jail: files in");
    // Nothing of the host stays open across the pivot but what is bound.
    for fd in all {
        let _ = nix::unistd::close(*fd);
    }
    std::env::set_current_dir(JAIL).map_err(|err| format!("jail: chdir: {err}"))?;
    nix::unistd::pivot_root(".", ".").map_err(e("pivot_root"))?;
    laps.lap("jail: pivot_root");
    umount2(".", MntFlags::MNT_DETACH).map_err(e("detaching the old root"))?;
    laps.lap("jail: old root detached");
    std::env::set_current_dir("/").map_err(|err| format!("jail: chdir /: {err}"))?;
    aurae_sys::process::drop_all_capabilities()
        .map_err(|err| format!("jail: dropping capabilities: {err}"))?;
    laps.lap("jail: capabilities dropped");
    let inside = VmmConfig {
        kernel: "/kernel".into(),
        initramfs: cfg.initramfs.as_ref().map(|_| {
            if cfg.initramfs_in_memory {
                "/boot/initramfs".into()
            } else {
                "/initramfs".into()
            }
        }),
        // The paths the caller sent, to name the drives in errors.
        drives: cfg.drives.clone(),
        ..cfg.clone()
    };
    Ok(Jailed {
        inside,
        snapshot,
        drives,
    })
}

/// The memfd `fd` copied into `{JAIL}/<dir>/<file>`, on a tmpfs of its size made
/// read-only afterwards (the jail's own tmpfs is only 64 KiB).
fn copy_into_tmpfs(fd: std::os::fd::RawFd, dir: &str, file: &str) -> Result<(), String> {
    use std::fs::File;
    let src = format!("/proc/self/fd/{fd}");
    let size = std::fs::metadata(&src)
        .map_err(|err| format!("jail: {file}: {err}"))?
        .len();
    let dir = format!("{JAIL}/{dir}");
    std::fs::create_dir(&dir).map_err(|err| format!("jail: {dir}: {err}"))?;
    let ro = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount(
        Some("tmpfs"),
        dir.as_str(),
        Some("tmpfs"),
        ro,
        Some(format!("mode=0500,size={}", size + (64 << 10)).as_str()),
    )
    .map_err(|err| format!("jail: mounting the {file} tmpfs: {err}"))?;
    {
        // Closed before the remount (a file open for writing keeps it busy).
        let mut from = File::open(&src).map_err(|err| format!("jail: {file}: {err}"))?;
        let mut to =
            File::create(format!("{dir}/{file}")).map_err(|err| format!("jail: {file}: {err}"))?;
        std::io::copy(&mut from, &mut to).map_err(|err| format!("jail: {file}: {err}"))?;
    }
    mount(
        None::<&str>,
        dir.as_str(),
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | ro,
        None::<&str>,
    )
    .map_err(|err| format!("jail: making the {file} read-only: {err}"))
}

fn install_control_filter() -> Result<(), String> {
    seccompiler::apply_filter(&aurae_vmm::seccomp::control_program())
        .map_err(|e| format!("seccomp: {e}"))
}

fn run(
    cfg: VmmConfig,
    files: &[std::os::fd::RawFd],
    ctl2: Option<Arc<OwnedFd>>,
    ctl: &OwnedFd,
    entered: std::time::Instant,
) -> Result<(), String> {
    // The VMM process's own steps before a restore, then the restore's, for its report.
    let mut laps = aurae_vmm::Laps::start_at(entered);
    laps.lap("configuration received");
    let cpu_template = if cfg.cpu_template.is_empty() {
        aurae_vmm::CpuTemplate::default()
    } else {
        aurae_vmm::CpuTemplate::from_name(&cfg.cpu_template)
            .ok_or_else(|| format!("unknown CPU template {:?}", cfg.cpu_template))?
    };
    // The VM itself (created, TSS, irqchip, PIT, vCPU 0, what KVM supports) and its TAP
    // on a thread of its own while the jail is built: none of it needs the jail, and each
    // ioctl is an exit to the L1 hypervisor under nested virtualisation. The thread drops
    // its capabilities first (the TAP is opened as the jailed VMM would), and is joined
    // before any filter is installed, so no thread runs outside them.
    let shell = aurae_vmm::VmShell::create_on_thread(
        cfg.net.as_ref().map(|(tap, _)| tap.clone()),
        aurae_sys::process::drop_all_capabilities,
    )
    .map_err(|e| format!("{e} (is KVM available?)"))?;
    // While the shell is still being made (it takes longer than the jail): this thread's
    // process-wide filter (inherited by every thread it starts; the shell's thread, which
    // runs no guest code and is joined below, has its capabilities dropped instead) and a
    // restore's state file read.
    let jailed = jail(&cfg, files, &mut laps).and_then(|j| {
        seccompiler::apply_filter(&aurae_vmm::seccomp::process_denylist_program())
            .map_err(|e| format!("seccomp: {e}"))?;
        laps.lap("process filter");
        let snapshot = match j.snapshot {
            Some(SnapshotFiles { mut state, memory }) => {
                let read = aurae_vmm::Snapshot::read(&mut state).map_err(|e| e.to_string())?;
                laps.lap("state file read");
                Some((read, memory))
            }
            None => None,
        };
        Ok((j.inside, snapshot, j.drives))
    });
    let shell = shell
        .join()
        .map_err(|_| "the VM's set-up thread panicked".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let (inside, snapshot, drives) = jailed?;
    let shell = shell?;
    laps.lap("VM made ahead (waited for)");
    // The serial console: our stdout (a pipe to auraed), written with write(2) only.
    let serial = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("serial: {e}"))?;
    let drives: Vec<_> = inside
        .drives
        .into_iter()
        .zip(drives)
        .map(|((path, read_only), file)| aurae_vmm::DriveConfig {
            path,
            read_only,
            opened: Some(aurae_vmm::OpenedFile(Arc::new(file))),
        })
        .collect();
    let net = inside
        .net
        .map(|(tap, mac)| aurae_vmm::NetConfig { tap, mac });
    // The virtio console writes to the same pipe (a guest that loads virtio_console and
    // writes to hvc0 takes an exit per buffer, not per byte).
    let console_out: aurae_vmm::SerialSink = Box::new(std::fs::File::from(
        serial
            .try_clone()
            .map_err(|e| format!("virtio console: {e}"))?,
    ));
    let serial_out = Box::new(std::fs::File::from(serial));
    let vm = match snapshot {
        Some((snapshot, memory)) => {
            // A snapshot's VM has the devices it had: a console only if it had one.
            let had_console = snapshot
                .transports
                .iter()
                .any(|t| t.device_type == aurae_vmm::virtio::console::DEVICE_TYPE);
            let (vm, info) = aurae_vmm::Vm::restore_in(
                shell,
                aurae_vmm::RestoreConfig {
                    snapshot,
                    memory,
                    serial_out,
                    drives,
                    net,
                    console_out: had_console.then_some(console_out),
                    seccomp: true,
                },
                std::time::Instant::now(),
            )
            .map_err(|e| e.to_string())?;
            send_msg(
                ctl,
                &Report::Restored {
                    restore_ns: nanos(info.took),
                    machine_ns: nanos(info.machine),
                    vcpus_ns: nanos(info.vcpus),
                    steps: {
                        laps.extend(info.steps.iter().copied());
                        laps.to_string()
                    },
                },
            )
            .map_err(|e| format!("control socket: {e}"))?;
            vm
        }
        None => aurae_vmm::Vm::new_in(
            shell,
            aurae_vmm::VmConfig {
                kernel: inside.kernel,
                initramfs: inside.initramfs,
                cmdline: inside.cmdline,
                vcpus: inside.vcpus,
                mem_bytes: inside.memory_bytes,
                serial_out,
                drives,
                net,
                console_out: Some(console_out),
                seccomp: true,
                cpu_template,
            },
        )
        .map_err(|e| e.to_string())?,
    };
    let handle = vm.handle();
    send_msg(ctl, &Report::Started).map_err(|e| format!("control socket: {e}"))?;
    let done = Arc::new(AtomicBool::new(false));
    if let Some(ctl2) = ctl2 {
        // Commands; auraed going away (end of stream) stops the guest too.
        let h = handle.clone();
        std::thread::Builder::new()
            .name("vmm-control".into())
            .spawn(move || {
                if let Err(e) = install_control_filter() {
                    let _ = writeln!(std::io::stderr(), "aurae-vmm: {e}");
                    h.stop();
                    return;
                }
                // Stop, or Snapshot with its two files; the end of the stream (auraed
                // gone) or an unreadable message stops the guest as well.
                match recv_with_fds::<Command>(ctl2.as_ref()) {
                    Ok(Some((Command::Snapshot, fds))) if fds.len() == 2 => {
                        let owned: Vec<_> = fds
                            .iter()
                            .filter_map(|&fd| aurae_sys::fd::dup_raw(fd).ok())
                            .collect();
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                        match <[OwnedFd; 2]>::try_from(owned) {
                            Ok([state, memory]) => h.snapshot(aurae_vmm::SnapshotTarget {
                                state: state.into(),
                                memory: memory.into(),
                            }),
                            Err(_) => h.stop(),
                        }
                    }
                    Ok(Some((_, fds))) => {
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                        h.stop();
                    }
                    _ => h.stop(),
                }
            })
            .map_err(|e| format!("control thread: {e}"))?;
        let h = handle.clone();
        let d = done.clone();
        let ctl3 = ctl
            .try_clone()
            .map_err(|e| format!("control socket: {e}"))?;
        std::thread::Builder::new()
            .name("vmm-reports".into())
            .spawn(move || {
                if install_control_filter().is_err() {
                    return;
                }
                // The boot timer, polled every 2 ms until the guest writes it; the exit
                // counts every second while the guest runs.
                let mut booted = false;
                let mut last_exits = std::time::Instant::now();
                while !d.load(Ordering::Relaxed) {
                    if !booted && let Some(t) = h.boot_time() {
                        booted = true;
                        let _ = send_msg(&ctl3, &Report::Booted { boot_ns: nanos(t) });
                    }
                    if last_exits.elapsed() >= EXITS_EVERY {
                        last_exits = std::time::Instant::now();
                        send_msg_or_drop(&ctl3, &exits_report(&h));
                    }
                    std::thread::sleep(if booted {
                        Duration::from_millis(50)
                    } else {
                        Duration::from_millis(2)
                    });
                }
            })
            .map_err(|e| format!("report thread: {e}"))?;
    }
    // What only the set-up ran (configuration, jail, KVM set-up: most of the code this
    // process touched) stays mapped for its life unless given back; the guest's own paths
    // map their pages again as they run. Costs memory only if it fails: said, not fatal.
    if let Err(e) = aurae_sys::memory::release_read_only_segments() {
        let _ = writeln!(
            std::io::stderr(),
            "aurae-vmm: the set-up's code pages were not given back: {e}"
        );
    }
    let exit = vm.run();
    done.store(true, Ordering::Relaxed);
    // A last boot-timer look, in case the guest booted and ended within one poll.
    if let Some(t) = handle.boot_time() {
        let _ = send_msg(ctl, &Report::Booted { boot_ns: nanos(t) });
    }
    send_msg_or_drop(ctl, &exits_report(&handle));
    if let Ok(aurae_vmm::VmExit::Snapshotted(info)) = &exit {
        let _ = send_msg(
            ctl,
            &Report::Snapshotted {
                state_bytes: info.state_bytes,
                memory_bytes: info.memory_bytes,
                took_ns: nanos(info.took),
            },
        );
    }
    let (reason, clean) = match exit {
        Ok(aurae_vmm::VmExit::PowerOff) => ("poweroff".to_owned(), true),
        Ok(aurae_vmm::VmExit::Reset) => ("reset".to_owned(), true),
        Ok(aurae_vmm::VmExit::Stopped) => ("stopped".to_owned(), true),
        Ok(aurae_vmm::VmExit::Snapshotted(_)) => ("snapshotted".to_owned(), true),
        Ok(aurae_vmm::VmExit::TripleFault { vcpu }) => {
            (format!("triple fault on vcpu {vcpu}"), false)
        }
        Ok(aurae_vmm::VmExit::Error(e)) => (format!("vcpu error: {e}"), false),
        Err(e) => (format!("vmm error: {e}"), false),
    };
    send_msg(ctl, &Report::Exited { reason, clean }).map_err(|e| format!("control socket: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn protocol_round_trips_over_seqpacket() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let cfg = VmmConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_bytes: 5 << 30,
            drives: vec![("/d".into(), true)],
            net: Some(("aurae-t1".into(), [2, 0, 0, 0, 0, 1])),
            initramfs_in_memory: false,
            cpu_template: String::new(),
            restore: false,
        };
        send_msg(&a, &cfg).unwrap();
        assert_eq!(recv_msg::<VmmConfig>(&b).unwrap(), Some(cfg));
        send_msg(&b, &Report::Booted { boot_ns: 7 }).unwrap();
        assert_eq!(
            recv_msg::<Report>(&a).unwrap(),
            Some(Report::Booted { boot_ns: 7 })
        );
        drop(b);
        assert_eq!(recv_msg::<Report>(&a).unwrap(), None);
    }

    #[test]
    fn files_travel_with_the_configuration() {
        use std::io::{Read, Seek, Write};

        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"kernel").unwrap();
        f.rewind().unwrap();
        let cfg = VmmConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            drives: vec![],
            net: None,
            initramfs_in_memory: false,
            cpu_template: String::new(),
            restore: false,
        };
        send_with_fds(&a, &cfg, &[f.as_raw_fd()]).unwrap();
        let (got, fds) = recv_with_fds::<VmmConfig>(&b).unwrap().unwrap();
        assert_eq!(got, cfg);
        assert_eq!(fds.len(), cfg.fds());
        assert_ne!(fds[0], f.as_raw_fd(), "a copy of its own");
        let mut s = String::new();
        std::fs::File::open(format!("/proc/self/fd/{}", fds[0]))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "kernel");
        nix::unistd::close(fds[0]).unwrap();
        drop(a);
        assert!(recv_with_fds::<VmmConfig>(&b).unwrap().is_none());
    }
}
