//! Containers: processes of a cell whose root filesystem is an OCI image.
//!
//! A container is an executable of its cell (same status, logs, events, stop and free),
//! started with three more things:
//! - a root: an overlay of the image's shared, read-only layer directories with a private
//!   upper directory under `<state>/containers/<id>` (removed when the executable is
//!   freed; the overlay mounted `volatile` where the kernel has it, so that its unmount
//!   syncs nothing of the host's file system: `overlay_volatile`) — for a read-only
//!   root, an upper layer in memory instead, mounted in the
//!   container's namespace over that (then empty) directory
//!   (`aurae_sys::container::UpperInMemory`) —,
//!   mounted in a mount namespace of the container's own, then `pivot_root`;
//! - the usual container hardening: fresh `/proc`, minimal `/dev`, read-only `/sys`,
//!   [`MASKED`] and [`READ_ONLY`] paths, capabilities cut to [`DEFAULT_CAPABILITIES`]
//!   (inheritable and ambient empty), `no_new_privs`, the [`seccomp`] allowlist;
//! - its process from the image config and the request ([`config`]).
//!
//! Everything is resolved and validated here, in auraed; the child between clone and exec
//! only runs the prepared syscalls (`aurae_sys::container`). It shares every other
//! namespace with its cell: several containers and plain executables in one cell talk
//! over localhost (the sidecar pattern).

pub mod config;
pub mod copy;
pub mod seccomp;
pub mod spec;

pub use spec::ContainerSpec;

use std::{
    ffi::{CStr, CString},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use aurae_sys::container::{ContainerSetup, MAX_VOLUMES, VolumeMount};

use crate::{
    image::{local::LocalImage, store::ImageStore},
    spec::FieldError,
    workload::WorkloadError,
};

/// Capabilities a container keeps (Docker's default set less MKNOD): CHOWN, DAC_OVERRIDE,
/// FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// AUDIT_WRITE, SETFCAP.
///
/// No CAP_MKNOD (27): every writable mount a container has (the overlay root, the `/dev`
/// tmpfs, `/dev/shm`, volumes) is `nodev`, so a node it made could never be opened, and
/// the cell's device filter refuses mknod and open of anything but the container's own
/// few character devices anyway. Kept, the capability would only serve an attack on some
/// future mount without `nodev`; an image that really needs device nodes needs a device
/// grant, not mknod.
pub const DEFAULT_CAPABILITIES: u64 = {
    let caps = [0u32, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31];
    let mut m = 0u64;
    let mut i = 0;
    while i < caps.len() {
        m |= 1 << caps[i];
        i += 1;
    }
    m
};

/// Hidden from the container (as runc and containerd do).
pub const MASKED: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/sysrq-trigger",
];

/// Read-only in the container.
pub const READ_ONLY: [&str; 4] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"];

/// Container paths a volume may not cover.
const RESERVED: [&str; 3] = ["/proc", "/sys", "/dev"];

/// What auraed's `/dev` holds (and names kept for what kernels and runtimes put there): a
/// file volume may be a new file directly in `/dev` (kubelet's `/dev/termination-log`),
/// never one of these.
const DEV_NAMES: [&str; 16] = [
    "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "fd", "stdin", "stdout",
    "stderr", "ptmx", "console", "core", "mqueue",
];

/// Whether a volume may be mounted at `target` (absolute, normalised): never `/`, `/proc`
/// or `/sys`; in `/dev` only a file volume, as a new name directly in it.
fn volume_target_allowed(target: &Path, file: bool) -> bool {
    if target == Path::new("/") {
        return false;
    }
    if let Ok(rest) = target.strip_prefix("/dev") {
        let mut c = rest.components();
        return file
            && match (c.next(), c.next()) {
                (Some(std::path::Component::Normal(n)), None) => {
                    !DEV_NAMES.iter().any(|d| std::ffi::OsStr::new(d) == n)
                }
                _ => false,
            };
    }
    !RESERVED.iter().any(|r| target.starts_with(r))
}

/// Writes a new file `path` (never following or reusing what is there) with `mode`.
fn write_new_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(content)?;
    // The mode as asked, whatever the umask took away.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(())
}

/// Writes `entries` (relative names checked when the spec was parsed: plain components,
/// none starting with "..") into the new directory `path` (0755), their directories made
/// on the way.
fn write_entries(path: &Path, entries: &[(PathBuf, Vec<u8>, u32)]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o755).create(path)?;
    for (name, content, mode) in entries {
        let at = path.join(name);
        if let Some(parent) = at.parent().filter(|p| *p != path) {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(parent)?;
        }
        write_new_file(&at, content, *mode)?;
    }
    Ok(())
}

/// The top-level names of `entries` (`conf/app.yaml` → `conf`).
fn top_names(
    entries: &[(PathBuf, Vec<u8>, u32)],
) -> std::collections::BTreeSet<std::ffi::OsString> {
    entries
        .iter()
        .filter_map(|(n, _, _)| n.components().next())
        .map(|c| c.as_os_str().to_owned())
        .collect()
}

/// Makes a new directory `path` (0755) holding `entries` in kubelet's atomic layout: the
/// files in `..v1/`, `..data -> ..v1`, and each top-level name a link into `..data`, so
/// [`swap_dir`] can replace them all at once.
fn write_new_dir(path: &Path, entries: &[(PathBuf, Vec<u8>, u32)]) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o755).create(path)?;
    write_entries(&path.join("..v1"), entries)?;
    std::os::unix::fs::symlink("..v1", path.join("..data"))?;
    for name in top_names(entries) {
        std::os::unix::fs::symlink(Path::new("..data").join(&name), path.join(&name))?;
    }
    Ok(())
}

/// Replaces the entries of a directory a container was given (kubelet's atomic layout, as
/// written at its start) with `entries`: the new
/// version is written beside the old, `..data` is renamed onto it (atomic), the top-level
/// links follow (new names linked, gone ones removed), the old version goes. A reader
/// that goes through `..data` once sees the old set or the new, never a mix; reading two
/// names one after the other across a swap may see one of each (as with kubelet's own
/// atomic writer). `path` must be auraed's own, mounted read-only into the container
/// (only read-only directories are written again).
pub fn swap_dir(path: &Path, entries: &[(PathBuf, Vec<u8>, u32)]) -> std::io::Result<()> {
    let old = std::fs::read_link(path.join("..data"))?;
    let n: u64 = old
        .to_str()
        .and_then(|s| s.strip_prefix("..v"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("..data points at {}", old.display())))?;
    let next = n
        .checked_add(1)
        .ok_or_else(|| std::io::Error::other("no version after ..data's"))?;
    let new = format!("..v{next}");
    // Versions a crash left (mid-swap, or before the old one went): only `..data`'s stays.
    for e in std::fs::read_dir(path)?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("..v") && Path::new(name.as_ref()) != old {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    write_entries(&path.join(&new), entries)?;
    let tmp = path.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&new, &tmp)?;
    std::fs::rename(&tmp, path.join("..data"))?;
    let wanted = top_names(entries);
    for name in &wanted {
        let link = path.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for e in std::fs::read_dir(path)?.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("..") && !wanted.contains(&name) {
            std::fs::remove_file(e.path())?;
        }
    }
    std::fs::remove_dir_all(path.join(old))
}

/// The `/etc/resolv.conf` a container gets from its [`ContainerSpec::dns`].
pub fn resolv_conf(dns: &spec::Dns) -> String {
    let mut s = String::from("# written by auraed\n");
    for n in &dns.servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

/// A container ready to start: image, process, volumes, all resolved and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub image: LocalImage,
    pub layers_dir: PathBuf,
    /// Holds the image's layers against garbage collection from planning on.
    pub pin: Arc<crate::image::store::Pin>,
    pub process: config::Resolved,
    pub read_only_root: bool,
    pub volumes: Vec<Volume>,
    /// The container's `/etc/resolv.conf` (written into its private directory and
    /// mounted read-only over the image's), when the spec asks for DNS settings.
    pub resolv_conf: Option<String>,
    /// Files written into its private directory and mounted over their (checked) paths.
    pub files: Vec<spec::FileSpec>,
    /// Its cell's directories mounted over their (checked) paths (see
    /// the cell module's `dirs`; opened when it is started, in its cell).
    pub cell_dirs: Vec<spec::CellDirSpec>,
}

/// A volume, its host directory or file already open: resolved once, below its root, when the
/// plan was made; its mount is cloned from this fd (`open_tree`, see [`Args::new`]) and
/// attached by the child, so nothing can be swapped in between.
#[derive(Debug, Clone)]
pub struct Volume {
    /// `O_PATH | O_CLOEXEC` (a directory or a regular file), held until the spawn is done.
    pub source: Arc<OwnedFd>,
    /// A regular file (mounted onto a file), else a directory.
    pub file: bool,
    /// The host path as the caller sent it (for messages only).
    pub sent: PathBuf,
    /// The container path (absolute, normalised).
    pub target: PathBuf,
    pub read_only: bool,
}

impl Plan {
    /// Resolves `spec` against `image`; volumes must be directories or regular files under `volume_roots`,
    /// named by their real path (no symlink is followed below a root), and are opened
    /// here, once. The caller has checked the grant allows each (see
    /// [`crate::workload::host_path::under_root`]).
    pub fn new(
        spec: &ContainerSpec,
        image: LocalImage,
        store: &ImageStore,
        volume_roots: &[PathBuf],
    ) -> Result<Self, WorkloadError> {
        // Pin first, then check: a removal that ran before the pin is seen here, none can
        // run after it.
        let pin = Arc::new(store.pin(&image.layers));
        if let Some(gone) = image.layer_dirs(store).iter().find(|d| !d.is_dir()) {
            return Err(WorkloadError::Precondition(format!(
                "image {} was removed while it was being prepared ({} is gone): try again",
                image.reference,
                gone.display()
            )));
        }
        let process = config::resolve(spec, &image.config, &image.layer_dirs(store))?;
        if spec.volumes.len()
            + spec.files.len()
            + spec.cell_dirs.len()
            + usize::from(spec.dns.is_some())
            > MAX_VOLUMES
        {
            return Err(FieldError::new(
                "container.volumes",
                format!(
                    "more than {MAX_VOLUMES} volumes (DNS settings, each file and each cell directory take one)"
                ),
            )
            .into());
        }
        let mut files = Vec::new();
        for (i, f) in spec.files.iter().enumerate() {
            let field = format!("container.files[{i}].path");
            let path = config::normalise(&field, &f.path.to_string_lossy())?;
            if path == Path::new("/")
                || RESERVED[..2].iter().any(|r| path.starts_with(r))
                || !volume_target_allowed(&path, !f.is_dir())
            {
                return Err(FieldError::new(
                    field,
                    format!(
                        "{} is reserved (/, /proc, /sys; in /dev only a file, as a new name directly in it)",
                        path.display()
                    ),
                )
                .into());
            }
            files.push(spec::FileSpec { path, ..f.clone() });
        }
        let mut cell_dirs = Vec::new();
        for (i, d) in spec.cell_dirs.iter().enumerate() {
            let field = format!("container.cell_directories[{i}].path");
            let path = config::normalise(&field, &d.path.to_string_lossy())?;
            if path == Path::new("/")
                || RESERVED[..2].iter().any(|r| path.starts_with(r))
                || !volume_target_allowed(&path, false)
            {
                return Err(FieldError::new(
                    field,
                    format!(
                        "{} is reserved (/, /proc, /sys; nothing but a file goes in /dev)",
                        path.display()
                    ),
                )
                .into());
            }
            cell_dirs.push(spec::CellDirSpec { path, ..d.clone() });
        }
        let mut volumes = Vec::new();
        for (i, (host, target, ro)) in spec.volumes.iter().enumerate() {
            let field = |f: &str| format!("container.volumes[{i}].{f}");
            // The container path first: a bad request never opens anything.
            let target = config::normalise(&field("container_path"), &target.to_string_lossy())?;
            if target == Path::new("/") || RESERVED[..2].iter().any(|r| target.starts_with(r)) {
                return Err(FieldError::new(
                    field("container_path"),
                    format!("{} is reserved (/, /proc, /sys)", target.display()),
                )
                .into());
            }
            let (source, _) = crate::workload::host_path::open_host_path(
                &field("host_path"),
                host,
                crate::workload::host_path::HostPath::DirOrFile,
                volume_roots,
                "--volume-root",
            )?;
            let file = crate::workload::host_path::is_regular_file(&source).map_err(|e| {
                WorkloadError::Precondition(format!(
                    "{}: {}: {e}",
                    field("host_path"),
                    host.display()
                ))
            })?;
            if !volume_target_allowed(&target, file) {
                return Err(FieldError::new(
                    field("container_path"),
                    format!(
                        "{} is reserved (in /dev only a file volume may go, as a new name directly in it)",
                        target.display()
                    ),
                )
                .into());
            }
            volumes.push(Volume {
                source: Arc::new(source),
                file,
                sent: host.clone(),
                target,
                read_only: *ro,
            });
        }
        Ok(Self {
            pin,
            image,
            layers_dir: store.layers_dir(),
            process,
            read_only_root: spec.read_only_root,
            volumes,
            resolv_conf: spec.dns.as_ref().map(resolv_conf),
            files,
            cell_dirs,
        })
    }
}

/// A container's private directories on the host (`upper`, `work`, `rootfs`), removed
/// when dropped (the executable is freed only after its process has exited): moved out of
/// the containers' directory then, their files deleted right after off the caller's
/// path (see [`removed_dir`]).
#[derive(Debug)]
pub struct Rootfs {
    dir: PathBuf,
    /// Its upper layer is in memory (a read-only root): see [`Rootfs::layout`].
    upper_in_memory: bool,
    /// The image's layers stay out of garbage collection while the container exists.
    _pin: Arc<crate::image::store::Pin>,
    /// The container's mount namespace, held while its process runs: see
    /// [`Rootfs::hold_mount_namespace`].
    mount_ns: Arc<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>,
}

impl Rootfs {
    /// The directory of a container found again after an auraed restart.
    pub fn adopt(dir: PathBuf, pin: Arc<crate::image::store::Pin>) -> Self {
        // (Its layout is not used again: the container runs already.)
        Self {
            dir,
            upper_in_memory: false,
            _pin: pin,
            mount_ns: Default::default(),
        }
    }

    /// Creates `<containers_dir>/<id>/{upper,work,rootfs}` (0700 at the top: the upper
    /// directory holds the container's files with the container's owners and modes). For
    /// a read-only root (`upper_in_memory`) only `<id>`, which stays empty on the host
    /// but for the files given to the container: its own mount namespace mounts its
    /// in-memory upper layer over it, with the overlay's directories in that.
    pub fn create(
        containers_dir: &Path,
        pin: Arc<crate::image::store::Pin>,
        upper_in_memory: bool,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = containers_dir.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let me = Self {
            dir,
            upper_in_memory,
            _pin: pin,
            mount_ns: Default::default(),
        };
        if !upper_in_memory {
            let (upper, work, root) = me.layout();
            for d in [upper, work, root] {
                std::fs::DirBuilder::new().mode(0o755).create(d)?;
            }
        }
        Ok(me)
    }

    /// The overlay's upper and work directories and its mount point: on the host's disk,
    /// or (upper layer in memory) in the tmpfs the child mounts over the container's
    /// directory (see `UpperInMemory`).
    fn layout(&self) -> (PathBuf, PathBuf, PathBuf) {
        let m = &self.dir;
        if self.upper_in_memory {
            (m.join("u"), m.join("w"), m.join("r"))
        } else {
            (m.join("upper"), m.join("work"), m.join("rootfs"))
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Holds the container's mount namespace (`ns`, an fd of it) so that its process's
    /// exit does not take it down: the last process of a mount namespace unmounts every
    /// mount in it (the overlay, `/proc`, `/dev`, volumes: an RCU grace period and the
    /// overlay's shutdown) before it has exited, so before its exit is seen and waited
    /// for. Held, that is done by [`Self::release_mount_namespace`] after the exit, off
    /// the caller's thread, or at the latest when this is dropped, before the
    /// directories go (a mount point in use cannot be removed).
    pub fn hold_mount_namespace(&self, ns: std::os::fd::OwnedFd) {
        if let Ok(mut held) = self.mount_ns.lock() {
            *held = Some(ns);
        }
    }

    /// Lets the held mount namespace go (its mounts with it) on the blocking pool: once
    /// the container's process has exited. Without a runtime, here and now.
    pub fn release_mount_namespace(&self) {
        let held = self.mount_ns.clone();
        let release = move || {
            // Dropped under the lock: whoever locks it next (`drop`) waits for the
            // unmounts to be done (closing the last fd of a namespace takes it down before
            // the close returns).
            if let Ok(mut ns) = held.lock() {
                drop(ns.take());
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(release);
            }
            Err(_) => release(),
        }
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        // The mount namespace first, if still held (waiting for a release under way):
        // the container's mounts are on its directories.
        if let Ok(mut ns) = self.mount_ns.lock() {
            drop(ns.take());
        }
        discard_dir(&self.dir);
    }
}

/// Where a container's directory goes when it is removed, beside the containers'
/// directory (`<state>/containers` → `<state>/containers-removed`): one rename takes it out
/// of `containers_dir` at once, and its files (an upper layer may hold many) are deleted
/// after, off the caller's path. auraed empties it when it starts
/// ([`remove_all_but`]), so a crash in between leaves nothing for long.
pub fn removed_dir(containers_dir: &Path) -> PathBuf {
    containers_dir.with_file_name(format!(
        "{}-removed",
        containers_dir
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy())
    ))
}

/// Removes the container directory `dir`: renamed into [`removed_dir`] and deleted there
/// by the deleter thread (`workload::tree::discard`; shutdown waits for it), or here and
/// now where the rename fails (reported once). A file that cannot be deleted is logged.
fn discard_dir(dir: &Path) {
    static NOT_MOVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    const WHAT: &str = "a freed container's directories";
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return crate::workload::tree::remove_logged(dir, WHAT);
    };
    let to = removed_dir(parent).join(name);
    match std::fs::rename(dir, &to) {
        Ok(()) => crate::workload::tree::discard(to, WHAT.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {}
        Err(e) => {
            if !NOT_MOVED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(dir = %dir.display(), to = %to.display(), error = %e, "a freed container's directory cannot be moved out: removed in place, on the free's path (reported once)");
            }
            crate::workload::tree::remove_logged(dir, WHAT);
        }
    }
}

/// Removes every entry of `dir` but those `kept` names (whole trees, links not followed),
/// at a start: the containers' directory (what no re-adopted container uses) and
/// [`removed_dir`] (what a previous auraed had not finished deleting). One warning per
/// entry that cannot be read or removed, naming it as `what`.
pub fn remove_all_but(dir: &Path, kept: &[PathBuf], what: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return warnings,
        Err(e) => {
            warnings.push(format!("reading {}: {e}", dir.display()));
            return warnings;
        }
    };
    for e in entries {
        let p = match e {
            Ok(e) => e.path(),
            Err(err) => {
                warnings.push(format!("reading {}: {err}", dir.display()));
                continue;
            }
        };
        if kept.contains(&p) {
            continue;
        }
        if let Err(err) = crate::workload::tree::remove_tree(&p) {
            warnings.push(format!(
                "{what} {} left by a previous auraed could not be removed: {err}",
                p.display()
            ));
        }
    }
    warnings
}

fn cstr(p: &Path) -> Result<CString, WorkloadError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| WorkloadError::Precondition(format!("{} contains NUL", p.display())))
}

/// How many components a mount's target has (`/a/b`: 2).
fn depth(target: &CStr) -> usize {
    target
        .to_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .count()
}

/// The directories to make before a mount at `target` is attached: its parents, and
/// itself unless it is a file.
fn mount_points(target: &Path, file: bool) -> Result<Vec<CString>, WorkloadError> {
    let dirs = match (file, target.parent()) {
        (true, Some(parent)) => with_parents(parent),
        _ => with_parents(target),
    };
    dirs.iter().map(|p| cstr(p)).collect()
}

/// `p` and its parents below `/`, parents first.
fn with_parents(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = p
        .ancestors()
        .filter(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    v.reverse();
    v
}

/// The C strings a [`ContainerSetup`] borrows, built before the clone.
#[derive(Debug)]
pub struct Args {
    layers_dir: CString,
    overlay: CString,
    rootfs: CString,
    volumes: Vec<VolumeMount>,
    /// The volumes' detached mount trees, cloned from the checked directories (their fds
    /// are in `volumes`): kept open until the child has attached them, i.e. as long as
    /// these arguments live.
    _volume_trees: Vec<OwnedFd>,
    /// The host paths as sent, for messages.
    volume_names: Vec<String>,
    mkdirs: Vec<CString>,
    masked: Vec<CString>,
    read_only: Vec<CString>,
    workdir: CString,
    program: Vec<CString>,
    read_only_root: bool,
    /// A read-only root's in-memory upper layer: its mount point (the container's
    /// directory), `upper`, `work`.
    upper_in_memory: Option<[CString; 3]>,
}

/// Largest overlay option string (one page for mount(2)).
const MAX_OVERLAY_OPTIONS: usize = 4000;

/// Whether a container's overlay is mounted `volatile` (Linux 5.10 and later): its
/// `syncfs` and its unmount then do not sync the upper layer's file system. Without it,
/// the unmount at each container's end syncs the whole file system its upper directory
/// is on (the host's state directory: every dirty page and inode of it, other workloads'
/// included) and waits for that — 0.3–1.5 ms with nothing else to write on this
/// project's hosts, 3–14 ms with a few MiB dirty, against ~20 µs volatile. An upper
/// layer needs no durability here: it is removed when its container is freed and, after
/// a crash of the machine, when auraed starts (nothing ever mounts it again, which is
/// all that `volatile` rules out); a container's `fsync` of a file in its writable layer
/// is then a no-op, as under podman's `--rm` containers, which mount it so too. Volumes
/// are bind mounts, not in the overlay: their syncs go to their own file system as ever.
/// Read once from the running kernel's release; an older kernel (or an unreadable
/// release) mounts without it, said once in the log.
fn overlay_volatile() -> bool {
    static VOLATILE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VOLATILE.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let ok = supports_volatile(&release);
        if !ok {
            tracing::info!(
                kernel = release.trim(),
                "containers' overlays are mounted without `volatile` (Linux 5.10 or later has it): each container's end syncs the state directory's file system"
            );
        }
        ok
    })
}

/// Whether a kernel release (`6.1.0-18-amd64`) is 5.10 or later.
fn supports_volatile(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 10),
        _ => false,
    }
}

impl Args {
    /// `cell_dirs`: the plan's cell directories opened (`O_PATH`), in its order.
    pub fn new(plan: &Plan, rootfs: &Rootfs, cell_dirs: &[OwnedFd]) -> Result<Self, WorkloadError> {
        let (upper, work, root) = rootfs.layout();
        for p in [&upper, &work] {
            let s = p.to_string_lossy();
            if s.contains([',', ':']) {
                return Err(WorkloadError::Precondition(format!(
                    "the container directory {s} contains ',' or ':' (the overlay cannot take it): choose another --state-dir"
                )));
            }
        }
        // Top layer first; names relative to the layer store.
        let lower: Vec<&str> = plan
            .image
            .layers
            .iter()
            .rev()
            .map(|d| crate::image::local::layer_name(d))
            .collect();
        let overlay = format!(
            "lowerdir={},upperdir={},workdir={}{}",
            lower.join(":"),
            upper.display(),
            work.display(),
            if overlay_volatile() { ",volatile" } else { "" }
        );
        if overlay.len() > MAX_OVERLAY_OPTIONS {
            return Err(WorkloadError::Precondition(format!(
                "image {}: {} layers do not fit one overlay mount",
                plan.image.reference,
                lower.len()
            )));
        }
        // (Each mount's own mount points are made right before it is attached: see
        // `VolumeMount::parents`.)
        let mut mkdirs: Vec<PathBuf> = RESERVED.iter().map(PathBuf::from).collect();
        mkdirs.extend(with_parents(&plan.process.working_dir));
        let mut seen = std::collections::HashSet::new();
        mkdirs.retain(|p| seen.insert(p.clone()));
        // Cloned here, in auraed's mount namespace, from the fds opened when the plan was
        // checked; the child, in a namespace of its own, can only attach them.
        let mut volume_trees = Vec::new();
        let mut volumes = Vec::new();
        let mut volume_names = Vec::new();
        // The DNS settings first: a volume the caller put at /etc/resolv.conf goes over it.
        if let Some(text) = &plan.resolv_conf {
            let path = rootfs.path().join("resolv.conf");
            let fail = |e: std::io::Error| {
                WorkloadError::Precondition(format!(
                    "container.dns: writing {}: {e}",
                    path.display()
                ))
            };
            std::fs::write(&path, text).map_err(fail)?;
            let fd = rustix::fs::open(
                &path,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| fail(e.into()))?;
            let tree = aurae_sys::container::clone_mount(fd.as_fd(), true).map_err(fail)?;
            volumes.push(VolumeMount {
                source: tree.as_raw_fd(),
                target: c"/etc/resolv.conf".to_owned(),
                file: true,
                parents: mount_points(Path::new("/etc/resolv.conf"), true)?,
            });
            volume_trees.push(tree);
            volume_names.push("(its DNS settings) -> /etc/resolv.conf".to_owned());
        }
        // Then the files it was given (a volume at the same path goes over one).
        for (i, f) in plan.files.iter().enumerate() {
            let path = rootfs.path().join(format!("file-{i}"));
            let fail = |e: std::io::Error| {
                WorkloadError::Precondition(format!(
                    "container.files[{i}]: writing {}: {e}",
                    path.display()
                ))
            };
            if !f.is_dir() {
                write_new_file(&path, &f.content, f.mode).map_err(fail)?;
            } else {
                write_new_dir(&path, &f.entries).map_err(fail)?;
            }
            let fd = rustix::fs::open(
                &path,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| fail(e.into()))?;
            let tree = aurae_sys::container::clone_mount(fd.as_fd(), f.read_only).map_err(fail)?;
            volumes.push(VolumeMount {
                source: tree.as_raw_fd(),
                target: cstr(&f.path)?,
                file: !f.is_dir(),
                parents: mount_points(&f.path, !f.is_dir())?,
            });
            volume_trees.push(tree);
            volume_names.push(format!("(a file it was given) -> {}", f.path.display()));
        }
        // Then its cell's directories (a volume at the same path goes over one).
        for (d, fd) in plan.cell_dirs.iter().zip(cell_dirs) {
            let tree = aurae_sys::container::clone_mount(fd.as_fd(), d.read_only).map_err(|e| {
                WorkloadError::Precondition(format!(
                    "the cell's directory {:?}: cannot clone its mount: {e}",
                    d.name
                ))
            })?;
            volumes.push(VolumeMount {
                source: tree.as_raw_fd(),
                target: cstr(&d.path)?,
                file: false,
                parents: mount_points(&d.path, false)?,
            });
            volume_trees.push(tree);
            volume_names.push(format!(
                "(its cell's directory {:?}) -> {}",
                d.name,
                d.path.display()
            ));
        }
        for (i, v) in plan.volumes.iter().enumerate() {
            let tree =
                aurae_sys::container::clone_mount(v.source.as_fd(), v.read_only).map_err(|e| {
                    WorkloadError::Precondition(format!(
                        "container.volumes[{i}].host_path: {}: cannot clone its mount: {e}",
                        v.sent.display()
                    ))
                })?;
            volumes.push(VolumeMount {
                source: tree.as_raw_fd(),
                target: cstr(&v.target)?,
                file: v.file,
                parents: mount_points(&v.target, v.file)?,
            });
            volume_trees.push(tree);
            volume_names.push(format!("{} -> {}", v.sent.display(), v.target.display()));
        }
        // Parents before what is below them, whatever their kind (as containerd sorts a
        // container's mounts): an emptyDir at /var/run before a token directory at
        // /var/run/secrets/…, which would be hidden under it otherwise. At one depth the
        // order above holds (a volume at the same path goes over a file given there).
        let mut order: Vec<usize> = (0..volumes.len()).collect();
        order.sort_by_key(|&i| depth(&volumes[i].target));
        let mut slots: Vec<Option<VolumeMount>> = volumes.into_iter().map(Some).collect();
        let volumes: Vec<VolumeMount> = order.iter().filter_map(|&i| slots[i].take()).collect();
        let volume_names: Vec<String> = order.iter().map(|&i| volume_names[i].clone()).collect();
        let strs = |v: &[&str]| {
            v.iter()
                .map(|p| cstr(Path::new(p)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            layers_dir: cstr(&plan.layers_dir)?,
            overlay: CString::new(overlay)
                .map_err(|_| WorkloadError::Precondition("overlay options contain NUL".into()))?,
            rootfs: cstr(&root)?,
            volumes,
            _volume_trees: volume_trees,
            volume_names,
            mkdirs: mkdirs.iter().map(|p| cstr(p)).collect::<Result<_, _>>()?,
            masked: strs(&MASKED)?,
            read_only: strs(&READ_ONLY)?,
            workdir: cstr(&plan.process.working_dir)?,
            program: plan
                .process
                .program
                .iter()
                .map(|p| cstr(p))
                .collect::<Result<_, _>>()?,
            read_only_root: plan.read_only_root,
            upper_in_memory: if rootfs.upper_in_memory {
                Some([cstr(rootfs.path())?, cstr(&upper)?, cstr(&work)?])
            } else {
                None
            },
        })
    }

    /// The set-up for the child. `own_cgroup_ns`: the cell has its own cgroup namespace
    /// (its cgroup tree is then shown read-only at /sys/fs/cgroup).
    pub fn setup(&self, own_cgroup_ns: bool) -> Result<ContainerSetup<'_>, WorkloadError> {
        Ok(ContainerSetup {
            layers_dir: &self.layers_dir,
            overlay_options: &self.overlay,
            rootfs: &self.rootfs,
            volumes: &self.volumes,
            mkdirs: &self.mkdirs,
            mount_cgroup: own_cgroup_ns,
            masked: &self.masked,
            read_only_paths: &self.read_only,
            read_only_root: self.read_only_root,
            upper_in_memory: self.upper_in_memory.as_ref().map(|[m, u, w]| {
                aurae_sys::container::UpperInMemory {
                    mount_point: m,
                    upper: u,
                    work: w,
                }
            }),
            workdir: &self.workdir,
            capabilities: DEFAULT_CAPABILITIES,
            seccomp: seccomp::default_filters().map_err(WorkloadError::Precondition)?,
            program: &self.program,
            enter: false,
        })
    }

    /// Names the item of a failed list step, for the error message.
    pub fn describe(&self, step: aurae_sys::Step, index: usize) -> Option<String> {
        use aurae_sys::Step as S;
        let s = |v: &[CString]| v.get(index).map(|c| c.to_string_lossy().into_owned());
        match step {
            S::CONTAINER_OPEN_VOLUME
            | S::CONTAINER_VOLUME_READ_ONLY
            | S::CONTAINER_ATTACH_VOLUME => self.volume_names.get(index).cloned(),
            S::CONTAINER_CREATE_MOUNT_POINT => s(&self.mkdirs),
            S::CONTAINER_MOUNT_POINT_NOT_A_DIRECTORY => {
                RESERVED.get(index).map(|p| (*p).to_owned())
            }
            S::CONTAINER_MASK_PATH => s(&self.masked),
            S::CONTAINER_PATH_READ_ONLY => s(&self.read_only),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    /// `volatile` from Linux 5.10 on; anything unreadable counts as older.
    #[test]
    fn the_overlay_is_volatile_from_linux_5_10() {
        for (release, want) in [
            ("6.1.0-18-amd64\n", true),
            ("5.10.0", true),
            ("5.9.16-arch1", false),
            ("4.18.0-553.el8_10.x86_64", false),
            ("6.18.44-fc-v1252", true),
            ("10.0", true),
            ("5", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(super::supports_volatile(release), want, "{release:?}");
        }
    }

    /// A directory given to a container is kubelet's atomic layout; written again, the
    /// names follow the new set (new linked, gone removed), `..data` points at the new
    /// version and the old one is gone.
    #[test]
    fn a_given_directory_is_swapped_whole() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("file-0");
        let e = |n: &str, c: &str| (PathBuf::from(n), c.as_bytes().to_vec(), 0o644);
        write_new_dir(&dir, &[e("token", "one"), e("conf/app.yaml", "a: 1")]).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).ok();
        assert_eq!(read("token").as_deref(), Some("one"));
        assert_eq!(read("conf/app.yaml").as_deref(), Some("a: 1"));
        assert_eq!(
            std::fs::read_link(dir.join("token")).unwrap(),
            Path::new("..data/token")
        );
        swap_dir(&dir, &[e("token", "two"), e("ca.crt", "pem")]).unwrap();
        assert_eq!(read("token").as_deref(), Some("two"));
        assert_eq!(read("ca.crt").as_deref(), Some("pem"));
        assert_eq!(read("conf/app.yaml"), None, "a name no longer given goes");
        assert_eq!(
            std::fs::read_link(dir.join("..data")).unwrap(),
            Path::new("..v2")
        );
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(), ["..data", "..v2", "ca.crt", "token"]);
        // A crash mid-swap left a version and a `..data_tmp`: the next swap clears them.
        std::fs::create_dir(dir.join("..v7")).unwrap();
        std::os::unix::fs::symlink("..v7", dir.join("..data_tmp")).unwrap();
        swap_dir(&dir, &[e("token", "three")]).unwrap();
        assert_eq!(read("token").as_deref(), Some("three"));
        assert_eq!(
            std::fs::read_link(dir.join("..data")).unwrap(),
            Path::new("..v3")
        );
        assert_eq!(names(), ["..data", "..v3", "token"]);
        // A `..data` the directory's owner did not write is refused, not overflowed.
        std::fs::remove_file(dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..v18446744073709551615", dir.join("..data")).unwrap();
        assert!(swap_dir(&dir, &[e("token", "four")]).is_err());
    }

    use super::*;

    #[test]
    fn default_capabilities_are_dockers_less_mknod() {
        assert_eq!(DEFAULT_CAPABILITIES.count_ones(), 13);
        assert_eq!(DEFAULT_CAPABILITIES, 0x0000_0000_a004_25fb);
        assert_eq!(DEFAULT_CAPABILITIES & (1 << 27), 0, "no CAP_MKNOD");
        assert_eq!(DEFAULT_CAPABILITIES & (1 << 21), 0, "no CAP_SYS_ADMIN");
        assert_eq!(DEFAULT_CAPABILITIES & (1 << 19), 0, "no CAP_SYS_PTRACE");
    }

    #[test]
    fn volume_targets_in_dev_are_new_files_directly_in_it() {
        for (t, file, ok) in [
            ("/data", false, true),
            ("/etc/hosts", true, true),
            ("/dev/termination-log", true, true),
            ("/dev/termination-log", false, false),
            ("/dev/null", true, false),
            ("/dev/shm", true, false),
            ("/dev/pts/0", true, false),
            ("/dev/a/b", true, false),
            ("/dev", true, false),
            ("/devices", false, true),
            ("/proc/x", true, false),
            ("/sys", false, false),
            ("/", false, false),
        ] {
            assert_eq!(
                volume_target_allowed(Path::new(t), file),
                ok,
                "{t} file={file}"
            );
        }
    }

    #[test]
    fn dns_settings_are_one_token_each() {
        let d = |servers: &[&str], searches: &[&str], options: &[&str]| {
            spec::Dns::parse(
                "dns",
                &aurae_proto::runtime::v0::ContainerDns {
                    servers: servers.iter().map(|s| (*s).to_owned()).collect(),
                    searches: searches.iter().map(|s| (*s).to_owned()).collect(),
                    options: options.iter().map(|s| (*s).to_owned()).collect(),
                },
            )
        };
        let ok = d(
            &["10.0.0.10", "::1"],
            &["a.b.", "svc"],
            &["ndots:5", "edns0"],
        )
        .unwrap();
        assert_eq!(
            resolv_conf(&ok),
            "# written by auraed\nnameserver 10.0.0.10\nnameserver ::1\nsearch a.b. svc\noptions ndots:5 edns0\n"
        );
        for (bad, field) in [
            (d(&["10.0.0.1 8.8.8.8"], &[], &[]), "dns.servers[0]"),
            (
                d(&["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4"], &[], &[]),
                "dns.servers",
            ),
            (d(&[], &["a..b"], &[]), "dns.searches[0]"),
            (d(&[], &["x\nnameserver"], &[]), "dns.searches[0]"),
            (d(&[], &[&"a".repeat(64)], &[]), "dns.searches[0]"),
            (d(&[], &[], &["a b"]), "dns.options[0]"),
            (d(&[], &[], &["#x"]), "dns.options[0]"),
        ] {
            assert_eq!(bad.unwrap_err().field, field);
        }
    }

    #[test]
    fn parents_first() {
        assert_eq!(
            with_parents(Path::new("/a/b/c")),
            [
                PathBuf::from("/a"),
                PathBuf::from("/a/b"),
                PathBuf::from("/a/b/c")
            ]
        );
        assert!(with_parents(Path::new("/")).is_empty());
    }

    /// A container directory (an upper layer with files, a subdirectory no one may enter,
    /// a link out) leaves `containers` at once and is deleted from `containers-removed`
    /// after; without a runtime, before the call returns; where it cannot be moved, in
    /// place. What a link points at stays. `remove_all_but` deletes what is left there.
    #[test]
    fn a_containers_directory_leaves_at_once_and_is_deleted_after() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let containers = t.path().join("containers");
        let removed = removed_dir(&containers);
        assert_eq!(removed, t.path().join("containers-removed"));
        std::fs::create_dir(&containers).unwrap();
        std::fs::create_dir(&removed).unwrap();
        let outside = t.path().join("precious");
        std::fs::write(&outside, b"x").unwrap();
        let make = |id: &str| {
            let d = containers.join(id);
            std::fs::create_dir_all(d.join("upper/etc")).unwrap();
            std::fs::write(d.join("upper/etc/data"), b"written").unwrap();
            std::fs::create_dir_all(d.join("work/work")).unwrap();
            std::fs::set_permissions(d.join("work/work"), std::fs::Permissions::from_mode(0o000))
                .unwrap();
            std::os::unix::fs::symlink(&outside, d.join("upper/link")).unwrap();
            d
        };
        let listed = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        // Out of `containers` at once, deleted by the deleter thread.
        for id in ["a", "b"] {
            let d = make(id);
            discard_dir(&d);
            assert!(!d.exists(), "moved out before it returns");
        }
        assert!(crate::workload::tree::deletions_done(
            std::time::Duration::from_secs(10)
        ));
        assert_eq!(listed(&removed), 0, "deleted after");
        // Nowhere to move it: removed in place. A missing one is fine.
        std::fs::remove_dir(&removed).unwrap();
        let d = make("c");
        discard_dir(&d);
        assert!(!d.exists());
        discard_dir(&d);
        assert_eq!(std::fs::read(&outside).unwrap(), b"x");
        // What a previous auraed left there.
        std::fs::create_dir(&removed).unwrap();
        let d = make("d");
        std::fs::rename(&d, removed.join("d")).unwrap();
        assert!(remove_all_but(&removed, &[], "freed container directory").is_empty());
        assert_eq!(listed(&removed), 0);
        assert_eq!(listed(&containers), 0);
        assert_eq!(std::fs::read(&outside).unwrap(), b"x");
    }
}
