//! The cgroup v2 seam (below cells and VMs): a `CgroupTree` trait with the real filesystem implementation rooted
//! at a parameter (`/sys/fs/cgroup/…` as PID 1, a delegated subtree as a host daemon) and an
//! in-memory fake for unit tests.
//!
//! Layout under the root: each cell is a directory (`web`, `web/api`) that carries its
//! limits; its processes live in the leaf `<cell>/_procs` (no label contains '_', so it
//! never clashes with a child cell), those of an executable started with limits of its
//! own in its own leaf `<cell>/_exe.<name>` beside it. Interior directories hold no
//! processes, so the no-internal-processes rule holds with controllers enabled for
//! children.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::spec::CellName;

/// The leaf directory of a cell, where its processes live.
pub const LEAF: &str = "_procs";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{field} needs the cgroup v2 {controller} controller, which is not available to auraed here (available: {available})"
    )]
    MissingController {
        field: &'static str,
        controller: &'static str,
        available: String,
    },
    /// The device filter could not be loaded or attached (a kernel without
    /// CONFIG_CGROUP_BPF, or without the privilege to use it).
    #[error("cgroup {path}: {source}")]
    DeviceFilter {
        path: PathBuf,
        #[source]
        source: aurae_sys::bpf::DeviceFilterError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What auraed needs from a cgroup v2 hierarchy.
pub trait CgroupTree: Send + Sync + std::fmt::Debug {
    /// Controllers cells can use (the root's `cgroup.controllers`).
    fn controllers(&self) -> Vec<String>;
    /// Creates the cell's directory and leaf, enabling the available controllers for its
    /// children on every directory above the leaf. The parent cell must exist.
    fn create(&self, cell: &CellName) -> Result<(), CgroupError>;
    /// Creates `group`, a leaf that holds processes itself and has no children (an
    /// executable's own group, [`CellName::own_group`]). One left behind empty (a free
    /// whose removal failed) is taken over; a populated one is an error.
    fn create_leaf(&self, group: &CellName) -> Result<(), CgroupError>;
    /// An `O_DIRECTORY` fd of `group` itself (a leaf made by [`CgroupTree::create_leaf`]),
    /// for `clone3(CLONE_INTO_CGROUP)`.
    fn group_fd(&self, group: &CellName) -> Result<OwnedFd, CgroupError>;
    /// Writes one interface file of the cell's directory.
    fn write(&self, cell: &CellName, file: &str, value: &str) -> Result<(), CgroupError>;
    /// Reads one interface file of the cell's directory (whole subtree figures).
    fn read(&self, cell: &CellName, file: &str) -> Result<String, CgroupError>;
    /// An `O_DIRECTORY` fd of the leaf, for `clone3(CLONE_INTO_CGROUP)`.
    fn leaf_fd(&self, cell: &CellName) -> Result<OwnedFd, CgroupError>;
    /// Moves the process `pid` into the cell's leaf (`cgroup.procs`): a spare cell init
    /// from the pool joining the cell that took it. What it was charged before stays with
    /// its old group (cgroup v2 does not move charges).
    fn move_into(&self, cell: &CellName, pid: i32) -> Result<(), CgroupError>;
    /// Whether moving a process between cgroups is cheap here: cgroup2 mounted with
    /// `favordynmods` (without it each move waits for an RCU grace period, ~6 ms measured
    /// on this project's hosts, unless another move happened just before).
    fn cheap_moves(&self) -> bool {
        true
    }
    /// Whether any process is left in the cell's subtree (`cgroup.events populated`).
    fn populated(&self, cell: &CellName) -> Result<bool, CgroupError>;
    /// Kills every process of the subtree at once (`cgroup.kill`).
    fn kill(&self, cell: &CellName) -> Result<(), CgroupError>;
    /// Freezes or thaws the subtree.
    fn freeze(&self, cell: &CellName, frozen: bool) -> Result<(), CgroupError>;
    /// Attaches the device filter ([`aurae_sys::bpf::DEFAULT_DEVICES`] and what `devices`
    /// adds) to the cell's directory: every process of the subtree may create and open only
    /// those few character devices, whatever its uid and capabilities.
    fn attach_device_filter(
        &self,
        cell: &CellName,
        devices: aurae_sys::bpf::CellDevices,
    ) -> Result<(), CgroupError>;
    /// Removes the cell's leaf, its executables' own groups (empty by now) and its
    /// directory; child cells must be removed first. Also removes a leaf made by
    /// [`CgroupTree::create_leaf`].
    fn remove(&self, cell: &CellName) -> Result<(), CgroupError>;
    /// Where the cell's directory is, for messages and probes.
    fn path(&self, cell: &CellName) -> PathBuf;
    /// Whether the cell's directory exists.
    fn exists(&self, cell: &CellName) -> bool;
    /// At shutdown, once every cell is gone: removes the root if auraed created it.
    fn release(&self) {}
    /// The processes in the cell's leaf (its `cgroup.procs`: not its children's, nor its
    /// executables' own groups').
    fn leaf_procs(&self, cell: &CellName) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .read(cell, &format!("{LEAF}/cgroup.procs"))?
            .split_ascii_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}
/// The real cgroup v2 filesystem below `root` (created if missing, mode 0755).
#[derive(Debug)]
pub struct FsTree {
    root: PathBuf,
    controllers: Vec<String>,
    /// Whether `open` created the root (then shutdown removes it again).
    created: bool,
    /// Whether the hierarchy is mounted with `favordynmods`.
    favordynmods: bool,
}

/// Whether the cgroup2 mount holding `dir` has `favordynmods` among its super options
/// (from /proc/self/mountinfo: the longest cgroup2 mount point above `dir`).
fn mounted_with_favordynmods(dir: &Path) -> bool {
    favordynmods_in(
        &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        dir,
    )
}

fn favordynmods_in(mountinfo: &str, dir: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let (fstype, _source, options) = (r.next()?, r.next()?, r.next()?);
            (fstype == "cgroup2" && dir.starts_with(mount_point)).then(|| {
                (
                    mount_point.len(),
                    options.split(',').any(|o| o == "favordynmods"),
                )
            })
        })
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, f)| f)
}

/// Controllers auraed enables for cells when available.
const WANTED: [&str; 6] = ["cpu", "cpuset", "io", "memory", "pids", "hugetlb"];

impl FsTree {
    /// Opens (creating) the subtree at `root`, which must be on a cgroup2 filesystem, and
    /// enables the wanted controllers available there for its children.
    pub fn open(root: &Path) -> Result<Self, CgroupError> {
        let created = !root.exists();
        if created {
            fs::create_dir(root).map_err(io_err(root))?;
        }
        let avail = fs::read_to_string(root.join("cgroup.controllers")).map_err(io_err(root))?;
        let controllers: Vec<String> = avail
            .split_whitespace()
            .filter(|c| WANTED.contains(c))
            .map(str::to_owned)
            .collect();
        let tree = Self {
            root: root.to_owned(),
            controllers,
            created,
            favordynmods: mounted_with_favordynmods(root),
        };
        tree.enable_for_children(root)?;
        Ok(tree)
    }

    /// Kills and removes every cgroup a previous auraed left under the root that
    /// `explained` (the cells re-adopted from their records) does not explain: left alone
    /// they would run on unsupervised, their names unusable. Each is reported (returned,
    /// and logged as a warning), never dropped in silence. Runs at start, after
    /// re-adoption and before anything new is created.
    pub fn sweep_leftovers(&self, explained: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut swept = Vec::new();
        self.sweep_below(&self.root, "", explained, &mut swept);
        swept
    }

    /// Sweeps the directories below `dir` (named `prefix`/…) that `explained` does not
    /// explain; goes down into the ones it does (a cell's leaf is its own).
    fn sweep_below(
        &self,
        dir: &Path,
        prefix: &str,
        explained: &dyn Fn(&str) -> bool,
        swept: &mut Vec<String>,
    ) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let base = e.file_name().to_string_lossy().into_owned();
            // The cell's leaf is the cell's. Its executables' own groups are explained
            // by their records like cells (one without is a process started and never
            // recorded: it goes).
            if base == LEAF {
                continue;
            }
            let name = if prefix.is_empty() {
                base
            } else {
                format!("{prefix}/{base}")
            };
            let dir = e.path();
            if explained(&name) {
                self.sweep_below(&dir, &name, explained, swept);
                continue;
            }
            let procs = count_procs(&dir);
            // cgroup.kill takes the whole subtree, nested cells included.
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|ev| ev.lines().any(|l| l.trim() == "populated 1"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let what = match remove_tree(&dir) {
                Ok(()) => format!(
                    "cgroup {name:?} left by a previous auraed, explained by no record: {procs} processes killed, removed"
                ),
                Err(err) => format!(
                    "cgroup {name:?} left by a previous auraed, explained by no record: {procs} processes killed, NOT removed: {err}"
                ),
            };
            tracing::warn!("{what}");
            swept.push(what);
        }
    }

    fn enable_for_children(&self, dir: &Path) -> Result<(), CgroupError> {
        if self.controllers.is_empty() {
            return Ok(());
        }
        let value: Vec<String> = self.controllers.iter().map(|c| format!("+{c}")).collect();
        let file = dir.join("cgroup.subtree_control");
        fs::write(&file, value.join(" ")).map_err(io_err(&file))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Processes in `dir` and below.
fn count_procs(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        n += fs::read_to_string(d.join("cgroup.procs"))
            .map(|p| p.lines().count())
            .unwrap_or(0);
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    n
}

/// Settles the calling process in the cgroup2 hierarchy rooted at `root` as auraed does
/// when it owns that hierarchy (PID 1 of a machine, a spawned instance): itself in the
/// leaf `auraed/`, then every controller `root` has enabled for its children (in that
/// order: a cgroup with processes of its own cannot hand controllers down, the root
/// excepted). `Err` when `root` is no cgroup2; else what could not be done.
pub fn settle_in(root: &Path) -> Result<Vec<String>, String> {
    let avail = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("no cgroup v2 at {}: {e}", root.display()))?;
    let mut warnings = Vec::new();
    let own = root.join("auraed");
    let moved = match fs::create_dir(&own) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => fs::write(own.join("cgroup.procs"), std::process::id().to_string()),
    };
    if let Err(e) = moved {
        warnings.push(format!("moving auraed into {}: {e}", own.display()));
    }
    let all: Vec<String> = avail.split_whitespace().map(|c| format!("+{c}")).collect();
    if !all.is_empty()
        && let Err(e) = fs::write(root.join("cgroup.subtree_control"), all.join(" "))
    {
        warnings.push(format!("enabling cgroup controllers: {e}"));
    }
    Ok(warnings)
}

/// Removes `dir` and the cgroups below it, deepest first.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        dirs.push(d);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        fs::remove_dir(&d)?;
    }
    Ok(())
}

impl CgroupTree for FsTree {
    fn controllers(&self) -> Vec<String> {
        self.controllers.clone()
    }

    fn create(&self, cell: &CellName) -> Result<(), CgroupError> {
        let dir = self.path(cell);
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let leaf = dir.join(LEAF);
        let made = fs::create_dir(&leaf)
            .map_err(io_err(&leaf))
            .and_then(|()| self.enable_for_children(&dir));
        if let Err(e) = made {
            let _ = fs::remove_dir(&leaf);
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(())
    }

    fn create_leaf(&self, group: &CellName) -> Result<(), CgroupError> {
        let dir = self.path(group);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // rmdir fails (EBUSY) while a process is in it.
                fs::remove_dir(&dir).map_err(io_err(&dir))?;
                fs::create_dir(&dir).map_err(io_err(&dir))
            }
            r => r.map_err(io_err(&dir)),
        }
    }

    fn group_fd(&self, group: &CellName) -> Result<OwnedFd, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path(group);
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY)
            .open(&p)
            .map_err(io_err(&p))?;
        Ok(OwnedFd::from(f))
    }

    fn write(&self, cell: &CellName, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = self.path(cell).join(file);
        fs::write(&p, value).map_err(io_err(&p))
    }

    fn read(&self, cell: &CellName, file: &str) -> Result<String, CgroupError> {
        let p = self.path(cell).join(file);
        fs::read_to_string(&p).map_err(io_err(&p))
    }

    fn leaf_fd(&self, cell: &CellName) -> Result<OwnedFd, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path(cell).join(LEAF);
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY)
            .open(&p)
            .map_err(io_err(&p))?;
        Ok(OwnedFd::from(f))
    }

    fn move_into(&self, cell: &CellName, pid: i32) -> Result<(), CgroupError> {
        let p = self.path(cell).join(LEAF).join("cgroup.procs");
        fs::write(&p, pid.to_string()).map_err(io_err(&p))
    }

    fn cheap_moves(&self) -> bool {
        self.favordynmods
    }

    fn populated(&self, cell: &CellName) -> Result<bool, CgroupError> {
        Ok(self
            .read(cell, "cgroup.events")?
            .lines()
            .any(|l| l.trim() == "populated 1"))
    }

    fn kill(&self, cell: &CellName) -> Result<(), CgroupError> {
        self.write(cell, "cgroup.kill", "1")
    }

    fn freeze(&self, cell: &CellName, frozen: bool) -> Result<(), CgroupError> {
        self.write(cell, "cgroup.freeze", if frozen { "1" } else { "0" })
    }

    fn attach_device_filter(
        &self,
        cell: &CellName,
        devices: aurae_sys::bpf::CellDevices,
    ) -> Result<(), CgroupError> {
        use std::os::fd::AsFd;
        let dir = self.path(cell);
        let f = fs::File::open(&dir).map_err(io_err(&dir))?;
        aurae_sys::bpf::attach_device_filter(f.as_fd(), devices)
            .map_err(|source| CgroupError::DeviceFilter { path: dir, source })
    }

    fn remove(&self, cell: &CellName) -> Result<(), CgroupError> {
        let dir = self.path(cell);
        let leaf = dir.join(LEAF);
        if leaf.exists() {
            fs::remove_dir(&leaf).map_err(io_err(&leaf))?;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(crate::spec::OWN_GROUP_PREFIX)
                {
                    let p = e.path();
                    fs::remove_dir(&p).map_err(io_err(&p))?;
                }
            }
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))
    }

    fn path(&self, cell: &CellName) -> PathBuf {
        self.root.join(cell.as_str())
    }

    fn exists(&self, cell: &CellName) -> bool {
        self.path(cell).is_dir()
    }

    fn release(&self) {
        if self.created {
            let _ = fs::remove_dir(&self.root);
        }
    }
}

/// In-memory stand-in for unit tests: records directories and writes, simulates
/// `populated` through [`FakeTree::set_populated`].
#[derive(Debug, Default)]
pub struct FakeTree {
    pub controllers: Vec<String>,
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    dirs: BTreeMap<String, BTreeMap<String, String>>,
    populated: BTreeMap<String, bool>,
    /// Cells with the device filter attached.
    filtered: std::collections::BTreeSet<String>,
    /// Of those, the cells whose filter allows /dev/kvm.
    kvm: std::collections::BTreeSet<String>,
    /// Make `attach_device_filter` fail, as on a kernel without CONFIG_CGROUP_BPF.
    no_device_filter: bool,
}

impl FakeTree {
    pub fn with_controllers(c: &[&str]) -> Self {
        Self {
            controllers: c.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    pub fn files(&self, cell: &str) -> Option<BTreeMap<String, String>> {
        self.state.lock().ok()?.dirs.get(cell).cloned()
    }

    pub fn has(&self, cell: &str) -> bool {
        self.state.lock().is_ok_and(|s| s.dirs.contains_key(cell))
    }

    /// Whether the cell's device filter is attached.
    pub fn has_device_filter(&self, cell: &str) -> bool {
        self.state.lock().is_ok_and(|s| s.filtered.contains(cell))
    }

    /// Whether the cell's device filter allows /dev/kvm.
    pub fn allows_kvm(&self, cell: &str) -> bool {
        self.state.lock().is_ok_and(|s| s.kvm.contains(cell))
    }

    /// Makes every later `attach_device_filter` fail (a kernel without cgroup BPF).
    pub fn refuse_device_filter(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.no_device_filter = true;
        }
    }

    pub fn set_populated(&self, cell: &str, p: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.populated.insert(cell.to_owned(), p);
        }
    }
}

fn fake_err(cell: &CellName, what: &str) -> CgroupError {
    CgroupError::Io {
        path: PathBuf::from(cell.as_str()),
        source: io::Error::new(io::ErrorKind::NotFound, what.to_owned()),
    }
}

impl CgroupTree for FakeTree {
    fn controllers(&self) -> Vec<String> {
        self.controllers.clone()
    }

    fn create(&self, cell: &CellName) -> Result<(), CgroupError> {
        let mut s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        if let Some(p) = cell.parent()
            && !s.dirs.contains_key(p.as_str())
        {
            return Err(fake_err(cell, "parent missing"));
        }
        if s.dirs.contains_key(cell.as_str()) {
            return Err(CgroupError::Io {
                path: PathBuf::from(cell.as_str()),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        s.dirs.insert(cell.as_str().to_owned(), BTreeMap::new());
        Ok(())
    }

    fn create_leaf(&self, group: &CellName) -> Result<(), CgroupError> {
        let mut s = self.state.lock().map_err(|_| fake_err(group, "poisoned"))?;
        if group
            .parent()
            .is_none_or(|p| !s.dirs.contains_key(p.as_str()))
        {
            return Err(fake_err(group, "parent missing"));
        }
        if s.populated.get(group.as_str()).copied().unwrap_or(false) {
            return Err(fake_err(group, "populated"));
        }
        s.dirs.insert(group.as_str().to_owned(), BTreeMap::new());
        Ok(())
    }

    fn group_fd(&self, group: &CellName) -> Result<OwnedFd, CgroupError> {
        self.leaf_fd(group)
    }

    fn write(&self, cell: &CellName, file: &str, value: &str) -> Result<(), CgroupError> {
        let mut s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        let d = s
            .dirs
            .get_mut(cell.as_str())
            .ok_or_else(|| fake_err(cell, "no such cell"))?;
        d.insert(file.to_owned(), value.to_owned());
        Ok(())
    }

    fn read(&self, cell: &CellName, file: &str) -> Result<String, CgroupError> {
        let s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        let d = s
            .dirs
            .get(cell.as_str())
            .ok_or_else(|| fake_err(cell, "no such cell"))?;
        match d.get(file) {
            Some(v) => Ok(v.clone()),
            // No process was placed in it (the fake spawner places none).
            None if file.ends_with("cgroup.procs") => Ok(String::new()),
            None => Err(fake_err(cell, file)),
        }
    }

    /// A stand-in fd (`/`, read-only): the fake spawner never uses it.
    fn leaf_fd(&self, cell: &CellName) -> Result<OwnedFd, CgroupError> {
        if !self.has(cell.as_str()) {
            return Err(fake_err(cell, "no such cgroup"));
        }
        fs::File::open("/")
            .map(OwnedFd::from)
            .map_err(|e| fake_err(cell, &e.to_string()))
    }

    fn move_into(&self, cell: &CellName, pid: i32) -> Result<(), CgroupError> {
        if !self.has(cell.as_str()) {
            return Err(fake_err(cell, "no such cgroup"));
        }
        self.write(cell, "moved", &pid.to_string())
    }

    fn populated(&self, cell: &CellName) -> Result<bool, CgroupError> {
        let s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        Ok(s.populated.get(cell.as_str()).copied().unwrap_or(false))
    }

    fn kill(&self, cell: &CellName) -> Result<(), CgroupError> {
        self.set_populated(cell.as_str(), false);
        self.write(cell, "cgroup.kill", "1")
    }

    fn freeze(&self, cell: &CellName, frozen: bool) -> Result<(), CgroupError> {
        self.write(cell, "cgroup.freeze", if frozen { "1" } else { "0" })
    }

    fn attach_device_filter(
        &self,
        cell: &CellName,
        devices: aurae_sys::bpf::CellDevices,
    ) -> Result<(), CgroupError> {
        let mut s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        if !s.dirs.contains_key(cell.as_str()) {
            return Err(fake_err(cell, "no such cell"));
        }
        if s.no_device_filter {
            return Err(CgroupError::DeviceFilter {
                path: self.path(cell),
                source: aurae_sys::bpf::DeviceFilterError::Load {
                    source: io::Error::from_raw_os_error(nix::libc::EINVAL),
                    log: String::new(),
                },
            });
        }
        s.filtered.insert(cell.as_str().to_owned());
        if devices.kvm {
            s.kvm.insert(cell.as_str().to_owned());
        }
        Ok(())
    }

    fn remove(&self, cell: &CellName) -> Result<(), CgroupError> {
        let mut s = self.state.lock().map_err(|_| fake_err(cell, "poisoned"))?;
        let prefix = format!("{}/", cell.as_str());
        let own = format!("{prefix}{}", crate::spec::OWN_GROUP_PREFIX);
        s.dirs.retain(|k, _| !k.starts_with(&own));
        if s.dirs.keys().any(|k| k.starts_with(&prefix)) {
            return Err(fake_err(cell, "has child cells"));
        }
        s.filtered.remove(cell.as_str());
        s.dirs
            .remove(cell.as_str())
            .map(|_| ())
            .ok_or_else(|| fake_err(cell, "no such cell"))
    }

    fn path(&self, cell: &CellName) -> PathBuf {
        PathBuf::from("/fake").join(cell.as_str())
    }

    fn exists(&self, cell: &CellName) -> bool {
        self.has(cell.as_str())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn favordynmods_is_read_from_the_mount_holding_the_root() {
        let info = "24 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n\
                    30 24 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
                    31 1 0:24 / /proc rw - proc proc rw\n";
        let p = std::path::Path::new;
        assert!(super::favordynmods_in(info, p("/sys/fs/cgroup/aurae")));
        assert!(!super::favordynmods_in(
            info,
            p("/sys/fs/cgroup/unified/aurae")
        ));
        assert!(!super::favordynmods_in(info, p("/proc/x")));
        assert!(!super::favordynmods_in("", p("/sys/fs/cgroup/aurae")));
    }

    use super::*;

    #[test]
    fn fake_tree_enforces_parents_and_children() {
        let t = FakeTree::with_controllers(&["memory"]);
        let web = CellName::parse("n", "web").unwrap();
        let api = CellName::parse("n", "web/api").unwrap();
        assert!(t.create(&api).is_err(), "parent first");
        t.create(&web).unwrap();
        t.create(&api).unwrap();
        assert!(t.remove(&web).is_err(), "children first");
        t.remove(&api).unwrap();
        t.remove(&web).unwrap();
    }

    #[test]
    fn fake_tree_records_the_device_filter_and_can_refuse_it() {
        let t = FakeTree::default();
        let web = CellName::parse("n", "web").unwrap();
        assert!(
            t.attach_device_filter(&web, Default::default()).is_err(),
            "no such cell"
        );
        t.create(&web).unwrap();
        t.attach_device_filter(&web, Default::default()).unwrap();
        assert!(t.has_device_filter("web"));
        assert_eq!(
            t.files("web").unwrap().len(),
            0,
            "no interface file written"
        );
        t.remove(&web).unwrap();
        assert!(!t.has_device_filter("web"));
        t.refuse_device_filter();
        t.create(&web).unwrap();
        let err = t
            .attach_device_filter(&web, Default::default())
            .unwrap_err();
        assert!(matches!(err, CgroupError::DeviceFilter { .. }), "{err:?}");
        assert!(err.to_string().contains("CONFIG_CGROUP_BPF"), "{err}");
    }

    /// The real tree (root and cgroup v2): the filter is on the cell's directory, once.
    #[test]
    fn fs_tree_attaches_the_device_filter_to_the_cells_directory() {
        use std::os::fd::AsFd;
        let test = "fs_tree_attaches_the_device_filter_to_the_cells_directory";
        let parent = match aurae_testkit::tier::cgroup_parent() {
            Ok(p) => p,
            Err(reason) => {
                aurae_testkit::tier::check(test, aurae_testkit::tier::Tier::Host, Some(reason));
                return;
            }
        };
        let root = parent.join(format!("aurae-unit-devfilter-{}", std::process::id()));
        let t = FsTree::open(&root).unwrap();
        let web = CellName::parse("n", "web").unwrap();
        t.create(&web).unwrap();
        let attached = t.attach_device_filter(&web, Default::default());
        let count = |p: &Path| {
            let f = fs::File::open(p).unwrap();
            aurae_sys::bpf::device_programs_attached(f.as_fd()).unwrap()
        };
        let counts = (count(&t.path(&web)), count(&t.path(&web).join(LEAF)));
        t.remove(&web).unwrap();
        t.release();
        attached.unwrap();
        assert_eq!(
            counts,
            (1, 0),
            "on the cell's directory, inherited by its leaf"
        );
        assert!(!root.exists());
    }
}
