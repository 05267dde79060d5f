//! Pods: a container in a cell of a freshly spawned instance.

pub mod spec;

pub use spec::PodSpec;
