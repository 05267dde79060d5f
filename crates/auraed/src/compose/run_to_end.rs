//! The one-call run (`RunOptions` of RunExecutable and RunCell): after the start, wait
//! for the process's end and its output, and free what the call made — the executable or
//! the whole cell — however the call ends.
//!
//! The waiting and freeing run in a task of the cell layer's ([`Cells::when_ended`]),
//! recorded with the executable: a caller that goes away, a wait that times out or an
//! auraed restart changes nothing about the process and its removal. The caller only
//! waits (bounded) for that task to report.

use std::{sync::Arc, time::Duration};

use super::run_cell::{Options, Workload};
use crate::{
    cell::{Cell, CellSpec, Cells, registry::detached},
    container::Plan,
    executable::{Executable, ExecutableSpec, FreeOnExit},
    workload::WorkloadError,
};

/// What a run call asked for (validated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Return once the process has ended.
    pub wait: bool,
    /// Free what the call made once the process has ended.
    pub remove: bool,
    /// With `wait`: the longest the call waits (`None`: as long as it runs; the API
    /// always sets one).
    pub timeout: Option<Duration>,
    /// With `wait`: the output comes back with the status.
    pub output: bool,
}

impl RunOptions {
    /// Whether anything happens after the start.
    pub fn follows(&self) -> bool {
        self.wait || self.remove
    }
}

/// How a waited run call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The process ended (and, with `remove`, what the call made is freed).
    Done,
    /// Still running after the call's timeout (freed at its end with `remove`).
    TimedOut(Duration),
}

/// RunExecutable: starts `spec` and, with `wait` or `remove`, follows it to its end — in
/// a task of its own, so a caller that goes away cannot stop it halfway (a process
/// started but not supervised, a `remove` never registered). Resolves once it has started
/// (with `wait`: ended, or at the timeout). `admission` (the caller's quota admission) is
/// held until the executable exists, then released: from then on it counts, and the
/// wait for its end holds no one else's request.
pub async fn run_executable<A: Send>(
    cells: &Arc<Cells>,
    mut spec: ExecutableSpec,
    plan: Option<Plan>,
    opts: RunOptions,
    admission: A,
) -> Result<(Arc<Executable>, Ended), WorkloadError> {
    if opts.remove {
        spec.free_on_exit = Some(FreeOnExit::Executable);
    }
    let c = cells.clone();
    let started = detached("RunExecutable", move |t| async move {
        let exe = c.run_in_task(spec, plan, t).await?;
        let done = opts.follows().then(|| c.when_ended(exe.clone(), None));
        Ok((exe, done))
    })
    .await;
    drop(admission);
    let (exe, done) = started?;
    Ok((exe, wait_for(done, opts).await))
}

/// RunCell: a new cell running `what`, followed to its end as [`run_executable`] does (with
/// `remove`, the whole cell goes), in a task of its own; `admission` is released once
/// the cell and its workload exist, as there.
pub async fn run_cell<A: Send>(
    cells: &Arc<Cells>,
    cell: CellSpec,
    what: Workload,
    mut options: Options,
    opts: RunOptions,
    admission: A,
) -> Result<(Arc<Cell>, Arc<Executable>, Ended), WorkloadError> {
    if opts.remove {
        options.free_on_exit = Some(FreeOnExit::Cell);
    }
    let t0 = std::time::Instant::now();
    let c = cells.clone();
    let started = detached("RunCell", move |t| async move {
        let (cell, exe) = super::run_cell::run_cell(&c, cell, what, options, t).await?;
        let done = opts
            .follows()
            .then(|| c.when_ended(exe.clone(), Some(cell.clone())));
        Ok((cell, exe, done))
    })
    .await;
    drop(admission);
    let (cell, exe, done) = started?;
    let t_started = t0.elapsed();
    let ended = wait_for(done, opts).await;
    tracing::debug!(
        started_us = t_started.as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "run call timings"
    );
    Ok((cell, exe, ended))
}

/// With `wait`: until `done` (the end, the output, the removal), at most the timeout.
async fn wait_for(done: Option<tokio::sync::oneshot::Receiver<()>>, opts: RunOptions) -> Ended {
    let Some(done) = done.filter(|_| opts.wait) else {
        return Ended::Done;
    };
    match opts.timeout {
        Some(t) => match tokio::time::timeout(t, done).await {
            Ok(_) => Ended::Done,
            Err(_) => Ended::TimedOut(t),
        },
        None => {
            let _ = done.await;
            Ended::Done
        }
    }
}
