//! Process file descriptors: signal and wait without ever naming a pid that may be reused.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// How a child ended, as `waitid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// An owned pidfd (close-on-exec).
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// Wraps a pidfd returned by `clone3(CLONE_PIDFD)`.
    pub(crate) fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// `pidfd_open(pid)`: for a process we did not create through [`crate::spawn()`] (a
    /// re-adopted cell, or our own pid for a test).
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags (0) and returns a new fd or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it. pidfds are
        // always close-on-exec.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Takes a pidfd that another process handed us (`SCM_RIGHTS`): checked to be a pidfd
    /// (its `/proc/self/fdinfo` names the process), returned with the pid it names in our
    /// PID namespace. What the sender said the pid was is not needed.
    pub fn from_received(fd: OwnedFd) -> io::Result<(Self, i32)> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse::<i32>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a pidfd"))?;
        if pid <= 0 {
            // -1: the process has exited and been reaped; 0: in no namespace of ours.
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the pidfd names no process of ours (Pid: {pid})"),
            ));
        }
        Ok((Self(fd), pid))
    }

    /// Sends `signal` to the process; ESRCH once it has exited (even before it is reaped).
    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: the fd is a live pidfd we own; info is NULL (kernel fills a default
        // siginfo) and flags are 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `pidfd_getfd(pidfd, target_fd, 0)`: a duplicate of the process's fd `target_fd`
    /// (the same open file description, like `dup`), close-on-exec. Needs ptrace access to
    /// the process (`PTRACE_MODE_ATTACH_REALCREDS`: root, or our own uid under Yama's
    /// default scope for a descendant); `EBADF` when `target_fd` is not open there, `ESRCH`
    /// once it has exited (Linux 5.6).
    pub fn get_fd(&self, target_fd: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a live pidfd we own, an fd number that the kernel
        // looks up in the target's table (any value is safe to pass), and flags 0; it
        // returns a new fd or -1. No memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), target_fd, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just installed this fd in our table for us (close-on-exec,
        // as pidfd_getfd always does); nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Reaps the process if it has exited (`waitid(P_PIDFD, WEXITED|WNOHANG)`); `None`
    /// while it runs. Only for our own children.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        waitid_pidfd(self.0.as_raw_fd(), libc::WEXITED | libc::WNOHANG)
    }

    /// Blocks until the process exits and reaps it. Only for our own children; never call
    /// it from an async task.
    pub fn wait_blocking(&self) -> io::Result<ExitStatus> {
        loop {
            match waitid_pidfd(self.0.as_raw_fd(), libc::WEXITED) {
                Ok(Some(s)) => return Ok(s),
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn status_of(info: &libc::siginfo_t) -> Option<ExitStatus> {
    // SAFETY: waitid filled `info` for an exited child (si_pid != 0 checked by callers);
    // si_status and si_code are valid for SIGCHLD siginfo.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    match code {
        libc::CLD_EXITED => Some(ExitStatus::Code(status)),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(ExitStatus::Signal(status)),
        _ => None,
    }
}

fn waitid_pidfd(fd: RawFd, options: libc::c_int) -> io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(fd).map_err(|_| io::Error::other("negative fd"))?;
    // SAFETY: `info` is a valid, writable siginfo_t; P_PIDFD takes the fd as the id.
    let r = unsafe { libc::waitid(libc::P_PIDFD, id, &mut info, options) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading si_pid of the siginfo waitid filled (or left zeroed).
    if unsafe { info.si_pid() } == 0 {
        return Ok(None);
    }
    Ok(status_of(&info))
}

/// A child of ours that has exited, found by [`peek_exited_child`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitedChild {
    pub pid: i32,
    pub status: Option<ExitStatus>,
}

/// Peeks at one exited child without reaping it (`waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`).
/// `Ok(None)` when no child has exited (or there are no children).
pub fn peek_exited_child() -> io::Result<Option<ExitedChild>> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid and writable; P_ALL ignores the id.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ECHILD) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: reading si_pid of the siginfo waitid filled (or left zeroed).
    let pid = unsafe { info.si_pid() };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(ExitedChild {
        pid,
        status: status_of(&info),
    }))
}

/// Reaps the exited child `pid` (an orphan we track by no pidfd). The pid cannot have been
/// reused: it names our own zombie, found by [`peek_exited_child`] and not yet reaped.
pub fn reap_zombie(pid: i32) -> io::Result<()> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::other("negative pid"))?;
    // SAFETY: `info` is valid and writable; the pid names our own zombie child.
    let r = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOHANG) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_of_self_signals_zero() {
        let me = Pidfd::open(i32::try_from(std::process::id()).unwrap()).unwrap();
        me.send_signal(0).unwrap();
    }

    /// A duplicate of one of our own fds through our own pidfd: the same pipe,
    /// close-on-exec; a number that is not open is EBADF.
    #[test]
    fn get_fd_duplicates_an_fd_of_the_process() {
        use std::io::{Read, Write};
        let me = Pidfd::open(i32::try_from(std::process::id()).unwrap()).unwrap();
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned these two fds to us; each is owned once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let dup = me.get_fd(w.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), w.as_raw_fd());
        // SAFETY: F_GETFD only reads the flags of an fd we own.
        let flags = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFD) };
        assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0, "{flags}");
        drop(w);
        std::fs::File::from(dup)
            .write_all(b"through the dup")
            .unwrap();
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the dup");
        let err = me.get_fd(0x3fff_0000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
