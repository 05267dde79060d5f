//! The cell init: PID 1 of a cell's PID namespace. It holds the cell's namespaces, reaps
//! orphans, and forwards SIGTERM to the whole cell.
//!
//! auraed starts it with `clone3` (into the cell's leaf cgroup, with the new namespaces)
//! and re-executes its own binary from a sealed memfd with the hidden first argument
//! [`INIT_ARG`], so this runs single-threaded before any async runtime exists. It sets the
//! cell up (private mount propagation, its own /proc, hostname, `lo` up), reports on fd 3,
//! then waits for signals forever. It never execs a workload: executables are started by
//! auraed directly into its namespaces, and are auraed's children.

use std::{ffi::OsString, io::Write, process::ExitCode};

use nix::{
    mount::{MsFlags, mount},
    sys::{
        signal::{SigSet, Signal},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
};

/// The hidden first argument that selects this mode.
pub const INIT_ARG: &str = crate::workload::layout::CELL_INIT_ARG;

/// What the init sets up, passed as arguments: `<hostname> <flags>`, where flags is a
/// comma list of the new namespaces ("mnt,uts,net").
fn setup(hostname: &str, flags: &str) -> Result<(), String> {
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
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if has("pid") {
            mount(Some("proc"), "/proc", Some("proc"), nosuid, None::<&str>)
                .map_err(|e| format!("mounting /proc: {e}"))?;
        }
        if has("net") {
            // A fresh sysfs shows the cell's own network devices; read-only.
            mount(
                Some("sysfs"),
                "/sys",
                Some("sysfs"),
                nosuid | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| format!("mounting /sys: {e}"))?;
            if has("cgroup") {
                // The cell's own cgroup tree (rooted at the cell by its cgroup namespace),
                // read-only (CVE-2023-25809).
                mount(
                    Some("cgroup2"),
                    "/sys/fs/cgroup",
                    Some("cgroup2"),
                    nosuid | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(|e| format!("mounting /sys/fs/cgroup: {e}"))?;
            }
        }
    }
    if has("uts") {
        nix::unistd::sethostname(hostname)
            .map_err(|e| format!("setting hostname {hostname:?}: {e}"))?;
    }
    if has("net") {
        aurae_sys::net::set_link_up("lo").map_err(|e| format!("bringing lo up: {e}"))?;
    }
    Ok(())
}

/// Entry point of the init process; `args` are the arguments after [`INIT_ARG`].
pub fn main(args: &[OsString]) -> ExitCode {
    let hostname = args.first().and_then(|s| s.to_str()).unwrap_or("cell");
    // Show as "aurae-init" in ps instead of the sealed memfd's name.
    let _ = nix::sys::prctl::set_name(c"aurae-init");
    let flags = args.get(1).and_then(|s| s.to_str()).unwrap_or("");
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
    let blocked = set.thread_block();
    let result = blocked
        .map_err(|e| format!("blocking signals: {e}"))
        .and_then(|()| setup(hostname, flags));
    // The readiness pipe auraed passed (placed at fd 3 by aurae_sys::spawn).
    let Some(ready) = aurae_sys::fd::take_passed() else {
        return ExitCode::FAILURE;
    };
    let mut ready = std::fs::File::from(ready);
    let report = match &result {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => format!("error: {e}\n"),
    };
    let _ = ready.write_all(report.as_bytes());
    drop(ready);
    if result.is_err() {
        return ExitCode::FAILURE;
    }
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
