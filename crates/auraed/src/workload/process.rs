//! A process found again after a restart: its pid, its start time and the boot it ran in,
//! so neither a reused pid nor a reboot makes another process pass for it.

use std::io;

use aurae_sys::Pidfd;
use serde::{Deserialize, Serialize};

/// This boot's id (`/proc/sys/kernel/random/boot_id`) as a number; 0 if unreadable (then
/// read again on the next call: a failed read is not kept for the process's lifetime).
pub fn boot_id() -> u128 {
    static BOOT: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    if let Some(b) = BOOT.get() {
        return *b;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| u128::from_str_radix(&s.trim().replace('-', ""), 16).ok())
        .map_or(0, |b| *BOOT.get_or_init(|| b))
}

/// A process named so that a recorded reference survives an auraed restart: its pid and
/// its start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot), which together
/// tell the process from a later one that got the same pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
    /// The boot it ran in ([`boot_id`]); 0 when unknown (then only pid and start time
    /// are compared).
    #[serde(default)]
    pub boot: u128,
}

/// What `/proc/<pid>/stat` says that [`ProcRef`] needs: the state letter and start time.
pub(crate) fn parse_stat(stat: &str) -> io::Result<(char, u64)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat");
    // `pid (comm) state …`: comm may contain anything, `)` and spaces included, but the
    // kernel writes it between the first `(` and the *last* `)`.
    let (_, rest) = stat.rsplit_once(')').ok_or_else(bad)?;
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 (state) is the first after the comm; field 22 (starttime) the twentieth.
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or_else(bad)?;
    let start = fields
        .nth(18)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(bad)?;
    Ok((state, start))
}

/// `Ok(None)` when the process is gone (no `/proc/<pid>`, or a zombie).
pub(crate) fn read_stat(pid: i32) -> io::Result<Option<(char, u64)>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let (state, start) = parse_stat(&s)?;
            Ok((!matches!(state, 'Z' | 'X' | 'x')).then_some((state, start)))
        }
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ESRCH) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl ProcRef {
    /// The reference of the live process `pid` (in our PID namespace).
    pub fn of(pid: i32) -> io::Result<ProcRef> {
        match read_stat(pid)? {
            Some((_, start_time)) => Ok(ProcRef {
                pid,
                start_time,
                boot: boot_id(),
            }),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} does not exist"),
            )),
        }
    }

    /// A pidfd of this very process, or `None` when it is gone (exited, a zombie, or its
    /// pid now names another process). An error means "could not tell", not "gone": a
    /// short-lived one (out of fds or memory, interrupted) is tried again a few times
    /// first, and callers name a persistent one in what they report.
    pub fn open(&self) -> io::Result<Option<Pidfd>> {
        tried_again(|| self.open_once())
    }

    /// [`ProcRef::open`] for re-adoption: an error is worded for its warning ("(pid N)
    /// could not be checked (…)"), to follow whose process it was.
    pub fn open_or_why(&self) -> Result<Option<Pidfd>, String> {
        self.open()
            .map_err(|e| format!("(pid {}) could not be checked ({e})", self.pid))
    }

    fn open_once(&self) -> io::Result<Option<Pidfd>> {
        if self.pid <= 0 {
            return Ok(None);
        }
        // Another boot's process is gone; an unreadable boot id proves nothing (pid and
        // start time still tell this process from a later one).
        let now = boot_id();
        if self.boot != 0 && now != 0 && self.boot != now {
            return Ok(None);
        }
        let pidfd = match Pidfd::open(self.pid) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        match read_stat(self.pid)? {
            Some((_, start)) if start == self.start_time => {}
            _ => return Ok(None),
        }
        // Still alive after the read: the stat we read was this pidfd's process (a pid is
        // not reused while its process lives).
        match pidfd.send_signal(0) {
            Ok(()) => Ok(Some(pidfd)),
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => Ok(Some(pidfd)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `pid`'s parent and how deep its PID namespace is below ours (the length of its
/// `NSpid` list): from `/proc/<pid>/status`, which anyone may read (a namespace link
/// needs ptrace access, which auraed does not keep for other users' processes).
fn parent_and_depth(pid: i32) -> Option<(i32, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_ascii_whitespace)
    };
    let ppid = field("PPid:")?.next()?.parse().ok()?;
    let depth = field("NSpid:")?.count();
    (depth > 0).then_some((ppid, depth))
}

/// Whether the parent of the live process `pid` is in another PID namespace than `pid`
/// itself: a process started from outside its namespace (by auraed: `setns` or
/// `CLONE_NEWPID`, then reparented to the host's reaper when auraed died), never one of
/// its own workload's forks (an orphan of those goes to the namespace's init). A child's
/// namespace is its parent's or one below it (`setns` goes only down), so a parent less
/// deep is one outside. `None` when it cannot be told (gone, unreadable).
pub fn started_from_outside(pid: i32) -> Option<bool> {
    let (ppid, depth) = parent_and_depth(pid)?;
    if ppid == 0 {
        // Its parent is outside our own PID namespace, so outside its too.
        return Some(depth > 1);
    }
    let (_, parent_depth) = parent_and_depth(ppid)?;
    Some(parent_depth < depth)
}

/// SIGKILLs `root` and every process below it. They are stopped first, from the top down
/// (SIGSTOP through a pidfd each), until no new child shows up: none can fork past the
/// kill, and none is reparented to somewhere it would be missed. Returns how many were
/// killed.
pub fn kill_tree(root: i32) -> usize {
    let mut stopped: Vec<Pidfd> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![root];
    // Two passes over what was stopped catch a child forked while its parent was being
    // stopped.
    for _ in 0..2 {
        while let Some(pid) = todo.pop() {
            if !seen.insert(pid) {
                continue;
            }
            let Ok(pidfd) = Pidfd::open(pid) else {
                continue;
            };
            let _ = pidfd.send_signal(nix::libc::SIGSTOP);
            todo.extend(children_of(pid));
            stopped.push(pidfd);
        }
        todo = seen.iter().flat_map(|p| children_of(*p)).collect();
        todo.retain(|p| !seen.contains(p));
    }
    for p in &stopped {
        let _ = p.send_signal(nix::libc::SIGKILL);
    }
    stopped.len()
}

/// The children of `pid` (every thread's `children` list).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// `f`, tried again (three tries in all, 10 ms apart) while it fails with an error that
/// may pass (out of fds or memory, interrupted); its last answer.
pub fn tried_again<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    const TRIES: u32 = 3;
    let mut tries = 1;
    loop {
        match f() {
            Err(e) if tries < TRIES && transient(&e) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// An error that may not happen again: out of file descriptors or memory, interrupted.
fn transient(e: &io::Error) -> bool {
    use nix::libc::{EAGAIN, EINTR, EMFILE, ENFILE, ENOMEM};
    e.kind() == io::ErrorKind::Interrupted
        || matches!(
            e.raw_os_error(),
            Some(EAGAIN | EINTR | EMFILE | ENFILE | ENOMEM)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_the_command() {
        let stat = "1234 (evil) (x 1 2) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(stat).unwrap(), ('S', 987654));
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn our_own_process_is_found_and_a_wrong_start_time_or_boot_is_not() {
        let me = ProcRef::of(std::process::id() as i32).unwrap();
        assert_ne!(me.boot, 0, "boot id readable");
        assert!(me.open().unwrap().is_some());
        for other in [
            ProcRef {
                start_time: me.start_time + 1,
                ..me
            },
            ProcRef {
                boot: me.boot ^ 1,
                ..me
            },
            ProcRef {
                pid: i32::MAX - 1,
                start_time: 1,
                boot: 0,
            },
        ] {
            assert!(other.open().unwrap().is_none(), "{other:?}");
        }
        // A record from before boot ids were kept still matches.
        assert!(ProcRef { boot: 0, ..me }.open().unwrap().is_some());
    }

    /// A process and its parent in one PID namespace: not started from outside; a
    /// `sleep` in a PID namespace of its own (`unshare --pid --fork`, root only): started
    /// from outside, and killed with its tree.
    #[test]
    fn a_process_started_into_a_namespace_below_its_parent_is_told_apart() {
        assert_eq!(started_from_outside(std::process::id() as i32), Some(false));
        if !nix::unistd::geteuid().is_root() {
            println!(
                "SKIP a_process_started_into_a_namespace_below_its_parent_is_told_apart: needs root for unshare --pid"
            );
            return;
        }
        let mut c = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "sh", "-c", "sleep 30 & exec sleep 31"])
            .spawn()
            .unwrap();
        let unshare = c.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let inner = loop {
            if let Some(p) = children_of(unshare).first() {
                break *p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "unshare forked nothing"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(started_from_outside(inner), Some(true));
        while children_of(inner).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no child of the sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(started_from_outside(children_of(inner)[0]), Some(false));
        assert_eq!(kill_tree(inner), 2);
        let _ = c.wait();
    }

    #[test]
    fn only_errors_that_may_pass_are_tried_again() {
        use nix::libc::{EACCES, EINVAL, EMFILE, ENFILE, ENOMEM};
        for e in [EMFILE, ENFILE, ENOMEM] {
            assert!(transient(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [EACCES, EINVAL] {
            assert!(!transient(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }
}
