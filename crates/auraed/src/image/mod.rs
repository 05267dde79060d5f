//! OCI images: references, a registry client, the content-addressed store, pulls with
//! verification, safe layer extraction, and [`local`]: an image in the store as a
//! container needs it; [`load`]: an image sent by a caller (a parent auraed) instead
//! of a registry, verified the same way.

pub mod load;
pub mod local;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;
