//! Executables: plain processes started in a cell.

pub mod spec;

pub use spec::{ExecutableRef, ExecutableSpec};
