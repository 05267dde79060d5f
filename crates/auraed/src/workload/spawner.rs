//! The process seam: how cells and VMs start a child. The real [`Spawner`] is the
//! [`Reaper`] running `aurae_sys::spawn` (clone3 into the cgroup and namespaces the
//! request names); [`FakeSpawner`] records each request and runs its program as a plain
//! child of the test, so cell logic is unit-tested without root.

use aurae_sys::{SpawnError, SpawnRequest};

use crate::reaper::{Child, Reaper};

/// Starts a prepared child and tracks it (its exit arrives on [`Child::exit`]).
pub trait Spawner: Send + Sync + std::fmt::Debug {
    fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Child, SpawnError>;
}

impl Spawner for Reaper {
    fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Child, SpawnError> {
        Reaper::spawn(self, || aurae_sys::spawn(req))
    }
}

/// Starts a helper process of auraed's own binary (`program`, the sealed copy) as
/// `argv` (its name and hidden argument), in auraed's own cgroup and namespaces (see
/// [`SpawnRequest::helper`]), with one end of a new `SOCK_SEQPACKET` pair at its fd 3:
/// returns the other end and the child.
pub fn start_helper(
    reaper: &Reaper,
    program: aurae_sys::spawn::Program<'_>,
    argv: [&str; 2],
) -> std::io::Result<(std::os::fd::OwnedFd, Child)> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (sock, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let devnull = std::fs::File::open("/dev/null")?;
    let argv: Vec<std::ffi::CString> = argv
        .iter()
        .filter_map(|s| std::ffi::CString::new(*s).ok())
        .collect();
    let req = SpawnRequest::helper(program, &argv, devnull.as_raw_fd(), theirs.as_raw_fd());
    let child = reaper
        .spawn(|| aurae_sys::spawn(&req))
        .map_err(|e| match e {
            SpawnError::Setup(e) => e,
            other => {
                std::io::Error::other(format!("starting {}: {other}", argv[0].to_string_lossy()))
            }
        })?;
    Ok((sock, child))
}

/// What a [`FakeSpawner`] was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub argv: Vec<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub no_new_privs: bool,
    pub into_cgroup: bool,
    pub new_namespaces: i32,
    pub joins: Option<i32>,
    pub container: bool,
}

/// A spawner for unit tests: records every request; a cell init (`argv[1]` is the init
/// argument) answers its two set-up steps on its passed socket and is stood in for by `sleep`; anything
/// else runs its argv as a plain child with the request's stdio. No cgroup, namespace,
/// id change or container is applied.
#[derive(Debug, Default)]
pub struct FakeSpawner {
    pub requests: std::sync::Mutex<Vec<Recorded>>,
    /// Refuse every spawn with this errno (a failing kernel).
    pub fail_with: std::sync::Mutex<Option<i32>>,
    /// Every child it started: killed when the fake goes.
    children: std::sync::Mutex<Vec<std::sync::Arc<aurae_sys::Pidfd>>>,
    /// A test's gate on the next spawn (taken by it): once its child runs, the spawn
    /// says so on the sender and waits on the receiver before it returns — what a
    /// start looks like to the rest of auraed while its child is being made.
    pub gate: std::sync::Mutex<Option<Gate>>,
}

/// See [`FakeSpawner::gate`].
pub type Gate = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

impl FakeSpawner {
    /// SIGKILLs every child it started (by pidfd).
    pub fn kill_all(&self) {
        for c in self.children.lock().map(|c| c.clone()).unwrap_or_default() {
            let _ = c.send_signal(nix::libc::SIGKILL);
        }
    }
}

impl Drop for FakeSpawner {
    fn drop(&mut self) {
        self.kill_all();
    }
}

impl FakeSpawner {
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Child, SpawnError> {
        use std::process::{Command, Stdio};
        let argv: Vec<String> = req
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Ok(mut r) = self.requests.lock() {
            r.push(Recorded {
                argv: argv.clone(),
                uid: req.uid,
                gid: req.gid,
                no_new_privs: req.no_new_privs,
                into_cgroup: req.cgroup.is_some(),
                new_namespaces: req.new_namespaces.0,
                joins: req.join.map(|(_, ns)| ns.0),
                container: req.container.is_some(),
            });
        }
        if let Some(errno) = self.fail_with.lock().ok().and_then(|f| *f) {
            return Err(SpawnError::Setup(std::io::Error::from_raw_os_error(errno)));
        }
        let is_init = argv
            .get(1)
            .is_some_and(|a| a == super::layout::CELL_INIT_ARG);
        // The request's fds are raw numbers of ours: reopened through /proc/self/fd (a
        // pipe end opens as the same pipe), without any unsafe borrowing.
        let reopen = |fd: i32, write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(format!("/proc/self/fd/{fd}"))
                .map_err(SpawnError::Setup)
        };
        let dup = |fd: i32, write: bool| reopen(fd, write).map(Stdio::from);
        let mut cmd = if is_init {
            if let Some(fd) = req.pass_fd {
                // The init's two steps on its socket: ready, then a hostname → ok.
                let mut s = std::os::unix::net::UnixStream::from(
                    aurae_sys::fd::dup_raw(fd).map_err(SpawnError::Setup)?,
                );
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    if s.write_all(b"ready\n").is_err() {
                        return;
                    }
                    let mut b = [0u8; 1];
                    while matches!(s.read(&mut b), Ok(1)) {
                        if b[0] == b'\n' {
                            let _ = s.write_all(b"ok\n");
                            return;
                        }
                    }
                });
            }
            let mut c = Command::new("/bin/sleep");
            c.arg("3600");
            c
        } else {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        };
        cmd.env_clear()
            .stdin(dup(req.stdio[0], false)?)
            .stdout(dup(req.stdio[1], true)?)
            .stderr(dup(req.stdio[2], true)?);
        let mut child = cmd.spawn().map_err(|e| SpawnError::Child {
            step: aurae_sys::Step::EXECUTE,
            index: None,
            error: e,
        })?;
        let pid = i32::try_from(child.id())
            .map_err(|_| SpawnError::Setup(std::io::Error::other("pid out of range")))?;
        let pidfd = aurae_sys::Pidfd::open(pid).map_err(SpawnError::Setup)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            let status = match child.wait() {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => aurae_sys::ExitStatus::Code(c),
                    (None, Some(sig)) => aurae_sys::ExitStatus::Signal(sig),
                    (None, None) => aurae_sys::ExitStatus::Code(-1),
                },
                Err(_) => aurae_sys::ExitStatus::Code(-1),
            };
            let _ = tx.send(status);
        });
        let pidfd = std::sync::Arc::new(pidfd);
        if let Ok(mut c) = self.children.lock() {
            c.push(pidfd.clone());
        }
        if let Some((spawned, go)) = self.gate.lock().ok().and_then(|mut g| g.take()) {
            let _ = spawned.send(());
            let _ = go.recv();
        }
        Ok(Child {
            pid,
            pidfd,
            exit: rx,
        })
    }
}
