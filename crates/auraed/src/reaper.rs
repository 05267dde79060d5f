//! One reaper owns every wait of this process.
//!
//! auraed is a child subreaper (or PID 1), so besides the processes it starts it also
//! inherits orphans. On each SIGCHLD the reaper peeks at exited children without reaping
//! (`waitid(P_ALL, WNOWAIT)`): a child it tracks is reaped through its pidfd and its status
//! delivered to whoever waits; any other child is an orphan and is reaped at once, so no
//! zombie is ever left. Spawns hold a shared gate while they clone and register, and the
//! reaper takes it exclusively, so a child that exits instantly is never mistaken for an
//! orphan.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use aurae_sys::{ExitStatus, Pidfd, SpawnError, pidfd};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// A started child: its pid (in our namespace), pidfd, and the exit status when it comes.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub pidfd: Arc<Pidfd>,
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// A tracked child: its pidfd and where its exit status goes.
type Tracked = (Arc<Pidfd>, oneshot::Sender<ExitStatus>);

#[derive(Debug, Default)]
pub struct Reaper {
    gate: RwLock<()>,
    /// By pid. Not a hash map: an instance template makes its reaper before its
    /// snapshot, and every copy restored from it would share the map's hash keys.
    tracked: Mutex<BTreeMap<i32, Tracked>>,
    orphans: std::sync::atomic::AtomicU64,
}

impl Reaper {
    /// Runs `spawn` (which clones a child of this process) and tracks the child.
    pub fn spawn(
        &self,
        spawn: impl FnOnce() -> Result<(i32, Pidfd), SpawnError>,
    ) -> Result<Child, SpawnError> {
        let _gate = self
            .gate
            .read()
            .map_err(|_| SpawnError::Setup(std::io::Error::other("reaper gate poisoned")))?;
        let (pid, pidfd) = spawn()?;
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut t) = self.tracked.lock() {
            t.insert(pid, (pidfd.clone(), tx));
        }
        Ok(Child {
            pid,
            pidfd,
            exit: rx,
        })
    }

    /// Reaps every exited child; returns how many were orphans. Waits for spawns in
    /// flight (they hold the gate until their child is tracked).
    pub fn reap(&self) -> u64 {
        let Ok(gate) = self.gate.write() else {
            return 0;
        };
        self.reap_gated(gate)
    }

    /// [`Reaper::reap`] if no spawn is in flight; `None` (nothing done) if one is.
    fn try_reap(&self) -> Option<u64> {
        match self.gate.try_write() {
            Ok(gate) => Some(self.reap_gated(gate)),
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(_)) => Some(0),
        }
    }

    fn reap_gated(&self, _gate: std::sync::RwLockWriteGuard<'_, ()>) -> u64 {
        let mut orphans = 0;
        loop {
            let child = match pidfd::peek_exited_child() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!("waitid: {e}");
                    break;
                }
            };
            let tracked = self
                .tracked
                .lock()
                .ok()
                .and_then(|mut t| t.remove(&child.pid));
            match tracked {
                Some((pidfd, tx)) => match pidfd.try_wait() {
                    Ok(Some(status)) => {
                        let _ = tx.send(status);
                    }
                    other => {
                        warn!(
                            pid = child.pid,
                            "tracked child could not be reaped through its pidfd: {other:?}"
                        );
                        let _ = pidfd::reap_zombie(child.pid);
                        if let Some(s) = child.status {
                            let _ = tx.send(s);
                        }
                    }
                },
                None => {
                    debug!(pid = child.pid, status = ?child.status, "reaped an orphan");
                    if let Err(e) = pidfd::reap_zombie(child.pid) {
                        warn!(pid = child.pid, "reaping orphan: {e}");
                        break;
                    }
                    orphans += 1;
                }
            }
        }
        self.orphans
            .fetch_add(orphans, std::sync::atomic::Ordering::Relaxed);
        orphans
    }

    /// Orphans reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reaps on every SIGCHLD, and once a second in case signals were coalesced away.
    pub async fn run(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("no SIGCHLD handler ({e}); reaping by polling every second");
                None
            }
        };
        loop {
            match sigchld.as_mut() {
                Some(s) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            // Here on this worker when no spawn is in flight (nearly always: a reap is a
            // few non-blocking `waitid`s): a trip through the blocking pool and back was
            // two more cross-thread wake-ups between a child's exit and whoever waits for
            // it. Otherwise the blocking pool waits for the spawn, not this worker (a
            // cell init's spawn can wait seconds for the zygote). Never `block_in_place`:
            // a task in it goes on after its runtime has shut down, and its next timer
            // panics ("context being shutdown"); awaited here, it is dropped instead.
            if self.try_reap().is_none() {
                let me = self.clone();
                if tokio::task::spawn_blocking(move || me.reap())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Runs a short blocking step (a call to the output holder, a spawn: the calling thread
/// waits until the child has exec'd) from async code without stalling the runtime's other
/// tasks and without waiting for another thread on the way in or out: on a multi-thread
/// runtime the worker hands its other tasks to another thread and runs `f` itself
/// (`block_in_place`); elsewhere (a current-thread runtime: unit tests) directly. Not for
/// steps that wait on something else for long (a cell init's set-up report, bounded by a
/// timeout of seconds): those take `spawn_blocking`. Measured on `RunExecutable`'s spawn: the round trip through the
/// blocking pool was ~0.5 ms of a ~1.9 ms call on a busy two-CPU machine (two
/// cross-thread wake-ups on the call's path).
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
