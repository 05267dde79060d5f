//! A fork of a single-threaded process straight into a cgroup and new namespaces, born as
//! its caller's sibling: how the cell inits' zygote (a small process of auraed's own
//! binary, exec'd once) makes each init without an exec.
//!
//! `clone3` without `CLONE_VM`, as `fork` is, with `CLONE_INTO_CGROUP` (never outside the
//! cell's cgroup, and no migration: moving a process writes `cgroup.procs`, which waits
//! for an RCU grace period on a cgroup2 hierarchy without `favordynmods`), `CLONE_PIDFD`
//! and `CLONE_PARENT`: the child's parent is the caller's parent (auraed), which reaps it
//! and is told of its exit as for any child it spawned.
//!
//! Only for a single-threaded caller (checked): the child is a copy of the caller's one
//! thread and may then run any code, allocation included. glibc keeps the thread's id in
//! its thread block and `clone3` does not update it there, but nothing the child runs reads
//! it: glibc's `raise`/`abort` ask the kernel for the id (glibc ≥ 2.34), and Rust's locks
//! are keyed by their own thread ids.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr,
};

use crate::{
    Namespaces, Pidfd,
    spawn::{CLONE_INTO_CGROUP, CloneArgs},
};

/// Which side of [`fork_sibling`] this is.
#[derive(Debug)]
pub enum Forked {
    /// The new process.
    Child,
    /// The caller, with the new process's pidfd (its pid is in the pidfd's fdinfo: the
    /// child's parent, not the caller, gets its exit).
    Parent(Pidfd),
}

/// Forks the calling process into the cgroup `cgroup` (an `O_DIRECTORY` fd of the leaf)
/// with the new namespaces `new` (a new PID namespace makes the child its PID 1), as a
/// child of the caller's parent. Refused unless the caller has exactly one thread.
pub fn fork_sibling(cgroup: BorrowedFd<'_>, new: Namespaces) -> io::Result<Forked> {
    if crate::process::thread_count() != Some(1) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "fork_sibling: the calling process has more than one thread",
        ));
    }
    let allowed = Namespaces::PID
        | Namespaces::MOUNT
        | Namespaces::IPC
        | Namespaces::UTS
        | Namespaces::NET
        | Namespaces::CGROUP;
    if new.0 & !allowed != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fork_sibling: flags {:#x} are not namespaces it makes",
                new.0
            ),
        ));
    }
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_PIDFD as u64
        | libc::CLONE_PARENT as u64
        | CLONE_INTO_CGROUP
        | u64::from(new.0.unsigned_abs());
    let args = CloneArgs {
        flags,
        pidfd: ptr::addr_of_mut!(pidfd) as u64,
        // Must be 0 with CLONE_PARENT (EINVAL otherwise): the child gets the caller's own
        // exit signal, SIGCHLD for a caller spawned as a plain child.
        exit_signal: 0,
        cgroup: u64::try_from(cgroup.as_raw_fd())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad cgroup fd"))?,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and with no stack given is a fork: the child runs on
    // a copy of this thread's stack and memory and returns here with 0. `args` and
    // `pidfd` outlive the call; this process has one thread (checked above), so the child
    // is a whole copy of it and no lock can be held by a thread that does not exist there.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            ptr::from_ref(&args),
            size_of::<CloneArgs>(),
        )
    };
    match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        _ => {
            // SAFETY: CLONE_PIDFD stored a new pidfd (close-on-exec) in `pidfd` that this
            // process now owns and nothing else does.
            let fd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            Ok(Forked::Parent(Pidfd::from_owned(fd)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A fork of a process with more threads than one would copy only the calling one
    /// (whatever lock another held stays held in the child): refused before any clone.
    #[test]
    fn a_process_with_threads_is_refused() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let dir = std::fs::File::open("/").unwrap();
        let e = fork_sibling(dir.as_fd(), Namespaces::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
        drop(tx);
        let _ = other.join();
    }
}
