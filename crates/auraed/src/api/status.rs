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

impl From<crate::cell::CellError> for Status {
    fn from(e: crate::cell::CellError) -> Self {
        use crate::cell::{CellError as E, cgroup::CgroupError};
        match e {
            E::Invalid(f) => invalid(f),
            E::NotFound(m) => Status::not_found(m),
            E::Exists(m) => Status::already_exists(m),
            E::Precondition(m) => Status::failed_precondition(m),
            E::Exhausted(m) => Status::resource_exhausted(m),
            E::Cgroup(c @ CgroupError::MissingController { .. }) => {
                Status::failed_precondition(c.to_string())
            }
            E::Spawn { what, source } => spawn_status(&what, source),
            other => internal(other),
        }
    }
}

/// A failed spawn: the child's failing step says which field was wrong.
fn spawn_status(what: &str, e: aurae_sys::SpawnError) -> Status {
    use std::io::ErrorKind as K;
    match e {
        aurae_sys::SpawnError::Child {
            step: "execute",
            error,
            ..
        } => match error.kind() {
            K::NotFound
            | K::PermissionDenied
            | K::NotADirectory
            | K::InvalidInput
            | K::ExecutableFileBusy => {
                Status::invalid_argument(format!("argv[0]: cannot execute it in the cell: {error}"))
            }
            _ if error.raw_os_error() == Some(nix::libc::ENOEXEC) => {
                Status::invalid_argument(format!("argv[0]: not an executable format: {error}"))
            }
            _ => internal(format!("{what}: execute: {error}")),
        },
        aurae_sys::SpawnError::Child {
            step: "change directory",
            error,
            ..
        } => Status::invalid_argument(format!("working_dir: {error}")),
        aurae_sys::SpawnError::Child {
            step: step @ ("set uid" | "set gid" | "set groups"),
            error,
            ..
        } => Status::invalid_argument(format!("uid/gid: {step}: {error}")),
        // The image or the request is wrong (a symlinked /proc, a bad working directory)…
        aurae_sys::SpawnError::Child { step, error, .. }
            if step.starts_with("container:")
                && (step.contains("not a directory") || step.contains("working directory")) =>
        {
            Status::invalid_argument(format!("{what}: {step}: {error}"))
        }
        // …or the host cannot do it (overlay, a volume's mount).
        aurae_sys::SpawnError::Child { step, error, .. } if step.starts_with("container:") => {
            Status::failed_precondition(format!("{what}: {step}: {error}"))
        }
        other => internal(format!("{what}: {other}")),
    }
}
