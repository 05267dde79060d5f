//! The cell inits' zygote: a small process of auraed's own binary, exec'd once, that forks
//! each top-level cell's init instead of auraed exec'ing the binary again for every cell.
//!
//! A cell init made by exec spends most of its start in the exec (~0.6 ms more than a
//! small program's) and the dynamic loader (~0.7 ms) before its first step (measured on
//! 181 inits, see SPECIFICATION.md). The zygote has paid that once: it waits,
//! single-threaded, on its control socket; for each init it is sent the cell's cgroup
//! leaf, the init's end of its report socket and which namespaces to make, and it forks
//! (`aurae_sys::fork::fork_sibling`: `clone3` into the leaf with the new namespaces, as
//! auraed's child, not its own). The child closes the zygote's socket and runs the same
//! `init::run` an exec'd init runs; the zygote answers with its pidfd.
//!
//! [`ZygoteSpawner`] sits in front of the real spawner: a request that is a top-level
//! cell init (no namespace to join, nothing but what the zygote does the same way) goes to
//! the zygote; anything else, and any init the zygote fails to make, goes the exec way (a
//! failure is logged and the zygote replaced at the next init). What a cell sees of its
//! init is the same but for `/proc/1/cmdline` (the zygote's), as for every cell made so.
//!
//! A new network namespace is most of what a new cell's namespaces cost (~0.3 ms of
//! ~0.37 ms over a plain fork, `lo` up not counted): the zygote keeps [`SPARE_NETS`]
//! network namespaces made ahead (`lo` up, nothing else ever in them: unused, as a fresh
//! one is) and forks an init that needs one into a spare instead, making the next spare
//! once no init has been asked for in a while (10 ms: made right after an init, its CPU
//! was taken from the cell just started). Each spare serves one init, never two; the
//! zygote's own namespace stays auraed's. A spare it cannot make costs nothing: the init
//! is born with `CLONE_NEWNET` as before (and that clone reports what is wrong, if
//! anything is).
//!
//! The zygote holds nothing of auraed's: it is exec'd fresh (no keys, no runtime, one
//! thread), with no fds but its socket and /dev/null; what each init inherits from it is
//! what it would have been exec'd with. It ends when its socket does (auraed gone or
//! replacing it), so a crash of auraed leaves no zygote behind. (Not `PR_SET_PDEATHSIG`:
//! that fires when the thread that started it ends, and auraed's threads come and go.)

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    process::ExitCode,
    sync::{Arc, Mutex},
};

use aurae_sys::{Namespaces, SpawnError, SpawnRequest, fork::Forked, spawn::Program};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    reaper::{Child, Reaper},
    workload::{fdpass, layout::CELL_INIT_ARG, spawner::Spawner},
};

/// The hidden first argument of auraed's binary when it runs as the zygote.
pub const ZYGOTE_ARG: &str = "__aurae-cell-zygote";
/// The zygote's `argv[0]`: what `ps` and a cell's `/proc/1/cmdline` show.
const ZYGOTE_NAME: &str = "aurae-cell-init";
/// Longest request or answer.
const MAX_MESSAGE: usize = 1024;
/// Network namespaces the zygote keeps made ahead.
pub const SPARE_NETS: usize = 2;
/// How long no init must have been asked for before the zygote makes a spare: making one
/// is ~0.35 ms of CPU, which on a busy machine is taken from the cell just started (its
/// first process, a container's mounts) when made right after each init. Under a steady
/// stream of requests no spare is made and inits are born with `CLONE_NEWNET`, as without.
const QUIET_BEFORE_SPARE: std::time::Duration = std::time::Duration::from_millis(10);

/// One init to fork: the namespaces it is born with (`CLONE_NEW*`) and the comma list its
/// [`super::init::main`] gets; fds attached: its report socket, then the cgroup leaf.
#[derive(Debug, Serialize, Deserialize)]
struct Fork {
    new: i32,
    init: String,
}

/// What the zygote answers: `None` and the pidfd attached, or what failed.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    error: Option<String>,
}

/// The zygote program (auraed re-executed with [`ZYGOTE_ARG`]): single-threaded, it forks
/// inits until its socket ends.
pub fn zygote_main() -> ExitCode {
    let Some(ctl) = aurae_sys::fd::take_passed() else {
        return ExitCode::FAILURE;
    };
    let _ = nix::sys::prctl::set_name(c"aurae-zygote");
    let mut nets = SpareNets::open();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if nets.fill(&ctl).is_err() {
            // Stranded in a namespace of its own making: not a place to fork inits from.
            return ExitCode::FAILURE;
        }
        let Ok(got) = fdpass::recv(&ctl, &mut buf) else {
            return ExitCode::FAILURE;
        };
        if got.len == 0 && got.fds.is_empty() {
            // auraed went away, or replaced us.
            return ExitCode::SUCCESS;
        }
        let fds = fdpass::owned(&got.fds);
        let request: Result<(Fork, OwnedFd, OwnedFd), String> = if got.truncated {
            Err("request truncated".into())
        } else {
            serde_json::from_slice::<Fork>(&buf[..got.len])
                .map_err(|e| format!("bad request: {e}"))
                .and_then(|f| match <[_; 2]>::try_from(fds) {
                    Ok([Ok(report), Ok(leaf)]) => Ok((f, report, leaf)),
                    _ => Err("a request needs its report socket and cgroup leaf".into()),
                })
        };
        let answer = match request {
            Err(e) => Err(e),
            Ok((fork, report, leaf)) => {
                // In a spare network namespace, the init is born in it: no CLONE_NEWNET.
                let in_spare = fork.new & Namespaces::NET != 0 && nets.enter_one();
                let new = if in_spare {
                    fork.new & !Namespaces::NET
                } else {
                    fork.new
                };
                let forked = match aurae_sys::fork::fork_sibling(leaf.as_fd(), Namespaces(new)) {
                    Ok(Forked::Child) => {
                        // The new init: nothing of the zygote's open but stdio (/dev/null)
                        // and its report socket.
                        drop((leaf, ctl, nets));
                        // It returns only when it failed (before serving its cell).
                        return super::init::run(report, &fork.init);
                    }
                    Ok(Forked::Parent(pidfd)) => Ok(pidfd),
                    Err(e) => Err(format!("forking the init: {e}")),
                };
                if in_spare && nets.go_home().is_err() {
                    return ExitCode::FAILURE;
                }
                forked
            }
        };
        let sent = match answer {
            Ok(pidfd) => fdpass::send_json(&ctl, &Answer { error: None }, &[pidfd.as_raw_fd()]),
            Err(e) => fdpass::send_json(&ctl, &Answer { error: Some(e) }, &[]),
        };
        if sent.is_err() {
            return ExitCode::FAILURE;
        }
    }
}

/// The zygote's network namespaces made ahead, and its own to go back to.
struct SpareNets {
    /// The zygote's own network namespace (auraed's); `None`: no spares are made.
    home: Option<OwnedFd>,
    spares: Vec<OwnedFd>,
}

impl SpareNets {
    fn open() -> Self {
        Self {
            home: aurae_sys::net::own_namespace().ok(),
            spares: Vec::with_capacity(SPARE_NETS),
        }
    }

    /// Makes spares up to [`SPARE_NETS`], each once no request has come on `ctl` for
    /// [`QUIET_BEFORE_SPARE`]; returns as soon as one waits, or at the first spare that
    /// cannot be made (the next request's init makes its own). `Err` when the zygote
    /// could not go back to its own namespace.
    fn fill(&mut self, ctl: &OwnedFd) -> Result<(), ()> {
        let Some(home) = self.home.as_ref() else {
            return Ok(());
        };
        while self.spares.len() < SPARE_NETS && !waiting(ctl, QUIET_BEFORE_SPARE) {
            match aurae_sys::net::namespace_ahead(home.as_fd()) {
                Ok(ns) => self.spares.push(ns),
                Err(aurae_sys::net::AheadError::Failed(_)) => break,
                Err(aurae_sys::net::AheadError::Stranded(_)) => return Err(()),
            }
        }
        Ok(())
    }

    /// Moves the zygote into a spare, which is then used up; false (still home) when
    /// there is none or it cannot be entered.
    fn enter_one(&mut self) -> bool {
        self.spares
            .pop()
            .is_some_and(|ns| aurae_sys::net::enter_namespace(ns.as_fd()).is_ok())
    }

    /// Back to the zygote's own namespace after [`Self::enter_one`].
    fn go_home(&self) -> std::io::Result<()> {
        let home = self
            .home
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no namespace to go back to"))?;
        aurae_sys::net::enter_namespace(home.as_fd())
    }
}

/// Whether a request is waiting to be read on `ctl` (or it has ended) within `within`.
fn waiting(ctl: &OwnedFd, within: std::time::Duration) -> bool {
    // An error counts as waiting: the receive that follows says what it is.
    crate::workload::supervise::readable_within(ctl.as_fd(), within).unwrap_or(true)
}

/// A running zygote, as auraed holds it.
#[derive(Debug)]
struct Zygote {
    sock: OwnedFd,
    child: Child,
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Its socket closing ends it too; a zygote stuck in a fork does not get to go on.
        let _ = self.child.pidfd.send_signal(nix::libc::SIGKILL);
    }
}

/// The spawner of a daemon's cells: top-level cell inits from the zygote, the rest (and
/// any init the zygote fails to make) through `reaper`.
#[derive(Debug)]
pub struct ZygoteSpawner {
    reaper: Arc<Reaper>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    zygote: Option<Zygote>,
    /// Inits it failed to make in a row; at [`MAX_FAILURES`] it is not asked again.
    failures: u32,
}

/// Failures in a row after which every init is exec'd (said once, as a warning).
const MAX_FAILURES: u32 = 3;
/// How long the zygote has to answer (a fork takes about a millisecond).
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl ZygoteSpawner {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            reaper,
            state: Mutex::new(State::default()),
        }
    }

    fn start(&self, program: Program<'_>) -> std::io::Result<Zygote> {
        // auraed's own cgroup and namespaces: each init is born in its cell's.
        let (sock, child) = crate::workload::spawner::start_helper(
            &self.reaper,
            program,
            [ZYGOTE_NAME, ZYGOTE_ARG],
        )
        .map_err(|e| std::io::Error::other(format!("starting the zygote: {e}")))?;
        // A zygote that stops answering (stopped, stuck) fails one init, which is exec'd,
        // and is replaced: it never holds cells up.
        let limit = nix::sys::time::TimeVal::new(ANSWER_WITHIN.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &limit)?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &limit)?;
        info!(pid = child.pid, "cell init zygote started");
        Ok(Zygote { sock, child })
    }

    /// One init from the zygote (starting one if none runs); `None` once it is off.
    fn fork_init(&self, req: &SpawnRequest<'_>, init: &str) -> Option<Result<Child, String>> {
        let (Some(report), Some(leaf)) = (req.pass_fd, req.cgroup) else {
            return None;
        };
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        if state.failures >= MAX_FAILURES {
            return None;
        }
        if state
            .zygote
            .as_ref()
            .is_some_and(|z| crate::workload::supervise::has_exited(&z.child.pidfd))
        {
            warn!("the cell init zygote has exited; starting another");
            state.zygote = None;
        }
        if state.zygote.is_none() {
            match self.start(req.program) {
                Ok(z) => state.zygote = Some(z),
                Err(e) => return Some(Err(state.failed(e.to_string()))),
            }
        }
        let z = state.zygote.as_ref()?;
        let fork = Fork {
            new: req.new_namespaces.0,
            init: init.to_owned(),
        };
        // Whether the zygote answered (so is still there to ask again).
        let mut answered = false;
        let asked = self.reaper.spawn(|| {
            fdpass::send_json(&z.sock, &fork, &[report, leaf]).map_err(SpawnError::Setup)?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            let got = fdpass::recv(&z.sock, &mut buf).map_err(SpawnError::Setup)?;
            let fds = fdpass::owned(&got.fds);
            if got.len == 0 && fds.is_empty() {
                return Err(SpawnError::Setup(std::io::Error::other(
                    "the zygote is gone",
                )));
            }
            let answer: Answer = serde_json::from_slice(&buf[..got.len])
                .map_err(|e| SpawnError::Setup(std::io::Error::other(e)))?;
            answered = true;
            if let Some(e) = answer.error {
                return Err(SpawnError::Setup(std::io::Error::other(e)));
            }
            let pidfd = fds
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(std::io::Error::other("the zygote sent no pidfd")))
                .and_then(aurae_sys::Pidfd::from_received)
                .map_err(SpawnError::Setup)?;
            Ok((pidfd.1, pidfd.0))
        });
        Some(match asked {
            Ok(child) => {
                state.failures = 0;
                Ok(child)
            }
            Err(e) => {
                if !answered {
                    // Its channel broke: the next init gets a fresh zygote.
                    state.zygote = None;
                }
                Err(state.failed(e.to_string()))
            }
        })
    }
}

impl State {
    /// Counts a failure; returns what to report of it.
    fn failed(&mut self, why: String) -> String {
        self.failures += 1;
        if self.failures >= MAX_FAILURES {
            self.zygote = None;
            format!(
                "{why}; {MAX_FAILURES} failures in a row: every cell init is exec'd from now on"
            )
        } else {
            why
        }
    }
}

/// The comma list of an init request the zygote can make exactly as the exec would: a
/// cell init of auraed's sealed binary, born into its leaf with its new namespaces, with
/// nothing to join and nothing else asked of the spawn.
fn zygote_init<'a>(req: &SpawnRequest<'a>) -> Option<&'a str> {
    let is_init = matches!(req.program, Program::Fd(_))
        && req.argv.len() == 3
        && req.argv[1].to_bytes() == CELL_INIT_ARG.as_bytes()
        && req.envp.is_empty()
        && req.cwd == Some(c"/")
        && req.uid.is_none()
        && req.gid.is_none()
        && req.no_new_privs
        && !req.controlling_terminal
        && req.pass_fd.is_some()
        && req.cgroup.is_some()
        && req.pid_namespace_of.is_none()
        && req.join.is_none()
        && req.unshare.is_empty()
        && req.container.is_none()
        && req.console.is_none();
    if is_init {
        req.argv[2].to_str().ok()
    } else {
        None
    }
}

impl Spawner for ZygoteSpawner {
    fn spawn(&self, req: &SpawnRequest<'_>) -> Result<Child, SpawnError> {
        if let Some(init) = zygote_init(req) {
            match self.fork_init(req, init) {
                Some(Ok(child)) => return Ok(child),
                Some(Err(e)) => warn!("the cell init zygote failed ({e}); this init is exec'd"),
                None => {}
            }
        }
        Reaper::spawn(&self.reaper, || aurae_sys::spawn(req))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use super::*;

    fn init_request<'a>(argv: &'a [CString]) -> SpawnRequest<'a> {
        SpawnRequest {
            cgroup: Some(9),
            new_namespaces: Namespaces(Namespaces::PID | Namespaces::NET),
            ..SpawnRequest::helper(Program::Fd(7), argv, 0, 8)
        }
    }

    /// Only a top-level cell init goes to the zygote: one that joins namespaces, is born
    /// in another's PID namespace, changes ids, or is anything but an init is exec'd.
    #[test]
    fn only_a_top_level_init_is_forked_by_the_zygote() {
        let argv: Vec<CString> = ["aurae-cell-init", CELL_INIT_ARG, "mnt,net,pid"]
            .iter()
            .map(|s| CString::new(*s).unwrap())
            .collect();
        assert_eq!(zygote_init(&init_request(&argv)), Some("mnt,net,pid"));
        let joins = SpawnRequest {
            join: Some((3, Namespaces(Namespaces::NET))),
            ..init_request(&argv)
        };
        assert_eq!(zygote_init(&joins), None);
        let nested = SpawnRequest {
            pid_namespace_of: Some(3),
            ..init_request(&argv)
        };
        assert_eq!(zygote_init(&nested), None);
        let as_user = SpawnRequest {
            uid: Some(1000),
            ..init_request(&argv)
        };
        assert_eq!(zygote_init(&as_user), None);
        let path = SpawnRequest {
            program: Program::Path(c"/bin/true"),
            ..init_request(&argv)
        };
        assert_eq!(zygote_init(&path), None);
        let other: Vec<CString> = ["sh", "-c", "true"]
            .iter()
            .map(|s| CString::new(*s).unwrap())
            .collect();
        assert_eq!(zygote_init(&init_request(&other)), None);
        let no_leaf = SpawnRequest {
            cgroup: None,
            ..init_request(&argv)
        };
        assert_eq!(zygote_init(&no_leaf), None);
    }
}
