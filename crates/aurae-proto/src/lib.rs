//! Generated code for the Aurae API (`proto/aurae/runtime/v0`) and the Kubernetes CRI
//! (`proto/cri/runtime/v1`), nothing else.
//!
//! The tonic clients and servers are behind the `client` and `server` features so that
//! crates needing only the messages (the VMM's control channel, later) stay free of tonic.
#![forbid(unsafe_code)]
#![allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
// Comments come from the .proto files, written for people reading protos, not rustdoc.
#![allow(
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls,
    rustdoc::broken_intra_doc_links
)]

/// `aurae.runtime.v0`: the Runtime service, the per-resource lifecycle services,
/// events and the daemon service.
pub mod runtime {
    pub mod v0 {
        tonic::include_proto!("aurae.runtime.v0");
    }
}

/// `runtime.v1`: the Kubernetes Container Runtime Interface (`proto/cri`, as Kubernetes
/// publishes it), served by auraed on `--cri-socket`.
pub mod cri {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

/// The encoded `FileDescriptorSet` of the CRI proto.
pub const CRI_FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cri_descriptor");

/// The encoded `FileDescriptorSet` of every Aurae proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("aurae_descriptor");

/// Full gRPC names of the services, as they appear in method paths and reflection.
pub mod service_names {
    pub const RUNTIME: &str = "aurae.runtime.v0.Runtime";
    pub const EXECUTABLES: &str = "aurae.runtime.v0.Executables";
    pub const CELLS: &str = "aurae.runtime.v0.Cells";
    pub const VIRTUAL_MACHINES: &str = "aurae.runtime.v0.VirtualMachines";
    pub const INSTANCES: &str = "aurae.runtime.v0.Instances";
    pub const PODS: &str = "aurae.runtime.v0.Pods";
    pub const EVENTS: &str = "aurae.runtime.v0.Events";
    pub const DAEMON: &str = "aurae.runtime.v0.Daemon";
    pub const IMAGES: &str = "aurae.runtime.v0.Images";
}
