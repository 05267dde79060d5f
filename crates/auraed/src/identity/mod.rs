//! Who may call what: the authorization policy (identities come from `aurae-identity`),
//! and the check of auraed's own identity at start.

pub mod own;
pub mod policy;

pub use policy::{Grant, Policy, PolicyError};
