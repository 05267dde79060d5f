//! Watching what runs: a cgroup draining after a kill, its OOM-kill counter, a process
//! that is not our child.

use std::{
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
};

use super::cgroup::CgroupTree;
use crate::spec::CellName;

/// Resolves once the process behind `pidfd` has exited (the pidfd polls readable; it
/// need not be our child), checking ten times a second: only processes found again after
/// a restart are watched this way (our children's exits come from the reaper).
pub async fn exited(pidfd: std::sync::Arc<aurae_sys::Pidfd>) {
    loop {
        match readable_within(pidfd.as_fd(), Duration::ZERO) {
            Ok(true) => return,
            Err(nix::errno::Errno::EINTR) | Ok(false) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `fd` polls readable within `within` (at once with zero), on this thread.
pub fn readable_within(fd: BorrowedFd<'_>, within: Duration) -> nix::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    poll(
        &mut [PollFd::new(fd, PollFlags::POLLIN)],
        PollTimeout::from(ms),
    )
    .map(|n| n > 0)
}

/// Whether the process of `pidfd` has exited (its pidfd polls readable; a zombie
/// counts), without reaping it. A poll that fails (but for an interruption: asked again)
/// counts as exited: every caller asks before it trusts what it read of a process or
/// hands it work (its namespace, its /proc, a spare init, the zygote), and a process
/// not known to run is not to be trusted. (It counted as running.)
pub fn has_exited(pidfd: &aurae_sys::Pidfd) -> bool {
    exited_by(|| readable_within(pidfd.as_fd(), Duration::ZERO))
}

fn exited_by(mut poll: impl FnMut() -> nix::Result<bool>) -> bool {
    loop {
        match poll() {
            Ok(readable) => return readable,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

/// The mount namespace of process `pid` (whose pidfd is `pidfd`) while it runs: opened,
/// then the process checked still running, so the pid was its own when opened (not a
/// reused one). `None` once it has exited (it took its namespace down itself) or where
/// the namespace cannot be opened. Held, the namespace outlives the process: its mounts
/// are undone when the fd is dropped, not in the process's exit.
pub fn mount_namespace_of(pid: i32, pidfd: &aurae_sys::Pidfd) -> Option<std::os::fd::OwnedFd> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok()?;
    (!has_exited(pidfd)).then(|| ns.into())
}

/// Waits up to `within` (on this worker: `off_runtime`) for the process of `pidfd` to
/// exit; whether it has.
pub fn exits_within(pidfd: &aurae_sys::Pidfd, within: Duration) -> bool {
    super::off_runtime(|| readable_within(pidfd.as_fd(), within).unwrap_or(false))
}

/// How long [`wait_empty`] looks at `populated` every [`FINE_STEP`] before it polls on
/// tokio's timer (whose millisecond ticks would round most drains up by up to 1 ms).
const FINE_FOR: Duration = Duration::from_millis(5);
const FINE_STEP: Duration = Duration::from_micros(100);

/// Polls `populated` until the cell is empty; `false` on timeout. The first 5 ms
/// every 100 µs on this worker (`off_runtime`: a killed cell drains
/// in a few hundred microseconds), then every 500 µs on the runtime's timer. (The kernel's
/// notification of `cgroup.events` is no faster: it is sent at most every 10 ms per file,
/// so a cell that filled just before, as a short-lived one did, is told empty late.)
pub async fn wait_empty(tree: &dyn CgroupTree, name: &CellName, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let empty = || !tree.populated(name).unwrap_or(false);
    if empty() {
        return true;
    }
    let fine_until = Instant::now() + FINE_FOR.min(timeout);
    if super::off_runtime(|| {
        while Instant::now() < fine_until {
            std::thread::sleep(FINE_STEP);
            if empty() {
                return true;
            }
        }
        false
    }) {
        return true;
    }
    loop {
        if empty() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A poll that fails is an exit, an interrupted one is asked again, and a real pidfd
    /// reads running, then exited once its process ends.
    #[test]
    fn a_process_not_known_to_run_counts_as_exited() {
        assert!(exited_by(|| Err(nix::errno::Errno::EBADF)));
        let mut asked = 0;
        assert!(!exited_by(|| {
            asked += 1;
            if asked < 3 {
                Err(nix::errno::Errno::EINTR)
            } else {
                Ok(false)
            }
        }));
        assert_eq!(asked, 3);
        let child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = aurae_sys::Pidfd::open(pid).unwrap();
        assert!(!has_exited(&pidfd));
        pidfd.send_signal(nix::libc::SIGKILL).unwrap();
        assert!(readable_within(pidfd.as_fd(), Duration::from_secs(5)).unwrap());
        assert!(has_exited(&pidfd));
        let mut child = child;
        child.wait().unwrap();
    }
}
