//! Instances: auraed spawning a new auraed (microVM, or isolated cell without KVM).

pub mod spec;

pub use spec::InstanceSpec;
