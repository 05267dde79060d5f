//! Error → gRPC status, one place for all services.

use std::fmt::Display;

use tonic::Status;
use uuid::Uuid;

use crate::spec::FieldError;

/// A field that failed validation: `INVALID_ARGUMENT` naming the field and the reason.
pub fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Capabilities still to be built, named in UNIMPLEMENTED answers.
#[derive(Debug, Clone, Copy)]
pub enum Capability {
    Cells,
    Images,
    VirtualMachines,
    Instances,
    Pods,
}

impl Capability {
    fn describe(self) -> &'static str {
        match self {
            Self::Cells => "cells and executables (cgroup v2 cells, RunExecutable)",
            Self::Images => "OCI images and RunCell",
            Self::VirtualMachines => "the embedded microVM monitor (RunVirtualMachine)",
            Self::Instances => "spawned instances (Spawn)",
            Self::Pods => "pods (RunPod)",
        }
    }
}

/// `UNIMPLEMENTED` for an RPC whose capability is not built yet. The request was
/// authenticated, authorized and validated first, so callers learn all they can.
pub fn not_built(method: &str, cap: Capability) -> Status {
    Status::unimplemented(format!(
        "{method} is not built in auraed {}: it arrives with {}",
        env!("CARGO_PKG_VERSION"),
        cap.describe()
    ))
}

/// `INTERNAL` with a correlation id; the details go to auraed's log only.
pub fn internal(err: impl Display) -> Status {
    let id = Uuid::new_v4();
    tracing::error!(correlation_id = %id, "internal error: {err}");
    Status::internal(format!(
        "internal error (correlation id {id}); the details are in auraed's log"
    ))
}
