//! Taking ownership of file descriptors a parent passed at a known number.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of `fd`, which the caller's parent left open for it (e.g. the cell
/// init's readiness pipe at fd 3).
///
/// The caller must be the only user of that fd number in this process: call it once, at
/// start-up, for a number nothing else opened.
pub fn take_inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: by this function's contract the fd was inherited for us alone; owning it
    // means it is closed exactly once, when the OwnedFd is dropped.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
