//! The workload seam: what cells, containers and VMs share below them, and nothing of
//! theirs. The cgroup tree ([`cgroup`]), the one error type ([`WorkloadError`]), host
//! paths resolved once ([`host_path`]), a child's output captured into a bounded log
//! ([`log`], [`output`]), watching what runs ([`supervise`]) and the layout of auraed's
//! cgroup root ([`layout`]).
//!
//! Layers, bottom to top (checked by `cargo xtask deps`): `workload` → `image` →
//! `container` → `executable` → `cell` → `vm` → `instance`/`pod` → `compose` → `api` →
//! `server`. A module imports only from modules below it.

pub mod cgroup;
pub mod error;
pub mod fdpass;
pub mod holder;
pub mod host_path;
pub mod limits;
pub mod log;
pub mod output;
pub mod process;
pub mod record;
pub mod spawner;
pub mod supervise;
pub mod tree;

pub use error::WorkloadError;

/// Short blocking steps from async code: see [`crate::reaper::off_runtime`] (it lives
/// with the reaper, the lowest layer that needs it).
pub use crate::reaper::off_runtime;

/// Where a workload (cell, executable, VM) is in its life. The API's `Phase` is made from
/// it at the edge (`api::convert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Being started (a VM before its VMM reports).
    Starting,
    Running,
    Stopping,
    Exited,
    Failed,
}

/// Names in auraed's cgroup root.
pub mod layout {
    /// The cgroup group every VMM lives under (a name cells may not take).
    pub const VM_GROUP: &str = "vms";
    /// The cgroup group of spawned instances (a name cells may not take either).
    pub const INSTANCE_GROUP: &str = "instances";
    /// The cgroup (below the cells' root) where spare cell inits wait; not a cell name.
    pub const POOL_GROUP: &str = "cell-pool";
    /// The hidden first argument of auraed's binary when it runs as a cell init.
    pub const CELL_INIT_ARG: &str = "__aurae-cell-init";
}

#[cfg(test)]
mod tests {
    use super::off_runtime;

    /// On a multi-thread runtime the step runs on the calling worker itself (no hop to the
    /// blocking pool and back) while the runtime keeps running the worker's other tasks
    /// (one spawned just before, still in its queue, must run for the step to end).
    #[test]
    fn a_short_blocking_step_runs_in_place_and_the_runtime_goes_on() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::spawn(async {
                let me = std::thread::current().id();
                let (tx, rx) = std::sync::mpsc::channel();
                let other = tokio::spawn(async move { tx.send(()).unwrap() });
                let ran_on = off_runtime(move || {
                    rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
                    std::thread::current().id()
                });
                assert_eq!(ran_on, me, "ran in place");
                other.await.unwrap();
            })
            .await
            .unwrap();
        });
        // Without a multi-thread runtime: directly (no panic).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(async { off_runtime(|| 7) }), 7);
        assert_eq!(off_runtime(|| 8), 8);
    }
}
