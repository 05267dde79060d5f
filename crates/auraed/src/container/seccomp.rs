//! The default seccomp filter of a container: an allowlist (everything else fails with
//! EPERM), compiled to BPF in pure Rust by seccompiler, once per daemon.
//!
//! Modelled on the default profiles of Docker and containerd, tighter where they allow
//! something a workload seldom needs: no namespace creation or joining (`unshare`,
//! `setns`, `clone` with `CLONE_NEW*`), no mounts, no `ptrace`, no keyrings, no BPF or
//! perf, no kernel modules, no `open_by_handle_at` (the "shocker" escape), no
//! `userfaultfd`, no `io_uring`, no clock or host changes. `personality` only with the
//! values Docker allows. A second filter answers `clone3` with ENOSYS so that glibc falls
//! back to `clone`, whose flags the first filter can inspect (clone3 passes them in
//! memory, out of a filter's reach).

use std::{collections::BTreeMap, sync::OnceLock};

use aurae_sys::container::BpfInstruction;
use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls allowed without conditions (x86_64).
#[rustfmt::skip]
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read, libc::SYS_write, libc::SYS_open, libc::SYS_close, libc::SYS_stat,
    libc::SYS_fstat, libc::SYS_lstat, libc::SYS_poll, libc::SYS_lseek, libc::SYS_mmap,
    libc::SYS_mprotect, libc::SYS_munmap, libc::SYS_brk, libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask, libc::SYS_rt_sigreturn, libc::SYS_ioctl, libc::SYS_pread64,
    libc::SYS_pwrite64, libc::SYS_readv, libc::SYS_writev, libc::SYS_access, libc::SYS_pipe,
    libc::SYS_select, libc::SYS_sched_yield, libc::SYS_mremap, libc::SYS_msync,
    libc::SYS_mincore, libc::SYS_madvise, libc::SYS_shmget, libc::SYS_shmat, libc::SYS_shmctl,
    libc::SYS_dup, libc::SYS_dup2, libc::SYS_pause, libc::SYS_nanosleep, libc::SYS_getitimer,
    libc::SYS_alarm, libc::SYS_setitimer, libc::SYS_getpid, libc::SYS_sendfile,
    libc::SYS_socket, libc::SYS_connect, libc::SYS_accept, libc::SYS_sendto,
    libc::SYS_recvfrom, libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_shutdown,
    libc::SYS_bind, libc::SYS_listen, libc::SYS_getsockname, libc::SYS_getpeername,
    libc::SYS_socketpair, libc::SYS_setsockopt, libc::SYS_getsockopt, libc::SYS_fork,
    libc::SYS_vfork, libc::SYS_execve, libc::SYS_exit, libc::SYS_wait4, libc::SYS_kill,
    libc::SYS_uname, libc::SYS_semget, libc::SYS_semop, libc::SYS_semctl, libc::SYS_shmdt,
    libc::SYS_msgget, libc::SYS_msgsnd, libc::SYS_msgrcv, libc::SYS_msgctl, libc::SYS_fcntl,
    libc::SYS_flock, libc::SYS_fsync, libc::SYS_fdatasync, libc::SYS_truncate,
    libc::SYS_ftruncate, libc::SYS_getdents, libc::SYS_getcwd, libc::SYS_chdir,
    libc::SYS_fchdir, libc::SYS_rename, libc::SYS_mkdir, libc::SYS_rmdir, libc::SYS_creat,
    libc::SYS_link, libc::SYS_unlink, libc::SYS_symlink, libc::SYS_readlink, libc::SYS_chmod,
    libc::SYS_fchmod, libc::SYS_chown, libc::SYS_fchown, libc::SYS_lchown, libc::SYS_umask,
    libc::SYS_gettimeofday, libc::SYS_getrlimit, libc::SYS_getrusage, libc::SYS_sysinfo,
    libc::SYS_times, libc::SYS_getuid, libc::SYS_getgid, libc::SYS_setuid, libc::SYS_setgid,
    libc::SYS_geteuid, libc::SYS_getegid, libc::SYS_setpgid, libc::SYS_getppid,
    libc::SYS_getpgrp, libc::SYS_setsid, libc::SYS_setreuid, libc::SYS_setregid,
    libc::SYS_getgroups, libc::SYS_setgroups, libc::SYS_setresuid, libc::SYS_getresuid,
    libc::SYS_setresgid, libc::SYS_getresgid, libc::SYS_getpgid, libc::SYS_setfsuid,
    libc::SYS_setfsgid, libc::SYS_getsid, libc::SYS_capget, libc::SYS_capset,
    libc::SYS_rt_sigpending, libc::SYS_rt_sigtimedwait, libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigsuspend, libc::SYS_sigaltstack, libc::SYS_utime, libc::SYS_mknod,
    libc::SYS_statfs, libc::SYS_fstatfs, libc::SYS_getpriority, libc::SYS_setpriority,
    libc::SYS_sched_setparam, libc::SYS_sched_getparam, libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler, libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min, libc::SYS_sched_rr_get_interval, libc::SYS_mlock,
    libc::SYS_munlock, libc::SYS_mlockall, libc::SYS_munlockall, libc::SYS_prctl,
    libc::SYS_arch_prctl, libc::SYS_setrlimit, libc::SYS_sync, libc::SYS_chroot,
    libc::SYS_gettid, libc::SYS_readahead, libc::SYS_setxattr, libc::SYS_lsetxattr,
    libc::SYS_fsetxattr, libc::SYS_getxattr, libc::SYS_lgetxattr, libc::SYS_fgetxattr,
    libc::SYS_listxattr, libc::SYS_llistxattr, libc::SYS_flistxattr, libc::SYS_removexattr,
    libc::SYS_lremovexattr, libc::SYS_fremovexattr, libc::SYS_tkill, libc::SYS_time,
    libc::SYS_futex, libc::SYS_sched_setaffinity, libc::SYS_sched_getaffinity,
    libc::SYS_io_setup, libc::SYS_io_destroy, libc::SYS_io_getevents, libc::SYS_io_submit,
    libc::SYS_io_cancel, libc::SYS_epoll_create, libc::SYS_getdents64,
    libc::SYS_set_tid_address, libc::SYS_restart_syscall, libc::SYS_semtimedop,
    libc::SYS_fadvise64, libc::SYS_timer_create, libc::SYS_timer_settime,
    libc::SYS_timer_gettime, libc::SYS_timer_getoverrun, libc::SYS_timer_delete,
    libc::SYS_clock_gettime, libc::SYS_clock_getres, libc::SYS_clock_nanosleep,
    libc::SYS_exit_group, libc::SYS_epoll_wait, libc::SYS_epoll_ctl, libc::SYS_tgkill,
    libc::SYS_utimes, libc::SYS_mq_open, libc::SYS_mq_unlink, libc::SYS_mq_timedsend,
    libc::SYS_mq_timedreceive, libc::SYS_mq_notify, libc::SYS_mq_getsetattr,
    libc::SYS_waitid, libc::SYS_inotify_init, libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch, libc::SYS_openat, libc::SYS_mkdirat, libc::SYS_mknodat,
    libc::SYS_fchownat, libc::SYS_futimesat, libc::SYS_newfstatat, libc::SYS_unlinkat,
    libc::SYS_renameat, libc::SYS_linkat, libc::SYS_symlinkat, libc::SYS_readlinkat,
    libc::SYS_fchmodat, libc::SYS_faccessat, libc::SYS_pselect6, libc::SYS_ppoll,
    libc::SYS_set_robust_list, libc::SYS_get_robust_list, libc::SYS_splice, libc::SYS_tee,
    libc::SYS_sync_file_range, libc::SYS_vmsplice, libc::SYS_utimensat,
    libc::SYS_epoll_pwait, libc::SYS_signalfd, libc::SYS_timerfd_create, libc::SYS_eventfd,
    libc::SYS_fallocate, libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime,
    libc::SYS_accept4, libc::SYS_signalfd4, libc::SYS_eventfd2, libc::SYS_epoll_create1,
    libc::SYS_dup3, libc::SYS_pipe2, libc::SYS_inotify_init1, libc::SYS_preadv,
    libc::SYS_pwritev, libc::SYS_rt_tgsigqueueinfo, libc::SYS_recvmmsg, libc::SYS_prlimit64,
    libc::SYS_syncfs, libc::SYS_sendmmsg, libc::SYS_getcpu, libc::SYS_sched_setattr,
    libc::SYS_sched_getattr, libc::SYS_renameat2, libc::SYS_getrandom,
    libc::SYS_memfd_create, libc::SYS_execveat, libc::SYS_membarrier,
    libc::SYS_copy_file_range, libc::SYS_preadv2, libc::SYS_pwritev2,
    libc::SYS_pkey_mprotect, libc::SYS_pkey_alloc, libc::SYS_pkey_free, libc::SYS_statx,
    SYS_IO_PGETEVENTS, libc::SYS_rseq, libc::SYS_pidfd_send_signal,
    libc::SYS_pidfd_open, libc::SYS_clone3, libc::SYS_close_range, libc::SYS_faccessat2,
    libc::SYS_epoll_pwait2, libc::SYS_openat2, libc::SYS_futex_waitv,
    libc::SYS_process_mrelease,
];

/// Missing from libc's x86_64 table.
const SYS_IO_PGETEVENTS: libc::c_long = 333;

/// `CLONE_NEW*` flags a container's `clone` may not pass.
const CLONE_NAMESPACES: u64 = 0x7E02_0000;
/// `personality` values Docker allows (Linux, with and without UNAME26, 32-bit, query).
const PERSONALITIES: [u64; 5] = [0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

fn compile() -> Result<Vec<Vec<BpfInstruction>>, String> {
    let e = |e: seccompiler::BackendError| format!("seccomp filter: {e}");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let no_ns = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(CLONE_NAMESPACES),
        0,
    )
    .map_err(e)?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![no_ns]).map_err(e)?],
    );
    let mut personality = Vec::new();
    for p in PERSONALITIES {
        let c =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, p).map_err(e)?;
        personality.push(SeccompRule::new(vec![c]).map_err(e)?);
    }
    rules.insert(libc::SYS_personality, personality);
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(e)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(e)?;
    // The allowlist last: once it is in force, seccomp(2) itself is refused.
    [clone3, allow]
        .into_iter()
        .map(|f| {
            let prog = BpfProgram::try_from(f).map_err(e)?;
            Ok(prog
                .into_iter()
                .map(|i| BpfInstruction {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect())
        })
        .collect()
}

/// The default filters, compiled once.
pub fn default_filters() -> Result<&'static [Vec<BpfInstruction>], String> {
    static FILTERS: OnceLock<Result<Vec<Vec<BpfInstruction>>, String>> = OnceLock::new();
    FILTERS
        .get_or_init(compile)
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn compiles_to_two_bounded_programs() {
        let f = default_filters().unwrap();
        assert_eq!(f.len(), 2);
        // BPF_MAXINSNS is 4096.
        assert!(
            f.iter().all(|p| !p.is_empty() && p.len() < 4096),
            "{:?}",
            f.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for banned in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_ptrace,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_open_by_handle_at,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
        ] {
            assert!(!ALLOWED.contains(&banned), "{banned} must not be allowed");
        }
    }
}
