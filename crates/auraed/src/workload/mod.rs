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
