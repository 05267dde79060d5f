//! OCI images: references, a registry client, the content-addressed store, pulls with
//! verification, and safe layer extraction. RunCell (running an image in a cell) is not
//! built yet and answers UNIMPLEMENTED.

pub mod pull;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;
