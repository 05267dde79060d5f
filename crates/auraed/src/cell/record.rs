//! Durable records of cells and executables, and finding them again after a restart.
//!
//! Every cell is recorded when it is allocated (and when its tree's kind or its phase
//! changes), every executable when it starts and when it exits; both are deleted when
//! freed. A record holds what is needed to find the thing again: the cell's spec and its
//! init ([`ProcRef`]: pid + start time, so a reused pid is never taken for it), the
//! executable's process, log file and container directory. Records are written
//! atomically ([`crate::store::Store`]); a failed write is reported (a FAILED event and a
//! warning) and the workload runs on: it just would not survive a restart.
//!
//! At start, [`Cells::readopt`] reads them back: a cell whose cgroup is still there and
//! whose init is still the same process is served again with its executables (running
//! ones re-opened through `pidfd_open`; their later exit is seen through the pidfd, but its
//! status belongs to their new parent); an executable that ended while auraed was down is
//! shown as exited. What a record cannot explain is left for the sweep of the cgroup root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::SystemTime,
};

use aurae_proto::runtime::v0 as pb;

use crate::workload::Phase;
use aurae_sys::ExitStatus;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::info;

use super::{
    registry::Cells,
    spec::CellSpec,
    state::{Cell, Init, Inner, NsSet},
};
use crate::{
    events::EventBus,
    executable::{Executable, Exit, State},
    spec::{CellName, Label},
    store::kinds,
    workload::{log::Log, process::ProcRef},
};
pub use crate::{executable::ContainerRecord, workload::holder::HeldOutput};

/// What is recorded of a cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellRecord {
    pub spec: CellSpec,
    pub created_at: SystemTime,
    /// The cell's init (none for a cell that shares every host namespace).
    pub init: Option<ProcRef>,
    pub runs_containers: Option<bool>,
    /// Both kinds were started by a privileged caller (see `Inner::mixed`).
    #[serde(default)]
    pub mixed: bool,
    /// Set once the cell was stopped: its message.
    pub stopped: Option<String>,
    /// Made by a run call for its one workload (see `Inner::made_for_run`).
    #[serde(default)]
    pub made_for_run: bool,
}

/// How an executable ended, as recorded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub at: SystemTime,
}

impl From<&Exit> for ExitRecord {
    fn from(e: &Exit) -> Self {
        Self {
            code: match e.status {
                Some(ExitStatus::Code(c)) => Some(c),
                _ => None,
            },
            signal: match e.status {
                Some(ExitStatus::Signal(s)) => Some(s),
                _ => None,
            },
            oom_killed: e.oom_killed,
            at: e.at,
        }
    }
}

impl From<&ExitRecord> for Exit {
    fn from(r: &ExitRecord) -> Self {
        Self {
            status: match (r.code, r.signal) {
                (Some(c), _) => Some(ExitStatus::Code(c)),
                (None, Some(s)) => Some(ExitStatus::Signal(s)),
                (None, None) => None,
            },
            oom_killed: r.oom_killed,
            at: r.at,
        }
    }
}

/// What is recorded of an executable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutableRecord {
    pub cell: CellName,
    pub name: Label,
    pub argv: Vec<String>,
    /// `None` when the process was gone before it could be looked at.
    pub process: Option<ProcRef>,
    pub started_at: SystemTime,
    pub log: PathBuf,
    pub container: Option<ContainerRecord>,
    pub exit: Option<ExitRecord>,
    /// Where its output pipes are held (none: they did not survive the crash).
    #[serde(default)]
    pub output: Option<HeldOutput>,
    /// What is freed once it has ended (a run call's `remove`), if anything.
    #[serde(default)]
    pub free_on_exit: Option<crate::executable::FreeOnExit>,
    /// How its input is wired: `output` then holds stdout, stderr and (with `stdin`, while
    /// it is open) its stdin's write end, or (with `tty`) only its terminal's master side.
    #[serde(default)]
    pub interactive: crate::executable::Interactive,
    /// With `stdin_once`: an attach asked to write its stdin, so the stdin is not taken
    /// back after a restart (that attach ended with the old auraed).
    #[serde(default)]
    pub stdin_claimed: bool,
    /// Started with a cgroup of its own: the limits in force (see
    /// [`CellName::own_group`]).
    #[serde(default)]
    pub limits: Option<super::spec::Limits>,
}

/// The store key of an executable: `cell/name` (its own kind directory, so it never
/// meets a cell's key).
pub fn executable_key(cell: &CellName, name: &Label) -> String {
    format!("{cell}/{name}")
}

pub use crate::workload::record::Recorder;

impl Recorder {
    pub fn cell(&self, r: &CellRecord) {
        self.put(pb::Kind::Cell, kinds::CELL, r.spec.name.as_str(), r);
    }

    pub fn forget_cell(&self, name: &CellName) {
        self.delete(pb::Kind::Cell, kinds::CELL, name.as_str());
    }

    pub fn executable(&self, r: &ExecutableRecord) {
        let key = executable_key(&r.cell, &r.name);
        self.put(pb::Kind::Executable, kinds::EXECUTABLE, &key, r);
    }

    pub fn forget_executable(&self, cell: &CellName, name: &Label) {
        let key = executable_key(cell, name);
        self.delete(pb::Kind::Executable, kinds::EXECUTABLE, &key);
    }
}

impl Cell {
    /// This cell's record as it stands.
    pub fn record(&self) -> CellRecord {
        let (runs_containers, mixed, stopped, made_for_run) = self
            .inner
            .lock()
            .map(|i| {
                (
                    i.runs_containers,
                    i.mixed,
                    (i.phase != Phase::Running).then(|| i.message.clone()),
                    i.made_for_run,
                )
            })
            .unwrap_or_default();
        CellRecord {
            spec: self.spec.clone(),
            created_at: self.created_at,
            init: self.init.as_ref().and_then(|i| i.proc),
            runs_containers,
            mixed,
            stopped,
            made_for_run,
        }
    }
}

impl Executable {
    /// This executable's record as it stands.
    pub fn record(&self) -> ExecutableRecord {
        ExecutableRecord {
            cell: self.cell.clone(),
            name: self.name.clone(),
            argv: self.argv.clone(),
            process: self.process,
            started_at: self.started_at,
            log: self.log.path().unwrap_or_default(),
            container: self.container_record.clone(),
            exit: self.state.borrow().exit.as_ref().map(ExitRecord::from),
            output: self.held_now(),
            free_on_exit: self.free_on_exit.lock().ok().and_then(|f| *f),
            interactive: self.interactive,
            stdin_claimed: self.input.as_ref().is_some_and(|i| i.claimed()),
            limits: self.limits(),
        }
    }

    /// What the holder still keeps of it: nothing once its output was let go; without the
    /// stdin's write end once its input closed.
    fn held_now(&self) -> Option<HeldOutput> {
        if self
            .output_released
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        let h = self.held.as_ref()?;
        let i = self.interactive;
        let input_open = self.input.as_ref().is_some_and(|i| i.is_open());
        Some(if i.stdin && !i.tty && !input_open {
            h.first(2)
        } else {
            h.clone()
        })
    }

    /// Writes its record, unless it was freed.
    pub fn write_record(&self, recorder: &Recorder) {
        self.write_given(recorder, &self.record());
    }

    /// Writes `rec` as its record (its record and more: an exit not yet announced),
    /// unless it was freed.
    pub fn write_given(&self, recorder: &Recorder, rec: &ExecutableRecord) {
        let ok = self.recordable.lock().unwrap_or_else(|e| e.into_inner());
        if *ok {
            recorder.executable(rec);
        }
    }

    /// Deletes its record; nothing writes it again.
    pub fn forget_record(&self, recorder: &Recorder) {
        let mut ok = self.recordable.lock().unwrap_or_else(|e| e.into_inner());
        *ok = false;
        recorder.forget_executable(&self.cell, &self.name);
    }
}

/// Writes `exe`'s record again whenever its input's state changes (claimed, closed).
pub(super) fn record_input_changes(exe: &Arc<Executable>, recorder: &Recorder) {
    if let Some(i) = &exe.input {
        let (w, recorder) = (Arc::downgrade(exe), recorder.clone());
        i.on_change(move || {
            if let Some(e) = w.upgrade() {
                e.write_record(&recorder);
            }
        });
    }
}

/// What a restart found.
#[derive(Debug, Default)]
pub struct Readopted {
    /// The records were read and acted on (a store and a cgroup tree were there): only
    /// then may what they do not name be swept (else a start without its cgroup tree
    /// would remove the directories of cells a later start serves again).
    pub ran: bool,
    /// Cells served again (their names: the sweep leaves them alone).
    pub cells: BTreeSet<String>,
    /// The own groups of executables served again (`web/_exe.api`: the sweep leaves
    /// them alone; one no record explains is a process started and never recorded).
    pub own_groups: BTreeSet<String>,
    pub executables: usize,
    /// Executables that ended while auraed was down.
    pub ended: usize,
    /// What could not be served again, and unreadable records: for Daemon/Info.
    pub warnings: Vec<String>,
    /// Holders of a previous auraed whose pipes were taken back: the caller retires
    /// those nothing of ours still needs (VMs may use the same holder).
    pub old_holders: Vec<crate::workload::holder::ProcRef>,
}

/// Kills what a previous auraed started in `cell` and died before recording (a start
/// between its spawn and its record), with everything below it, and says so. In a cell
/// with a PID namespace of its own, a process whose parent is outside that namespace was
/// started by auraed (an executable, a container, an exec's command): its own workloads'
/// forks have their parent inside, and their orphans go to the cell's init. One that no
/// record names is no executable anyone can see or free, and its start was never
/// acknowledged: left, it would run unseen beside a retry of the same start. (An exec's
/// command is such a process too: its call ended with the previous auraed.)
fn kill_unrecorded_starts(
    tree: &dyn crate::workload::cgroup::CgroupTree,
    cell: &Cell,
) -> Vec<String> {
    let name = &cell.spec.name;
    let procs = match tree.leaf_procs(name) {
        Ok(p) => p,
        Err(e) => {
            return vec![format!(
                "cell {name:?}: its processes could not be listed to find starts a previous auraed did not record: {e}"
            )];
        }
    };
    let mut named: std::collections::BTreeSet<i32> = cell.init.iter().map(|i| i.pid).collect();
    named.extend(
        cell.executables()
            .iter()
            .filter(|e| !e.exited())
            .map(|e| e.pid),
    );
    let mut warnings = Vec::new();
    for pid in procs {
        if named.contains(&pid) || crate::workload::process::started_from_outside(pid) != Some(true)
        {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let killed = crate::workload::process::kill_tree(pid);
        warnings.push(format!(
            "cell {name:?}: process {pid} ({}) was started by a previous auraed that stopped before recording it: killed, with what it started ({killed} processes)",
            comm.trim()
        ));
    }
    warnings
}

impl Cells {
    /// Serves again what the records of a previous auraed describe (see the module
    /// documentation). Call once, at start, before the sweep and before serving.
    pub async fn readopt(self: &Arc<Self>) -> Readopted {
        let mut out = Readopted::default();
        let (Some(store), Ok(tree)) = (self.recorder.store().cloned(), self.tree()) else {
            return out;
        };
        out.ran = true;
        let cells = store.load::<CellRecord>(kinds::CELL);
        let exes = store.load::<ExecutableRecord>(kinds::EXECUTABLE);
        out.warnings.extend(cells.quarantined);
        out.warnings.extend(exes.quarantined);
        let mut by_cell: BTreeMap<String, Vec<ExecutableRecord>> = BTreeMap::new();
        let mut to_free = Vec::new();
        for (_, r) in exes.records {
            by_cell.entry(r.cell.to_string()).or_default().push(r);
        }
        // Parents before their children: by depth, then name. Not by the store's key: a
        // name too long for a file name is stored under its hash (`h-…`), which sorts
        // anywhere among its parents.
        let mut cells = cells.records;
        cells.sort_by_cached_key(|(_, r)| {
            let n = r.spec.name.as_str();
            (n.matches('/').count(), n.to_owned())
        });
        for (_, rec) in cells {
            let name = rec.spec.name.clone();
            let parent = match name.parent() {
                None => None,
                Some(p) => match self.find(&p) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        out.warnings.push(format!(
                            "cell {name:?}: its parent was not found again; removed"
                        ));
                        self.recorder.forget_cell(&name);
                        continue;
                    }
                },
            };
            if !tree.exists(&name) {
                out.warnings.push(format!(
                    "cell {name:?}: its cgroup is gone; its record is removed"
                ));
                self.recorder.forget_cell(&name);
                continue;
            }
            let ns = NsSet::of(&rec.spec, parent.is_some());
            let mut why_lost = "its init exited while auraed was down".to_owned();
            let init = match (&rec.init, ns.any()) {
                (Some(p), true) => match p.open_or_why() {
                    Ok(Some(pidfd)) => Some(Init {
                        pid: p.pid,
                        proc: Some(*p),
                        pidfd: Arc::new(pidfd),
                    }),
                    Ok(None) => None,
                    Err(why) => {
                        why_lost = format!("its init {why}");
                        None
                    }
                },
                _ => None,
            };
            let init_lost = ns.any() && init.is_none();
            if init_lost && rec.stopped.is_none() {
                // Its namespaces are gone with the init (or cannot be reached through it):
                // what is left cannot be served.
                let _ = tree.kill(&name);
                out.warnings.push(format!(
                    "cell {name:?}: {why_lost}; its processes were killed"
                ));
            }
            let pid_holder = match (&parent, &init) {
                (Some(p), _) if !rec.spec.namespaces.share_host_pid => p.pid_holder.clone(),
                (None, Some(i)) if ns.pid => Some(i.pidfd.clone()),
                _ => None,
            };
            let (phase, message) = match (&rec.stopped, init_lost) {
                (Some(m), _) => (Phase::Exited, m.clone()),
                (None, true) => (Phase::Exited, why_lost),
                (None, false) => (Phase::Running, String::new()),
            };
            let cell = Arc::new(Cell {
                created_at: rec.created_at,
                ns,
                init,
                pid_holder,
                inner: Mutex::new(Inner {
                    phase,
                    message,
                    executables: BTreeMap::new(),
                    runs_containers: rec.runs_containers,
                    mixed: rec.mixed,
                    starting: Default::default(),
                    made_for_run: rec.made_for_run,
                }),
                oom_kills: AtomicU64::new(crate::workload::supervise::oom_kills(
                    tree.as_ref(),
                    &name,
                )),
                spec: rec.spec,
            });
            for r in by_cell.remove(name.as_str()).unwrap_or_default() {
                if r.limits.is_some() {
                    out.own_groups
                        .insert(r.cell.own_group(&r.name).as_str().to_owned());
                }
                let (exe, ended) = self.readopt_executable(&r, init_lost, &mut out);
                if ended {
                    out.ended += 1;
                }
                out.executables += 1;
                if let Ok(mut i) = cell.inner.lock() {
                    i.executables.insert(exe.name.clone(), exe);
                }
            }
            if cell.pid_holder.is_some() && !init_lost {
                out.warnings
                    .extend(kill_unrecorded_starts(tree.as_ref(), &cell));
            }
            if let Some(i) = &cell.init {
                self.watch_readopted_init(&name, i.pidfd.clone());
            }
            self.recorder.cell(&cell.record());
            if let Ok(mut c) = self.cells.lock() {
                c.insert(name.clone(), cell.clone());
            }
            // Run calls' `remove` that the previous auraed had not done yet: started once
            // every cell is back (a parent's free needs its children registered).
            for exe in cell.executables() {
                if exe.free_on_exit.lock().ok().and_then(|f| *f).is_some() {
                    to_free.push((exe, cell.clone()));
                }
            }
            if tree.controllers().iter().any(|c| c == "memory") {
                tokio::spawn(super::registry::watch_oom(
                    self.clone(),
                    cell.clone(),
                    tree.clone(),
                ));
            }
            info!(cell = %name, "cell re-adopted after a restart");
            out.cells.insert(name.to_string());
        }
        for (exe, cell) in to_free {
            drop(self.when_ended(exe, Some(cell)));
        }
        // A run call's cell that holds nothing: its start was cut by a crash before the
        // workload's record (what it had started was killed above). The call failed; as
        // a failed start's cell, it goes.
        let snapshot = self.snapshot();
        for cell in &snapshot {
            let name = &cell.spec.name;
            let empty = cell.phase() == Phase::Running
                && cell.inner.lock().is_ok_and(|i| i.made_for_run)
                && cell.executables().is_empty()
                && !snapshot
                    .iter()
                    .any(|c| c.spec.name.parent().as_ref() == Some(name));
            if !empty {
                continue;
            }
            match self.free_if_same(cell).await {
                Ok(()) => {
                    out.cells.remove(name.as_str());
                    out.warnings.push(format!(
                        "cell {name:?}: made by a run call whose workload a previous auraed started but never recorded; freed"
                    ));
                }
                Err(e) => out.warnings.push(format!(
                    "cell {name:?}: made by a run call whose workload a previous auraed never recorded; freeing it failed: {e}"
                )),
            }
        }
        for (cell, rs) in by_cell {
            for r in rs {
                out.warnings.push(format!(
                    "executable {cell}/{}: its cell was not found again; removed",
                    r.name
                ));
                self.recorder.forget_executable(&r.cell, &r.name);
            }
        }
        out
    }

    /// One executable of a re-adopted cell; whether it ended while auraed was down.
    fn readopt_executable(
        &self,
        r: &ExecutableRecord,
        cell_killed: bool,
        out: &mut Readopted,
    ) -> (Arc<Executable>, bool) {
        let pidfd = match (&r.exit, &r.process, cell_killed) {
            (None, Some(p), false) => match p.open_or_why() {
                Ok(pidfd) => pidfd.map(Arc::new),
                Err(why) => {
                    // Taken as ended: with a group of its own, ending it kills what is in
                    // it (below); without, nothing can be signalled safely by pid alone.
                    let then = if r.limits.is_some() {
                        "it is ended (its group killed)"
                    } else {
                        "it is shown as ended and no longer supervised"
                    };
                    out.warnings.push(format!(
                        "executable {}/{}: its process {why}; {then}",
                        r.cell, r.name
                    ));
                    None
                }
            },
            _ => None,
        };
        // A group of its own: its OOM kills are counted there. Ended while auraed was down,
        // it was OOM-killed if one happened and such a kill takes the whole group
        // (`memory.oom.group`); else a process of it may have been. The count now is its
        // watcher's baseline.
        let own = match (&r.limits, self.tree()) {
            (Some(_), Ok(tree)) => Some((tree, r.cell.own_group(&r.name))),
            _ => None,
        };
        let oom_before = own.as_ref().map_or(0, |(tree, g)| {
            crate::workload::supervise::oom_kills(tree.as_ref(), g)
        });
        let exit = r.exit.as_ref().map(Exit::from).or_else(|| {
            pidfd.is_none().then(|| Exit {
                status: None,
                oom_killed: oom_before > 0 && r.limits.as_ref().is_some_and(|l| l.memory_oom_group),
                at: SystemTime::now(),
            })
        });
        let ended = r.exit.is_none() && exit.is_some();
        if ended && let Some((tree, g)) = &own {
            super::run::end_own_group(tree.as_ref(), g, &executable_key(&r.cell, &r.name));
        }
        let rootfs = r.container.as_ref().map(|c| {
            let pin = Arc::new(self.pin_layers(&c.layers));
            crate::container::Rootfs::adopt(c.dir.clone(), pin)
        });
        let log = Arc::new(Log::resume(r.log.clone()));
        // Its pipes, taken back from the holder that kept them: what was written while
        // auraed was down is still in them. Its output must all come back (else none is
        // pumped); its stdin only if it was not closed meanwhile.
        let tty = r.interactive.tty;
        let outputs = if tty { 1 } else { 2 };
        let reclaimed = r
            .output
            .as_ref()
            .and_then(|h| match h.reclaim(pidfd.is_some()) {
                Ok(fds) => Some(fds),
                Err(e) => {
                    out.warnings.push(format!(
                        "executable {}/{}: its output pipes could not be taken back ({e})",
                        r.cell, r.name
                    ));
                    None
                }
            });
        let (pipes, input): (
            Option<Vec<std::os::fd::OwnedFd>>,
            Option<std::os::fd::OwnedFd>,
        ) = match reclaimed {
            Some(mut fds) if fds.len() >= outputs => {
                let rest = fds.split_off(outputs);
                let output: Option<Vec<std::os::fd::OwnedFd>> = fds.into_iter().collect();
                let input = match (&output, tty) {
                    (Some(o), true) => o[0].try_clone().ok(),
                    // A stdin_once whose attach had begun: that attach ended with the old
                    // auraed, and so does the stdin (the old holder's copy goes with it).
                    (Some(_), false) if r.interactive.stdin_once && r.stdin_claimed => None,
                    (Some(_), false) if r.interactive.stdin => rest.into_iter().next().flatten(),
                    _ => None,
                };
                (output, input)
            }
            _ => (None, None),
        };
        let held = pipes.as_ref().and_then(|o| {
            let mut all: Vec<&std::os::fd::OwnedFd> = o.iter().collect();
            if let (Some(i), false) = (&input, tty) {
                all.push(i);
            }
            self.hold_output(&r.cell, &r.name, &all)
        });
        let ours = held.clone();
        // The old holder goes only once our holder holds the pipes; until then (no holder
        // of ours, a state disk that takes no writes) it keeps them, and the record keeps
        // naming it.
        let held = match (held, &r.output) {
            (Some(new), Some(old)) => {
                out.old_holders.push(old.holder);
                Some(new)
            }
            // Taken back but not held by ours: the old holder keeps them.
            (None, Some(old)) if pipes.is_some() => Some(old.clone()),
            // Not there any more (released at the end of the output, or the holder is
            // gone): nothing is held.
            _ => None,
        };
        let input = input.map(|fd| self.new_input(fd, r.interactive, ours.as_ref()));
        let exe = Arc::new(Executable {
            cell: r.cell.clone(),
            name: r.name.clone(),
            argv: r.argv.clone(),
            pid: r.process.map_or(0, |p| p.pid),
            pidfd: pidfd.clone(),
            process: r.process,
            held: held.clone(),
            rootfs: std::sync::Mutex::new(rootfs),
            image_digest: r.container.as_ref().map(|c| c.image_digest.clone()),
            container_record: r.container.clone(),
            interactive: r.interactive,
            input: input.clone(),
            started_at: r.started_at,
            log: log.clone(),
            state: watch::channel(State {
                phase: if exit.is_some() {
                    Phase::Exited
                } else {
                    Phase::Running
                },
                exit,
            })
            .0,
            free_on_exit: std::sync::Mutex::new(r.free_on_exit),
            output_released: Default::default(),
            recordable: std::sync::Mutex::new(true),
            own_limits: r.limits.clone().map(std::sync::Mutex::new),
            updating: Default::default(),
        });
        record_input_changes(&exe, &self.recorder);
        let id = executable_key(&r.cell, &r.name);
        if ended {
            self.events.emit(
                pb::Kind::Executable,
                &id,
                pb::EventType::Exited,
                "ended while auraed was down (its exit status went to its new parent)",
            );
        }
        let pumped = pipes.is_some();
        if let Some(o) = pipes {
            self.pump_output(&exe, o);
        } else if exit.is_some() {
            log.close();
        }
        if exit.is_some()
            && let Some(i) = &exe.input
        {
            i.close();
        }
        exe.write_record(&self.recorder);
        if let Some(pidfd) = pidfd {
            tokio::spawn(watch_readopted_executable(
                self.events.clone(),
                self.recorder.clone(),
                exe.clone(),
                pidfd,
                !pumped,
                own.map(|(tree, g)| (tree, g, oom_before)),
            ));
        }
        (exe, ended)
    }

    /// An init that is not our child any more: its exit is seen through its pidfd.
    fn watch_readopted_init(&self, name: &CellName, pidfd: Arc<aurae_sys::Pidfd>) {
        let events = self.events.clone();
        let name = name.clone();
        tokio::spawn(async move {
            crate::workload::supervise::exited(pidfd).await;
            events.emit(
                pb::Kind::Cell,
                name.as_str(),
                pb::EventType::Stopped,
                "cell init exited",
            );
        });
    }
}

/// A re-adopted executable's end: seen through its pidfd, status unknown (it is not our
/// child any more), recorded.
async fn watch_readopted_executable(
    events: Arc<EventBus>,
    recorder: Recorder,
    exe: Arc<Executable>,
    pidfd: Arc<aurae_sys::Pidfd>,
    close_log: bool,
    own: Option<(Arc<dyn crate::workload::cgroup::CgroupTree>, CellName, u64)>,
) {
    crate::workload::supervise::exited(pidfd).await;
    if close_log {
        exe.log.close();
    }
    if let Some(i) = &exe.input {
        i.close();
    }
    let id = executable_key(&exe.cell, &exe.name);
    // Its exit status went to its new parent; an OOM kill in its own group since it was
    // re-adopted is still seen.
    let oom_killed = own.as_ref().is_some_and(|(tree, g, before)| {
        crate::workload::supervise::oom_kills(tree.as_ref(), g) > *before
    });
    if let Some((tree, g, _)) = &own {
        super::run::end_own_group(tree.as_ref(), g, &id);
    }
    let e = Exit {
        status: None,
        oom_killed,
        at: SystemTime::now(),
    };
    // Recorded before anyone waiting learns of it (see `supervise`).
    let mut rec = exe.record();
    rec.exit = Some(ExitRecord::from(&e));
    exe.write_given(&recorder, &rec);
    exe.state.send_replace(State {
        phase: Phase::Exited,
        exit: Some(e),
    });
    events.emit(
        pb::Kind::Executable,
        &id,
        if oom_killed {
            pb::EventType::OomKilled
        } else {
            pb::EventType::Exited
        },
        "exited after auraed re-adopted it (its exit status went to its new parent)",
    );
}
