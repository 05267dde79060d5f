//! Per-thread seccomp filters for the VMM's threads, as Firecracker does: allowlists
//! (`seccomp/rules.rs`) compiled to BPF in pure Rust (`seccompiler`) once, by `build.rs`
//! (a VM's VMM copies the programs rather than compiling them), each installed by its
//! thread on itself (`seccomp(SECCOMP_SET_MODE_FILTER)` without TSYNC, after
//! `PR_SET_NO_NEW_PRIVS`) before it runs guest code or handles guest input. Any other
//! syscall kills the process (`SECCOMP_RET_KILL_PROCESS`): a VMM that does something
//! unexpected is treated as compromised.
//!
//! | thread   | allowed                                                            |
//! |----------|--------------------------------------------------------------------|
//! | all      | `fcntl(F_GETFD)` only (std's debug check when an fd is dropped), plus:  |
//! | `vcpuN`  | `ioctl` (`KVM_RUN`, `KVM_GET_REGS` only), `read`, `write`, `pread64`, `pwrite64`, `fsync`, `fdatasync` (disk, TAP, eventfds, serial sink), `futex`, memory (`mmap`, `munmap`, `mremap`, `madvise`, `brk`), signals (`rt_sigreturn` for the kick, `rt_sigprocmask`, `sigaltstack`), `sched_yield`, `clock_gettime`, `close`, `exit` |
//! | `vmm`    | the controller: `futex`, `tgkill`/`getpid` (kicks), `clock_nanosleep`/`nanosleep`, `write`/`fsync` (serial flush, RX stop), `close`, memory, signals, `exit`; for a snapshot, `ioctl` ([`SNAPSHOT_IOCTLS`]: the `KVM_GET_*` of the vCPUs' and VM's state only), `pwrite64` and `ftruncate` on its files, `mprotect` (malloc's arena) |
//! | `net-rx` | `epoll_wait`/`epoll_pwait`, `read`, `write`, `futex`, `close`, memory, signals, `exit` |
//!
//! The serial sink is the embedder's `Write`: a file, a pipe or a socket works (`write`);
//! a sink that needs other syscalls (e.g. one that opens files) does not.

#[cfg_attr(not(test), allow(dead_code))] // compiled by build.rs; the tests compare
mod rules;

use seccompiler::{BpfProgram, sock_filter};

pub use rules::{
    CONTROL_ALLOWED, KVM_GET_REGS, KVM_RUN, PROCESS_DENIED, SNAPSHOT_IOCTLS, ThreadKind,
};

/// A filter could not be installed (the programs are compiled at build time).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// The programs `build.rs` compiled from `seccomp/rules.rs`: `(code, jt, jf, k)`.
mod built {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// [`PROCESS_DENIED`] as a program (compiled at build time), for an embedder that runs the
/// VMM in a process of its own to install process-wide before it builds the VM.
pub fn process_denylist_program() -> BpfProgram {
    program(built::PROCESS_DENYLIST)
}

/// [`CONTROL_ALLOWED`] as a program (compiled at build time), for that embedder's own
/// control and report threads.
pub fn control_program() -> BpfProgram {
    program(built::CONTROL)
}

fn program(insns: &[(u16, u8, u8, u32)]) -> BpfProgram {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect()
}

/// The three programs, compiled once per VM.
#[derive(Clone, Debug)]
pub struct Filters {
    /// For vCPU threads.
    pub vcpu: BpfProgram,
    /// For the controller thread.
    pub vmm: BpfProgram,
    /// For the network RX thread.
    pub net_rx: BpfProgram,
}

impl Filters {
    /// Every filter, as compiled at build time.
    pub fn built() -> Self {
        Self {
            vcpu: program(built::VCPU),
            vmm: program(built::VMM),
            net_rx: program(built::NET_RX),
        }
    }
}

/// Installs `prog` on the calling thread only.
pub fn install(prog: &BpfProgram) -> Result<(), SeccompError> {
    Ok(seccompiler::apply_filter(prog)?)
}

/// The calling thread's seccomp mode from `/proc/thread-self/status` (0 none, 1 strict,
/// 2 filter); `None` if unreadable.
pub fn current_mode() -> Option<u8> {
    let s = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insns(p: &BpfProgram) -> Vec<(u16, u8, u8, u32)> {
        p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
    }

    #[test]
    fn the_programs_compiled_at_build_time_are_the_rules_compiled_now() {
        let built = Filters::built();
        let now = |kind| rules::compile(kind).unwrap();
        for (kind, b, n) in [
            ("vcpu", built.vcpu, now(ThreadKind::Vcpu)),
            ("vmm", built.vmm, now(ThreadKind::Vmm)),
            ("net_rx", built.net_rx, now(ThreadKind::NetRx)),
            (
                "process denylist",
                process_denylist_program(),
                rules::compile_process_denylist().unwrap(),
            ),
            (
                "control",
                control_program(),
                rules::compile_control().unwrap(),
            ),
        ] {
            assert!(!b.is_empty(), "{kind}");
            assert_eq!(insns(&b), insns(&n), "{kind}");
        }
    }

    #[test]
    fn a_thread_installs_its_filter_on_itself_only() {
        let prog = Filters::built().net_rx;
        let before = current_mode();
        let mode = std::thread::spawn(move || {
            install(&prog).unwrap();
            // Only allowlisted syscalls from here: reading /proc is not one of them,
            // so report through the join value (futex, exit).
            7u8
        })
        .join()
        .unwrap();
        assert_eq!(mode, 7);
        assert_eq!(current_mode(), before, "the test thread is not filtered");
    }
}
