//! A container's view of the world, set up in the child between `clone3` and `execve`.
//!
//! The child has already joined its cell's namespaces and unshared a mount namespace of
//! its own. `setup_root` then, with raw syscalls on data prepared by auraed:
//! 1. makes every mount private (nothing propagates back to the cell or host);
//! 2. clones the host's six device nodes (null, zero, full, random, urandom, tty) into
//!    detached mounts (`open_tree`), checking each is the character device it should be,
//!    while the host is still visible (the volumes come as detached trees auraed cloned
//!    from the directories and files it checked: [`clone_mount`]);
//! 3. mounts the image root: an overlay of the shared, read-only layer directories with a
//!    private upper directory (lower dirs are named relative to the layer store, so the
//!    options fit in one page);
//! 4. `pivot_root` into it and detaches the old root: from here on, absolute symlinks in
//!    the image resolve inside the container and nothing of the host is reachable;
//! 5. creates missing mount points and refuses any that is a symlink (runc
//!    CVE-2019-19921 class: an image whose `/proc` or `/dev` is a link), then mounts a
//!    fresh `/proc`, a minimal `/dev` (a `nodev` tmpfs with the host's six device nodes
//!    bind-mounted read-only onto empty files, devpts, shm), a
//!    read-only `/sys` (and the cell's cgroup tree, read-only), attaches the volumes, masks
//!    and write-protects the usual kernel paths, and optionally makes `/` read-only;
//! 6. drops every capability outside the kept set from the bounding set and clears the
//!    ambient set.
//!
//! After the uid/gid change `finish` sets the effective/permitted sets (inheritable
//! empty), `no_new_privs`, enters the working directory without following magic links
//! and checks it is inside the root (runc CVE-2024-21626: a leaked fd reached through
//! `/proc/self/fd/N`), and installs the seccomp filters last, just before the exec.

use std::ffi::{CStr, CString};

/// One classic BPF instruction, as `seccomp(2)` takes it.
pub use libc::sock_filter as BpfInstruction;

/// A host directory or regular file bind-mounted into the container.
#[derive(Debug, Clone)]
pub struct VolumeMount {
    /// A detached mount of the host directory made by [`clone_mount`] from the fd auraed
    /// opened and checked, kept open by auraed until the spawn returns. The child only
    /// attaches it: no host path is resolved after the check, so what auraed checked is
    /// what gets mounted. One fd per volume (the child closes its copy once attached).
    pub source: std::os::fd::RawFd,
    /// Absolute container path; created if missing (a directory, or an empty file for a
    /// file volume). A symlink there is refused, never followed.
    pub target: CString,
    /// The source is a regular file: the target must be (or is created as) a regular
    /// file.
    pub file: bool,
    /// Directories made (if missing) right before it is attached, parents first: its
    /// target's parents (and the target, for a directory). Made then, not before any
    /// mount, so that a path below another mount exists in what that mount shows.
    pub parents: Vec<CString>,
}

/// Clones what `src` is open on (auraed's fd of a volume directory or a VM's file, resolved
/// once and checked), with the mounts below it, into a detached mount tree
/// (`open_tree(src, "", AT_EMPTY_PATH | OPEN_TREE_CLONE | AT_RECURSIVE)`), made nosuid,
/// nodev, private, and read-only with `read_only`. Runs in auraed: a mount can only be
/// cloned or bound from its own mount namespace (a container's child or a VMM has one of
/// its own by the time it mounts), while a detached tree can be attached in any
/// (`move_mount`, or `MS_MOVE` from its `/proc/self/fd` link).
pub fn clone_mount(
    src: std::os::fd::BorrowedFd<'_>,
    read_only: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: open_tree on a borrowed, open fd with an empty NUL-terminated path; it
    // returns a new fd or -1 and touches no memory of ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            src.as_raw_fd(),
            c"".as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint) as libc::c_ulong
                | (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: open_tree just returned this fd; nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    if read_only {
        attr.attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_setattr on the tree we own, an empty path, and a mount_attr on our
    // stack of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// Most volumes per container (their detached mounts are kept in a fixed array: the
/// child may not allocate).
pub const MAX_VOLUMES: usize = 32;

/// Everything the child needs to build the container's root, prepared before the clone.
#[derive(Debug)]
pub struct ContainerSetup<'a> {
    /// The layer store directory; the overlay's lower dirs are relative to it.
    pub layers_dir: &'a CStr,
    /// Overlay options: `lowerdir=<top>:…:<bottom>,upperdir=<abs>,workdir=<abs>`.
    pub overlay_options: &'a CStr,
    /// An empty directory the overlay is mounted on; it becomes `/`.
    pub rootfs: &'a CStr,
    pub volumes: &'a [VolumeMount],
    /// Directories created (0755, when missing) after the pivot, in order: mount points
    /// and the working directory with their parents.
    pub mkdirs: &'a [CString],
    /// Mount the cell's cgroup tree read-only at `/sys/fs/cgroup` (the cell has its own
    /// cgroup namespace).
    pub mount_cgroup: bool,
    /// Paths hidden: `/dev/null` over files, an empty read-only tmpfs over directories.
    pub masked: &'a [CString],
    /// Paths made read-only.
    pub read_only_paths: &'a [CString],
    pub read_only_root: bool,
    /// Where the overlay's upper layer lives when it is not a directory on the host's
    /// disk (a read-only root): see [`UpperInMemory`].
    pub upper_in_memory: Option<UpperInMemory<'a>>,
    /// The working directory (absolute, normalised).
    pub workdir: &'a CStr,
    /// Capabilities kept (bit n = capability n) in the bounding, permitted and effective
    /// sets; everything else is dropped. The inheritable and ambient sets are emptied.
    pub capabilities: u64,
    /// Seccomp filters, installed in order just before the exec.
    pub seccomp: &'a [Vec<BpfInstruction>],
    /// Paths tried in order for the program (a PATH search done without allocating).
    pub program: &'a [CString],
    /// Enter a running container instead of building one (an exec into it): the child has
    /// joined (`SpawnRequest::join`) the namespaces of a process of that container, mount
    /// namespace included, so its root already is the container's. Steps 1–5 are skipped
    /// (the mount fields are ignored); step 6 and `finish` run as for a new container:
    /// the same capability sets, `no_new_privs`, working directory and seccomp filters.
    pub enter: bool,
}

/// A read-only root's upper layer, kept in memory: a small tmpfs mounted on
/// `mount_point` in the child's own mount namespace (the host never sees it), with the
/// overlay's `upper` and `work` directories (named in the overlay options) and the
/// overlay's mount point ([`ContainerSetup::rootfs`]) made in it. It
/// takes only what the set-up makes before the root turns read-only — mount points, the
/// working directory — and goes with the container's mount namespace: nothing of it is
/// written to the host's disk or left there, and the overlay's unmount has no upper
/// filesystem to sync.
#[derive(Debug, Clone, Copy)]
pub struct UpperInMemory<'a> {
    pub mount_point: &'a CStr,
    pub upper: &'a CStr,
    pub work: &'a CStr,
}

/// The in-memory upper layer's tmpfs: room for mount points and a working directory, not
/// for files (the root is read-only once set up).
const UPPER_IN_MEMORY_OPTIONS: &CStr = c"size=1m,nr_inodes=4096,mode=0755";

/// Steps of the container set-up, as reported by a failing child.
pub const STEPS: [&str; 19] = [
    "container: make mounts private",
    "container: open volume source",
    "container: make volume read-only",
    "container: mount the image root (overlay)",
    "container: pivot_root into the image root",
    "container: create mount point",
    "container: mount point is not a directory (a symlink in the image?)",
    "container: mount /proc",
    "container: mount /dev",
    "container: mount /sys",
    "container: attach volume",
    "container: mask path",
    "container: make path read-only",
    "container: make the root read-only",
    "container: drop capabilities",
    "container: enter the working directory",
    "container: clone host device node",
    "container: host device node is not the expected character device",
    "container: attach device node",
];

/// First step number of [`STEPS`] in the child's report (spawn's own steps come first).
pub const FIRST_STEP: u8 = 32;
/// Steps of `finish`, reported after [`STEPS`].
pub const FINISH_STEPS: [&str; 4] = [
    "container: set capabilities",
    "container: set no_new_privs",
    "container: working directory is outside the root",
    "container: install seccomp filter",
];

const NO_INDEX: u16 = u16::MAX;

/// What failed in the child: a step and, for list steps, which item.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure {
    pub step: u8,
    pub index: u16,
}

fn at(step: usize, index: usize) -> Failure {
    Failure {
        step: FIRST_STEP + step as u8,
        index: u16::try_from(index).unwrap_or(NO_INDEX),
    }
}

fn step(step: usize) -> Failure {
    Failure {
        step: FIRST_STEP + step as u8,
        index: NO_INDEX,
    }
}

/// The step code of [`STEPS`]`[i]`.
pub(crate) const fn step_code(i: u8) -> crate::spawn::Step {
    crate::spawn::Step::from_code(FIRST_STEP + i)
}

/// The step code of [`FINISH_STEPS`]`[i]`.
pub(crate) const fn finish_code(i: u8) -> crate::spawn::Step {
    crate::spawn::Step::from_code(FIRST_STEP + STEPS.len() as u8 + i)
}

/// Resolves a reported step number (and index) to its name, for [`crate::SpawnError`].
pub(crate) fn step_name(n: u8) -> Option<&'static str> {
    let i = usize::from(n.checked_sub(FIRST_STEP)?);
    match i.checked_sub(STEPS.len()) {
        None => STEPS.get(i).copied(),
        Some(j) => FINISH_STEPS.get(j).copied(),
    }
}

fn errno_is(e: libc::c_int) -> bool {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() == e }
}

/// `mount(2)` with C strings; null for `None`.
///
/// # Safety
/// Only with valid C strings (they are, being `&CStr`).
unsafe fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> bool {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string or null, as mount(2) expects.
    unsafe {
        libc::mount(
            p(src),
            target.as_ptr(),
            p(fstype),
            flags,
            p(data).cast::<libc::c_void>(),
        ) == 0
    }
}

/// Opens `path` as a directory without following a final symlink; -1 if it is not one.
fn open_dir_nofollow(path: &CStr) -> libc::c_int {
    // SAFETY: open(2) on a NUL-terminated path; the fd is close-on-exec and closed by the
    // caller.
    unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    }
}

/// Opens `path` (absolute, a path in the container) from the container's root `root`:
/// symlinks are followed only inside the root (`RESOLVE_IN_ROOT`: an absolute one is read
/// from the root) and never through a magic link (`RESOLVE_NO_MAGICLINKS`:
/// `/proc/<pid>/root` or `/proc/self/fd/N` would reach the host's tree, or a directory of
/// auraed's). Returns a close-on-exec fd or -1 (errno set).
///
/// # Safety
/// In the child between clone and exec: a raw syscall on a stack struct.
unsafe fn open_in_root(
    root: libc::c_int,
    path: &CStr,
    flags: libc::c_int,
    mode: u64,
) -> libc::c_int {
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a NUL-terminated path and an open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<OpenHow>(),
        )
    };
    libc::c_int::try_from(fd).unwrap_or(-1)
}

/// Makes the missing ones of `dirs` (absolute, each the previous one's child, parents
/// first), each with `mkdirat` in its parent as resolved from `root` (see
/// [`open_in_root`]): nothing is made outside the container's root, whatever symlinks
/// its image or a directory shared with another container holds.
///
/// # Safety
/// In the child between clone and exec, after the pivot: raw syscalls on its own fds.
unsafe fn make_dirs_in_root(root: libc::c_int, dirs: &[CString]) -> bool {
    const DIR: libc::c_int = libc::O_PATH | libc::O_DIRECTORY;
    let mut parent = -1;
    // SAFETY: see the function's contract; `name` points into `d`'s own NUL-terminated
    // buffer, after its last '/'.
    unsafe {
        for d in dirs {
            let mut fd = open_in_root(root, d, DIR, 0);
            if fd < 0 && errno_is(libc::ENOENT) {
                let bytes = d.to_bytes();
                let slash = bytes.iter().rposition(|b| *b == b'/').unwrap_or(0);
                let name = d.as_ptr().add(slash + 1);
                let at = if parent < 0 { root } else { parent };
                if libc::mkdirat(at, name, 0o755) == 0 || errno_is(libc::EEXIST) {
                    fd = open_in_root(root, d, DIR, 0);
                }
            }
            if parent >= 0 {
                libc::close(parent);
            }
            if fd < 0 {
                return false;
            }
            parent = fd;
        }
        if parent >= 0 {
            libc::close(parent);
        }
    }
    true
}

/// The mount point of a file volume, from the container's root `root` (see
/// [`open_in_root`]): an existing regular file or a new empty one (0644), never a symlink
/// (`O_NOFOLLOW`), FIFO, socket or device (non-blocking open, then `fstat`). Returns a
/// close-on-exec fd or -1 (errno set).
fn open_file_target(root: libc::c_int, path: &CStr) -> libc::c_int {
    // SAFETY: openat2 on a NUL-terminated path and fstat(2) into a stack struct; the fd is
    // closed here on refusal, else by the caller.
    unsafe {
        let fd = open_in_root(
            root,
            path,
            libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0o644,
        );
        if fd < 0 {
            return fd;
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) < 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            libc::close(fd);
            *libc::__errno_location() = libc::EINVAL;
            return -1;
        }
        fd
    }
}

/// Refuses a mount point that is not a real directory.
fn check_dir(path: &CStr) -> bool {
    let fd = open_dir_nofollow(path);
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the fd we just opened.
    unsafe { libc::close(fd) };
    true
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// Device nodes of the minimal `/dev`: (path, major, minor). The same path on the host
/// is the source of each (see [`clone_devices`]); the cell's device filter
/// (`crate::bpf::DEFAULT_DEVICES`) allows exactly these, plus the pseudo-terminals.
const DEVICES: [(&CStr, u32, u32); 6] = [
    (c"/dev/null", 1, 3),
    (c"/dev/zero", 1, 5),
    (c"/dev/full", 1, 7),
    (c"/dev/random", 1, 8),
    (c"/dev/urandom", 1, 9),
    (c"/dev/tty", 5, 0),
];

const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
    (c"pts/ptmx", c"/dev/ptmx"),
];

/// Builds the container's root (steps 1–6 of the module docs). Runs in the child, as
/// root, before the uid/gid change.
///
/// # Safety
/// Only in the freshly cloned child (async-signal-safe: raw syscalls on prepared data).
pub(crate) unsafe fn setup_root(c: &ContainerSetup<'_>) -> Result<(), Failure> {
    if c.enter {
        // SAFETY: as for the whole function (umask and raw prctl calls only).
        return unsafe {
            libc::umask(0o022);
            drop_capabilities(c)
        };
    }
    // SAFETY: raw syscalls on integers, stack values and the prepared C strings of `c`.
    unsafe {
        libc::umask(0o022);
        if !mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None) {
            return Err(step(0));
        }
        // The host's device nodes, taken while the host is visible (attached in `setup_dev`).
        let mut devices = [-1 as libc::c_int; DEVICES.len()];
        clone_devices(&mut devices)?;
        // Volumes: detached trees auraed cloned (`clone_mount`) from the directories it
        // checked; attached after the pivot. Nothing is resolved by a host path here.
        if c.volumes.len() > MAX_VOLUMES {
            *libc::__errno_location() = libc::E2BIG;
            return Err(step(1));
        }
        // A read-only root's upper layer, in memory (reported as the overlay's step).
        if let Some(u) = &c.upper_in_memory
            && (!mount(
                Some(c"tmpfs"),
                u.mount_point,
                Some(c"tmpfs"),
                NOSUID | NODEV,
                Some(UPPER_IN_MEMORY_OPTIONS),
            ) || libc::mkdir(u.upper.as_ptr(), 0o755) < 0
                || libc::mkdir(u.work.as_ptr(), 0o755) < 0
                || libc::mkdir(c.rootfs.as_ptr(), 0o755) < 0)
        {
            return Err(step(3));
        }
        // The image root. Relative lower dirs resolve against our working directory.
        if libc::chdir(c.layers_dir.as_ptr()) < 0
            || !mount(
                Some(c"overlay"),
                c.rootfs,
                Some(c"overlay"),
                NODEV,
                Some(c.overlay_options),
            )
        {
            return Err(step(3));
        }
        // pivot_root(".", "."): the old root ends up stacked under the new one; detach it.
        if libc::chdir(c.rootfs.as_ptr()) < 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) < 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) < 0
            || libc::chdir(c"/".as_ptr()) < 0
        {
            return Err(step(4));
        }
        for (i, d) in c.mkdirs.iter().enumerate() {
            if libc::mkdir(d.as_ptr(), 0o755) < 0 && !errno_is(libc::EEXIST) {
                return Err(at(5, i));
            }
        }
        for (i, d) in [c"/proc", c"/dev", c"/sys"].iter().enumerate() {
            if !check_dir(d) {
                return Err(at(6, i));
            }
        }
        if !mount(
            Some(c"proc"),
            c"/proc",
            Some(c"proc"),
            NOSUID | NODEV | NOEXEC,
            None,
        ) {
            return Err(step(7));
        }
        setup_dev(&devices)?;
        if !mount(
            Some(c"sysfs"),
            c"/sys",
            Some(c"sysfs"),
            NOSUID | NODEV | NOEXEC | libc::MS_RDONLY,
            None,
        ) {
            return Err(step(9));
        }
        if c.mount_cgroup
            && !mount(
                Some(c"cgroup2"),
                c"/sys/fs/cgroup",
                Some(c"cgroup2"),
                NOSUID | NODEV | NOEXEC | libc::MS_RDONLY,
                None,
            )
        {
            return Err(step(9));
        }
        // Mount points are made and opened from the new root only (see `open_in_root`):
        // /proc is mounted by now, and a symlink to /proc/1/root/… (in the image, or left
        // in a directory shared with another container) would otherwise reach the host.
        let root = libc::open(
            c"/".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if root < 0 {
            return Err(step(10));
        }
        for (i, v) in c.volumes.iter().enumerate() {
            let target = if !make_dirs_in_root(root, &v.parents) {
                -1
            } else if v.file {
                open_file_target(root, &v.target)
            } else {
                open_in_root(
                    root,
                    &v.target,
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
                    0,
                )
            };
            if target < 0 {
                libc::close(root);
                return Err(at(10, i));
            }
            let r = libc::syscall(
                libc::SYS_move_mount,
                v.source,
                c"".as_ptr(),
                target,
                c"".as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            );
            libc::close(target);
            // Our copy of the fd table (no CLONE_FILES): auraed's stays open.
            libc::close(v.source);
            if r < 0 {
                libc::close(root);
                return Err(at(10, i));
            }
        }
        libc::close(root);
        for (i, p) in c.masked.iter().enumerate() {
            mask(p).map_err(|()| at(11, i))?;
        }
        for (i, p) in c.read_only_paths.iter().enumerate() {
            if !mount(Some(p), p, None, libc::MS_BIND | libc::MS_REC, None) {
                if errno_is(libc::ENOENT) {
                    continue;
                }
                return Err(at(12, i));
            }
            if !mount(
                None,
                p,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
                None,
            ) {
                return Err(at(12, i));
            }
        }
        if c.read_only_root
            && !mount(
                None,
                c"/",
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | NODEV,
                None,
            )
        {
            return Err(step(13));
        }
        drop_capabilities(c)
    }
}

/// Step 6: every capability outside the kept set leaves the bounding set; the ambient set
/// is cleared.
///
/// # Safety
/// Child only (raw syscalls).
unsafe fn drop_capabilities(c: &ContainerSetup<'_>) -> Result<(), Failure> {
    // SAFETY: raw prctl calls on integers.
    unsafe {
        for cap in 0..64u32 {
            if c.capabilities & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && !errno_is(libc::EINVAL)
            {
                return Err(step(14));
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return Err(step(14));
        }
        Ok(())
    }
}

/// Whether `st` is the character device `major:minor`.
fn is_char_device(st: &libc::stat, major: u32, minor: u32) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(major, minor)
}

/// Clones the host's [`DEVICES`] into detached mounts, one per node (`open_tree`, a final
/// symlink not followed), and refuses any that is not the character device it should be:
/// a host `/dev/null` that is a regular file, a symlink or another device would otherwise
/// be mounted writable into the container (the runc CVE-2025-31133 class). Each clone is
/// made read-only, nosuid and noexec: a container root cannot chmod or chown the host's
/// node through it, and reads and writes of a character device do not need a writable
/// mount.
///
/// # Safety
/// Child only (raw syscalls, before the pivot).
unsafe fn clone_devices(trees: &mut [libc::c_int; DEVICES.len()]) -> Result<(), Failure> {
    // SAFETY: raw syscalls on static C strings, stack values and fds we own.
    unsafe {
        for (i, (path, major, minor)) in DEVICES.iter().enumerate() {
            let fd = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                path.as_ptr(),
                (libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint) as libc::c_ulong
                    | libc::AT_SYMLINK_NOFOLLOW as libc::c_ulong,
            );
            if fd < 0 {
                return Err(at(16, i));
            }
            trees[i] = fd as libc::c_int;
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(trees[i], &mut st) < 0 {
                return Err(at(16, i));
            }
            if !is_char_device(&st, *major, *minor) {
                *libc::__errno_location() = libc::ENODEV;
                return Err(at(17, i));
            }
            let attr = libc::mount_attr {
                attr_set: libc::MOUNT_ATTR_RDONLY
                    | libc::MOUNT_ATTR_NOSUID
                    | libc::MOUNT_ATTR_NOEXEC,
                attr_clr: 0,
                propagation: libc::MS_PRIVATE,
                userns_fd: 0,
            };
            if libc::syscall(
                libc::SYS_mount_setattr,
                trees[i],
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                std::ptr::addr_of!(attr),
                std::mem::size_of::<libc::mount_attr>(),
            ) < 0
            {
                return Err(at(16, i));
            }
        }
        Ok(())
    }
}

/// The minimal `/dev`: a small `nodev` tmpfs (no node made in it could ever be opened),
/// the host's [`DEVICES`] cloned by [`clone_devices`] attached onto empty files, devpts,
/// shm and the usual links.
///
/// # Safety
/// Child only (raw syscalls); `devices` holds the detached mounts of [`clone_devices`].
unsafe fn setup_dev(devices: &[libc::c_int; DEVICES.len()]) -> Result<(), Failure> {
    // SAFETY: raw syscalls on static C strings and the fds of `devices`, which we own.
    unsafe {
        if !mount(
            Some(c"tmpfs"),
            c"/dev",
            Some(c"tmpfs"),
            NOSUID | NODEV | NOEXEC | libc::MS_STRICTATIME,
            Some(c"mode=755,size=65536k"),
        ) {
            return Err(step(8));
        }
        for (i, (path, _, _)) in DEVICES.iter().enumerate() {
            // A fresh, empty file of the fresh tmpfs: nothing to follow, nothing to race.
            let target = libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o666 as libc::c_uint,
            );
            if target < 0 {
                return Err(at(18, i));
            }
            let r = libc::syscall(
                libc::SYS_move_mount,
                devices[i],
                c"".as_ptr(),
                target,
                c"".as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            );
            libc::close(target);
            libc::close(devices[i]);
            if r < 0 {
                return Err(at(18, i));
            }
        }
        for d in [c"/dev/pts", c"/dev/shm"] {
            if libc::mkdir(d.as_ptr(), 0o755) < 0 {
                return Err(step(8));
            }
        }
        if !mount(
            Some(c"devpts"),
            c"/dev/pts",
            Some(c"devpts"),
            NOSUID | NOEXEC,
            Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5,max=64"),
        ) || !mount(
            Some(c"shm"),
            c"/dev/shm",
            Some(c"tmpfs"),
            NOSUID | NODEV | NOEXEC,
            Some(c"mode=1777,size=65536k"),
        ) {
            return Err(step(8));
        }
        for (target, link) in DEV_LINKS {
            if libc::symlink(target.as_ptr(), link.as_ptr()) < 0 {
                return Err(step(8));
            }
        }
        Ok(())
    }
}

/// Hides `p`: `/dev/null` over a file, an empty read-only tmpfs over a directory; a
/// missing path is fine.
///
/// # Safety
/// Child only (raw syscalls).
unsafe fn mask(p: &CStr) -> Result<(), ()> {
    // SAFETY: raw syscalls on a prepared C string and a stack stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(p.as_ptr(), &mut st) < 0 {
            return if errno_is(libc::ENOENT) {
                Ok(())
            } else {
                Err(())
            };
        }
        let ok = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            mount(
                Some(c"tmpfs"),
                p,
                Some(c"tmpfs"),
                libc::MS_RDONLY | NOSUID | NODEV | NOEXEC,
                Some(c"size=0"),
            )
        } else {
            mount(Some(c"/dev/null"), p, None, libc::MS_BIND, None)
        };
        if ok { Ok(()) } else { Err(()) }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// After the uid/gid change: capabilities, `no_new_privs`, working directory, seccomp.
/// `root`: the process runs as uid 0 (keeps the kept set; others keep nothing).
///
/// # Safety
/// Child only (raw syscalls).
pub(crate) unsafe fn finish(c: &ContainerSetup<'_>, root: bool) -> Result<(), Failure> {
    let fin = |i: usize| Failure {
        step: FIRST_STEP + (STEPS.len() + i) as u8,
        index: NO_INDEX,
    };
    // SAFETY: raw syscalls on stack values and the prepared data of `c`.
    unsafe {
        let keep = if root { c.capabilities } else { 0 };
        let lo = (keep & 0xffff_ffff) as u32;
        let hi = (keep >> 32) as u32;
        let mut hdr = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [
            CapData {
                effective: lo,
                permitted: lo,
                inheritable: 0,
            },
            CapData {
                effective: hi,
                permitted: hi,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, std::ptr::addr_of_mut!(hdr), data.as_ptr()) < 0 {
            return Err(fin(0));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(fin(1));
        }
        // Never through a magic link (/proc/self/fd/N would reach a host directory fd we
        // still hold until exec), never outside the root.
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        let root_fd = libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
        if root_fd < 0 {
            return Err(step(15));
        }
        let fd = libc::syscall(
            libc::SYS_openat2,
            root_fd,
            c.workdir.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<OpenHow>(),
        );
        libc::close(root_fd);
        if fd < 0 {
            return Err(step(15));
        }
        let r = libc::fchdir(fd as libc::c_int);
        libc::close(fd as libc::c_int);
        if r < 0 {
            return Err(step(15));
        }
        let mut buf = [0u8; 256];
        let n = libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len());
        // A path that does not start with '/' ("(unreachable)/…") is outside our root.
        if n >= 0 && buf[0] != b'/' {
            *libc::__errno_location() = libc::EPERM;
            return Err(fin(2));
        }
        for f in c.seccomp {
            let prog = libc::sock_fprog {
                len: f.len() as libc::c_ushort,
                filter: f.as_ptr().cast_mut(),
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                std::ptr::addr_of!(prog),
            ) < 0
            {
                return Err(fin(3));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use std::ffi::CString;

    use super::*;

    fn lstat(p: &std::path::Path) -> libc::stat {
        let c = CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: lstat on a NUL-terminated path into a zeroed stat buffer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::lstat(c.as_ptr(), &mut st), 0, "{}", p.display());
            st
        }
    }

    #[test]
    fn only_the_expected_character_device_is_accepted_as_a_host_node() {
        for (path, major, minor) in DEVICES {
            let p = std::path::Path::new(path.to_str().unwrap());
            if p.exists() {
                assert!(is_char_device(&lstat(p), major, minor), "{}", p.display());
            }
        }
        let null = lstat("/dev/null".as_ref());
        assert!(!is_char_device(&null, 1, 5), "/dev/null is not /dev/zero");
        // A regular file or a symlink standing in for /dev/null (CVE-2025-31133 class).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("link")).unwrap();
        assert!(!is_char_device(&lstat(&dir.path().join("file")), 1, 3));
        assert!(!is_char_device(&lstat(&dir.path().join("link")), 1, 3));
        assert!(!is_char_device(&lstat(dir.path()), 1, 3));
    }

    #[test]
    fn every_step_has_a_name() {
        for i in 0..STEPS.len() + FINISH_STEPS.len() {
            assert!(step_name(FIRST_STEP + i as u8).is_some(), "step {i}");
        }
        assert_eq!(
            step_name(FIRST_STEP + 16),
            Some("container: clone host device node")
        );
        assert_eq!(
            step_name(FIRST_STEP + STEPS.len() as u8),
            Some(FINISH_STEPS[0])
        );
        assert_eq!(
            step_name(FIRST_STEP + (STEPS.len() + FINISH_STEPS.len()) as u8),
            None
        );
    }
}
