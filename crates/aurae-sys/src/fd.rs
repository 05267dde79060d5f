//! Taking ownership of the one file descriptor a parent passes at a known number: the cell
//! init's readiness pipe, which `spawn` places at fd 3.

use std::{
    os::fd::{FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

/// The number `SpawnRequest::pass_fd` lands on in the child.
pub const PASSED_FD: i32 = 3;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the fd the parent passed at [`PASSED_FD`]: at most once per process,
/// and only if that fd is open. Call it first thing in a process started with a
/// `pass_fd`, before anything else can open a file (the cell init does).
pub fn take_passed() -> Option<OwnedFd> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if fd 3 is not open.
    if unsafe { libc::fcntl(PASSED_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: fd 3 is open, was inherited for this purpose (see the function's contract),
    // and the TAKEN flag guarantees no second OwnedFd is ever made for it here.
    Some(unsafe { OwnedFd::from_raw_fd(PASSED_FD) })
}

/// A new fd (close-on-exec) for the same open file as the raw number `fd` of this process,
/// for code that is handed fd numbers (a spawn request) and must not borrow them unsafely.
pub fn dup_raw(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the fd number; it fails with EBADF if `fd` is not
    // open, and on success returns a new fd that nothing else owns.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just created above and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
