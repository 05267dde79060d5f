//! The holder: a tiny per-daemon process that keeps duplicates of the read ends of the
//! executables' output pipes, so that
//! 1. a crash of auraed (even `kill -9`) never closes the last read end of a pipe: a
//!    workload that writes blocks once the pipe buffer is full instead of dying of
//!    SIGPIPE, and nothing it wrote is lost;
//! 2. a restarted auraed takes the read ends back ([`reclaim`], `pidfd_getfd`) and keeps
//!    pumping, including what was written while it was down.
//!
//! The holder is auraed's own binary re-executed from its sealed copy with the hidden first
//! argument [`HOLDER_ARG`] ([`holder_main`]), in auraed's own cgroup and namespaces, with
//! `no_new_privs`, stdio on `/dev/null`, and a `SOCK_SEQPACKET` control socket on fd 3. It
//! never reads or writes a held pipe, and it outlives auraed on purpose (no parent-death
//! signal, its own session so a terminal's SIGINT/SIGHUP does not reach it); auraed kills
//! it through its pidfd when it is no longer needed ([`Holder::kill`], [`retire`]).
//!
//! The protocol is one JSON message per packet, each request answered by one `Reply`
//! with the same sequence number (a reply that arrives after its caller gave up is
//! recognised as stale and dropped):
//! - `{"op":"ping","seq":1}` → `{"seq":1,"fds":[]}` (the start-up check);
//! - `{"op":"hold","seq":2}` with N fds (`SCM_RIGHTS`) → `{"seq":2,"fds":[7,8]}`: the
//!   numbers the fds have in the holder, in the order sent;
//! - `{"op":"release","seq":3,"fds":[7,8],"ids":[[d,i],[d,i]]}` → `{"seq":3,"fds":[7,8]}`:
//!   the ones it held, now closed (numbers it does not hold are ignored, and so is one
//!   whose file is not the `(device, inode)` given: a number released once may since hold
//!   another workload's fd).
//!
//! The holder's numbers are reused once released (the kernel gives the lowest free
//! number), so auraed records each held fd's identity ([`HeldOutput::ids`], its device and
//! inode when it was handed over) and checks it on every take-back and release: a
//! restarted auraed never takes another workload's pipe for one of its own.
//!
//! On end of stream (auraed died) the holder keeps everything it holds and sleeps until it
//! is killed; holding nothing, it exits.

use super::off_runtime;
use std::{
    collections::BTreeSet,
    io::{self, Write},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_sys::{ExitStatus, Pidfd, memfd::SealedSelf};
use nix::sys::socket::{MsgFlags, recv};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::reaper::Reaper;

/// The hidden first argument that selects the holder mode.
pub const HOLDER_ARG: &str = "__aurae-holder";
/// The holder's `argv[0]` (and its thread name).
const HOLDER_NAME: &str = "aurae-holder";
/// How long auraed waits for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Most fds one `hold` carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_HOLD: usize = 253;
/// Largest control message.
const MAX_MESSAGE: usize = 64 * 1024;

/// auraed → holder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Ping {
        seq: u64,
    },
    Hold {
        seq: u64,
    },
    Release {
        seq: u64,
        fds: Vec<i32>,
        /// Each number's file identity: one that does not match is not closed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<FileId>,
    },
}

impl Request {
    fn seq(&self) -> u64 {
        match self {
            Self::Ping { seq } | Self::Hold { seq } | Self::Release { seq, .. } => *seq,
        }
    }
}

/// holder → auraed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Reply {
    seq: u64,
    #[serde(default)]
    fds: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub use super::process::ProcRef;

/// A file's identity: its device and inode (a pipe's, a terminal's, a socket's).
pub type FileId = (u64, u64);

/// The identity of the file `fd` refers to.
pub fn file_id(fd: BorrowedFd<'_>) -> io::Result<FileId> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether `fd` is a pipe or a socket (what holders held before identities were kept).
fn pipe_or_socket(fd: &OwnedFd) -> bool {
    use rustix::fs::FileType;
    rustix::fs::fstat(fd).is_ok_and(|st| {
        matches!(
            FileType::from_raw_mode(st.st_mode),
            FileType::Fifo | FileType::Socket
        )
    })
}

/// The identity of our own fd `n`, through `/proc/self/fd` (the magic link is the file
/// itself: a pipe's stat is the pipe's).
fn file_id_of_number(n: RawFd) -> io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/self/fd/{n}"))?;
    Ok((m.dev(), m.ino()))
}

impl HeldOutput {
    /// Takes back the ends a previous holder keeps (see [`reclaim`]), in order: `None`
    /// for one it no longer holds (released) or whose number now holds another file than
    /// the one handed over ([`HeldOutput::ids`]). A record from before identities were
    /// kept (none) is taken at its word only when `owner_alive` (the workload still
    /// runs: its ends were not released, so its numbers were not reused) and only for
    /// what was held then (pipes and sockets); else nothing comes back.
    pub fn reclaim(&self, owner_alive: bool) -> io::Result<Vec<Option<OwnedFd>>> {
        let got = reclaim(&self.holder, &self.fds)?;
        let legacy = self.ids.is_empty();
        Ok(got
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let fd = fd?;
                let same = if legacy {
                    owner_alive && pipe_or_socket(&fd)
                } else {
                    self.ids
                        .get(i)
                        .is_some_and(|want| file_id(fd.as_fd()).is_ok_and(|id| id == *want))
                };
                same.then_some(fd)
            })
            .collect())
    }

    /// The first `n` of what it names (with their identities).
    pub fn first(&self, n: usize) -> HeldOutput {
        HeldOutput {
            holder: self.holder,
            fds: self.fds.iter().take(n).copied().collect(),
            ids: self.ids.iter().take(n).copied().collect(),
        }
    }

    /// [`HeldOutput::reclaim`] of two ends; `Ok(None)` unless both come back.
    pub fn reclaim_pair(&self, owner_alive: bool) -> io::Result<Option<(OwnedFd, OwnedFd)>> {
        Ok(
            match <[Option<OwnedFd>; 2]>::try_from(self.reclaim(owner_alive)?) {
                Ok([Some(a), Some(b)]) => Some((a, b)),
                _ => None,
            },
        )
    }
}

/// The holder that keeps copies of a workload's pipe or socket ends, and their numbers
/// there: an executable's stdout and stderr, a VMM's control socket and console.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldOutput {
    pub holder: ProcRef,
    pub fds: Vec<i32>,
    /// Each fd's identity when it was handed over ([`file_id`]), checked when it is taken
    /// back or released.
    #[serde(default)]
    pub ids: Vec<FileId>,
}

/// Opens the old holder named by `old`, checking that it is still that process and still
/// a holder (its `argv[1]` is [`HOLDER_ARG`]). `Err(NotFound)` otherwise.
fn open_holder(old: &ProcRef) -> io::Result<Pidfd> {
    let gone = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("holder process {} is gone", old.pid),
        )
    };
    let pidfd = old.open()?.ok_or_else(gone)?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", old.pid)).map_err(|_| gone())?;
    if cmdline.split(|b| *b == 0).nth(1) != Some(HOLDER_ARG.as_bytes()) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {} is not an aurae holder", old.pid),
        ));
    }
    Ok(pidfd)
}

/// After a restart: duplicates of the fds the old holder holds at `numbers`
/// (`pidfd_getfd`, close-on-exec), `None` for a number not open there. `Err(NotFound)`
/// when the old holder is gone. The old holder keeps its copies: kill it ([`retire`])
/// once everything it held has been taken back (and is held again by the new holder).
pub fn reclaim(old: &ProcRef, numbers: &[i32]) -> io::Result<Vec<Option<OwnedFd>>> {
    let pidfd = open_holder(old)?;
    numbers
        .iter()
        .map(|&n| match pidfd.get_fd(n) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBADF) => Ok(None),
            Err(e) => Err(e),
        })
        .collect()
}

/// Kills the old holder named by `old` (SIGKILL through its pidfd) if it is still that
/// holder; `Ok(false)` when it is already gone. It is not our child after a restart: its
/// new parent reaps it.
pub fn retire(old: &ProcRef) -> io::Result<bool> {
    let pidfd = match open_holder(old) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match pidfd.send_signal(nix::libc::SIGKILL) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The control channel: the socket and the next sequence number.
#[derive(Debug)]
struct Ctl {
    sock: OwnedFd,
    seq: u64,
}

/// auraed's handle on its holder. Dropping it closes the control socket but does not kill
/// the holder (it keeps what it holds, as after a crash): call [`Holder::kill`] when it is
/// no longer needed.
#[derive(Debug)]
pub struct Holder {
    ctl: Mutex<Ctl>,
    pidfd: Arc<Pidfd>,
    proc: ProcRef,
    exit: Mutex<Option<oneshot::Receiver<ExitStatus>>>,
}

impl Holder {
    /// Starts the holder from auraed's sealed binary, as a child tracked by `reaper`
    /// (blocking: clone, exec, and one round trip to check it answers).
    pub fn start(sealed: &SealedSelf, reaper: &Reaper) -> io::Result<Holder> {
        let program = sealed.get()?;
        Self::start_from(program.as_fd(), reaper)
    }

    /// Like [`Holder::start`] with the program given as an open executable (an auraed
    /// binary: tests, whose own executable is not auraed, pass it this way).
    pub fn start_from(program: BorrowedFd<'_>, reaper: &Reaper) -> io::Result<Holder> {
        Ok(Self::launch(program, reaper)?.in_this_boot())
    }

    /// Like [`Holder::start`] without reading the kernel's boot ID: an instance template
    /// starts its holder before its snapshot, and each copy restored from it must read
    /// (and so make) its own. Named by pid and start time only until
    /// [`Holder::in_this_boot`].
    pub fn start_before_boot_id(sealed: &SealedSelf, reaper: &Reaper) -> io::Result<Holder> {
        let program = sealed.get()?;
        Self::launch(program.as_fd(), reaper)
    }

    /// Whether it still answers (one round trip): a holder started long before it is
    /// used (an instance template's) may have died since.
    pub fn answers(&self) -> io::Result<()> {
        self.call(|seq| Request::Ping { seq }, &[]).map(drop)
    }

    /// The holder named with this boot's ID too (see [`ProcRef::boot`]).
    pub fn in_this_boot(mut self) -> Holder {
        self.proc.boot = crate::workload::process::boot_id();
        self
    }

    fn launch(program: BorrowedFd<'_>, reaper: &Reaper) -> io::Result<Holder> {
        // auraed's own cgroup and namespaces: the holder belongs to no cell.
        let (sock, child) = crate::workload::spawner::start_helper(
            reaper,
            aurae_sys::spawn::Program::Fd(program.as_raw_fd()),
            [HOLDER_NAME, HOLDER_ARG],
        )?;
        let holder = Holder {
            ctl: Mutex::new(Ctl { sock, seq: 0 }),
            pidfd: child.pidfd,
            // Our child, not reaped yet: its pid cannot name another process. Its boot
            // is filled in by `in_this_boot`.
            proc: ProcRef {
                pid: child.pid,
                start_time: crate::workload::process::read_stat(child.pid)
                    .ok()
                    .flatten()
                    .map_or(0, |(_, start)| start),
                boot: 0,
            },
            exit: Mutex::new(Some(child.exit)),
        };
        let ready = holder.call(|seq| Request::Ping { seq }, &[]).and_then(|_| {
            if holder.proc.start_time == 0 {
                Err(io::Error::other("the holder's start time is unreadable"))
            } else {
                Ok(())
            }
        });
        if let Err(e) = ready {
            let _ = holder.kill();
            return Err(io::Error::new(
                e.kind(),
                format!("the holder did not start: {e}"),
            ));
        }
        Ok(holder)
    }

    /// Hands duplicates of `fds` to the holder; returns their numbers there, in order.
    pub fn hold(&self, fds: &[BorrowedFd<'_>]) -> io::Result<Vec<i32>> {
        if fds.is_empty() {
            return Ok(Vec::new());
        }
        if fds.len() > MAX_FDS_PER_HOLD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_FDS_PER_HOLD} fds per hold"),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let numbers = self.call(|seq| Request::Hold { seq }, &raw)?;
        if numbers.len() != fds.len() {
            return Err(io::Error::other(format!(
                "the holder holds {} of the {} fds sent",
                numbers.len(),
                fds.len()
            )));
        }
        Ok(numbers)
    }

    /// Hands copies of `fds` (an executable's output ends and its input, a VMM's control
    /// socket and console) to the holder, off the async runtime; where it keeps them, and
    /// what they are.
    pub fn hold_all(&self, fds: &[&OwnedFd]) -> io::Result<HeldOutput> {
        let ids = fds
            .iter()
            .map(|f| file_id(f.as_fd()))
            .collect::<io::Result<Vec<_>>>()?;
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let numbers = off_runtime(|| self.hold(&borrowed))?;
        Ok(HeldOutput {
            holder: self.proc,
            fds: numbers,
            ids,
        })
    }

    /// Lets go of what `held` names, if this holder is the one keeping it (a previous
    /// holder's are left to its retirement); off the async runtime.
    pub fn release_held(&self, held: &HeldOutput) -> io::Result<()> {
        if held.holder != self.proc {
            return Ok(());
        }
        off_runtime(|| self.release(&held.fds, &held.ids))
    }

    /// Closes the holder's copies at `numbers` whose files are `ids` (numbers it does not
    /// hold, and ones now holding another file, are left alone).
    pub fn release(&self, numbers: &[i32], ids: &[FileId]) -> io::Result<()> {
        if numbers.is_empty() {
            return Ok(());
        }
        let fds = numbers.to_vec();
        let ids = ids.to_vec();
        self.call(|seq| Request::Release { seq, fds, ids }, &[])?;
        Ok(())
    }

    /// The holder process, as recorded for the next auraed.
    pub fn proc(&self) -> ProcRef {
        self.proc
    }

    /// The holder's pidfd.
    pub fn pidfd(&self) -> &Pidfd {
        &self.pidfd
    }

    /// SIGKILL through the pidfd (the reaper reaps it); `Ok` when it already exited.
    pub fn kill(&self) -> io::Result<()> {
        match self.pidfd.send_signal(nix::libc::SIGKILL) {
            Err(e) if e.raw_os_error() != Some(nix::libc::ESRCH) => Err(e),
            _ => Ok(()),
        }
    }

    /// Where the holder's exit status comes (from the reaper); only once.
    pub fn take_exit(&self) -> Option<oneshot::Receiver<ExitStatus>> {
        self.exit.lock().ok().and_then(|mut e| e.take())
    }

    /// One request and its reply (blocking, at most [`REPLY_TIMEOUT`]).
    fn call(&self, request: impl FnOnce(u64) -> Request, fds: &[RawFd]) -> io::Result<Vec<i32>> {
        let mut ctl = self
            .ctl
            .lock()
            .map_err(|_| io::Error::other("holder channel lock poisoned"))?;
        ctl.seq += 1;
        let req = request(ctl.seq);
        let bytes = serde_json::to_vec(&req).map_err(io::Error::other)?;
        super::fdpass::send(&ctl.sock, &bytes, fds).map_err(holder_io)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the holder did not answer in time",
                ));
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut pfd = [nix::poll::PollFd::new(
                ctl.sock.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pfd, ms) {
                Err(nix::errno::Errno::EINTR) | Ok(0) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            let n = match recv(ctl.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                Err(e) => return Err(holder_io(e.into())),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the holder exited",
                    ));
                }
                Ok(n) => n,
            };
            let reply: Reply = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
            if reply.seq != req.seq() {
                // The late answer to a call that timed out.
                continue;
            }
            return match reply.error {
                Some(e) => Err(io::Error::other(format!("the holder refused: {e}"))),
                None => Ok(reply.fds),
            };
        }
    }
}

fn holder_io(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("holder channel: {e}"))
}

/// The holder program (auraed re-executed with [`HOLDER_ARG`]). Single-threaded; never
/// touches a held pipe.
pub fn holder_main() -> ExitCode {
    let Some(ctl) = aurae_sys::fd::take_passed() else {
        let _ = writeln!(io::stderr(), "{HOLDER_NAME}: no control socket on fd 3");
        return ExitCode::FAILURE;
    };
    let _ = nix::sys::prctl::set_name(c"aurae-holder");
    // Its own session: a terminal's SIGINT or SIGHUP aimed at auraed does not end it.
    let _ = nix::unistd::setsid();
    // Two fds per executable: take the whole open-file allowance.
    raise_nofile();
    let mut held = BTreeSet::new();
    // Until end of stream (auraed died) or a broken channel: nothing more will be asked.
    while let Ok(true) = serve_one(&ctl, &mut held) {}
    if held.is_empty() {
        return ExitCode::SUCCESS;
    }
    // Keep the read ends open for the next auraed, which reclaims them and kills us.
    loop {
        nix::unistd::pause();
    }
}

fn raise_nofile() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        );
    }
}

/// Serves one request; `Ok(false)` at end of stream.
fn serve_one(ctl: &OwnedFd, held: &mut BTreeSet<RawFd>) -> io::Result<bool> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let super::fdpass::Received {
        len: n,
        fds,
        truncated,
    } = super::fdpass::recv(ctl, &mut buf)?;
    if n == 0 && fds.is_empty() {
        return Ok(false);
    }
    let request: Result<Request, String> = if truncated {
        Err("message truncated".to_owned())
    } else {
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("bad request: {e}"))
    };
    if !matches!(request, Ok(Request::Hold { .. })) {
        // Only `hold` keeps what comes with a message.
        for &fd in &fds {
            let _ = nix::unistd::close(fd);
        }
    }
    let reply = match request {
        Ok(Request::Hold { seq }) => {
            held.extend(fds.iter().copied());
            Reply {
                seq,
                fds,
                error: None,
            }
        }
        Ok(Request::Ping { seq }) => Reply {
            seq,
            fds: Vec::new(),
            error: None,
        },
        Ok(Request::Release {
            seq,
            fds: numbers,
            ids,
        }) => {
            let mut released = Vec::new();
            for (i, n) in numbers.into_iter().enumerate() {
                // With identities, only the very file handed over is closed.
                let other_file = ids.get(i).is_some_and(|want| {
                    // Unreadable counts as another file: kept, never closed blind.
                    held.contains(&n) && file_id_of_number(n).map_or(true, |id| id != *want)
                });
                if !other_file && held.remove(&n) {
                    let _ = nix::unistd::close(n);
                    released.push(n);
                }
            }
            Reply {
                seq,
                fds: released,
                error: None,
            }
        }
        Err(e) => Reply {
            // Answer the caller's number if it can be read, so it fails at once.
            seq: seq_of(&buf[..n]),
            fds: Vec::new(),
            error: Some(e),
        },
    };
    let bytes = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    loop {
        match nix::sys::socket::send(ctl.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(true),
        }
    }
}

/// The `seq` of a request that did not parse (0 when there is none).
fn seq_of(bytes: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(bytes).map_or(0, |s| s.seq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::workload::process::parse_stat;

    /// A `/proc/<pid>/stat` line with `comm` and start time `start`.
    fn stat(comm: &str, state: char, start: u64) -> String {
        format!(
            "4242 ({comm}) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
             {start} 12345678 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0"
        )
    }

    #[test]
    fn stat_parsing_survives_any_comm() {
        for comm in [
            "sleep",
            "a b",
            ") (",
            "x) S 1 2 3 (y",
            "))",
            "(",
            "",
            "9 9 9 9 9 9 9 9 9 9",
        ] {
            assert_eq!(
                parse_stat(&stat(comm, 'S', 987_654)).unwrap(),
                ('S', 987_654),
                "{comm:?}"
            );
        }
        assert_eq!(parse_stat(&stat(") (", 'Z', 7)).unwrap(), ('Z', 7));
        for bad in [
            "",
            "4242 (x",
            "4242 (x) S 1 2",
            "4242 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 nope",
        ] {
            assert!(parse_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_live_process_is_found_by_its_reference() {
        let me = ProcRef::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(me.start_time > 0);
        let pidfd = me.open().unwrap().expect("we are alive");
        pidfd.send_signal(0).unwrap();
        // Round trip through what auraed records.
        let json = serde_json::to_string(&me).unwrap();
        assert_eq!(serde_json::from_str::<ProcRef>(&json).unwrap(), me);
    }

    #[test]
    fn another_start_time_or_pid_is_not_the_process() {
        let me = ProcRef::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        for other in [
            ProcRef {
                start_time: me.start_time + 1,
                ..me
            },
            ProcRef {
                start_time: me.start_time - 1,
                ..me
            },
            ProcRef {
                pid: 0x3fff_fff0,
                ..me
            },
            ProcRef { pid: 0, ..me },
            ProcRef { pid: -1, ..me },
        ] {
            assert!(other.open().unwrap().is_none(), "{other:?}");
        }
        assert_eq!(
            ProcRef::of(0x3fff_fff0).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// An exited child that is not reaped yet (a zombie) is gone for a reference.
    #[test]
    fn a_zombie_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::workload::process::read_stat(pid).unwrap().is_some() {
            assert!(Instant::now() < deadline, "true never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let (state, start_time) = parse_stat(&r).unwrap();
        assert_eq!(state, 'Z');
        assert!(
            ProcRef {
                pid,
                start_time,
                boot: 0
            }
            .open()
            .unwrap()
            .is_none()
        );
        child.wait().unwrap();
    }

    /// Our own process is not a holder: nothing is reclaimed from it, and it is not killed.
    #[test]
    fn reclaim_and_retire_refuse_a_process_that_is_not_a_holder() {
        let me = ProcRef::of(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert_eq!(
            reclaim(&me, &[0]).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(!retire(&me).unwrap());
        let gone = ProcRef {
            pid: 0x3fff_fff0,
            start_time: 1,
            boot: 0,
        };
        assert_eq!(
            reclaim(&gone, &[0]).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(!retire(&gone).unwrap());
    }

    #[test]
    fn protocol_messages_are_what_the_docs_say() {
        assert_eq!(
            serde_json::to_string(&Request::Hold { seq: 2 }).unwrap(),
            r#"{"op":"hold","seq":2}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Release {
                seq: 3,
                fds: vec![7, 8],
                ids: Vec::new(),
            })
            .unwrap(),
            r#"{"op":"release","seq":3,"fds":[7,8]}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply {
                seq: 2,
                fds: vec![7, 8],
                error: None
            })
            .unwrap(),
            r#"{"seq":2,"fds":[7,8]}"#
        );
        assert_eq!(seq_of(br#"{"op":"frobnicate","seq":9}"#), 9);
        assert_eq!(seq_of(b"garbage"), 0);
    }

    /// The `flags:` of an fd of ours (`/proc/self/fdinfo`), `None` when it is not open.
    fn open_flags(fd: RawFd) -> Option<u32> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
    }

    /// The holder's side of the protocol, in-process over a socketpair: hold keeps the
    /// fds (their numbers come back), release closes only held ones, anything sent with
    /// another request is closed, EOF ends serving.
    #[test]
    fn serve_one_holds_releases_and_stops_at_eof() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut held = BTreeSet::new();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let send = |req: &Request, fds: &[RawFd]| {
            let bytes = serde_json::to_vec(req).unwrap();
            super::super::fdpass::send(&ours, &bytes, fds).unwrap();
        };
        let answer = |held: &mut BTreeSet<RawFd>| {
            assert!(serve_one(&theirs, held).unwrap());
            let mut buf = vec![0u8; 1024];
            let n = recv(ours.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            serde_json::from_slice::<Reply>(&buf[..n]).unwrap()
        };
        send(&Request::Hold { seq: 1 }, &[r.as_raw_fd(), w.as_raw_fd()]);
        let got = answer(&mut held);
        assert_eq!((got.seq, got.fds.len(), got.error), (1, 2, None));
        assert_eq!(held, got.fds.iter().copied().collect());
        for n in &got.fds {
            // Close-on-exec, and a pipe end.
            let flags = open_flags(*n).expect("held fds are open");
            assert_ne!(flags & 0o2_000_000, 0, "O_CLOEXEC");
            let link = std::fs::read_link(format!("/proc/self/fd/{n}")).unwrap();
            assert!(link.to_string_lossy().starts_with("pipe:"), "{link:?}");
        }
        // A release naming another file than the one a number holds (the number was
        // released and reused meanwhile) leaves it alone.
        let (r_id, w_id) = (file_id(r.as_fd()).unwrap(), file_id(w.as_fd()).unwrap());
        let (other, _other_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        send(
            &Request::Release {
                seq: 20,
                fds: vec![got.fds[0]],
                ids: vec![file_id(other.as_fd()).unwrap()],
            },
            &[],
        );
        assert_eq!(answer(&mut held).fds, Vec::<i32>::new());
        assert!(open_flags(got.fds[0]).is_some(), "another file's id: kept");
        assert_eq!(r_id, w_id, "a pipe's two ends are one file");
        // Release one held number (its own id) and one that is not held (our socket).
        send(
            &Request::Release {
                seq: 2,
                fds: vec![got.fds[0], ours.as_raw_fd()],
                ids: vec![r_id, file_id(ours.as_fd()).unwrap()],
            },
            &[],
        );
        let rel = answer(&mut held);
        assert_eq!((rel.seq, rel.fds.clone()), (2, vec![got.fds[0]]));
        assert!(open_flags(got.fds[0]).is_none(), "released: closed");
        assert!(open_flags(got.fds[1]).is_some(), "still held");
        assert!(
            open_flags(ours.as_raw_fd()).is_some(),
            "not held: untouched"
        );
        // Fds sent with a ping are not kept.
        send(&Request::Ping { seq: 3 }, &[r.as_raw_fd()]);
        let ping = answer(&mut held);
        assert_eq!((ping.seq, ping.fds.len()), (3, 0));
        assert_eq!(held.len(), 1);
        // A request that does not parse is refused under its own number.
        nix::sys::socket::send(
            ours.as_raw_fd(),
            br#"{"op":"x","seq":4}"#,
            MsgFlags::empty(),
        )
        .unwrap();
        let bad = answer(&mut held);
        assert_eq!(bad.seq, 4);
        assert!(bad.error.is_some());
        drop(ours);
        assert!(!serve_one(&theirs, &mut held).unwrap());
        for n in held {
            nix::unistd::close(n).unwrap();
        }
    }
}
