//! Error → gRPC status, one place for all services.

use std::fmt::Display;

use tonic::Status;
use uuid::Uuid;

use crate::spec::FieldError;

/// A field that failed validation: `INVALID_ARGUMENT` naming the field and the reason.
pub fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// `UNAVAILABLE` (retry-able) for auraed running out of file descriptors: a load
/// condition, not a bug, and the call may well succeed a moment later.
pub fn out_of_fds(what: impl Display) -> Status {
    tracing::warn!("out of file descriptors: {what}");
    Status::unavailable(
        "auraed is out of file descriptors (too many open files); retry shortly: \
         the condition is temporary",
    )
}

/// Whether an I/O error means the process or the system ran out of file descriptors.
pub fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

/// Whether `e` or any error below it is EMFILE/ENFILE.
fn fd_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(is_out_of_fds)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `INTERNAL` with a correlation id; the details go to auraed's log only. An error that
/// is EMFILE/ENFILE underneath (its text ends in `(os error 24)` or `(os error 23)`, as every
/// `io::Error` does) answers [`out_of_fds`] instead.
pub fn internal(err: impl Display) -> Status {
    let text = err.to_string();
    if text.contains("(os error 24)") || text.contains("(os error 23)") {
        return out_of_fds(text);
    }
    let id = Uuid::new_v4();
    tracing::error!(correlation_id = %id, "internal error: {err}");
    Status::internal(format!(
        "internal error (correlation id {id}); the details are in auraed's log"
    ))
}

impl From<crate::workload::WorkloadError> for Status {
    fn from(e: crate::workload::WorkloadError) -> Self {
        use crate::workload::{WorkloadError as E, cgroup::CgroupError};
        if fd_exhaustion(&e) {
            return out_of_fds(&e);
        }
        match e {
            E::Invalid(f) => invalid(f),
            E::Refused(m) => Status::invalid_argument(m),
            E::NotFound(m) => Status::not_found(m),
            E::Exists(m) => Status::already_exists(m),
            E::Precondition(m) => Status::failed_precondition(m),
            E::Exhausted(m) => Status::resource_exhausted(m),
            E::Denied(m) => Status::permission_denied(m),
            E::Deadline(m) => Status::deadline_exceeded(m),
            E::Cgroup(c @ CgroupError::MissingController { .. }) => {
                Status::failed_precondition(c.to_string())
            }
            // A cgroup of that name is there though no cell is (never INTERNAL).
            E::Cgroup(CgroupError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Status::already_exists(
                    "name: a cgroup of that name exists that no cell of this auraed owns",
                )
            }
            E::Spawn { what, source } => spawn_status(&what, source),
            // The state disk is full: nothing more can be made there now.
            E::Io(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => Status::resource_exhausted(
                "the state directory's disk is full: nothing new can be started until there is room",
            ),
            other => internal(other),
        }
    }
}

/// A failed spawn: the child's failing step (typed, with its blame) says what was wrong;
/// for `execute`, the errno says whether the program is the request's fault.
fn spawn_status(what: &str, e: aurae_sys::SpawnError) -> Status {
    use std::io::ErrorKind as K;

    use aurae_sys::{Blame, SpawnError, Step};
    let SpawnError::Child { step, error, .. } = e else {
        return internal(format!("{what}: {e}"));
    };
    match (step, step.blame()) {
        (Step::EXECUTE, _) => match error.kind() {
            K::NotFound
            | K::PermissionDenied
            | K::NotADirectory
            | K::InvalidInput
            | K::ExecutableFileBusy => {
                Status::invalid_argument(format!("argv[0]: {what}: cannot execute it: {error}"))
            }
            _ if error.raw_os_error() == Some(nix::libc::ENOEXEC) => Status::invalid_argument(
                format!("argv[0]: {what}: not an executable format: {error}"),
            ),
            _ => internal(format!("{what}: execute: {error}")),
        },
        (Step::CHANGE_DIRECTORY, _) => Status::invalid_argument(format!("working_dir: {error}")),
        (Step::SET_UID | Step::SET_GID | Step::SET_GROUPS, _) => {
            Status::invalid_argument(format!("uid/gid: {step}: {error}"))
        }
        // The image or the request is wrong (a symlinked /proc, a bad working directory)…
        (_, Blame::Request) => Status::invalid_argument(format!("{what}: {step}: {error}")),
        // …or the host cannot do it (overlay, a volume's mount).
        (_, Blame::Host) => Status::failed_precondition(format!("{what}: {step}: {error}")),
        (_, Blame::Internal) => internal(format!("{what}: {step}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_exhaustion_is_unavailable_not_internal() {
        let emfile = || std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        let s = Status::from(crate::workload::WorkloadError::Io(emfile()));
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains("file descriptors"), "{s:?}");
        let s = Status::from(crate::workload::WorkloadError::Spawn {
            what: "run".into(),
            source: aurae_sys::SpawnError::Setup(emfile()),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        let s = internal(format!(
            "opening a log: {}",
            std::io::Error::from_raw_os_error(nix::libc::ENFILE)
        ));
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        let s = Status::from(crate::workload::WorkloadError::Io(std::io::Error::other(
            "boom",
        )));
        assert_eq!(
            s.code(),
            tonic::Code::Internal,
            "other errors stay INTERNAL"
        );
    }
}
