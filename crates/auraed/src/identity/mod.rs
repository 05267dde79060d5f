//! Who may call what: the authorization policy (identities come from `aurae-identity`).

pub mod policy;

pub use policy::{Grant, Policy, PolicyError};
