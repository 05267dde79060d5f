//! Virtual machines on the embedded VMM (its own crate and process; not built yet).

pub mod spec;

pub use spec::VmSpec;
