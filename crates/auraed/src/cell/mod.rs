//! Cells: a cgroup v2 group of processes with their own namespaces.

pub mod dirs;
pub mod exec;
pub mod init;
pub mod limits;
pub mod pool;
pub mod record;
pub mod registry;
mod run;
pub mod session;
pub mod spec;
mod state;
pub mod when_ended;
pub mod zygote;

pub use registry::{CellStats, Cells, Usage};
pub use spec::{CellSpec, Limits, Namespaces, parse_hostname};
pub use state::Cell;

#[cfg(test)]
mod tests;
