//! Starting executables in a cell (plain or as a container), and supervising them until
//! they exit.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use aurae_proto::runtime::v0 as pb;

use crate::workload::Phase;
use aurae_sys::{ExitStatus, Namespaces as Ns, SpawnError, SpawnRequest, spawn::Program};
use tokio::sync::watch;
use tracing::warn;

use super::{
    registry::{Cells, InTask, MAX_EXECUTABLES},
    state::Cell,
};
use crate::{
    events::EventBus,
    executable::{self, Executable, ExecutableSpec, Exit, Prepared, State},
    spec::{CellName, Label},
    workload::{
        WorkloadError,
        cgroup::CgroupTree,
        log::{Log, Stream},
        output,
        supervise::oom_kills,
    },
};

/// How long an executable whose output ended waits for its exit before its record stops
/// naming the holder's copies and the holder lets go of them.
const RELEASE_AFTER_EXIT: std::time::Duration = std::time::Duration::from_millis(20);

impl Cells {
    /// Starts an executable in its cell; with a `container` plan (already applied to
    /// `spec`), in a container root of its own. In a task of its own: a caller that goes
    /// away cannot leave a process started but not supervised.
    pub async fn run(
        self: &Arc<Self>,
        spec: ExecutableSpec,
        container: Option<crate::container::Plan>,
    ) -> Result<Arc<Executable>, WorkloadError> {
        let me = self.clone();
        super::registry::detached("run", move |t| async move {
            me.run_in_task(spec, container, t).await
        })
        .await
    }

    /// [`Cells::run`] in the caller's own task (`InTask`), as part of a larger operation.
    pub async fn run_in_task(
        self: &Arc<Self>,
        spec: ExecutableSpec,
        container: Option<crate::container::Plan>,
        _: InTask,
    ) -> Result<Arc<Executable>, WorkloadError> {
        self.run_checked(spec, container, None).await
    }

    /// [`Cells::run_in_task`] in the cell `cell` itself: refused if its name now names
    /// another cell (freed and allocated again meanwhile).
    pub async fn run_in(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        spec: ExecutableSpec,
        container: Option<crate::container::Plan>,
        _: InTask,
    ) -> Result<Arc<Executable>, WorkloadError> {
        self.run_checked(spec, container, Some(cell.clone())).await
    }

    async fn run_checked(
        self: &Arc<Self>,
        spec: ExecutableSpec,
        container: Option<crate::container::Plan>,
        expected: Option<Arc<Cell>>,
    ) -> Result<Arc<Executable>, WorkloadError> {
        let t_call = Instant::now();
        if spec.container.is_some() != container.is_some() {
            return Err(WorkloadError::Precondition(
                "a container executable needs its resolved image".into(),
            ));
        }
        self.check_writable()?;
        let tree = self.tree()?;
        let cell = self.find(&spec.cell).map_err(|_| {
            WorkloadError::NotFound(format!(
                "cell {:?} does not exist: allocate it first (aer cell allocate {})",
                spec.cell.as_str(),
                spec.cell.as_str()
            ))
        })?;
        if expected.as_ref().is_some_and(|e| !Arc::ptr_eq(e, &cell)) {
            return Err(WorkloadError::Precondition(format!(
                "cell {:?} was freed and allocated again by someone else meanwhile",
                spec.cell.as_str()
            )));
        }
        if cell.phase() != Phase::Running {
            return Err(WorkloadError::Precondition(format!(
                "cell {:?} is not running; free it and allocate it again",
                spec.cell.as_str()
            )));
        }
        let name = match &spec.name {
            Some(n) => n.clone(),
            None => self.generated_name(&spec.argv[0])?,
        };
        {
            let mut inner = cell
                .inner
                .lock()
                .map_err(|_| WorkloadError::Precondition("cell lock poisoned".into()))?;
            if inner.executables.contains_key(&name) || inner.starting.contains(&name) {
                return Err(WorkloadError::Exists(format!(
                    "executable {:?} already exists in cell {:?}",
                    name.as_str(),
                    spec.cell.as_str()
                )));
            }
            if inner.executables.len() + inner.starting.len() >= MAX_EXECUTABLES {
                return Err(WorkloadError::Exhausted(format!(
                    "cell {:?} holds {MAX_EXECUTABLES} executables: free exited ones first",
                    spec.cell.as_str()
                )));
            }
            inner.starting.insert(name.clone());
        }
        // The reservation ends however the start ends.
        let _reserved = Reservation {
            cell: cell.clone(),
            name: name.clone(),
        };
        self.claim_kind(&spec)?;
        let prepared = Prepared::new(&spec)?;
        let has_memory = tree.controllers().iter().any(|c| c == "memory");
        // With limits of its own: its own group, every limit's controller checked first.
        let own = spec
            .limits
            .clone()
            .map(|l| (cell.spec.name.own_group(&name), *l));
        if let Some((_, l)) = &own {
            super::limits::check_controllers(
                &super::limits::own_writes(l, has_memory),
                &tree.controllers(),
            )?;
        }
        let charged = own.as_ref().map_or(&spec.cell, |(g, _)| g).clone();
        // A group of its own starts counting at 0 (one taken over from a free whose
        // removal failed is made anew).
        let oom = has_memory.then(|| {
            (
                tree.clone(),
                charged.clone(),
                if own.is_some() {
                    0
                } else {
                    oom_kills(tree.as_ref(), &charged)
                },
            )
        });
        let own_group = own.as_ref().map(|(g, _)| g.clone());
        let uid = spec.uid.unwrap_or(0);
        let gid = spec.gid.unwrap_or(uid);
        let allow_new_privileges = spec.allow_new_privileges;
        let me = self.clone();
        let cell2 = cell.clone();
        let containers_dir = self.containers_dir.clone();
        let cell_dirs = self.cell_dirs.clone();
        let image_digest = container.as_ref().map(|p| p.image.digest.clone());
        let image_layers = container.as_ref().map(|p| p.image.layers.clone());
        let file_dirs: Vec<Option<std::path::PathBuf>> =
            container.as_ref().map_or_else(Vec::new, |p| {
                p.files
                    .iter()
                    // Only a read-only directory may be written again: a writable one is the
                    // container's to change (it could put links where auraed writes).
                    .map(|f| (f.is_dir() && f.read_only).then(|| f.path.clone()))
                    .collect()
            });
        // The holder takes its copies while the child starts, on a pool thread (the spawn
        // keeps this one until the child has exec'd): a round trip to another process off
        // the call's path. A terminal's ends exist only after the spawn: taken then.
        let early_hold = match &prepared.console {
            None => self.hold_early(&prepared, spec.interactive),
            Some(_) => None,
        };
        let t_spawn = Instant::now();
        let t_before = t_spawn - t_call;
        let tree_after = tree.clone();
        let (prepared, child, rootfs) = crate::workload::off_runtime(move || {
            let mut rootfs = None;
            let r = (|| {
                let t = Instant::now();
                let leaf = match &own {
                    Some((group, limits)) => {
                        make_own_group(tree.as_ref(), group, limits, has_memory)?;
                        tree.group_fd(group)?
                    }
                    None => tree.leaf_fd(&cell2.spec.name)?,
                };
                let init = cell2.init.as_ref();
                let args = match &container {
                    Some(plan) => {
                        let r = crate::container::Rootfs::create(
                            &containers_dir,
                            plan.pin.clone(),
                            // A read-only root takes only mount points before it turns
                            // read-only: its upper layer can be in memory.
                            plan.read_only_root,
                        )?;
                        let dirs = plan
                            .cell_dirs
                            .iter()
                            .enumerate()
                            .map(|(i, d)| {
                                cell_dirs.open(&cell2.spec.name, &d.name).map_err(|e| {
                                    let msg = format!(
                                        "container.cell_directories[{i}]: the cell's directory {:?}: {e}",
                                        d.name
                                    );
                                    if e.kind() == std::io::ErrorKind::QuotaExceeded {
                                        WorkloadError::Exhausted(msg)
                                    } else {
                                        WorkloadError::Precondition(msg)
                                    }
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        let a = crate::container::Args::new(plan, &r, &dirs)?;
                        rootfs = Some(r);
                        Some(a)
                    }
                    None => None,
                };
                let setup = args
                    .as_ref()
                    .map(|a| a.setup(cell2.ns.others & Ns::CGROUP != 0))
                    .transpose()?;
                let req = SpawnRequest {
                    program: Program::Path(&prepared.argv[0]),
                    argv: &prepared.argv,
                    envp: &prepared.envp,
                    cwd: Some(&prepared.cwd),
                    uid: Some(uid),
                    gid: Some(gid),
                    no_new_privs: !allow_new_privileges,
                    stdio: prepared.stdio(),
                    controlling_terminal: prepared.tty && prepared.console.is_none(),
                    pass_fd: None,
                    cgroup: Some(leaf.as_raw_fd()),
                    new_namespaces: Ns(0),
                    pid_namespace_of: cell2.pid_holder.as_ref().map(|h| h.as_raw_fd()),
                    join: init
                        .filter(|_| cell2.ns.others != 0)
                        .map(|i| (i.pidfd.as_raw_fd(), Ns(cell2.ns.others))),
                    // With a group of its own in a cell with its own cgroup namespace: a
                    // cgroup namespace of its own, rooted at its group (born there), so
                    // its /proc/self/cgroup reads "/" and a container's /sys/fs/cgroup
                    // shows its own limits (what a JVM sizes its heap from).
                    unshare: Ns(if setup.is_some() { Ns::MOUNT } else { 0 }
                        | if own.is_some() && cell2.ns.others & Ns::CGROUP != 0 {
                            Ns::CGROUP
                        } else {
                            0
                        }),
                    container: setup.as_ref(),
                    console: prepared
                        .console
                        .as_ref()
                        .map(|(_, theirs)| theirs.as_raw_fd()),
                };
                let t_prep = t.elapsed();
                let r = me
                    .spawner
                    .spawn(&req)
                    .map_err(|source| container_error(args.as_ref(), source));
                tracing::debug!(
                    prepare_us = t_prep.as_micros() as u64,
                    clone_to_exec_us = (t.elapsed() - t_prep).as_micros() as u64,
                    "spawn timings"
                );
                r
            })();
            if let (Err(_), Some((group, _))) = (&r, &own) {
                let _ = tree.remove(group);
            }
            (prepared, r, rootfs)
        });
        // On failure `rootfs` is dropped here, and its directories with it.
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(h) = early_hold {
                    self.let_go(h);
                }
                return Err(e);
            }
        };
        if let Some(r) = &rootfs
            && let Some(ns) =
                crate::workload::supervise::mount_namespace_of(child.pid, &child.pidfd)
        {
            r.hold_mount_namespace(ns);
        }
        let mut prepared = prepared;
        if let Err(e) = prepared.take_console() {
            let _ = child.pidfd.send_signal(nix::libc::SIGKILL);
            if let Some(g) = &own_group {
                let _ = tree_after.kill(g);
            }
            return Err(WorkloadError::Precondition(format!(
                "the container's terminal: {e}"
            )));
        }
        tracing::debug!(
            total_us = t_spawn.elapsed().as_micros() as u64,
            "run timings"
        );
        let Prepared {
            child: child_fds,
            output,
            stdin_data,
            input,
            argv,
            ..
        } = prepared;
        drop(child_fds);
        let _ = argv;
        // The holder keeps copies of the read ends (and of an interactive stdin's write
        // end): a crash of auraed never leaves the workload writing into a pipe nobody
        // can read (SIGPIPE), nor reading EOF on a stdin still to be written; a restarted
        // auraed takes them back.
        let interactive = spec.interactive;
        let held = match early_hold {
            Some(h) => {
                let r = h.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
                self.held_or_report(&spec.cell, &name, r)
            }
            None => {
                let mut to_hold: Vec<&std::os::fd::OwnedFd> = output.iter().collect();
                if let (Some(i), false) = (&input, interactive.tty) {
                    to_hold.push(i);
                }
                self.hold_output(&spec.cell, &name, &to_hold)
            }
        };
        let t_held = t_call.elapsed();
        let output_count = output.len();
        let input = input.map(|fd| self.new_input(fd, interactive, held.as_ref()));
        let log = Arc::new(Log::on_first_write(
            self.logs_dir
                .join(spec.cell.as_str())
                .join(format!("{name}.log")),
        ));
        if let Some((w, data)) = stdin_data {
            tokio::spawn(output::feed(w, data));
        }
        let exe = Arc::new(Executable {
            cell: spec.cell.clone(),
            name: name.clone(),
            argv: spec.argv.clone(),
            pid: child.pid,
            pidfd: Some(child.pidfd.clone()),
            process: crate::workload::process::ProcRef::of(child.pid).ok(),
            held,
            container_record: match (&rootfs, &image_digest, image_layers) {
                (Some(r), Some(d), Some(layers)) => Some(super::record::ContainerRecord {
                    dir: r.path().to_owned(),
                    image_digest: d.clone(),
                    layers,
                    file_dirs,
                }),
                _ => None,
            },
            rootfs: std::sync::Mutex::new(rootfs),
            image_digest,
            interactive,
            input,
            started_at: SystemTime::now(),
            log,
            state: watch::channel(State {
                phase: Phase::Running,
                exit: None,
            })
            .0,
            free_on_exit: std::sync::Mutex::new(spec.free_on_exit),
            output_released: Default::default(),
            recordable: std::sync::Mutex::new(true),
            own_limits: spec.limits.clone().map(|l| std::sync::Mutex::new(*l)),
            updating: Default::default(),
        });
        super::record::record_input_changes(&exe, &self.recorder);
        // The cell may have been stopped or freed while the child started: then the child
        // goes (it was born in a cgroup being killed) and the start fails. Its output is
        // pumped only once it is the cell's: a pump started before this could make the
        // log file, and the log directory the cell's free removed, again.
        let still_here = self
            .find(&spec.cell)
            .is_ok_and(|c| Arc::ptr_eq(&c, &cell) && c.phase() == Phase::Running);
        let inserted = still_here
            && cell.inner.lock().is_ok_and(|mut inner| {
                inner.executables.insert(name.clone(), exe.clone());
                true
            });
        if !inserted {
            let _ = exe.signal(nix::libc::SIGKILL);
            let _ = exe.log.remove_files();
            exe.forget_record(&self.recorder);
            drop(output);
            if let (Some(h), Some(held)) = (self.holder.clone(), exe.held.as_ref()) {
                let held = held.first(output_count);
                tokio::spawn(async move {
                    if let Err(e) = h.release_held(&held) {
                        warn!("the output holder did not let go of a failed start's pipes: {e}");
                    }
                });
            }
            if let Some(g) = &own_group {
                let _ = tree_after.kill(g);
            }
            return Err(WorkloadError::Precondition(format!(
                "cell {:?} was stopped or freed while the executable started",
                spec.cell.as_str()
            )));
        }
        self.pump_output(&exe, output);
        let t_built = t_call.elapsed();
        exe.write_record(&self.recorder);
        let t_recorded = t_call.elapsed();
        let id = format!("{}/{}", spec.cell, name);
        self.events.emit(
            pb::Kind::Executable,
            &id,
            pb::EventType::Started,
            format!("pid {}", child.pid),
        );
        tokio::spawn(supervise(
            self.events.clone(),
            self.recorder.clone(),
            oom,
            own_group.map(|g| (tree_after, g)),
            exe.clone(),
            child.exit,
            id,
        ));
        tracing::debug!(
            before_us = t_before.as_micros() as u64,
            spawn_hold_us = (t_held - t_before).as_micros() as u64,
            build_us = (t_built - t_held).as_micros() as u64,
            record_us = (t_recorded - t_built).as_micros() as u64,
            total_us = t_call.elapsed().as_micros() as u64,
            "start timings"
        );
        Ok(exe)
    }

    /// Gives the holder copies of an executable's output read ends (and its input's
    /// write end); `None` (reported) when there is no holder or it does not answer: the
    /// executable still runs, but its output would not survive a crash of auraed.
    pub(super) fn hold_output(
        &self,
        cell: &CellName,
        name: &Label,
        fds: &[&std::os::fd::OwnedFd],
    ) -> Option<super::record::HeldOutput> {
        let r = self.holder.as_ref()?.hold_all(fds);
        self.held_or_report(cell, name, r)
    }

    /// Starts handing copies of a prepared executable's output read ends (and of a
    /// piped stdin's write end) to the holder on a pool thread; `None` without a holder.
    /// A copy that cannot be made fails the hand-over (reported when it is collected).
    fn hold_early(
        &self,
        prepared: &Prepared,
        interactive: executable::Interactive,
    ) -> Option<tokio::task::JoinHandle<std::io::Result<super::record::HeldOutput>>> {
        let holder = self.holder.clone()?;
        let input = prepared.input.iter().filter(|_| !interactive.tty);
        let fds: std::io::Result<Vec<std::os::fd::OwnedFd>> = prepared
            .output
            .iter()
            .chain(input)
            .map(|f| f.try_clone())
            .collect();
        Some(tokio::task::spawn_blocking(move || {
            let fds = fds?;
            holder.hold_all(&fds.iter().collect::<Vec<_>>())
        }))
    }

    /// Lets the holder go of what an early hand-over gave it, once it is done (the start
    /// failed).
    fn let_go(&self, h: tokio::task::JoinHandle<std::io::Result<super::record::HeldOutput>>) {
        let Some(holder) = self.holder.clone() else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(Ok(held)) = h.await
                && let Err(e) = holder.release_held(&held)
            {
                warn!("the output holder did not let go of a failed start's pipes: {e}");
            }
        });
    }

    /// `r`, the holder's answer to a hand-over, or `None` with the failure reported.
    fn held_or_report(
        &self,
        cell: &CellName,
        name: &Label,
        r: std::io::Result<super::record::HeldOutput>,
    ) -> Option<super::record::HeldOutput> {
        match r {
            Ok(held) => Some(held),
            Err(e) => {
                let id = super::record::executable_key(cell, name);
                warn!(executable = %id, "the output holder did not take its pipes: {e}");
                self.events.emit(
                    pb::Kind::Executable,
                    &id,
                    pb::EventType::Failed,
                    format!("its output would not survive an auraed crash: the holder did not take it ({e})"),
                );
                None
            }
        }
    }

    /// The input of an executable started `interactive` (`fd`: its stdin's write end, or
    /// its terminal's master side), with the holder's copy of a stdin (the last of what
    /// `held` names) let go when it closes.
    pub(super) fn new_input(
        &self,
        fd: std::os::fd::OwnedFd,
        interactive: executable::Interactive,
        held: Option<&super::record::HeldOutput>,
    ) -> Arc<executable::Input> {
        let held_input = match (&self.holder, held) {
            (Some(h), Some(held)) if !interactive.tty && held.fds.len() > 2 => held
                .fds
                .last()
                .zip(held.ids.last())
                .map(|(n, id)| (h.clone(), *n, *id)),
            _ => None,
        };
        Arc::new(executable::Input::new(
            fd,
            interactive.tty,
            interactive.stdin_once,
            held_input,
        ))
    }

    /// Pumps an executable's stdout and stderr (or its terminal: all `stdout`) into its
    /// log; once all reach EOF the log is complete, its record stops naming the holder's
    /// copies, and the holder lets go of them (its stdin's copy goes when the process
    /// ends: see [`executable::Input::close`]).
    pub(super) fn pump_output(&self, exe: &Arc<Executable>, output: Vec<std::os::fd::OwnedFd>) {
        let outputs = output.len();
        let pumps: Vec<_> = output
            .into_iter()
            .zip([Stream::Stdout, Stream::Stderr])
            .map(|(fd, stream)| {
                tokio::spawn(output::pump(
                    fd,
                    exe.log.clone(),
                    stream,
                    log_failure(&self.events, &exe.cell, &exe.name),
                ))
            })
            .collect();
        let (holder, recorder, exe) = (self.holder.clone(), self.recorder.clone(), exe.clone());
        tokio::spawn(async move {
            for p in pumps {
                let _ = p.await;
            }
            exe.log.close();
            // Most processes close their output by exiting: their end (its record, the
            // caller's wait, a one-call free, which leaves no record to write) goes first,
            // and this record and the holder's round trip come after it, not beside it.
            exe.wait(Some(RELEASE_AFTER_EXIT)).await;
            exe.output_released
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if !(exe.exited() && exe.freed_at_end()) {
                exe.write_record(&recorder);
            }
            if let (Some(h), Some(held)) = (holder, &exe.held) {
                let _ = h.release_held(&held.first(outputs));
            }
        });
    }

    /// Fixes (or checks) whether the cell's tree runs containers or plain executables;
    /// see `Inner::runs_containers`. `spec.allow_mixed_cell` lets a start of the other
    /// kind through and marks the tree mixed (`Inner::mixed`).
    pub(super) fn claim_kind(&self, spec: &ExecutableSpec) -> Result<(), WorkloadError> {
        let top = spec.cell.as_str().split('/').next().unwrap_or_default();
        let top = CellName::parse("cell", top)?;
        let root = self.find(&top)?;
        let container = spec.container.is_some();
        let mut inner = root
            .inner
            .lock()
            .map_err(|_| WorkloadError::Precondition("cell lock poisoned".into()))?;
        if inner.mixed && !spec.allow_mixed_cell {
            return Err(WorkloadError::Precondition(format!(
                "cell {:?} runs containers beside plain executables (a privileged caller mixed them): nothing more starts there without a grant that allows host namespaces",
                top.as_str()
            )));
        }
        match inner.runs_containers {
            None => {
                // Recorded even for a privileged start: who comes next is checked.
                inner.runs_containers = Some(container);
                drop(inner);
                self.recorder.cell(&root.record());
            }
            Some(c) if c != container && spec.allow_mixed_cell => {
                inner.mixed = true;
                drop(inner);
                self.recorder.cell(&root.record());
            }
            Some(c) if c != container => {
                let (has, wants) = if c {
                    ("containers", "a plain executable")
                } else {
                    ("plain executables", "a container")
                };
                return Err(WorkloadError::Precondition(format!(
                    "cell {:?} runs {has}: {wants} in the same PID namespace would let a container reach the host's files through /proc/<pid>/root; use another cell (mixing needs a grant that allows host namespaces)",
                    top.as_str()
                )));
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn generated_name(&self, argv0: &str) -> Result<Label, WorkloadError> {
        let base = Label::sanitized(argv0.rsplit('/').next().unwrap_or(""), 40, "exe");
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Label::parse("name", &format!("{base}-{n}"))?)
    }

    pub fn executable(
        &self,
        r: &executable::ExecutableRef,
    ) -> Result<Arc<Executable>, WorkloadError> {
        let cell = self.find(&r.cell)?;
        let inner = cell
            .inner
            .lock()
            .map_err(|_| WorkloadError::Precondition("cell lock poisoned".into()))?;
        inner.executables.get(&r.name).cloned().ok_or_else(|| {
            WorkloadError::NotFound(format!(
                "executable {:?} does not exist in cell {:?}",
                r.name.as_str(),
                r.cell.as_str()
            ))
        })
    }

    pub fn executables(&self, visible: impl Fn(&str) -> bool) -> Vec<Arc<Executable>> {
        self.snapshot()
            .iter()
            .filter(|c| visible(c.spec.name.as_str()))
            .flat_map(|c| c.executables())
            .collect()
    }

    /// Forgets the exited executable `exe` if its cell still holds this very executable
    /// under its name (not one freed meanwhile and started again by someone else, nor one
    /// whose cell went); `Ok` either way.
    pub fn free_executable_if_same(&self, exe: &Arc<Executable>) -> Result<(), WorkloadError> {
        let Ok(cell) = self.find(&exe.cell) else {
            return Ok(());
        };
        self.take_out_freed(&cell, exe, |now| {
            now.is_some_and(|now| Arc::ptr_eq(now, exe) && now.exited())
        });
        Ok(())
    }

    /// Takes the freed executable `exe` out of `cell` if `is_it` says so of the one there
    /// by its name (if any), and discards what it leaves — under the cell's lock, so a new executable
    /// of this name cannot start (and lose its log and record to this) before they are
    /// gone. A run call's cell emptied so on purpose is recorded as no longer one: a
    /// restart must not take it for a cut run call.
    fn take_out_freed(
        &self,
        cell: &Cell,
        exe: &Executable,
        is_it: impl FnOnce(Option<&Arc<Executable>>) -> bool,
    ) {
        let mut was_run_cell = false;
        if let Ok(mut inner) = cell.inner.lock()
            && is_it(inner.executables.get(&exe.name))
        {
            inner.executables.remove(&exe.name);
            self.discard_freed(exe);
            was_run_cell = std::mem::take(&mut inner.made_for_run);
        }
        if was_run_cell {
            self.recorder.cell(&cell.record());
        }
    }

    /// What a freed executable leaves: its log files, its record, its own group, a
    /// container's private directories (its caller holds the cell's lock).
    fn discard_freed(&self, exe: &Executable) {
        let _ = exe.log.remove_files();
        exe.forget_record(&self.recorder);
        self.remove_own_group(exe);
        exe.remove_rootfs();
    }

    /// Removes a freed executable's own group (if it had one); what it left there was
    /// killed at its end. One not empty yet is killed again and left (reported): a start
    /// of the same name takes it over once empty, and the cell's free removes it.
    fn remove_own_group(&self, exe: &Executable) {
        let (Some(group), Ok(tree)) = (exe.own_group(), self.tree()) else {
            return;
        };
        // What it left was killed at its end, but a kill is not instant: a short wait.
        for _ in 0..10 {
            if tree.remove(&group).is_ok() || !tree.exists(&group) {
                return;
            }
            let _ = tree.kill(&group);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if let Err(e) = tree.remove(&group)
            && tree.exists(&group)
        {
            warn!(group = %group, "a freed executable's own cgroup is not empty yet; left for its cell's free: {e}");
        }
    }

    /// The executable `r`, while it runs (FAILED_PRECONDITION once it has ended).
    fn running_executable(
        &self,
        r: &executable::ExecutableRef,
    ) -> Result<Arc<Executable>, WorkloadError> {
        let exe = self.executable(r)?;
        if exe.exited() {
            return Err(WorkloadError::Precondition(format!(
                "executable {}/{} has ended",
                r.cell.as_str(),
                r.name.as_str()
            )));
        }
        Ok(exe)
    }

    /// Writes new limits to a running executable's own group (the fields `update` sets;
    /// the others stay as they are) and records them. FAILED_PRECONDITION for one without
    /// a group of its own or that has ended; a limit the kernel refuses is named.
    pub fn update_limits(
        &self,
        r: &executable::ExecutableRef,
        update: &super::spec::Limits,
        oom_group: Option<bool>,
    ) -> Result<Arc<Executable>, WorkloadError> {
        let exe = self.running_executable(r)?;
        let (Some(group), Some(current)) = (exe.own_group(), exe.own_limits.as_ref()) else {
            return Err(WorkloadError::Precondition(format!(
                "executable {}/{} has no cgroup of its own to update: start it with limits",
                r.cell.as_str(),
                r.name.as_str()
            )));
        };
        let tree = self.tree()?;
        let mut writes = super::limits::limit_writes(update);
        if let Some(on) = oom_group {
            let with = super::spec::Limits {
                memory_oom_group: on,
                ..Default::default()
            };
            writes.extend(super::limits::own_writes(&with, true));
        }
        super::limits::check_controllers(&writes, &tree.controllers())?;
        // One update at a time (what is recorded is what was written last); readers of
        // the limits only wait for the merge, not for the kernel's writes (lowering
        // memory.max makes the kernel reclaim first).
        let one = exe
            .updating
            .lock()
            .map_err(|_| WorkloadError::Precondition("executable lock poisoned".into()))?;
        let mut applied = super::spec::Limits::default();
        let mut applied_oom = None;
        let mut refused = None;
        for w in &writes {
            if let Err(e) = tree.write(&group, w.file, &w.value) {
                refused = Some(super::registry::refused_limit(w, e));
                break;
            }
            if w.file == "memory.oom.group" {
                applied_oom = oom_group;
            } else {
                applied.merge(&update.only(w.field), None);
            }
        }
        // What the kernel took is recorded, also when a later write was refused.
        if let Ok(mut now) = current.lock() {
            now.merge(&applied, applied_oom);
        }
        exe.write_record(&self.recorder);
        drop(one);
        let partial = applied != super::spec::Limits::default() || applied_oom.is_some();
        match refused {
            Some(WorkloadError::Invalid(mut f)) if partial => {
                f.reason
                    .push_str(" (the limits before it were applied: see the executable's status)");
                Err(WorkloadError::Invalid(f))
            }
            Some(e) => Err(e),
            None => Ok(exe),
        }
    }

    /// Writes again directories a running container was given at its start (see
    /// [`crate::container::swap_dir`]); a path that was not one of them, or a file given
    /// for a directory, is refused naming `files[i]`.
    pub fn update_files(
        &self,
        r: &executable::ExecutableRef,
        files: &[crate::container::spec::FileSpec],
    ) -> Result<Arc<Executable>, WorkloadError> {
        let exe = self.running_executable(r)?;
        let Some(rec) = &exe.container_record else {
            return Err(WorkloadError::Precondition(format!(
                "executable {}/{} is not a container",
                r.cell.as_str(),
                r.name.as_str()
            )));
        };
        let mut at = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let index = rec
                .file_dirs
                .iter()
                .position(|d| d.as_deref() == Some(f.path.as_path()))
                .filter(|_| f.is_dir())
                .ok_or_else(|| {
                    crate::spec::FieldError::new(
                        format!("files[{i}].path"),
                        format!(
                            "{} is not a read-only directory the container was given at its start",
                            f.path.display()
                        ),
                    )
                })?;
            at.push((index, f));
        }
        // One writer at a time (the same lock as its limits' updates).
        let _one = exe
            .updating
            .lock()
            .map_err(|_| WorkloadError::Precondition("executable lock poisoned".into()))?;
        for (index, f) in at {
            let dir = rec.dir.join(format!("file-{index}"));
            crate::container::swap_dir(&dir, &f.entries).map_err(|e| {
                WorkloadError::Precondition(format!("writing {} again: {e}", f.path.display()))
            })?;
        }
        drop(_one);
        Ok(exe)
    }

    /// Forgets an exited executable.
    pub fn free_executable(&self, r: &executable::ExecutableRef) -> Result<(), WorkloadError> {
        let exe = self.executable(r)?;
        if !exe.exited() {
            return Err(WorkloadError::Precondition(format!(
                "executable {}/{} is still running: stop it first",
                r.cell.as_str(),
                r.name.as_str()
            )));
        }
        let cell = self.find(&r.cell)?;
        self.take_out_freed(&cell, &exe, |_| true);
        Ok(())
    }
}

/// Reports a failed log write of executable `cell/name` as a FAILED event (the process
/// keeps running; its status message says so too).
fn log_failure(
    events: &Arc<EventBus>,
    cell: &CellName,
    name: &Label,
) -> impl Fn(String) + Send + 'static {
    let events = events.clone();
    let id = format!("{cell}/{name}");
    move |e| {
        warn!(executable = %id, "log write failed: {e}");
        // The cause names host paths: it stays in auraed's log.
        events.emit(
            pb::Kind::Executable,
            &id,
            pb::EventType::Failed,
            "output is not reaching the log file (the cause is in auraed's log); it still reaches the in-memory log",
        );
    }
}

/// A failed spawn; for a container, the failing item named in the message.
fn container_error(args: Option<&crate::container::Args>, source: SpawnError) -> WorkloadError {
    let what = match (&source, args) {
        (
            SpawnError::Child {
                step,
                index: Some(i),
                ..
            },
            Some(a),
        ) => match a.describe(*step, *i) {
            Some(item) => format!("starting the container ({item})"),
            None => "starting the container".into(),
        },
        (_, Some(_)) => "starting the container".into(),
        _ => "starting the executable".into(),
    };
    WorkloadError::Spawn { what, source }
}

/// A name reserved while an executable starts; released when dropped.
struct Reservation {
    cell: Arc<super::Cell>,
    name: Label,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.cell.inner.lock() {
            inner.starting.remove(&self.name);
        }
    }
}

/// Waits for an executable's exit and records it. A SIGKILL while the OOM-kill counter
/// (memory.events) of its cell's group, or of its own, moved since the executable started
/// is attributed to the OOM killer, and the event names the victim. What it leaves
/// running in a group of its own is killed.
async fn supervise(
    events: Arc<EventBus>,
    recorder: super::record::Recorder,
    oom: Option<(Arc<dyn CgroupTree>, CellName, u64)>,
    own_group: Option<(Arc<dyn CgroupTree>, CellName)>,
    exe: Arc<Executable>,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    id: String,
) {
    let status = exit.await.unwrap_or(ExitStatus::Signal(nix::libc::SIGKILL));
    // A container's mounts go now, off this task (see `Rootfs::hold_mount_namespace`).
    exe.release_mount_namespace();
    let oom_killed = status == ExitStatus::Signal(nix::libc::SIGKILL)
        && oom.is_some_and(|(tree, cell, before)| oom_kills(tree.as_ref(), &cell) > before);
    if let Some((tree, group)) = own_group {
        end_own_group(tree.as_ref(), &group, &id);
    }
    let e = Exit {
        status: Some(status),
        oom_killed,
        at: SystemTime::now(),
    };
    // Recorded before anyone waiting learns of it: a Free right after the Wait must
    // find the record to delete, not have it written back after.
    let mut rec = exe.record();
    rec.exit = Some(super::record::ExitRecord::from(&e));
    // One that a run call frees at its end (`remove`) is about to go: no exit record (a
    // restarted auraed frees it all the same, as ended while it was down; a free that
    // fails writes it then, see `Cells::when_ended`).
    if !exe.freed_at_end() {
        exe.write_given(&recorder, &rec);
    }
    exe.state.send_replace(State {
        phase: Phase::Exited,
        exit: Some(e),
    });
    // Its input goes with it (a process that closed its output may still read on until
    // here).
    if let Some(i) = &exe.input {
        i.close();
    }
    let (ty, msg) = if oom_killed {
        (
            pb::EventType::OomKilled,
            format!("OOM-killed: pid {} {:?}", exe.pid, exe.argv),
        )
    } else {
        (pb::EventType::Exited, format!("{status:?}"))
    };
    events.publish(pb::Event {
        kind: pb::Kind::Executable as i32,
        name: id,
        r#type: ty as i32,
        exit: Some(crate::events::exit_status(e.status, e.oom_killed, e.at)),
        victim_pid: if oom_killed { exe.pid } else { 0 },
        victim_command: if oom_killed {
            exe.argv.join(" ")
        } else {
            String::new()
        },
        message: msg,
        ..Default::default()
    });
}

/// Makes an executable's own group and writes its limits (and `memory.oom.group` where
/// the memory controller is); on any failure removes it again. A limit the kernel
/// refuses is named as the request's field.
pub(super) fn make_own_group(
    tree: &dyn CgroupTree,
    group: &CellName,
    limits: &super::spec::Limits,
    has_memory: bool,
) -> Result<(), WorkloadError> {
    tree.create_leaf(group)?;
    let written = super::limits::own_writes(limits, has_memory)
        .iter()
        .try_for_each(|w| {
            tree.write(group, w.file, &w.value)
                .map_err(|e| super::registry::refused_limit(w, e))
        });
    if written.is_err() {
        let _ = tree.remove(group);
    }
    written
}

/// At the end of an executable with a group of its own: what it left running there (its
/// children, in the cell's PID namespace) is killed, as runc does for a container that
/// shares its pod's PID namespace. Reported when the kill fails.
pub(super) fn end_own_group(tree: &dyn CgroupTree, group: &CellName, id: &str) {
    if let Err(e) = tree.kill(group) {
        warn!(executable = %id, "killing what it left in its own group: {e}");
    }
}
