//! The one-call run (`RunOptions` of RunExecutable and RunCell): after the start, wait
//! for the process's end and its output, and free what the call made — the executable or
//! the whole cell — however the call ends.
//!
//! The waiting and freeing run in a task of the cell layer's ([`Cells::when_ended`]),
//! recorded with the executable: a caller that goes away, a wait that times out or an
//! auraed restart changes nothing about the process and its removal. The caller only
//! waits (bounded) for that task to report.

use std::{sync::Arc, time::Duration};

use crate::{
    cell::{Cell, Cells},
    executable::{Executable, FreeOnExit},
};

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

/// How a waited run call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The process ended (and, with `remove`, what the call made is freed).
    Done,
    /// Still running after the call's timeout (freed at its end with `remove`).
    TimedOut(Duration),
}

/// After a run call started `exe` (in `cell`, for RunCell): with `remove`, `free` goes once
/// it has ended
/// (done by the cell layer in a task of its own, recorded: see
/// [`crate::cell::when_ended`]); with `wait`, resolves once that is done, or at the
/// timeout; otherwise at once.
pub async fn follow(
    cells: &Arc<Cells>,
    exe: Arc<Executable>,
    cell: Option<Arc<Cell>>,
    free: FreeOnExit,
    opts: RunOptions,
) -> Ended {
    if !opts.follows() {
        return Ended::Done;
    }
    let done = cells.when_ended(exe, opts.remove.then_some(free), cell);
    if !opts.wait {
        return Ended::Done;
    }
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
