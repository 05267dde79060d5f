//! Cells: a cgroup v2 group of processes with their own namespaces.

pub mod cgroup;
pub mod init;
pub mod registry;
pub mod spec;

pub use registry::{Cell, CellError, Cells};
pub use spec::{CellSpec, ContainerSpec, Limits, Namespaces};

/// What a host path named in a request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPath {
    File,
    Dir,
}

/// `p` canonicalised (symlinks and `..` resolved), a `kind` under one of `roots` — the
/// directories the operator allowed with `flag`. Malformed or missing: INVALID_ARGUMENT;
/// not allowed: FAILED_PRECONDITION naming the flag.
pub fn allowed_host_path(
    field: &str,
    p: &std::path::Path,
    kind: HostPath,
    roots: &[std::path::PathBuf],
    flag: &str,
) -> Result<std::path::PathBuf, CellError> {
    use crate::spec::FieldError;
    if roots.is_empty() {
        return Err(CellError::Precondition(format!(
            "{field}: this auraed allows none (start it with {flag} DIR)"
        )));
    }
    let c = std::fs::canonicalize(p)
        .map_err(|e| FieldError::new(field, format!("{}: {e}", p.display())))?;
    let (ok, what) = match kind {
        HostPath::File => (c.is_file(), "a regular file"),
        HostPath::Dir => (c.is_dir(), "a directory"),
    };
    if !ok {
        return Err(FieldError::new(field, format!("{} is not {what}", c.display())).into());
    }
    if !roots.iter().any(|r| c.starts_with(r)) {
        return Err(CellError::Precondition(format!(
            "{field}: {} is not under an allowed {flag}",
            c.display()
        )));
    }
    Ok(c)
}
