//! Executables: plain processes started in a cell, supervised through their pidfd.

pub mod input;
pub mod spec;

use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::workload::Phase;
use aurae_sys::{ExitStatus, Pidfd};
use tokio::sync::watch;

pub use input::Input;
pub use spec::{ExecutableRef, ExecutableSpec, Interactive};

use crate::{
    spec::{CellName, Label},
    workload::log::Log,
};

/// How an executable ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// `None`: the process exited while it was not auraed's child (after an auraed
    /// restart), so its status went to its new parent.
    pub status: Option<ExitStatus>,
    pub oom_killed: bool,
    pub at: SystemTime,
}

/// Where an executable is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    pub exit: Option<Exit>,
}

/// A container's private directory and the image layers it pins.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerRecord {
    pub dir: std::path::PathBuf,
    pub image_digest: String,
    pub layers: Vec<String>,
    /// The container paths of its read-only `Container.files` directories, by their
    /// index (a file's or a writable directory's place holds `None`): what
    /// `Executables/UpdateFiles` may write again.
    #[serde(default)]
    pub file_dirs: Vec<Option<std::path::PathBuf>>,
}

/// What is freed once an executable has ended (a run call's `remove`): recorded with it,
/// so a restarted auraed frees it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreeOnExit {
    /// The executable (its cell stays).
    Executable,
    /// Its whole cell.
    Cell,
}

/// A started process of a cell.
#[derive(Debug)]
pub struct Executable {
    pub cell: CellName,
    pub name: Label,
    pub argv: Vec<String>,
    /// Host pid (auraed's namespace).
    pub pid: i32,
    /// `None` for a process that was already gone when a restarted auraed looked.
    pub pidfd: Option<Arc<Pidfd>>,
    /// The process as its record names it (pid + start time + boot).
    pub process: Option<crate::workload::process::ProcRef>,
    /// A container's private directories, removed when the executable is freed
    /// ([`Executable::remove_rootfs`]; at the latest with the executable).
    pub rootfs: std::sync::Mutex<Option<crate::container::Rootfs>>,
    /// A container's image (manifest digest).
    pub image_digest: Option<String>,
    /// Where the holder keeps copies of its output pipes' read ends (see
    /// [`crate::workload::holder`]).
    pub held: Option<crate::workload::holder::HeldOutput>,
    /// A container's directory and layers, for its record.
    pub container_record: Option<ContainerRecord>,
    /// How its input is wired (recorded: a restarted auraed takes it back the same way).
    pub interactive: Interactive,
    /// Its input, for Attach (started with `interactive.stdin` or `tty`, and not lost).
    pub input: Option<Arc<Input>>,
    /// The holder let go of its output (at its end): its record names none of the
    /// holder's numbers any more (one released may soon hold another workload's fd).
    pub output_released: std::sync::atomic::AtomicBool,
    /// Its record may be written: false once it was freed (a late write would bring back
    /// the record of something gone).
    pub recordable: std::sync::Mutex<bool>,
    pub started_at: SystemTime,
    pub log: Arc<Log>,
    pub state: watch::Sender<State>,
    /// What goes once it has ended, if anything (see [`FreeOnExit`]).
    pub free_on_exit: std::sync::Mutex<Option<FreeOnExit>>,
    /// Started with a cgroup of its own ([`CellName::own_group`]): the limits in force.
    pub own_limits: Option<std::sync::Mutex<crate::workload::limits::Limits>>,
    /// Held while an update writes its group's limits (one at a time).
    pub updating: std::sync::Mutex<()>,
}

impl Executable {
    /// Lets a container's mount namespace go, once its process has exited (see
    /// `Rootfs::hold_mount_namespace`).
    pub fn release_mount_namespace(&self) {
        if let Ok(r) = self.rootfs.lock()
            && let Some(r) = r.as_ref()
        {
            r.release_mount_namespace();
        }
    }

    /// Removes a container's private directories now (a free does, so that they are out of
    /// the containers' directory when it returns, whatever task still holds the executable
    /// a moment longer; their files are deleted right after, see
    /// [`crate::container::removed_dir`]).
    pub fn remove_rootfs(&self) {
        if let Ok(mut r) = self.rootfs.lock() {
            drop(r.take());
        }
    }

    /// A container's private directory (`None` for a plain process, or once freed).
    pub fn rootfs_path(&self) -> Option<std::path::PathBuf> {
        self.rootfs
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.path().to_owned()))
    }

    /// Its own cgroup, when it was started with one.
    pub fn own_group(&self) -> Option<CellName> {
        self.own_limits
            .as_ref()
            .map(|_| self.cell.own_group(&self.name))
    }

    /// The limits of its own group, when it has one.
    pub fn limits(&self) -> Option<crate::workload::limits::Limits> {
        self.own_limits
            .as_ref()
            .and_then(|l| l.lock().ok().map(|l| l.clone()))
    }

    pub fn exited(&self) -> bool {
        self.state.borrow().exit.is_some()
    }

    /// Whether a run call frees it (or its cell) at its end.
    pub fn freed_at_end(&self) -> bool {
        self.free_on_exit.lock().ok().and_then(|f| *f).is_some()
    }

    /// Waits until the process has exited, at most `timeout`.
    pub async fn wait(&self, timeout: Option<Duration>) -> Option<Exit> {
        let mut rx = self.state.subscribe();
        let wait = rx.wait_for(|s| s.exit.is_some());
        let r = match timeout {
            Some(t) => tokio::time::timeout(t, wait).await.ok()?,
            None => wait.await,
        };
        r.ok().and_then(|s| s.exit)
    }

    /// Sends a signal through the pidfd; `false` if the process had already exited.
    pub fn signal(&self, signal: i32) -> std::io::Result<bool> {
        if self.exited() {
            return Ok(false);
        }
        let Some(pidfd) = &self.pidfd else {
            return Ok(false);
        };
        match pidfd.send_signal(signal) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// SIGTERM, up to `grace`, then SIGKILL; returns the exit.
    pub async fn stop(&self, grace: Duration) -> std::io::Result<Option<Exit>> {
        if let Some(e) = self.state.borrow().exit {
            return Ok(Some(e));
        }
        self.signal(nix::libc::SIGTERM)?;
        if let Some(e) = self.wait(Some(grace)).await {
            return Ok(Some(e));
        }
        self.signal(nix::libc::SIGKILL)?;
        Ok(self.wait(Some(Duration::from_secs(10))).await)
    }
}

/// Prepared, owned pieces of an exec: C strings and the stdio.
#[derive(Debug)]
pub struct Prepared {
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    /// The child's fds 0, 1 and 2.
    pub child: [OwnedFd; 3],
    /// Our read ends of its output: stdout and stderr, or the terminal's master side
    /// alone (all its output is `stdout`).
    pub output: Vec<OwnedFd>,
    /// Bytes for its stdin and the pipe's write end (`spec.stdin`).
    pub stdin_data: Option<(OwnedFd, Vec<u8>)>,
    /// Our end of an interactive input: its stdin pipe's write end, or the terminal's
    /// master side.
    pub input: Option<OwnedFd>,
    /// Its stdio is a terminal (made its controlling terminal).
    pub tty: bool,
    /// A container's terminal comes from its own devpts: (our end, the child's end) of
    /// the console socket its child sends the master side on (its stdio until then is
    /// /dev/null, and `output`/`input` are filled from [`Prepared::take_console`]).
    pub console: Option<(OwnedFd, OwnedFd)>,
}

fn cstring(field: &str, s: &str) -> Result<CString, crate::spec::FieldError> {
    CString::new(s).map_err(|_| crate::spec::FieldError::new(field, "contains NUL"))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// `master` if it is the pseudo-terminal multiplexer's (character device 5:2): a new
/// terminal's master side, not whatever a path led to.
pub fn checked_ptmx(master: OwnedFd) -> std::io::Result<OwnedFd> {
    use rustix::fs::FileType;
    let st = rustix::fs::fstat(&master)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::CharacterDevice
        || rustix::fs::major(st.st_rdev) != 5
        || rustix::fs::minor(st.st_rdev) != 2
    {
        return Err(std::io::Error::other("not the ptmx device"));
    }
    Ok(master)
}

/// A new pseudo-terminal of auraed's devpts: (master, slave). The master is checked to
/// be the multiplexer's ([`checked_ptmx`]) before the slave is taken from it.
pub fn open_terminal() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags};
    let master = checked_ptmx(rustix::fs::open(
        "/dev/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)?;
    let slave = aurae_sys::pty::open_peer(std::os::fd::AsFd::as_fd(&master))?;
    Ok((master, slave))
}

impl Prepared {
    /// Builds the C strings and the stdio for `spec` (see the fields).
    pub fn new(spec: &ExecutableSpec) -> Result<Self, crate::workload::WorkloadError> {
        let argv = spec
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| cstring(&format!("argv[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(k, v)| cstring("env", &format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = cstring("working_dir", &spec.working_dir.to_string_lossy())?;
        let io = crate::workload::WorkloadError::io;
        let mut stdin_data = None;
        let mut input = None;
        let mut console = None;
        let (child, output) = if spec.interactive.tty && spec.container.is_some() {
            // The container's own terminal, opened by its child inside its root.
            let (ours, theirs) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC
                    | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            )
            .map_err(|e| io(e.into()))?;
            console = Some((ours, theirs));
            let null = || {
                std::fs::File::open("/dev/null")
                    .map(OwnedFd::from)
                    .map_err(io)
            };
            ([null()?, null()?, null()?], Vec::new())
        } else if spec.interactive.tty {
            let (master, slave) = open_terminal().map_err(|e| {
                crate::workload::WorkloadError::Precondition(format!("a terminal for it: {e}"))
            })?;
            let child = [
                slave.try_clone().map_err(io)?,
                slave.try_clone().map_err(io)?,
                slave,
            ];
            let out = master.try_clone().map_err(io)?;
            input = Some(master);
            (child, vec![out])
        } else {
            let stdin = if spec.interactive.stdin {
                let (r, w) = pipe().map_err(io)?;
                input = Some(w);
                r
            } else if spec.stdin.is_empty() {
                OwnedFd::from(std::fs::File::open("/dev/null").map_err(io)?)
            } else {
                let (r, w) = pipe().map_err(io)?;
                stdin_data = Some((w, spec.stdin.clone()));
                r
            };
            let (out_r, out_w) = pipe().map_err(io)?;
            let (err_r, err_w) = pipe().map_err(io)?;
            ([stdin, out_w, err_w], vec![out_r, err_r])
        };
        Ok(Self {
            argv,
            envp,
            cwd,
            child,
            output,
            stdin_data,
            input,
            tty: spec.interactive.tty,
            console,
        })
    }

    /// After the spawn of a container with its own terminal: the master side its child
    /// sent (checked to be a ptmx), as its output and its input.
    pub fn take_console(&mut self) -> std::io::Result<()> {
        let Some((ours, _)) = self.console.take() else {
            return Ok(());
        };
        let mut byte = [0u8; 1];
        let got = crate::workload::fdpass::recv(&ours, &mut byte)?;
        let master = crate::workload::fdpass::owned(&got.fds)
            .into_iter()
            .next()
            .ok_or_else(|| std::io::Error::other("the container's child sent no terminal"))??;
        let master = checked_ptmx(master)?;
        self.output = vec![master.try_clone()?];
        self.input = Some(master);
        Ok(())
    }

    pub fn stdio(&self) -> [std::os::fd::RawFd; 3] {
        self.child.each_ref().map(|f| f.as_raw_fd())
    }
}
