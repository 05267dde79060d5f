//! The VMM threads' allowlists and their compilation to BPF. This file is also compiled
//! into `build.rs` (it uses only `std`, `libc`, `kvm-bindings` and `seccompiler`), which
//! compiles every program once, at build time: a restored VM's fresh VMM process then
//! copies them rather than running the compiler (under nested virtualisation, ~6 ms of a
//! ~35 ms restore). `seccomp::tests` checks the two agree.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// `KVM_RUN`.
pub const KVM_RUN: u64 = 0xae80;
/// `KVM_GET_REGS` (read after an internal error).
pub const KVM_GET_REGS: u64 = 0x8090_ae81;

/// `_IOC(dir, KVMIO, nr, size)`.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const IOR: u64 = 2;
const IOWR: u64 = 3;

/// The read-only KVM ioctls a snapshot needs, allowed on the controller thread only: the
/// vCPUs' and the VM's state, nothing that changes it.
pub const SNAPSHOT_IOCTLS: &[u64] = {
    use std::mem::size_of;

    use kvm_bindings as k;
    &[
        kvm_ioc(IOR, 0x81, size_of::<k::kvm_regs>()), // KVM_GET_REGS
        kvm_ioc(IOR, 0x83, size_of::<k::kvm_sregs>()), // KVM_GET_SREGS
        kvm_ioc(IOWR, 0x88, size_of::<k::kvm_msrs>()), // KVM_GET_MSRS
        kvm_ioc(IOR, 0x8e, size_of::<k::kvm_lapic_state>()), // KVM_GET_LAPIC
        kvm_ioc(IOWR, 0x91, size_of::<k::kvm_cpuid2>()), // KVM_GET_CPUID2
        kvm_ioc(IOR, 0x98, size_of::<k::kvm_mp_state>()), // KVM_GET_MP_STATE
        kvm_ioc(IOR, 0x9f, size_of::<k::kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        kvm_ioc(IOR, 0xa1, size_of::<k::kvm_debugregs>()), // KVM_GET_DEBUGREGS
        kvm_ioc(0, 0xa3, 0),                          // KVM_GET_TSC_KHZ
        kvm_ioc(IOR, 0xa4, size_of::<k::kvm_xsave>()), // KVM_GET_XSAVE
        kvm_ioc(IOR, 0xa6, size_of::<k::kvm_xcrs>()), // KVM_GET_XCRS
        kvm_ioc(IOWR, 0x62, size_of::<k::kvm_irqchip>()), // KVM_GET_IRQCHIP
        kvm_ioc(IOR, 0x9f, size_of::<k::kvm_pit_state2>()), // KVM_GET_PIT2
        kvm_ioc(IOR, 0x7c, size_of::<k::kvm_clock_data>()), // KVM_GET_CLOCK
    ]
};

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The controller thread (`vmm`) that waits for the vCPUs and stops them.
    Vmm,
    /// The network RX thread.
    NetRx,
}

/// Syscalls every VMM thread needs: memory, futexes, signal return and masks, thread
/// exit, time. (`mmap` and `mprotect` too, never with `PROT_EXEC`: see [`compile`].)
const COMMON: &[libc::c_long] = &[
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_rseq,
];

fn allowed(kind: ThreadKind) -> Vec<libc::c_long> {
    let mut v = COMMON.to_vec();
    v.extend_from_slice(match kind {
        ThreadKind::Vcpu => &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
        ],
        ThreadKind::Vmm => &[
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_fsync,
            libc::SYS_tgkill,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            // A snapshot's files (opened by the embedder beforehand).
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
        ],
        ThreadKind::NetRx => &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
        ],
    });
    v
}

/// A rule on the protection (argument 2) of `mmap`, `mprotect` or `pkey_mprotect`: it
/// matches when `PROT_EXEC` is asked for (`exec`) or when it is not.
fn prot_exec_is(exec: bool) -> Result<SeccompRule, BackendError> {
    let want = if exec { libc::PROT_EXEC as u64 } else { 0 };
    SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        want,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
}

/// The BPF program for one kind of thread (x86_64).
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let arg1_is = |v| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    // std's `OwnedFd` drop checks the fd with `fcntl(F_GETFD)` in debug builds.
    rules.insert(libc::SYS_fcntl, vec![arg1_is(libc::F_GETFD as u64)?]);
    // Memory, never executable: glibc maps a thread's arena `PROT_NONE` and grows it with
    // `mprotect(PROT_READ | PROT_WRITE)` on any thread that allocates past what it has
    // (a guest's 1 MiB read then 512 KiB read did, and without `mprotect` the VMM was
    // killed); no thread of ours maps or makes code.
    rules.insert(libc::SYS_mmap, vec![prot_exec_is(false)?]);
    rules.insert(libc::SYS_mprotect, vec![prot_exec_is(false)?]);
    if kind == ThreadKind::Vcpu {
        rules.insert(
            libc::SYS_ioctl,
            vec![arg1_is(KVM_RUN)?, arg1_is(KVM_GET_REGS)?],
        );
    }
    if kind == ThreadKind::Vmm {
        rules.insert(
            libc::SYS_ioctl,
            SNAPSHOT_IOCTLS
                .iter()
                .map(|&nr| arg1_is(nr))
                .collect::<Result<_, _>>()?,
        );
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(answering_enoent(f.try_into()?))
}

/// Syscalls a thread's filter answers with `ENOENT` rather than killing the process:
/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time it gives back the
/// top of a thread's heap, which a filtered thread does after freeing enough. Nothing is
/// opened either way; the thread's malloc goes on (it gives the memory back with
/// `madvise`).
pub const ANSWERED_ENOENT: &[libc::c_long] = &[libc::SYS_open, libc::SYS_openat];

/// `prog` behind a preamble that answers [`ANSWERED_ENOENT`] with `ENOENT` (x86_64 only;
/// anything else goes on to `prog`, which checks the architecture itself).
fn answering_enoent(prog: BpfProgram) -> BpfProgram {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let insn = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let n = ANSWERED_ENOENT.len() as u8;
    // 0 arch; 1 not x86_64: to `prog`; 2 nr; 3.. one test each, to the answer; then over
    // the answer; the answer; `prog`.
    let mut out = vec![
        insn(LD_W_ABS, 0, 0, 4),
        insn(JEQ_K, 0, n + 3, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0),
    ];
    for (i, &nr) in ANSWERED_ENOENT.iter().enumerate() {
        out.push(insn(JEQ_K, n - i as u8, 0, nr as u32));
    }
    out.push(insn(JA, 0, 0, 1));
    out.push(insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOENT as u32));
    out.extend(prog);
    out
}

/// Syscalls no thread of a VMM process ever needs, refused process-wide with `EPERM` by an
/// embedder that runs the VMM in a process of its own (inherited by every thread; the
/// vCPU, controller and network threads stack their own allowlists on top).
#[rustfmt::skip]
pub const PROCESS_DENIED: &[libc::c_long] = {
    use libc::*;
    &[
        SYS_execve, SYS_execveat, SYS_ptrace, SYS_mount, SYS_umount2, SYS_pivot_root,
        SYS_chroot, SYS_setns, SYS_unshare, SYS_open_by_handle_at, SYS_name_to_handle_at,
        SYS_kexec_load, SYS_kexec_file_load, SYS_init_module, SYS_finit_module,
        SYS_delete_module, SYS_bpf, SYS_perf_event_open, SYS_keyctl, SYS_add_key,
        SYS_request_key, SYS_userfaultfd, SYS_process_vm_readv, SYS_process_vm_writev,
        SYS_socket, SYS_connect, SYS_bind, SYS_listen, SYS_accept, SYS_accept4, SYS_setuid,
        SYS_setgid, SYS_setreuid, SYS_setregid, SYS_setresuid, SYS_setresgid, SYS_setgroups,
        SYS_capset, SYS_fsopen, SYS_fsmount, SYS_move_mount, SYS_open_tree, SYS_fspick,
        SYS_mount_setattr, SYS_reboot, SYS_swapon, SYS_swapoff, SYS_syslog, SYS_acct,
        SYS_iopl, SYS_ioperm, SYS_quotactl, SYS_settimeofday, SYS_clock_settime,
        SYS_adjtimex, SYS_clock_adjtime, SYS_sethostname, SYS_setdomainname,
        SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register, SYS_pidfd_getfd,
        SYS_kcmp, SYS_fanotify_init, SYS_vhangup, SYS_personality,
    ]
};

/// What such an embedder's own control and report threads may do (anything else `EPERM`): talk on the control socket, sleep,
/// kick vCPU threads, allocate, exit.
#[rustfmt::skip]
pub const CONTROL_ALLOWED: &[libc::c_long] = {
    use libc::*;
    &[
        SYS_recvfrom, SYS_recvmsg, SYS_sendto, SYS_sendmsg, SYS_futex, SYS_nanosleep,
        SYS_clock_nanosleep, SYS_clock_gettime, SYS_tgkill, SYS_getpid, SYS_gettid,
        SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sigaltstack, SYS_mmap, SYS_munmap,
        SYS_mprotect, SYS_madvise, SYS_brk, SYS_write, SYS_close, SYS_sched_yield,
        SYS_exit, SYS_exit_group, SYS_rseq, SYS_set_robust_list,
        // A snapshot's files arrive as fds: duplicated into owned ones (F_DUPFD_CLOEXEC).
        SYS_fcntl,
    ]
};

/// A program from a bare list of syscalls: `matched` for those listed, `mismatch` for the rest.
pub fn compile_list(
    list: &[libc::c_long],
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, BackendError> {
    let rules = list.iter().map(|&nr| (nr, Vec::new())).collect();
    SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)?.try_into()
}

/// [`PROCESS_DENIED`] → `EPERM`, and so is any `mmap`, `mprotect` or `pkey_mprotect` that
/// asks for `PROT_EXEC` (no thread of a VMM process makes code once it is jailed); the
/// rest allowed.
pub fn compile_process_denylist() -> Result<BpfProgram, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        PROCESS_DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    for nr in [libc::SYS_mmap, libc::SYS_mprotect, libc::SYS_pkey_mprotect] {
        rules.insert(nr, vec![prot_exec_is(true)?]);
    }
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

/// [`CONTROL_ALLOWED`]: listed allowed, the rest → `EPERM`.
pub fn compile_control() -> Result<BpfProgram, BackendError> {
    compile_list(
        CONTROL_ALLOWED,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )
}
