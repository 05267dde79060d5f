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
//! | all      | `fcntl(F_GETFD)` only (std's debug check when an fd is dropped), memory (`mmap` and `mprotect` without `PROT_EXEC`: malloc grows a thread's arena with `mprotect`; `munmap`, `mremap`, `madvise`, `brk`), plus:  |
//! | `vcpuN`  | `ioctl` (`KVM_RUN`, `KVM_GET_REGS` only), `read`, `write`, `pread64`, `pwrite64`, `fsync`, `fdatasync` (disk, TAP, eventfds, serial sink), `futex`, signals (`rt_sigreturn` for the kick, `rt_sigprocmask`, `sigaltstack`), `sched_yield`, `clock_gettime`, `close`, `exit` |
//! | `vmm`    | the controller: `futex`, `tgkill`/`getpid` (kicks), `clock_nanosleep`/`nanosleep`, `write`/`fsync` (serial flush, RX stop), `close`, memory, signals, `exit`; for a snapshot, `ioctl` ([`SNAPSHOT_IOCTLS`]: the `KVM_GET_*` of the vCPUs' and VM's state only), `pwrite64` and `ftruncate` on its files |
//! | `net-rx` | `epoll_wait`/`epoll_pwait`, `read`, `write`, `futex`, `close`, signals, `exit` |
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

/// [`PROCESS_DENIED`] and executable memory refused, as a program (compiled at build
/// time), for an embedder that runs the VMM in a process of its own to install
/// process-wide before it builds the VM.
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

/// Test support: code run on a thread under one of the filters, in a child process of the
/// test binary (a filter's kill would otherwise end the whole test run).
#[cfg(test)]
pub(crate) mod probe {
    use std::process::{Command, ExitStatus};

    use super::{Filters, ThreadKind, install};

    const ENV: &str = "AURAE_VMM_SECCOMP_PROBE";

    /// The probe this process was started to run (`None` in the test run itself).
    pub(crate) fn asked() -> Option<String> {
        std::env::var(ENV).ok()
    }

    /// Runs the test `test` (its path, e.g. `seccomp::tests::name`) again in a child with
    /// [`asked`] answering `which`; its exit status and what it wrote.
    pub(crate) fn run(test: &str, which: &str) -> (ExitStatus, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--test-threads=1", "--nocapture"])
            .env(ENV, which)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, said)
    }

    /// Runs `f` on a new thread that has allocated (as every VMM thread has, in std's
    /// start-up, before it installs its filter) and then installed `kind`'s filter.
    pub(crate) fn on_filtered_thread<T: Send + 'static>(
        kind: ThreadKind,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let f_all = Filters::built();
        let prog = match kind {
            ThreadKind::Vcpu => f_all.vcpu,
            ThreadKind::Vmm => f_all.vmm,
            ThreadKind::NetRx => f_all.net_rx,
        };
        std::thread::spawn(move || {
            drop(std::hint::black_box(vec![1u8; 64]));
            install(&prog).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

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

    /// The process-wide denylist refuses executable memory (`EPERM`, not a kill) and
    /// leaves the rest of memory alone.
    #[test]
    fn the_process_denylist_refuses_executable_memory() {
        let prog = process_denylist_program();
        let (exec, plain) = std::thread::spawn(move || {
            install(&prog).unwrap();
            let map = |prot| {
                vm_memory::mmap::MmapRegionBuilder::<()>::new(4096)
                    .with_mmap_prot(prot)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                    .build()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            (
                map(libc::PROT_READ | libc::PROT_EXEC),
                map(libc::PROT_READ | libc::PROT_WRITE),
            )
        })
        .join()
        .unwrap();
        let err = exec.unwrap_err();
        assert!(err.contains("Operation not permitted"), "{err}");
        plain.unwrap();
    }

    fn kind(name: &str) -> ThreadKind {
        match name {
            "vcpu" => ThreadKind::Vcpu,
            "vmm" => ThreadKind::Vmm,
            _ => ThreadKind::NetRx,
        }
    }

    /// Each thread's filter lets malloc grow the thread's arena (`mprotect` of its
    /// reserve to read-write), as a guest's 1 MiB read followed by a 512 KiB one makes
    /// the vCPU thread's bounce buffer do, and refuses executable memory.
    #[test]
    fn a_filtered_thread_grows_its_heap_but_maps_no_code() {
        if let Some(which) = probe::asked() {
            let (k, what) = which.split_once(':').unwrap();
            let grow = what == "grow";
            probe::on_filtered_thread(kind(k), move || match grow {
                true => {
                    // Anything opened is answered ENOENT, not killed (glibc opens one
                    // file the first time it trims a thread's heap).
                    let opened = std::fs::File::open("/proc/self/status").map_err(|e| e.kind());
                    assert_eq!(opened.err(), Some(std::io::ErrorKind::NotFound));
                    // Freed, a 1 MiB mapping raises glibc's mmap threshold past the
                    // 512 KiB that follows: that one comes from the arena, which grows.
                    drop(std::hint::black_box(vec![1u8; 1 << 20]));
                    drop(std::hint::black_box(vec![2u8; 512 << 10]));
                    // Grown by 8 MiB in small pieces, then given back (the heap trimmed).
                    let held: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 2048]).collect();
                    assert_eq!(std::hint::black_box(held).len(), 4096);
                }
                false => {
                    let _ = vm_memory::mmap::MmapRegionBuilder::<()>::new(4096)
                        .with_mmap_prot(libc::PROT_READ | libc::PROT_EXEC)
                        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
                        .build();
                }
            });
            println!("probe {which}: survived");
            return;
        }
        let me = "seccomp::tests::a_filtered_thread_grows_its_heap_but_maps_no_code";
        for k in ["vcpu", "vmm", "net_rx"] {
            let (st, said) = probe::run(me, &format!("{k}:grow"));
            assert!(
                st.success() && said.contains("survived"),
                "{k}: growing the heap: {st:?}\n{said}"
            );
            let (st, said) = probe::run(me, &format!("{k}:exec"));
            assert_eq!(
                st.signal(),
                Some(libc::SIGSYS),
                "{k}: an executable mapping must kill the process: {st:?}\n{said}"
            );
        }
    }
}
