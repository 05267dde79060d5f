//! The pool of spare cell inits: inits started ahead of time, every namespace of their own
//! made and set up (mounts, /proc, /sys, `lo` up), each waiting in the pool's cgroup for a
//! cell to take it. A top-level cell that wants every namespace of its own takes one
//! instead of starting its init (a clone with six new namespaces and an exec, the largest
//! cost of an allocation): it moves the init into its own leaf, then the init makes its
//! cgroup namespace there and sets the hostname — the same second step a fresh init takes
//! (see [`super::init`]), so a pooled cell is the same as a fresh one.
//!
//! Each spare is used once (a freed cell's init dies with it); the pool refills in the
//! background. A spare that cannot be used (it died, the move failed) is killed and the
//! cell starts a fresh init instead, with a warning. When auraed goes away, the spares
//! read EOF and exit by themselves; the next auraed removes the pool's cgroup and makes
//! it again.

use std::{
    collections::VecDeque,
    io::Read,
    os::unix::net::UnixStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tracing::{info, warn};

use super::{
    registry::{Cells, INIT_TIMEOUT},
    spec::CellSpec,
    state::{Init, NsSet},
};
use crate::{
    reaper::Child,
    spec::CellName,
    workload::{WorkloadError, cgroup::CgroupTree, layout::POOL_GROUP, supervise::wait_empty},
};

/// How long the pool waits before trying again after it failed to make a spare.
const RETRY: Duration = Duration::from_secs(5);
/// A spare is made only once no cell has taken one for this long: making one (a clone
/// with six namespaces, an exec, the set-up) costs as much CPU as the fresh init it
/// saves, and must not compete with the cells of a burst that is still starting.
const REFILL_IDLE: Duration = Duration::from_millis(25);
/// The first spare is made this long after the pool starts (when auraed serves): the
/// first calls — a parent's health check of a spawned instance, the first cells — are
/// answered before making spares competes with them (an instance has one vCPU).
const FIRST_FILL_AFTER: Duration = Duration::from_millis(500);
/// The most spare inits a pool may keep.
pub const MAX_POOL: usize = 64;
/// Spare inits kept by default where moving a process between cgroups is cheap (see
/// [`crate::workload::cgroup::CgroupTree::cheap_moves`]): enough for a burst of two, a
/// few hundred KiB of memory.
pub const DEFAULT_POOL: usize = 2;

/// A cell init after its first step: ready, waiting for its cell.
#[derive(Debug)]
pub(super) struct StartedInit {
    pub(super) child: Child,
    /// auraed's end of the init's socket.
    pub(super) ctl: UnixStream,
    /// What was read past the last line (the init may write its two reports at once).
    pub(super) pending: Vec<u8>,
}

impl StartedInit {
    /// One line from the init (without the newline), within the init timeout; `Err` with
    /// why not.
    pub(super) fn line(&mut self) -> Result<String, String> {
        self.ctl
            .set_read_timeout(Some(INIT_TIMEOUT))
            .map_err(|e| format!("reading its report: {e}"))?;
        let mut line = std::mem::take(&mut self.pending);
        let mut b = [0u8; 256];
        loop {
            if let Some(l) = take_line(&mut line) {
                self.pending = line;
                return Ok(l);
            }
            match self.ctl.read(&mut b) {
                Ok(0) => {
                    return Err(if line.is_empty() {
                        "it exited without a report".to_owned()
                    } else {
                        format!("a cut report: {:?}", String::from_utf8_lossy(&line))
                    });
                }
                Ok(n) => {
                    line.extend_from_slice(&b[..n]);
                    if line.len() > 4096 && !line.contains(&b'\n') {
                        return Err("a report without end".to_owned());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("no report within {} s", INIT_TIMEOUT.as_secs()));
                }
                Err(e) => return Err(format!("reading its report: {e}")),
            }
        }
    }

    /// Reads the init's next report: `Ok` if it is `want`; else kills the init and says
    /// what came instead (its `error: …` line, or why nothing came).
    pub(super) fn expect(&mut self, want: &str) -> Result<(), String> {
        match self.line() {
            Ok(l) if l == want => Ok(()),
            r => {
                self.kill();
                Err(r.unwrap_or_else(|e| e))
            }
        }
    }

    fn kill(&self) {
        let _ = self.child.pidfd.send_signal(nix::libc::SIGKILL);
    }

    /// Whether it has exited (its pidfd polls readable).
    fn exited(&self) -> bool {
        crate::workload::supervise::has_exited(&self.child.pidfd)
    }
}

/// The first line of `buf` (without its newline), taken out of it; `None` while it holds
/// no whole line. What follows stays in `buf`: an init writes its two reports back to back
/// when it got its hostname with its start, and one read may return both.
fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&c| c == b'\n')?;
    let rest = buf.split_off(end + 1);
    buf.truncate(end);
    let line = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    Some(line)
}

/// The spare inits, and how many to keep.
#[derive(Debug, Default)]
pub struct Pool {
    size: AtomicUsize,
    waiting: Mutex<VecDeque<StartedInit>>,
    wake: tokio::sync::Notify,
    closed: AtomicBool,
    /// Held while a spare is being made, so a drain never races one.
    making: tokio::sync::Mutex<()>,
    /// When a cell last took a spare (or tried to).
    last_take: Mutex<Option<std::time::Instant>>,
}

/// The namespaces of a pooled init: every one of its own (a top-level cell with the
/// default namespaces).
pub(super) fn pooled_namespaces() -> NsSet {
    use aurae_sys::Namespaces as Ns;
    NsSet {
        others: Ns::MOUNT | Ns::UTS | Ns::IPC | Ns::NET | Ns::CGROUP,
        pid: true,
    }
}

impl Pool {
    /// A spare init for a top-level cell with namespaces `ns`, if a live one is waiting
    /// (spares that died while they waited are dropped).
    pub(super) fn take(&self, ns: NsSet) -> Option<StartedInit> {
        if ns != pooled_namespaces() || self.closed.load(Ordering::SeqCst) {
            return None;
        }
        if let Ok(mut t) = self.last_take.lock() {
            *t = Some(std::time::Instant::now());
        }
        // The background task tops the pool up (once cells stop taking spares).
        self.wake.notify_one();
        let mut w = self.waiting.lock().ok()?;
        while let Some(s) = w.pop_front() {
            if !s.exited() {
                return Some(s);
            }
            warn!(
                pid = s.child.pid,
                "a spare cell init died while it waited; dropped"
            );
        }
        None
    }

    /// How many spares wait now.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }

    /// How many spares it keeps.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::SeqCst)
    }
}

fn pool_group() -> Result<CellName, WorkloadError> {
    Ok(CellName::parse("name", POOL_GROUP)?)
}

impl Cells {
    /// The pool of spare inits.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Keeps `size` spare inits ready from now on (0: none, cells start their own). Also
    /// removes the pool group a previous auraed left. Call once at start, after the sweep
    /// of leftovers; a pool that cannot be made is a warning (cells then start their
    /// own inits), never a failure.
    pub async fn start_pool(self: &Arc<Self>, size: Option<usize>) {
        let Ok(tree) = self.tree() else { return };
        let size = size.unwrap_or_else(|| {
            if tree.cheap_moves() {
                DEFAULT_POOL
            } else {
                info!(
                    "no spare cell inits by default: cgroup2 is mounted here without \
                     favordynmods, so moving one into its cell waits for an RCU grace period \
                     (about as long as starting a fresh init); --cell-pool N keeps N anyway"
                );
                0
            }
        });
        let Ok(group) = pool_group() else { return };
        if self.find(&group).is_ok() {
            // A cell of that name from before it was reserved, re-adopted: it is left
            // alone, and no pool is kept until it is freed and auraed restarts.
            warn!(
                "a cell is named {POOL_GROUP:?} (made before the name was reserved for the \
                 pool of spare cell inits): no pool while it exists"
            );
            return;
        }
        if tree.exists(&group) {
            // Its spares read EOF when the previous auraed went and exited; whatever is
            // left goes now.
            let _ = tree.kill(&group);
            wait_empty(tree.as_ref(), &group, Duration::from_secs(10)).await;
            match tree.remove(&group) {
                Ok(()) => info!("removed the cell pool group of a previous auraed"),
                Err(e) => {
                    warn!(
                        "the cell pool group of a previous auraed could not be removed ({e}): no cell pool"
                    );
                    return;
                }
            }
        }
        if size == 0 {
            return;
        }
        // The group (its device filter is a BPF program: loading it is tens of
        // milliseconds on an instance's one vCPU) is made by the task, off the start.
        self.pool.size.store(size.min(MAX_POOL), Ordering::SeqCst);
        info!(size, "keeping spare cell inits");
        tokio::spawn(keep_filled(self.clone(), tree, group));
    }

    /// A pooled init for the cell `spec` (blocking): moved into the cell's leaf, then its
    /// second step. One that cannot be used is killed and a fresh init started instead.
    pub(super) fn finish_pooled_init(
        &self,
        tree: &Arc<dyn CgroupTree>,
        spec: &CellSpec,
        pooled: StartedInit,
    ) -> Result<Init, WorkloadError> {
        let t = std::time::Instant::now();
        let moved = tree.move_into(&spec.name, pooled.child.pid);
        tracing::debug!(move_us = t.elapsed().as_micros() as u64, "pool timings");
        let used = match moved {
            Ok(()) => self.finish_init(pooled, &spec.name, Some(spec.hostname())),
            Err(e) => {
                pooled.kill();
                Err(e.into())
            }
        };
        used.or_else(|e| {
            warn!(cell = %spec.name, "a spare cell init could not be used ({e}); starting a fresh one");
            let ns = NsSet::of(spec, false);
            self.start_init(tree, &spec.name, ns, None, false, Some(spec.hostname()))
                .and_then(|s| self.finish_init(s, &spec.name, None))
        })
    }

    /// Stops refilling, kills the spares and removes the pool's group (at shutdown).
    pub async fn drain_pool(&self) {
        self.pool.closed.store(true, Ordering::SeqCst);
        self.pool.wake.notify_one();
        let _making = self.pool.making.lock().await;
        let spares: Vec<StartedInit> = self
            .pool
            .waiting
            .lock()
            .map(|mut w| w.drain(..).collect())
            .unwrap_or_default();
        for s in &spares {
            s.kill();
        }
        drop(spares);
        let (Ok(tree), Ok(group)) = (self.tree(), pool_group()) else {
            return;
        };
        if !tree.exists(&group) {
            return;
        }
        let _ = tree.kill(&group);
        if !wait_empty(tree.as_ref(), &group, Duration::from_secs(10)).await {
            warn!("the cell pool group still has processes after cgroup.kill");
        }
        if let Err(e) = tree.remove(&group) {
            warn!("removing the cell pool group: {e}");
        }
    }
}

/// The pool's background task: from [`FIRST_FILL_AFTER`] on makes spares until there are
/// `size` (once cells stopped taking them for [`REFILL_IDLE`]), then sleeps until one is
/// taken. Failures are warned about once per streak and retried every [`RETRY`].
async fn keep_filled(cells: Arc<Cells>, tree: Arc<dyn CgroupTree>, group: CellName) {
    let pool = &cells.pool;
    let mut failing = false;
    tokio::time::sleep(FIRST_FILL_AFTER).await;
    {
        let _making = pool.making.lock().await;
        if pool.closed.load(Ordering::SeqCst) {
            return;
        }
        let (t, g) = (tree.clone(), group.clone());
        let made = tokio::task::spawn_blocking(move || {
            t.create(&g)
                .and_then(|()| t.attach_device_filter(&g, aurae_sys::bpf::CellDevices::default()))
        })
        .await
        .map_err(|e| format!("cell pool task: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = made {
            let _ = tree.remove(&group);
            pool.size.store(0, Ordering::SeqCst);
            warn!("no cell pool ({e}): every cell starts its own init");
            return;
        }
    }
    loop {
        if pool.closed.load(Ordering::SeqCst) {
            return;
        }
        if pool.waiting() >= pool.size() {
            pool.wake.notified().await;
            continue;
        }
        // Not while cells are still being taken.
        let since = pool
            .last_take
            .lock()
            .ok()
            .and_then(|t| *t)
            .map(|t| t.elapsed());
        if let Some(since) = since
            && since < REFILL_IDLE
        {
            tokio::time::sleep(REFILL_IDLE - since).await;
            continue;
        }
        let making = pool.making.lock().await;
        if pool.closed.load(Ordering::SeqCst) {
            return;
        }
        let (me, t, g) = (cells.clone(), tree.clone(), group.clone());
        let made = tokio::task::spawn_blocking(move || {
            me.start_init(&t, &g, pooled_namespaces(), None, false, None)
        })
        .await
        .map_err(|e| WorkloadError::Precondition(format!("cell pool task: {e}")))
        .and_then(|r| r);
        match made {
            Ok(spare) => {
                failing = false;
                if let Ok(mut w) = pool.waiting.lock() {
                    w.push_back(spare);
                }
                drop(making);
            }
            Err(e) => {
                drop(making);
                if !failing {
                    warn!(
                        "the cell pool could not make a spare init ({e}); trying again every {} s",
                        RETRY.as_secs()
                    );
                }
                failing = true;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_line;

    #[test]
    fn two_reports_read_at_once_are_two_lines() {
        let mut buf = b"ready\nok\nerror: x".to_vec();
        assert_eq!(take_line(&mut buf).as_deref(), Some("ready"));
        assert_eq!(take_line(&mut buf).as_deref(), Some("ok"));
        assert_eq!(take_line(&mut buf), None, "a line without its end waits");
        assert_eq!(buf, b"error: x");
        buf.extend_from_slice(b"\n");
        assert_eq!(take_line(&mut buf).as_deref(), Some("error: x"));
        assert!(buf.is_empty());
    }
}
