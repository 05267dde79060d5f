//! The one error type of the workload layers (cells, executables, containers, VMs):
//! what the API maps to a status (`api::status`), by kind, never by text.

use aurae_sys::SpawnError;

use super::cgroup::CgroupError;
use crate::spec::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Bad input found further down (a spawned instance refusing it), its message naming
    /// the field: INVALID_ARGUMENT as it is.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    /// The caller may not do it (what only shows further down: the user a running
    /// process has).
    #[error("{0}")]
    Denied(String),
    /// Something did not happen in time (a spawned instance never became ready).
    #[error("{0}")]
    Deadline(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: SpawnError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl WorkloadError {
    pub fn io(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
