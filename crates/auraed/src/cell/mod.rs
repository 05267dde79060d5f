//! Cells: a cgroup v2 group of processes with their own namespaces.

pub mod init;
pub mod limits;
pub mod record;
pub mod registry;
mod state;
mod run;
pub mod spec;

pub use registry::{Cells, Usage};
pub use state::Cell;
pub use spec::{CellSpec, Limits, Namespaces};
