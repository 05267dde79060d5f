//! OCI images. Built so far: safe extraction of layer tarballs ([`unpack`]). Pulling from
//! registries and RunCell are not built yet (RunCell answers UNIMPLEMENTED).

pub mod unpack;
