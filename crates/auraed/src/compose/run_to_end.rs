//! The one-call run (`RunOptions` of RunExecutable and RunCell): after the start, wait
//! for the process's end and its output, and free what the call made — the executable or
//! the whole cell — however the call ends.
//!
//! The waiting and freeing run in a task of their own: a caller that goes away, or a
//! wait that times out, changes nothing about what happens to the process and its
//! removal. The caller only waits (bounded) for that task to report.

use std::{sync::Arc, time::Duration};

use crate::{
    cell::{Cell, Cells},
    executable::Executable,
};

/// How long after the process's end its output may still arrive (children that keep its
/// stdout or stderr open) before the reply is made without it.
pub const OUTPUT_SETTLE: Duration = Duration::from_secs(2);

/// What a run call asked for (validated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Return once the process has ended.
    pub wait: bool,
    /// Free what the call made once the process has ended.
    pub remove: bool,
    /// With `wait`: the longest the call waits (`None`: as long as it runs).
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

/// What `remove` frees.
#[derive(Debug, Clone)]
pub enum Made {
    /// RunExecutable: the executable (its cell stays).
    Executable,
    /// RunCell: the whole cell.
    Cell(Arc<Cell>),
}

/// How a waited run call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The process ended (and, with `remove`, what the call made is freed).
    Done,
    /// Still running after the call's timeout (freed at its end with `remove`).
    TimedOut(Duration),
}

/// After a run call started `exe`: follows it to its end in a task of its own (waits
/// for its output, frees `made` with `remove`). With `wait`, resolves once that is
/// done, or at the timeout; without, at once.
pub async fn follow(
    cells: &Arc<Cells>,
    exe: Arc<Executable>,
    made: Made,
    opts: RunOptions,
) -> Ended {
    if !opts.follows() {
        return Ended::Done;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cells = cells.clone();
    tokio::spawn(async move {
        exe.wait(None).await;
        settle_output(&exe).await;
        if opts.remove {
            let freed = match &made {
                Made::Executable => cells.free_executable_if_same(&exe),
                Made::Cell(cell) => cells.free_if_same(cell).await,
            };
            if let Err(e) = freed {
                tracing::warn!(executable = %format!("{}/{}", exe.cell, exe.name), "freeing after the run (run.remove): {e}");
            }
        }
        let _ = tx.send(());
    });
    if !opts.wait {
        return Ended::Done;
    }
    match opts.timeout {
        Some(t) => match tokio::time::timeout(t, rx).await {
            Ok(_) => Ended::Done,
            Err(_) => Ended::TimedOut(t),
        },
        None => {
            let _ = rx.await;
            Ended::Done
        }
    }
}

/// Waits until the executable's output has ended (its pipes reached EOF), at most
/// [`OUTPUT_SETTLE`].
async fn settle_output(exe: &Executable) {
    let mut updates = exe.log.subscribe();
    let _ = tokio::time::timeout(OUTPUT_SETTLE, updates.wait_for(|(_, closed)| *closed)).await;
}
