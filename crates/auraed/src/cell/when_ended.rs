//! Following an executable to its end and freeing what a run call made (`RunOptions.remove`:
//! the executable or its whole cell) — in a task of its own, so nobody waiting or going
//! away changes it. What is to be freed is recorded with the executable from its first
//! record on (`ExecutableSpec::free_on_exit`), so a restarted auraed finishes it too (see
//! [`super::record`]).

use std::{sync::Arc, time::Duration};

use tracing::warn;

use super::{registry::Cells, state::Cell};
use crate::executable::{Executable, FreeOnExit};

/// How long after the process's end its output may still arrive (children that keep its
/// stdout or stderr open) before it is taken as complete.
pub const OUTPUT_SETTLE: Duration = Duration::from_secs(2);

/// How long after the process's end its output is waited for before its end is recorded
/// (for a free that waits for the output longer): the output's end is most often seen
/// within microseconds of the process's.
const OUTPUT_GRACE: Duration = Duration::from_millis(5);

impl Cells {
    /// Once `exe` (of `cell`, needed to free the whole cell) has ended and its output is in
    /// (at most [`OUTPUT_SETTLE`] after its end), frees what its `free_on_exit` names — the
    /// executable, or the whole cell — if the registry
    /// still holds that very one (never a name freed and used again by someone else). The
    /// receiver resolves once that is done (with nothing to free: once it ended and its
    /// output is in).
    pub fn when_ended(
        self: &Arc<Self>,
        exe: Arc<Executable>,
        cell: Option<Arc<Cell>>,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let free = exe.free_on_exit.lock().ok().and_then(|f| *f);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            exe.wait(None).await;
            let t_ended = t0.elapsed();
            let mut updates = exe.log.subscribe();
            // Its output still open (a child of it holds it): the free waits for it, so
            // its end is recorded now. An executable freed at its end writes no exit
            // record (the free comes at once), and a restart in this wait would take it as
            // ended while auraed was down: a second Exited, its status lost.
            // Its end is usually seen a moment before its output's: a quarter of B3's
            // one-call rounds wrote this record for nothing. A short grace first.
            let settled =
                tokio::time::timeout(OUTPUT_GRACE, updates.wait_for(|(_, closed)| *closed))
                    .await
                    .is_ok();
            if free.is_some() && !settled {
                exe.write_record(&me.recorder);
            }
            let _ =
                tokio::time::timeout(OUTPUT_SETTLE, updates.wait_for(|(_, closed)| *closed)).await;
            let t_settled = t0.elapsed();
            let freed = match free {
                None => Ok(()),
                Some(FreeOnExit::Executable) => me.free_executable_if_same(&exe),
                Some(FreeOnExit::Cell) => match &cell {
                    Some(c) => me.free_if_same(c).await,
                    None => Err(crate::workload::WorkloadError::Precondition(
                        "its cell was not given: the cell is left".into(),
                    )),
                },
            };
            if let Err(e) = freed {
                // It stays: its record says how it ended (not written at its end).
                exe.write_record(&me.recorder);
                warn!(executable = %format!("{}/{}", exe.cell, exe.name), "freeing it at its end (run.remove): {e}");
            }
            tracing::debug!(
                ended_us = t_ended.as_micros() as u64,
                settle_us = (t_settled - t_ended).as_micros() as u64,
                free_us = (t0.elapsed() - t_settled).as_micros() as u64,
                "run end timings"
            );
            let _ = tx.send(());
        });
        rx
    }
}
