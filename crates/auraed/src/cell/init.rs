//! The cell init: PID 1 of a cell's PID namespace. It holds the cell's namespaces, reaps
//! orphans, and forwards SIGTERM to the whole cell.
//!
//! auraed starts it with `clone3` (with the new namespaces) and re-executes its own binary
//! from a sealed memfd with the hidden first argument [`INIT_ARG`], so this runs
//! single-threaded before any async runtime exists. It never execs a workload: executables
//! are started by auraed directly into its namespaces, and are auraed's children.
//!
//! Set-up is two steps on the socket auraed passed at fd 3, so that an init can be made
//! ahead of time and wait in the pool of spare inits (see [`super::pool`]) until a cell
//! takes it:
//! 1. `prepare`: private mount propagation, its own /proc and /sys, `lo` up; then it
//!    reports `ready` (or `error: …`) and waits for one line: the cell's hostname.
//! 2. `finish`: once auraed has placed it in the cell's cgroup, a cgroup namespace of its
//!    own rooted there (with the cell's cgroup tree mounted read-only at /sys/fs/cgroup),
//!    the hostname; it reports `ok` (or `error: …`), closes the socket and waits for
//!    signals forever.
//!
//! A fresh cell goes through both steps at once; a pooled init is the same process, only
//! stopped between them, so a cell cannot tell the two apart. EOF instead of a hostname
//! (auraed gone, the pool drained) ends the init.

use std::{
    ffi::OsString,
    io::{Read, Write},
    os::{fd::OwnedFd, unix::net::UnixStream},
    process::ExitCode,
};

use nix::{
    mount::{MsFlags, mount},
    sys::{
        signal::{SigSet, Signal},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
};

/// The hidden first argument that selects this mode.
pub const INIT_ARG: &str = crate::workload::layout::CELL_INIT_ARG;
/// What the init reports after its first set-up step when all went well.
pub const READY: &str = "ready";
/// What the init reports after its second set-up step when all went well.
pub const OK: &str = "ok";
/// Longest hostname line auraed sends (a label is at most 63 bytes).
const MAX_LINE: usize = 256;

fn nosuid() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// Step 1, from the comma list of the new namespaces `flags` ("mnt,uts,net,cgroup,pid").
fn prepare(flags: &str) -> Result<(), String> {
    let has = |f: &str| flags.split(',').any(|x| x == f);
    if has("mnt") {
        // Nothing we mount may propagate back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making / private: {e}"))?;
        if has("pid") {
            mount(Some("proc"), "/proc", Some("proc"), nosuid(), None::<&str>)
                .map_err(|e| format!("mounting /proc: {e}"))?;
        }
        if has("net") {
            // A fresh sysfs shows the cell's own network devices; read-only.
            mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                nosuid() | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| format!("mounting /sys: {e}"))?;
        }
    }
    if has("net") {
        aurae_sys::net::set_link_up("lo").map_err(|e| format!("bringing lo up: {e}"))?;
    }
    Ok(())
}

/// Step 2, in the cell's cgroup: the cgroup namespace and the hostname.
fn finish(flags: &str, hostname: &str) -> Result<(), String> {
    let has = |f: &str| flags.split(',').any(|x| x == f);
    if has("cgroup") {
        // Rooted at the cgroup the init is in now: the cell's leaf.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| format!("a cgroup namespace of its own: {e}"))?;
        if has("mnt") && has("net") {
            // The cell's own cgroup tree, read-only (CVE-2023-25809).
            mount(
                Some("cgroup2"),
                "/sys/fs/cgroup",
                Some("cgroup2"),
                nosuid() | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| format!("mounting /sys/fs/cgroup: {e}"))?;
        }
    }
    if has("uts") {
        nix::unistd::sethostname(hostname)
            .map_err(|e| format!("setting hostname {hostname:?}: {e}"))?;
    }
    Ok(())
}

/// One line from auraed: `None` on EOF, an error, or a line too long.
fn read_line(s: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < MAX_LINE {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(1) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
    None
}

fn report(s: &mut UnixStream, result: &Result<(), String>, ok: &str) -> bool {
    let line = match result {
        Ok(()) => format!("{ok}\n"),
        Err(e) => format!("error: {e}\n"),
    };
    s.write_all(line.as_bytes()).is_ok() && result.is_ok()
}

/// Entry point of the init process; `args` are the arguments after [`INIT_ARG`]: the
/// comma list of its new namespaces.
pub fn main(args: &[OsString]) -> ExitCode {
    let flags = args.first().and_then(|s| s.to_str()).unwrap_or("");
    // The socket auraed passed (placed at fd 3 by aurae_sys::spawn).
    let Some(fd) = aurae_sys::fd::take_passed() else {
        return ExitCode::FAILURE;
    };
    run(fd, flags)
}

/// The init itself, reporting on `ctl`, with the comma list of its new namespaces `flags`:
/// what [`main`] runs, and what the zygote's child runs (see [`super::zygote`]).
pub(super) fn run(ctl: OwnedFd, flags: &str) -> ExitCode {
    // Show as "aurae-init" in ps instead of the sealed memfd's name.
    let _ = nix::sys::prctl::set_name(c"aurae-init");
    let mut ctl = UnixStream::from(ctl);
    // Block the signals we wait for before reporting ready, so none is lost.
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    let prepared = set
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))
        .and_then(|()| prepare(flags));
    if !report(&mut ctl, &prepared, READY) {
        return ExitCode::FAILURE;
    }
    let Some(hostname) = read_line(&mut ctl) else {
        // auraed went away, or drained the pool.
        return ExitCode::FAILURE;
    };
    let finished = finish(flags, &hostname);
    if !report(&mut ctl, &finished, OK) {
        return ExitCode::FAILURE;
    }
    drop(ctl);
    // Waiting is all that is left: the code pages of the set-up (most of what this process
    // touched) are given back, off the allocation's path; the wait loop maps its few again.
    // A cell's init lives as long as the cell, so this is memory per cell. A failure costs
    // only that memory, and the init protocol has no place left to report it.
    let _ = aurae_sys::memory::release_read_only_segments();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap_all(),
            Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP) => {
                let _ = aurae_sys::process::signal_all_in_namespace(Signal::SIGTERM as i32);
            }
            _ => {}
        }
    }
}

fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
