//! Compiles `proto/` with protox (pure Rust, no `protoc`, no network) and generates the
//! prost messages and tonic services. The descriptor set is written too, for reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "aurae/runtime/v0/common.proto",
    "aurae/runtime/v0/container.proto",
    "aurae/runtime/v0/executable.proto",
    "aurae/runtime/v0/cell.proto",
    "aurae/runtime/v0/vm.proto",
    "aurae/runtime/v0/instance.proto",
    "aurae/runtime/v0/pod.proto",
    "aurae/runtime/v0/events.proto",
    "aurae/runtime/v0/image.proto",
    "aurae/runtime/v0/daemon.proto",
    "aurae/runtime/v0/runtime.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    let fds = protox::compile(FILES, [&proto_root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("aurae_descriptor.bin"), fds.encode_to_vec())?;
    generate(fds)?;
    // The Kubernetes CRI (`runtime.v1`), as published: a descriptor set of its own, so
    // the Aurae API's reflection and method list stay ours.
    let cri = protox::compile(["cri/runtime/v1/api.proto"], [&proto_root])?;
    fs::write(out.join("cri_descriptor.bin"), cri.encode_to_vec())?;
    generate(cri)?;
    Ok(())
}

/// The prost messages and the tonic clients and servers of `fds`, each side behind its
/// feature.
fn generate(fds: prost_types::FileDescriptorSet) -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .client_mod_attribute(".", "#[cfg(feature = \"client\")]")
        .server_mod_attribute(".", "#[cfg(feature = \"server\")]")
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
