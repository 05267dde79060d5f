//! Watching what runs: a cgroup draining after a kill, its OOM-kill counter, a process
//! that is not our child.

use std::time::{Duration, Instant};

use super::cgroup::CgroupTree;
use crate::spec::CellName;

/// Resolves once the process behind `pidfd` has exited (the pidfd polls readable; it
/// need not be our child), checking ten times a second: only processes found again after
/// a restart are watched this way (our children's exits come from the reaper).
pub async fn exited(pidfd: std::sync::Arc<aurae_sys::Pidfd>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(pidfd.as_ref()),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the process of `pidfd` has exited (its pidfd polls readable; a zombie
/// counts), without reaping it.
pub fn has_exited(pidfd: &aurae_sys::Pidfd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(
        std::os::fd::AsFd::as_fd(pidfd),
        PollFlags::POLLIN,
    )];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Polls `populated` until the cell is empty; `false` on timeout.
pub async fn wait_empty(tree: &dyn CgroupTree, name: &CellName, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !tree.populated(name).unwrap_or(false) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        // cgroup.kill is synchronous for signal delivery; exits follow within a few
        // hundred microseconds, so poll finely.
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// The cgroup's OOM-kill count (`memory.events oom_kill`); 0 without the memory
/// controller.
pub fn oom_kills(tree: &dyn CgroupTree, name: &CellName) -> u64 {
    tree.read(name, "memory.events")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}
