//! Cells: a cgroup v2 group of processes with their own namespaces.

pub mod spec;

pub use spec::{CellSpec, ContainerSpec, Limits, Namespaces};
