//! The default seccomp filter of a container: an allowlist (everything else fails with
//! EPERM), written out as classic BPF here (pure Rust, once per daemon; see `compile`
//! for why not a general rule compiler).
//!
//! Modelled on the default profiles of Docker and containerd, tighter where they allow
//! something a workload seldom needs: no namespace creation or joining (`unshare`,
//! `setns`, `clone` with `CLONE_NEW*`), no mounts, no `ptrace`, no keyrings, no BPF or
//! perf, no kernel modules, no `open_by_handle_at` (the "shocker" escape), no
//! `userfaultfd`, no `io_uring`, no clock or host changes. `personality` only with the
//! values Docker allows. Sockets only of the families a workload needs (Unix, IPv4, IPv6,
//! netlink, packet): no `AF_VSOCK`, which Docker also refuses, and none of the exotic
//! families (see `SOCKET_FAMILIES`). `clone3` gets ENOSYS so that glibc falls back to
//! `clone`, whose flags the filter can inspect (clone3 passes them in memory, out of a
//! filter's reach).

use std::sync::OnceLock;

use aurae_sys::container::BpfInstruction;
use nix::libc;

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
    libc::SYS_connect, libc::SYS_accept, libc::SYS_sendto,
    libc::SYS_recvfrom, libc::SYS_sendmsg, libc::SYS_recvmsg, libc::SYS_shutdown,
    libc::SYS_bind, libc::SYS_listen, libc::SYS_getsockname, libc::SYS_getpeername,
    libc::SYS_setsockopt, libc::SYS_getsockopt, libc::SYS_fork,
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

/// Address families `socket` and `socketpair` may create: Unix, IPv4, IPv6, netlink (`ip`,
/// `ss`, glibc's interface queries) and packet (raw L2 for DHCP clients and tcpdump, as
/// Docker's default `CAP_NET_RAW` intends). Every other family, `AF_VSOCK` first of all
/// (between a VM and its host: from a container on the host it reaches guests' vsock
/// services, from one inside a guest the host's), fails with EAFNOSUPPORT,
/// as if the kernel had been built without it: the rarely used families (AF_ALG, AF_RDS,
/// AF_TIPC, AF_CAN, AF_KCM, AF_LLC, AF_X25, AF_AX25, AF_PPPOX, AF_BLUETOOTH, AF_XDP, …) are
/// where kernel socket bugs cluster, and creating one would also autoload its module.
const SOCKET_FAMILIES: [u32; 5] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
    libc::AF_PACKET as u32,
];

/// `CLONE_NEW*` flags a container's `clone` may not pass.
const CLONE_NAMESPACES: u64 = 0x7E02_0000;
/// `personality` values Docker allows (Linux, with and without UNAME26, 32-bit, query).
const PERSONALITIES: [u64; 5] = [0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

// Classic BPF, as seccomp(2) runs it.
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
// struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> BpfInstruction {
    BpfInstruction { code, jt, jf, k }
}

fn nr(n: libc::c_long) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("seccomp: syscall number {n} out of range"))
}

/// One filter, written out directly (about a quarter of what a general rule compiler
/// emits for this list, so it installs faster and each syscall runs fewer instructions):
/// wrong architecture → kill; x32 numbers → EPERM; `clone3` → ENOSYS (libc then uses
/// `clone`, whose flags a filter can read); `clone` with any `CLONE_NEW*` → EPERM;
/// `socket`/`socketpair` only in [`SOCKET_FAMILIES`], else EAFNOSUPPORT;
/// `personality` only with Docker's values; then the allowlist, searched as ranges of
/// numbers ([`allow_ranges`]); anything else → EPERM.
fn compile() -> Result<Vec<Vec<BpfInstruction>>, String> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let mut p = vec![
        ins(LD_W_ABS, 0, 0, OFF_ARCH),
        ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        ins(RET_K, 0, 0, RET_KILL_PROCESS),
        ins(LD_W_ABS, 0, 0, OFF_NR),
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, eperm),
        ins(JEQ_K, 0, 1, nr(libc::SYS_clone3)?),
        ins(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
        // clone: allowed only without namespace flags (all in the low word).
        ins(JEQ_K, 0, 5, nr(libc::SYS_clone)?),
        ins(LD_W_ABS, 0, 0, OFF_ARG0_LO),
        ins(AND_K, 0, 0, CLONE_NAMESPACES as u32),
        ins(JEQ_K, 0, 1, 0),
        ins(RET_K, 0, 0, RET_ALLOW),
        ins(RET_K, 0, 0, eperm),
    ];
    // socket, socketpair: the domain (an int: the kernel reads only the low word) must be
    // one of SOCKET_FAMILIES.
    let n = SOCKET_FAMILIES.len();
    p.push(ins(JEQ_K, 1, 0, nr(libc::SYS_socket)?));
    p.push(ins(
        JEQ_K,
        0,
        u8::try_from(n + 3).unwrap_or(0),
        nr(libc::SYS_socketpair)?,
    ));
    p.push(ins(LD_W_ABS, 0, 0, OFF_ARG0_LO));
    for (i, f) in SOCKET_FAMILIES.iter().enumerate() {
        // Jump to the RET ALLOW after the list.
        p.push(ins(JEQ_K, u8::try_from(n - i).unwrap_or(0), 0, *f));
    }
    p.push(ins(RET_K, 0, 0, RET_ERRNO | libc::EAFNOSUPPORT as u32));
    p.push(ins(RET_K, 0, 0, RET_ALLOW));
    // personality: one of Docker's values, compared on the low word.
    let n = PERSONALITIES.len();
    p.push(ins(
        JEQ_K,
        0,
        u8::try_from(n + 3).unwrap_or(0),
        nr(libc::SYS_personality)?,
    ));
    p.push(ins(LD_W_ABS, 0, 0, OFF_ARG0_LO));
    for (i, v) in PERSONALITIES.iter().enumerate() {
        // Jump to the RET ALLOW after the list.
        p.push(ins(JEQ_K, u8::try_from(n - i).unwrap_or(0), 0, *v as u32));
    }
    p.push(ins(RET_K, 0, 0, eperm));
    p.push(ins(RET_K, 0, 0, RET_ALLOW));
    let mut list: Vec<u32> = ALLOWED
        .iter()
        .filter(|&&s| s != libc::SYS_clone3)
        .map(|&s| nr(s))
        .collect::<Result<_, _>>()?;
    list.sort_unstable();
    list.dedup();
    allow_ranges(&mut p, &ranges(&list), eperm)?;
    if p.len() >= 4096 {
        return Err(format!(
            "seccomp: filter of {} instructions is too long",
            p.len()
        ));
    }
    Ok(vec![p])
}

/// The sorted, distinct numbers `list` as inclusive ranges of consecutive numbers.
fn ranges(list: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &n in list {
        match out.last_mut() {
            Some((_, hi)) if n == *hi + 1 => *hi = n,
            _ => out.push((n, n)),
        }
    }
    out
}

/// The allowlist as a binary search over `ranges` (sorted, disjoint), the syscall
/// number in the accumulator: each inner node one `JGE` to the upper half, each leaf
/// `lo <= nr <= hi` → `RET ALLOW`, else `RET eperm`. A syscall runs about log2 of the
/// ranges' count in comparisons (8 for today's list) instead of scanning the list, and
/// the kernel's per-syscall action cache, which runs the filter once for every syscall
/// number when it is installed, does the same: installing it took ~0.2 ms of a
/// container's start as a list.
fn allow_ranges(
    p: &mut Vec<BpfInstruction>,
    ranges: &[(u32, u32)],
    eperm: u32,
) -> Result<(), String> {
    match ranges {
        [] => p.push(ins(RET_K, 0, 0, eperm)),
        [(lo, hi)] => {
            p.push(ins(JGE_K, 0, 2, *lo));
            p.push(ins(JGE_K, 1, 0, hi + 1));
            p.push(ins(RET_K, 0, 0, RET_ALLOW));
            p.push(ins(RET_K, 0, 0, eperm));
        }
        _ => {
            let (low, high) = ranges.split_at(ranges.len() / 2);
            let mut lower = Vec::new();
            allow_ranges(&mut lower, low, eperm)?;
            // Taken: over the lower half's code to the upper half's.
            let skip = u8::try_from(lower.len())
                .map_err(|_| format!("seccomp: a jump over {} instructions", lower.len()))?;
            p.push(ins(JGE_K, skip, 0, high[0].0));
            p.extend(lower);
            allow_ranges(p, high, eperm)?;
        }
    }
    Ok(())
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
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    /// Runs `prog` on a seccomp_data (arch, nr, arg0) as the kernel would.
    fn run(prog: &[BpfInstruction], arch: u32, nr: libc::c_long, arg0: u64) -> u32 {
        exec(prog, arch, nr, arg0).0
    }

    /// [`run`]'s verdict and how many instructions it took.
    fn exec(prog: &[BpfInstruction], arch: u32, nr: libc::c_long, arg0: u64) -> (u32, usize) {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let (mut a, mut pc, mut n) = (0u32, 0usize, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            n += 1;
            match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    a = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                AND_K => a &= i.k,
                RET_K => return (i.k, n),
                JEQ_K | JGE_K => {
                    let hit = if i.code == JEQ_K { a == i.k } else { a >= i.k };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn one_short_filter_that_decides_as_intended() {
        let f = default_filters().unwrap();
        assert_eq!(f.len(), 1);
        let p = &f[0];
        assert!(p.len() < 400, "{} instructions", p.len());
        let x86 = AUDIT_ARCH_X86_64;
        let eperm = RET_ERRNO | libc::EPERM as u32;
        for &s in ALLOWED.iter().filter(|&&s| s != libc::SYS_clone3) {
            assert_eq!(run(p, x86, s, 0), RET_ALLOW, "syscall {s}");
        }
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
            libc::SYS_seccomp,
            999,
        ] {
            assert!(!ALLOWED.contains(&banned), "{banned} must not be allowed");
            assert_eq!(run(p, x86, banned, 0), eperm, "syscall {banned}");
        }
        assert_eq!(
            run(p, x86, libc::SYS_clone3, 0),
            RET_ERRNO | libc::ENOSYS as u32
        );
        let sigchld = libc::SIGCHLD as u64;
        assert_eq!(run(p, x86, libc::SYS_clone, sigchld), RET_ALLOW);
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(run(p, x86, libc::SYS_clone, thread), RET_ALLOW);
        for ns in [
            libc::CLONE_NEWNET,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
        ] {
            assert_eq!(run(p, x86, libc::SYS_clone, sigchld | ns as u64), eperm);
        }
        // Sockets: the families a workload needs, never AF_VSOCK or the exotic ones.
        let eafnosupport = RET_ERRNO | libc::EAFNOSUPPORT as u32;
        for call in [libc::SYS_socket, libc::SYS_socketpair] {
            for ok in [
                libc::AF_UNIX,
                libc::AF_INET,
                libc::AF_INET6,
                libc::AF_NETLINK,
                libc::AF_PACKET,
            ] {
                assert_eq!(run(p, x86, call, ok as u64), RET_ALLOW, "{call}({ok})");
            }
            for refused in [
                libc::AF_VSOCK,
                libc::AF_UNSPEC,
                libc::AF_ALG,
                libc::AF_RDS,
                libc::AF_TIPC,
                libc::AF_CAN,
                41, // AF_KCM (not in libc for gnu)
                libc::AF_XDP,
                libc::AF_BLUETOOTH,
                libc::AF_KEY,
                libc::AF_PPPOX,
                libc::AF_LLC,
                libc::AF_X25,
                libc::AF_AX25,
                255,
            ] {
                assert_eq!(
                    run(p, x86, call, refused as u64),
                    eafnosupport,
                    "{call}({refused})"
                );
            }
            // The kernel reads the domain as an int: only the low word counts, both ways.
            assert_eq!(run(p, x86, call, 40 | (2 << 32)), eafnosupport);
            assert_eq!(run(p, x86, call, 2 | (40 << 32)), RET_ALLOW);
        }
        assert_eq!(libc::AF_VSOCK, 40);
        assert!(!ALLOWED.contains(&libc::SYS_socket));
        assert!(!ALLOWED.contains(&libc::SYS_socketpair));
        assert_eq!(run(p, x86, libc::SYS_personality, 0), RET_ALLOW);
        assert_eq!(run(p, x86, libc::SYS_personality, 0xffff_ffff), RET_ALLOW);
        assert_eq!(run(p, x86, libc::SYS_personality, 0x0040_0000), eperm);
        // x32 numbering and another architecture.
        assert_eq!(run(p, x86, libc::SYS_read | 0x4000_0000, 0), eperm);
        assert_eq!(run(p, 0x4000_0003, libc::SYS_read, 0), RET_KILL_PROCESS);
    }

    /// Every syscall number, and a few far beyond the table, against the list itself:
    /// the search decides exactly as the list says, in a few comparisons.
    #[test]
    fn the_search_decides_every_number_as_the_list_does() {
        let p = &default_filters().unwrap()[0];
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let special = [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_personality,
        ];
        let mut longest = 0;
        for n in (0u32..1100).chain([0x3fff_ffff, 0xffff_ffff]) {
            let nr = n as libc::c_long;
            if special.contains(&nr) {
                continue;
            }
            let want = if ALLOWED.contains(&nr) {
                RET_ALLOW
            } else {
                eperm
            };
            let (got, took) = exec(p, AUDIT_ARCH_X86_64, nr, 0);
            assert_eq!(got, want, "syscall {n}");
            longest = longest.max(took);
        }
        assert!(longest <= 40, "{longest} instructions for one syscall");
        // The ranges: disjoint, sorted, each a run of consecutive numbers.
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8]), vec![(1, 3), (5, 5), (7, 8)]);
        assert_eq!(ranges(&[]), vec![]);
    }
}
