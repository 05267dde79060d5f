//! Cells: a cgroup v2 group of processes with their own namespaces.

pub mod cgroup;
pub mod init;
pub mod registry;
pub mod spec;

pub use registry::{Cell, CellError, Cells};
pub use spec::{CellSpec, ContainerSpec, Limits, Namespaces};
