//! `clone3` straight into a cgroup and into (new or existing) namespaces, then `execve`.
//!
//! The child is created with `CLONE_INTO_CGROUP` (it never runs outside its cell) and
//! `CLONE_PIDFD` (we never signal or wait by pid), and with `CLONE_VM | CLONE_VFORK`, as
//! glibc's `posix_spawn`: it runs in auraed's own memory, on a stack of its own, while the
//! calling thread waits for its exec (or its exit), so no page table is copied and no page
//! is copied on write (a fork of auraed copied its whole address space's page tables for
//! every process it started). Between the clone and the exec the child runs only raw
//! syscalls on data prepared before the clone: it may not allocate, lock or write anything
//! of the parent's, and no signal handler of auraed's may run in it (every signal is
//! blocked across the clone; the child resets each handler before it unblocks them). A
//! close-on-exec pipe reports a failed step: no bytes means the exec succeeded.
//!
//! Joining a cell's PID namespace cannot be done by the child itself (`setns(CLONE_NEWPID)`
//! only affects the caller's future children), so [`spawn`] does it on the calling thread:
//! `setns(pidfd, CLONE_NEWPID)` changes that thread's `pid_ns_for_children`, the clone from
//! it is born inside the cell's PID namespace while still being our child (we wait for it
//! and get its exit status), and the thread goes back to auraed's own PID namespace right
//! after (`setns` of the namespace opened once at the first such spawn). A thread that
//! could not go back (the kernel out of memory for its namespace set) is marked: every
//! later spawn from it tries again first and fails rather than start a process in the
//! cell's PID namespace. (This was a short-lived helper thread per spawn: a thread made
//! and joined, its stack mapped and unmapped, for two `setns` calls.)

use std::{
    ffi::{CStr, CString},
    io,
    mem::size_of,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    ptr,
};

use crate::{
    container::{self, ContainerSetup},
    pidfd::Pidfd,
};

/// `CLONE_NEW*` flags, as the kernel spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Namespaces(pub libc::c_int);

impl Namespaces {
    pub const PID: libc::c_int = libc::CLONE_NEWPID;
    pub const MOUNT: libc::c_int = libc::CLONE_NEWNS;
    pub const IPC: libc::c_int = libc::CLONE_NEWIPC;
    pub const UTS: libc::c_int = libc::CLONE_NEWUTS;
    pub const NET: libc::c_int = libc::CLONE_NEWNET;
    pub const CGROUP: libc::c_int = libc::CLONE_NEWCGROUP;
    pub const USER: libc::c_int = libc::CLONE_NEWUSER;

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What to execute.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// `execve(path, …)`, resolved in the child's mount namespace.
    Path(&'a CStr),
    /// `execveat(fd, "", …, AT_EMPTY_PATH)`: a sealed memfd of our own binary.
    Fd(RawFd),
}

/// Everything the child needs, prepared before the clone.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub program: Program<'a>,
    pub argv: &'a [CString],
    pub envp: &'a [CString],
    pub cwd: Option<&'a CStr>,
    /// Run as this uid/gid (real, effective and saved). Must be a real id (not
    /// `u32::MAX`, which set*id reads as "unchanged"): [`spawn`] refuses anything above
    /// `i32::MAX`. After the change the child checks the result and aborts the exec
    /// unless it holds exactly these ids and no supplementary groups.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `PR_SET_NO_NEW_PRIVS` before the exec: setuid/setgid bits and file capabilities
    /// of the program grant nothing.
    pub no_new_privs: bool,
    /// Become fds 0, 1, 2 of the child.
    pub stdio: [RawFd; 3],
    /// Start a session (`setsid`) and take fd 0, a terminal's slave side, as its
    /// controlling terminal (`TIOCSCTTY`): an interactive shell's job control and
    /// `/dev/tty` then work.
    pub controlling_terminal: bool,
    /// Becomes fd 3 of the child (e.g. a readiness pipe).
    pub pass_fd: Option<RawFd>,
    /// cgroup v2 directory to be born in (`CLONE_INTO_CGROUP`).
    pub cgroup: Option<RawFd>,
    /// New namespaces to create at clone time.
    pub new_namespaces: Namespaces,
    /// Be born inside the PID namespace of this pidfd's process (see the module docs).
    pub pid_namespace_of: Option<RawFd>,
    /// In the child, before anything else: `setns(pidfd, flags)` to join a process's
    /// namespaces, then `unshare(unshare)`.
    pub join: Option<(RawFd, Namespaces)>,
    pub unshare: Namespaces,
    /// Run in a container root (after `join`/`unshare`, which must include a new mount
    /// namespace, or with [`ContainerSetup::enter`] a join of a running container's):
    /// see [`crate::container`]. `program` and `cwd` are then ignored in favour of the
    /// container's.
    pub container: Option<&'a ContainerSetup<'a>>,
    /// With a new `container` (not [`ContainerSetup::enter`]): a socket on which the
    /// child, once the container's root is set up, sends the master side of a new
    /// pseudo-terminal of the container's own devpts (`/dev/pts/ptmx`, `SCM_RIGHTS`), as
    /// runc's console socket; its slave side replaces `stdio` as fds 0, 1 and 2 and
    /// becomes the controlling terminal of a new session (`controlling_terminal` is then
    /// not needed). Inside, the terminal is the container's own (`tty` names it).
    pub console: Option<RawFd>,
}

impl<'a> SpawnRequest<'a> {
    /// A helper process of auraed's own binary (`program`, the sealed copy): in auraed's
    /// own cgroup and namespaces, no environment, `/` as its directory, `no_new_privs`,
    /// `null` as stdio and `pass_fd` at fd 3; nothing else.
    pub fn helper(program: Program<'a>, argv: &'a [CString], null: RawFd, pass_fd: RawFd) -> Self {
        Self {
            program,
            argv,
            envp: &[],
            cwd: Some(c"/"),
            uid: None,
            gid: None,
            no_new_privs: true,
            stdio: [null, null, null],
            controlling_terminal: false,
            pass_fd: Some(pass_fd),
            cgroup: None,
            new_namespaces: Namespaces(0),
            pid_namespace_of: None,
            join: None,
            unshare: Namespaces(0),
            container: None,
            console: None,
        }
    }
}

/// Why a spawn failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Before or during the clone, in the parent.
    #[error("spawn: {0}")]
    Setup(#[source] io::Error),
    /// In the child, at `step` (for a list step, at item `index`), before the exec
    /// completed.
    #[error("{step}: {error}")]
    Child {
        step: Step,
        index: Option<usize>,
        #[source]
        error: io::Error,
    },
}

/// The soft `RLIMIT_NOFILE` children get (0: the parent's). Set once at start by a
/// daemon that raised its own limit; read by the child between clone and exec (a plain
/// load of a static is async-signal-safe).
static CHILD_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Children started from now on get `soft` as their soft open-file limit (capped at the
/// hard limit), whatever the parent's is.
pub fn set_child_nofile_limit(soft: u64) {
    CHILD_NOFILE.store(soft, std::sync::atomic::Ordering::Relaxed);
}

/// Who is at fault when a step of the child fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The request (or the image it names) asks for something that cannot be done: a
    /// program that is not there, a working directory that is a file, an id the kernel
    /// refuses, a symlinked `/proc` in the image.
    Request,
    /// The host cannot do it (a mount, an overlay, a capability the kernel lacks).
    Host,
    /// Neither: a bug or an unexpected kernel answer.
    Internal,
}

/// A step of the child between clone3 and execve, as a failing child reports it (one
/// byte on the error pipe). Typed so callers decide by step and blame, never by text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step(u8);

impl Step {
    pub const SET_GROUPS: Step = Step(5);
    pub const SET_GID: Step = Step(6);
    pub const SET_UID: Step = Step(7);
    pub const CHANGE_DIRECTORY: Step = Step(8);
    pub const EXECUTE: Step = Step(9);
    pub const VERIFY_CREDENTIALS: Step = Step(10);
    pub const CONTAINER_OPEN_VOLUME: Step = container::step_code(1);
    pub const CONTAINER_VOLUME_READ_ONLY: Step = container::step_code(2);
    pub const CONTAINER_CREATE_MOUNT_POINT: Step = container::step_code(5);
    pub const CONTAINER_MOUNT_POINT_NOT_A_DIRECTORY: Step = container::step_code(6);
    pub const CONTAINER_ATTACH_VOLUME: Step = container::step_code(10);
    pub const CONTAINER_MASK_PATH: Step = container::step_code(11);
    pub const CONTAINER_PATH_READ_ONLY: Step = container::step_code(12);
    pub const CONTAINER_ENTER_WORKING_DIRECTORY: Step = container::step_code(15);
    pub const CONTAINER_WORKDIR_OUTSIDE_ROOT: Step = container::finish_code(2);

    pub(crate) const fn from_code(code: u8) -> Self {
        Self(code)
    }

    /// The code the child reports.
    pub fn code(self) -> u8 {
        self.0
    }

    pub fn name(self) -> &'static str {
        STEPS
            .get(usize::from(self.0))
            .copied()
            .or_else(|| container::step_name(self.0))
            .unwrap_or("unknown step")
    }

    /// A step of the container set-up (`aurae_sys::container`).
    pub fn is_container(self) -> bool {
        self.0 >= container::FIRST_STEP
    }

    pub fn blame(self) -> Blame {
        match self {
            Self::SET_GROUPS
            | Self::SET_GID
            | Self::SET_UID
            | Self::CHANGE_DIRECTORY
            | Self::EXECUTE
            | Self::CONTAINER_MOUNT_POINT_NOT_A_DIRECTORY
            | Self::CONTAINER_ENTER_WORKING_DIRECTORY
            | Self::CONTAINER_WORKDIR_OUTSIDE_ROOT => Blame::Request,
            s if s.is_container() => Blame::Host,
            _ => Blame::Internal,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), as the 64-bit flag clone3 takes.
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The child's stack between clone and exec (it runs a few raw syscalls, no allocation);
/// a multiple of 16, so the stack pointer the kernel gives it is aligned as the ABI wants.
const CHILD_STACK: usize = 64 * 1024;

/// The kernel's `struct sigaction` on x86_64 (handler, flags, restorer, mask): all zero is
/// `SIG_DFL` with no flags and nothing masked.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// What the child's entry point is handed (on the parent's stack; the parent waits,
/// `CLONE_VFORK`, until the child no longer uses it).
struct ChildArgs<'a, 'r> {
    req: &'a SpawnRequest<'r>,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    empty: &'a CStr,
    err_w: RawFd,
}

/// The child's entry point: on its own stack, in the parent's memory.
///
/// # Safety
/// Only as the function [`clone3_vfork`] runs in the child, with a `ChildArgs`.
unsafe extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the ChildArgs the parent passed, alive while it waits for us.
    unsafe {
        let a = &*(arg as *const ChildArgs<'_, '_>);
        child(a.req, a.argv, a.envp, a.empty, a.err_w)
    }
}

/// `clone3(args)` whose child runs `entry(arg)` on the stack `args` names (the kernel sets
/// its stack pointer to `stack + stack_size`) and never returns into this frame. Returns
/// the child's pid, or `-errno`.
///
/// # Safety
/// `args` must name a valid, 16-aligned stack that outlives the child's use of it (with
/// `CLONE_VFORK`: until its exec); `entry` must never return and must be safe to run in
/// this address space (see the module's rules).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork(
    args: &CloneArgs,
    entry: unsafe extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: the raw clone3 syscall; in the parent it returns like any syscall (rax, with
    // rcx and r11 clobbered). In the child (rax 0) the code after it runs on the new stack:
    // it clears the frame pointer, calls `entry(arg)` (r12, r13: preserved by the syscall)
    // and traps if that ever returned. Nothing of this frame is used by the child.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") ptr::from_ref(args),
            in("rsi") size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

const STEPS: [&str; 16] = [
    "join namespaces (setns)",
    "unshare namespaces",
    "set up stdio",
    "pass fd",
    "reset signals",
    "set groups",
    "set gid",
    "set uid",
    "change directory",
    "execute",
    "verify credentials",
    "set no_new_privs",
    "set the open-file limit",
    "take the terminal (setsid, TIOCSCTTY)",
    "open a terminal of the container's devpts (/dev/pts/ptmx)",
    "send the terminal's master side (console socket)",
];

/// Layout of `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

#[cfg(not(target_arch = "x86_64"))]
compile_error!("spawn's clone3 trampoline is written for x86_64 only");

/// Makes this process not dumpable (no core dump, no ptrace or `/proc/PID/mem` but by
/// a holder of CAP_SYS_PTRACE): auraed's memory holds keys, and a child between
/// [`spawn`]'s clone and its exec runs in it (and marks it so in any case).
pub fn forbid_dumps() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(|_| ())
}

/// Starts the process described by `req`; returns its pid (in our namespace) and pidfd.
/// The child is ours: reap it through the pidfd (or a reaper that knows it).
pub fn spawn(req: &SpawnRequest<'_>) -> Result<(i32, Pidfd), SpawnError> {
    for id in [req.uid, req.gid].into_iter().flatten() {
        if i32::try_from(id).is_err() {
            return Err(SpawnError::Setup(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{id} is not a real uid/gid (set*id would read it as \"unchanged\")"),
            )));
        }
    }
    back_home().map_err(SpawnError::Setup)?;
    let Some(ns) = req.pid_namespace_of else {
        return spawn_here(req);
    };
    let home = own_pid_namespace().map_err(SpawnError::Setup)?;
    // Put back by `GoBack` however the spawn ends, before anything else can start a
    // process from this thread.
    set_pid_ns_for_children(ns).map_err(SpawnError::Setup)?;
    let _back = GoBack(home);
    spawn_here(req)
}

/// `setns(fd, CLONE_NEWPID)`: changes this thread's `pid_ns_for_children` (where the
/// processes it starts are born) and nothing else — its own PID stays auraed's.
fn set_pid_ns_for_children(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns on an fd with CLONE_NEWPID only: the kernel checks the fd is a PID
    // namespace (or a pidfd) it may enter, and changes only this thread's
    // pid_ns_for_children; no memory of ours is touched.
    if unsafe { libc::setns(fd, libc::CLONE_NEWPID) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the thread's `pid_ns_for_children` back to auraed's own (the fd) when dropped:
/// after the spawn, and also if it unwound. Marks the thread when that fails.
struct GoBack(RawFd);

impl Drop for GoBack {
    fn drop(&mut self) {
        if set_pid_ns_for_children(self.0).is_err() {
            AWAY.with(|a| a.set(true));
        }
    }
}

/// A pidfd of auraed itself, whose active PID namespace (every thread's) is where a
/// thread goes back to after a spawn into a cell's; opened at the first such spawn (a
/// pidfd: no /proc needed).
static OWN_PID_NS: std::sync::OnceLock<Pidfd> = std::sync::OnceLock::new();

fn own_pid_namespace() -> io::Result<RawFd> {
    use std::os::fd::AsRawFd;
    if let Some(fd) = OWN_PID_NS.get() {
        return Ok(fd.as_raw_fd());
    }
    let fd = Pidfd::open(std::process::id().try_into().map_err(io::Error::other)?)?;
    Ok(OWN_PID_NS.get_or_init(|| fd).as_raw_fd())
}

thread_local! {
    /// This thread's `pid_ns_for_children` is still a cell's (going back failed).
    static AWAY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Puts this thread's `pid_ns_for_children` back to auraed's own if a spawn left it in a
/// cell's; an error when it still cannot (no process may be started from it then).
fn back_home() -> io::Result<()> {
    if !AWAY.with(std::cell::Cell::get) {
        return Ok(());
    }
    set_pid_ns_for_children(own_pid_namespace()?).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "this thread could not go back to auraed's PID namespace after a spawn into a cell's: {e}"
            ),
        )
    })?;
    AWAY.with(|a| a.set(false));
    Ok(())
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn spawn_here(req: &SpawnRequest<'_>) -> Result<(i32, Pidfd), SpawnError> {
    // Everything the child touches is prepared here, before the clone.
    let argv: Vec<*const libc::c_char> = req
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = req
        .envp
        .iter()
        .map(|e| e.as_ptr())
        .chain([ptr::null()])
        .collect();
    let empty = c"";
    let mut pipe = [-1 as libc::c_int; 2];
    // SAFETY: `pipe` has room for the two fds pipe2 writes.
    cvt(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }).map_err(SpawnError::Setup)?;
    // SAFETY: pipe2 just returned these two fds; we own them exclusively.
    let (err_r, err_w) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let err_w_raw = pipe[1];

    let mut pidfd: libc::c_int = -1;
    let mut flags = u64::try_from(libc::CLONE_PIDFD | req.new_namespaces.0).unwrap_or(0);
    let mut args = CloneArgs {
        pidfd: ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: u64::try_from(libc::SIGCHLD).unwrap_or(17),
        ..CloneArgs::default()
    };
    if let Some(cg) = req.cgroup {
        flags |= CLONE_INTO_CGROUP;
        args.cgroup =
            u64::try_from(cg).map_err(|_| SpawnError::Setup(io::Error::other("bad cgroup fd")))?;
    }
    // The child's stack: on ours (this thread waits until the child is done with it).
    #[repr(C, align(16))]
    struct Stack([std::mem::MaybeUninit<u8>; CHILD_STACK]);
    let mut stack = Stack([std::mem::MaybeUninit::uninit(); CHILD_STACK]);
    args.flags = flags | u64::try_from(libc::CLONE_VM | libc::CLONE_VFORK).unwrap_or(0);
    args.stack = stack.0.as_mut_ptr() as u64;
    args.stack_size = CHILD_STACK as u64;
    let mut child_args = ChildArgs {
        req,
        argv: &argv,
        envp: &envp,
        empty,
        err_w: err_w_raw,
    };
    // Every signal blocked across the clone: the child inherits the mask and resets every
    // handler before it unblocks them, so none of ours runs in our memory from it.
    // SAFETY: a sigset_t is plain integers: all zeroes is a valid (empty) one.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset/pthread_sigmask on sigset_t values of this frame.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: a valid clone_args naming `stack` (16-aligned, alive until the child's exec:
    // CLONE_VFORK holds this thread until then); `child_entry` never returns and only
    // runs raw syscalls on data prepared above (see `child`).
    let pid = unsafe {
        clone3_vfork(
            &args,
            child_entry,
            ptr::addr_of_mut!(child_args).cast::<libc::c_void>(),
        )
    };
    // SAFETY: restoring this thread's mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    }
    // (Whatever the child's id change did to the dumpable flag of our memory, undone.)
    let _ = forbid_dumps();
    // (The child is done with `stack`: it has exec'd or exited.)
    let _ = &stack;
    if pid < 0 {
        let errno = i32::try_from(-pid).unwrap_or(libc::EINVAL);
        return Err(SpawnError::Setup(io::Error::from_raw_os_error(errno)));
    }
    drop(err_w);
    let pid =
        i32::try_from(pid).map_err(|_| SpawnError::Setup(io::Error::other("pid out of range")))?;
    // SAFETY: CLONE_PIDFD stored a new pidfd (close-on-exec) that we now own.
    let pidfd = Pidfd::from_owned(unsafe { OwnedFd::from_raw_fd(pidfd) });

    let mut report = [0u8; 8];
    let n = read_full(&err_r, &mut report).map_err(SpawnError::Setup)?;
    if n == 0 {
        return Ok((pid, pidfd));
    }
    // The child failed before exec and exits 127 right away: reap it here.
    let _ = pidfd.wait_blocking();
    let step = Step::from_code(report[0]);
    let index = u16::from_ne_bytes([report[1], report[2]]);
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Err(SpawnError::Child {
        step,
        index: (index != u16::MAX).then_some(usize::from(index)),
        error: io::Error::from_raw_os_error(errno),
    })
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reading into the unfilled tail of `buf`, whose length we pass.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r.unsigned_abs();
    }
    Ok(done)
}

/// Reports `step` and errno on the error pipe and exits 127. Async-signal-safe.
///
/// # Safety
/// Only for the child between clone and exec.
unsafe fn fail(err_w: RawFd, step: u8) -> ! {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        fail_at(
            err_w,
            container::Failure {
                step,
                index: u16::MAX,
            },
        )
    }
}

/// [`fail`] with the index of the failing item of a list step.
///
/// # Safety
/// Only for the child between clone and exec.
unsafe fn fail_at(err_w: RawFd, f: container::Failure) -> ! {
    // SAFETY: __errno_location returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    let e = errno.to_ne_bytes();
    let i = f.index.to_ne_bytes();
    let msg = [f.step, i[0], i[1], 0, e[0], e[1], e[2], e[3]];
    // SAFETY: writing 8 bytes from a stack buffer to our pipe; _exit never returns and
    // runs no atexit handlers or destructors.
    unsafe {
        libc::write(err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Whether the calling thread's real, effective and saved uid and gid are `uid` and `gid`
/// (when given) and it has no supplementary groups. Async-signal-safe.
///
/// # Safety
/// Raw syscalls only; callable in the child between clone and exec.
unsafe fn credentials_are(uid: Option<u32>, gid: Option<u32>) -> bool {
    let (mut r, mut e, mut s) = (0u32, 0u32, 0u32);
    // SAFETY: getresuid/getresgid write three ids into the stack variables we pass;
    // getgroups(0, NULL) only returns the count.
    unsafe {
        if let Some(u) = uid
            && (libc::syscall(libc::SYS_getresuid, &mut r, &mut e, &mut s) < 0
                || r != u
                || e != u
                || s != u)
        {
            return false;
        }
        if let Some(g) = gid
            && (libc::syscall(libc::SYS_getresgid, &mut r, &mut e, &mut s) < 0
                || r != g
                || e != g
                || s != g)
        {
            return false;
        }
        libc::syscall(libc::SYS_getgroups, 0, ptr::null_mut::<libc::gid_t>()) == 0
    }
}

/// The child between clone3 and exec. Async-signal-safe: raw syscalls only.
///
/// # Safety
/// Must only run in the freshly cloned child, with pointers prepared by `spawn_here`.
unsafe fn child(
    req: &SpawnRequest<'_>,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    empty: &CStr,
    err_w: RawFd,
) -> ! {
    // SAFETY: every call below is a raw syscall (or an async-signal-safe libc wrapper) on
    // integers and on memory prepared before the clone; on failure `fail` exits.
    unsafe {
        // Every handler back to its default first (ignored signals stay ignored across
        // exec, and Rust ignores SIGPIPE), while all are still blocked: none of auraed's
        // handlers may run here, in auraed's memory. The raw syscall, for all 64: glibc's
        // wrapper refuses the two it keeps for itself (32, 33), which stayed as they were.
        let dfl = KernelSigaction::default();
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    ptr::addr_of!(dfl),
                    ptr::null_mut::<KernelSigaction>(),
                    size_of::<u64>(),
                );
            }
        }
        // Not dumpable: processes already in the cell cannot ptrace us or read our /proc
        // entries while we hold auraed's memory (CVE-2016-9962). With CLONE_VM the flag is
        // the memory's, i.e. auraed's own too (it stays so: see `forbid_dumps`); the
        // exec gives the program a fresh one.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        if let Some((fd, ns)) = req.join
            && libc::setns(fd, ns.0) < 0
        {
            fail(err_w, 0);
        }
        if !req.unshare.is_empty() && libc::unshare(req.unshare.0) < 0 {
            fail(err_w, 1);
        }
        for (target, src) in req.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            if *src == target {
                // Keep it, but clear close-on-exec.
                if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    fail(err_w, 2);
                }
            } else if libc::dup2(*src, target) < 0 {
                fail(err_w, 2);
            }
        }
        if req.controlling_terminal
            && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0)
        {
            fail(err_w, 13);
        }
        if let Some(fd) = req.pass_fd
            && libc::dup2(fd, crate::fd::PASSED_FD) < 0
        {
            fail(err_w, 3);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut()) < 0 {
            fail(err_w, 4);
        }
        if let Some(c) = req.container
            && let Err(f) = container::setup_root(c)
        {
            fail_at(err_w, f);
        }
        if let (Some(sock), Some(c)) = (req.console, req.container)
            && !c.enter
            && let Err(step) = take_console(sock, req.uid)
        {
            fail(err_w, step);
        }
        // Raw syscalls, not glibc's set*id wrappers: those synchronize every thread glibc
        // believes exists (nptl setxid), and after a raw clone3 it still believes in the
        // parent's threads, so the child would wait forever. Supplementary groups are
        // always set explicitly (to none): never inherited from auraed.
        if libc::syscall(libc::SYS_setgroups, 0, ptr::null::<libc::gid_t>()) < 0 {
            fail(err_w, 5);
        }
        if let Some(g) = req.gid
            && libc::syscall(libc::SYS_setresgid, g, g, g) < 0
        {
            fail(err_w, 6);
        }
        if let Some(u) = req.uid
            && libc::syscall(libc::SYS_setresuid, u, u, u) < 0
        {
            fail(err_w, 7);
        }
        // A change of ids sets the memory's dumpable flag to `fs.suid_dumpable` (2 where a
        // core-dump collector runs): the memory is auraed's, so not dumpable again at once.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // Trust nothing: the kernel must report exactly the requested ids.
        if !credentials_are(req.uid, req.gid) {
            *libc::__errno_location() = libc::EPERM;
            fail(err_w, 10);
        }
        if req.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            fail(err_w, 11);
        }
        let nofile = CHILD_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
        if nofile != 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::syscall(libc::SYS_getrlimit, libc::RLIMIT_NOFILE, &mut lim) == 0
                && lim.rlim_cur > nofile
            {
                lim.rlim_cur = nofile.min(lim.rlim_max);
                if libc::syscall(libc::SYS_setrlimit, libc::RLIMIT_NOFILE, &lim) < 0 {
                    fail(err_w, 12);
                }
            }
        }
        if let Some(c) = req.container {
            if let Err(f) = container::finish(c, req.uid.unwrap_or(0) == 0) {
                fail_at(err_w, f);
            }
        } else if let Some(cwd) = req.cwd
            && libc::chdir(cwd.as_ptr()) < 0
        {
            fail(err_w, 8);
        }
        // Nothing but stdio (and the passed fd) crosses the exec; the error pipe stays
        // open until the exec succeeds (it is close-on-exec already).
        let first = if req.pass_fd.is_some() { 4 } else { 3 };
        libc::close_range(
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        );
        if let Some(c) = req.container {
            // A PATH search: try each candidate; stop at the first error other than
            // "not there".
            for p in c.program {
                libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr());
                let e = *libc::__errno_location();
                if e != libc::ENOENT && e != libc::ENOTDIR {
                    break;
                }
            }
            fail(err_w, 9)
        }
        match req.program {
            Program::Path(p) => {
                libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            Program::Fd(fd) => {
                libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    empty.as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
        }
        fail(err_w, 9)
    }
}

/// In the child, inside the container's root: a new pseudo-terminal of its devpts, its
/// slave side as fds 0, 1, 2 and the controlling terminal of a new session, its master
/// side sent on `sock` and closed here. `Err(step)` on failure (errno set).
///
/// # Safety
///
/// Only in the child between clone and exec: raw syscalls on its own fds and on memory
/// on its stack.
unsafe fn take_console(sock: RawFd, uid: Option<u32>) -> Result<(), u8> {
    const OPEN: u8 = 14;
    const SEND: u8 = 15;
    // SAFETY: see the function's contract; every pointer is to a local of this frame.
    unsafe {
        let master = libc::open(
            c"/dev/pts/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        );
        if master < 0 {
            return Err(OPEN);
        }
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK, ptr::addr_of!(unlock)) < 0 {
            return Err(OPEN);
        }
        let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
        if slave < 0 {
            return Err(OPEN);
        }
        // The user it will run as owns its terminal (as runc's fixStdioPermissions): it
        // can open it again by name (`script`, `ttyname`); the group stays devpts's.
        // (u32::MAX: the group left as it is, devpts's `gid=5`.)
        if let Some(owner) = uid
            && libc::fchown(slave, owner, u32::MAX) < 0
        {
            return Err(OPEN);
        }
        for target in 0..3 {
            if libc::dup2(slave, target) < 0 {
                return Err(2);
            }
        }
        if slave > 2 {
            libc::close(slave);
        }
        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(13);
        }
        // One byte and the master side as SCM_RIGHTS.
        let mut byte = [b't'];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut space = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = ptr::addr_of_mut!(iov);
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(ptr::addr_of!(msg));
        if cmsg.is_null() {
            return Err(SEND);
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), master);
        if libc::sendmsg(sock, ptr::addr_of!(msg), libc::MSG_NOSIGNAL) != 1 {
            return Err(SEND);
        }
        libc::close(master);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::pidfd::ExitStatus;

    /// A plain request: `program` with `argv`, stdio on `stdio`, nothing else asked.
    fn request<'a>(program: &'a CStr, argv: &'a [CString], stdio: [RawFd; 3]) -> SpawnRequest<'a> {
        SpawnRequest {
            program: Program::Path(program),
            argv,
            envp: &[],
            cwd: None,
            uid: None,
            gid: None,
            no_new_privs: false,
            stdio,
            controlling_terminal: false,
            pass_fd: None,
            cgroup: None,
            new_namespaces: Namespaces::default(),
            pid_namespace_of: None,
            join: None,
            unshare: Namespaces::default(),
            container: None,
            console: None,
        }
    }

    /// Runs `argv` (stdio on /dev/null) as `uid`/`gid`, and waits.
    fn spawn_wait(
        argv: &[&str],
        cwd: Option<&CStr>,
        uid: Option<u32>,
        gid: Option<u32>,
        no_new_privs: bool,
    ) -> Result<ExitStatus, SpawnError> {
        let argv: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let fd = devnull.as_raw_fd();
        let req = SpawnRequest {
            cwd,
            uid,
            gid,
            no_new_privs,
            ..request(&argv[0], &argv, [fd, fd, fd])
        };
        let (_, pidfd) = spawn(&req)?;
        Ok(pidfd.wait_blocking().unwrap())
    }

    fn run(argv: &[&str], cwd: Option<&CStr>) -> Result<ExitStatus, SpawnError> {
        spawn_wait(argv, cwd, None, None, false)
    }

    fn run_as(
        script: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        no_new_privs: bool,
    ) -> Result<ExitStatus, SpawnError> {
        spawn_wait(&["/bin/sh", "-c", script], None, uid, gid, no_new_privs)
    }

    /// The child runs in our memory until its exec (CLONE_VM): every signal is blocked
    /// across the clone and reset in the child, which starts with no signal blocked or
    /// ignored (this test process ignores SIGPIPE, as Rust does, and blocks SIGUSR2 on
    /// this thread); this thread's mask is its own again afterwards, and many spawns in a
    /// row (one failing before its exec) leave this memory as it was.
    #[test]
    fn the_child_starts_with_default_signals_and_the_parent_keeps_its_mask() {
        // SAFETY: signal-mask calls on sigset_t values of this frame.
        let before = unsafe {
            let mut usr2: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut usr2);
            libc::sigaddset(&mut usr2, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &usr2, ptr::null_mut());
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, ptr::null(), &mut now);
            now
        };
        let marker = vec![0x5au8; 4096];
        for i in 0..20 {
            let (r, w) = std::io::pipe().unwrap();
            let devnull = std::fs::File::open("/dev/null").unwrap();
            let script = "grep -E '^(SigBlk|SigIgn)' /proc/self/status";
            let argv: Vec<CString> = ["/bin/sh", "-c", script]
                .iter()
                .map(|a| CString::new(*a).unwrap())
                .collect();
            let missing = [CString::new("/nonexistent/program").unwrap()];
            let program = if i == 7 { &missing[0] } else { &argv[0] };
            let req = request(
                program,
                &argv,
                [devnull.as_raw_fd(), w.as_raw_fd(), devnull.as_raw_fd()],
            );
            let spawned = spawn(&req);
            drop(w);
            if i == 7 {
                match spawned {
                    Err(SpawnError::Child { error, .. }) => {
                        assert_eq!(error.raw_os_error(), Some(libc::ENOENT));
                    }
                    other => panic!("{other:?}"),
                }
                continue;
            }
            let (_, pidfd) = spawned.unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut &r, &mut out).unwrap();
            assert_eq!(pidfd.wait_blocking().unwrap(), ExitStatus::Code(0));
            assert_eq!(
                out, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
                "the child's signals"
            );
        }
        // SAFETY: as above.
        let after = unsafe {
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, ptr::null(), &mut now);
            now
        };
        for sig in 1..libc::SIGRTMAX() {
            // SAFETY: sigismember on the two sets read above.
            let (b, a) = unsafe {
                (
                    libc::sigismember(&before, sig),
                    libc::sigismember(&after, sig),
                )
            };
            assert_eq!(b, a, "signal {sig} in this thread's mask");
        }
        assert!(marker.iter().all(|b| *b == 0x5a));
    }

    /// uid/gid 4294967295 is "-1" to set*id: the child would keep our uid 0.
    #[test]
    fn ids_that_mean_unchanged_are_refused() {
        for (uid, gid) in [
            (Some(u32::MAX), None),
            (None, Some(u32::MAX)),
            (Some(1 << 31), Some(1000)),
            (Some(1000), Some(u32::MAX)),
        ] {
            match run_as("exit 0", uid, gid, false) {
                Err(SpawnError::Setup(e)) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{uid:?} {gid:?}")
                }
                other => panic!("{uid:?}/{gid:?} must be refused, got {other:?}"),
            }
        }
    }

    /// The child runs with exactly the ids asked for, no supplementary groups, and
    /// no_new_privs when asked.
    #[test]
    fn credentials_groups_and_no_new_privs() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP credentials_groups_and_no_new_privs: needs root to change uid");
            return;
        }
        let check = "[ \"$(id -u)\" = 65534 ] && [ \"$(id -g)\" = 65533 ] \
            && grep -q '^Uid:\t65534\t65534\t65534' /proc/self/status \
            && grep -q '^Gid:\t65533\t65533\t65533' /proc/self/status \
            && grep -qx 'Groups:[[:space:]]*' /proc/self/status";
        assert_eq!(
            run_as(
                &format!("{check} && grep -q '^NoNewPrivs:\t1' /proc/self/status"),
                Some(65534),
                Some(65533),
                true
            )
            .unwrap(),
            ExitStatus::Code(0)
        );
        assert_eq!(
            run_as(
                &format!("{check} && grep -q '^NoNewPrivs:\t0' /proc/self/status"),
                Some(65534),
                Some(65533),
                false
            )
            .unwrap(),
            ExitStatus::Code(0)
        );
    }

    #[test]
    fn exit_codes_and_exec_errors() {
        assert_eq!(run(&["/bin/true"], None).unwrap(), ExitStatus::Code(0));
        assert_eq!(
            run(&["/bin/sh", "-c", "exit 7"], None).unwrap(),
            ExitStatus::Code(7)
        );
        assert_eq!(
            run(&["/bin/sh", "-c", "kill -9 $$"], None).unwrap(),
            ExitStatus::Signal(9)
        );
        match run(&["/nonexistent/binary"], None) {
            Err(SpawnError::Child { step, error, .. }) => {
                assert_eq!(step, Step::EXECUTE);
                assert_eq!(step.blame(), Blame::Request);
                assert_eq!(error.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an exec error, got {other:?}"),
        }
        match run(&["/bin/true"], Some(c"/nonexistent-dir")) {
            Err(SpawnError::Child { step, .. }) => {
                assert_eq!(step, Step::CHANGE_DIRECTORY);
                assert_eq!(step.name(), "change directory");
            }
            other => panic!("expected a chdir error, got {other:?}"),
        }
    }

    /// `echo $$` spawned with `pid_namespace_of`: its pid as it sees it.
    fn own_pid_seen(pid_namespace_of: Option<RawFd>) -> (i32, String) {
        let argv: Vec<CString> = ["/bin/sh", "-c", "echo $$"]
            .iter()
            .map(|a| CString::new(*a).unwrap())
            .collect();
        let (r, w) = std::io::pipe().unwrap();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let req = SpawnRequest {
            pid_namespace_of,
            ..request(
                &argv[0],
                &argv,
                [devnull.as_raw_fd(), w.as_raw_fd(), devnull.as_raw_fd()],
            )
        };
        let (pid, pidfd) = spawn(&req).unwrap();
        drop(w);
        let out = std::io::read_to_string(r).unwrap();
        assert_eq!(pidfd.wait_blocking().unwrap(), ExitStatus::Code(0));
        (pid, out.trim().to_owned())
    }

    fn link(p: &str) -> String {
        std::fs::read_link(p)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// A spawn into another process's PID namespace is born there, and the calling thread
    /// is back in auraed's own at once: the next spawn from it (without one) is born in
    /// ours. A failed setns leaves the thread as it was; a thread left in a cell's PID
    /// namespace (a failed way back) goes back before its next spawn.
    #[test]
    fn a_spawn_into_a_pid_namespace_leaves_the_thread_in_its_own() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!(
                "SKIP a_spawn_into_a_pid_namespace_leaves_the_thread_in_its_own: needs root for CLONE_NEWPID"
            );
            return;
        }
        let argv: Vec<CString> = ["/bin/sleep", "30"]
            .iter()
            .map(|a| CString::new(*a).unwrap())
            .collect();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let fd = devnull.as_raw_fd();
        let holder = SpawnRequest {
            new_namespaces: Namespaces(Namespaces::PID),
            ..request(&argv[0], &argv, [fd, fd, fd])
        };
        let (_, holder) = spawn(&holder).unwrap();
        let ours = link("/proc/self/ns/pid");
        for _ in 0..3 {
            let (pid, seen) = own_pid_seen(Some(holder.as_raw_fd()));
            assert!(pid > 1);
            assert_ne!(seen, pid.to_string(), "born in the holder's PID namespace");
            assert_eq!(link("/proc/thread-self/ns/pid_for_children"), ours);
            let (pid, seen) = own_pid_seen(None);
            assert_eq!(seen, pid.to_string(), "the next spawn is born in ours");
        }
        // Not a namespace: refused, the thread unchanged.
        let bad = SpawnRequest {
            pid_namespace_of: Some(fd),
            ..request(&argv[0], &argv, [fd, fd, fd])
        };
        assert!(spawn(&bad).is_err());
        assert_eq!(link("/proc/thread-self/ns/pid_for_children"), ours);
        // As if the way back had failed: the next spawn goes back first.
        // SAFETY: setns of this test thread's pid_ns_for_children to the holder's.
        let moved = unsafe { libc::setns(holder.as_raw_fd(), libc::CLONE_NEWPID) };
        assert_eq!(moved, 0);
        AWAY.with(|a| a.set(true));
        let (pid, seen) = own_pid_seen(None);
        assert_eq!(seen, pid.to_string(), "born in ours after going back");
        assert_eq!(link("/proc/thread-self/ns/pid_for_children"), ours);
        holder.send_signal(libc::SIGKILL).unwrap();
        holder.wait_blocking().unwrap();
    }
}
