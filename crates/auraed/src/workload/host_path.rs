//! Host paths named in requests (volumes, VM kernels, initramfs images, drives): placed
//! under one of the operator's roots by name first, then opened once below it with
//! `openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS)`; the fd is what
//! is used from then on (resolve once, then use the fd).

use super::WorkloadError;

/// What a host path named in a request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPath {
    /// A regular file, opened for reading, or for reading and writing with `write`.
    File { write: bool },
    /// A directory, opened `O_PATH` (for `open_tree`).
    Dir,
    /// A directory or a regular file (nothing else: no FIFO, socket or device), opened
    /// `O_PATH` (for `open_tree`); [`is_regular_file`] tells which.
    DirOrFile,
}

/// Whether an fd [`UnderRoot::open`] returned is a regular file (else a directory).
pub fn is_regular_file(fd: &std::os::fd::OwnedFd) -> std::io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile)
}

/// A host path from a request, placed under one of the operator's roots by its name
/// alone: nothing on the filesystem has been looked at yet (a caller learns nothing about
/// paths outside the roots, and a grant is checked before anything is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderRoot {
    /// What the caller sent: the only path an error names.
    pub sent: std::path::PathBuf,
    /// The most specific root it lies under (canonical, as auraed resolved it at start).
    pub root: std::path::PathBuf,
    /// The path below `root`: only normal components; empty for the root itself.
    pub rel: std::path::PathBuf,
    /// The path below each root it lies under, most specific first. A grant must allow
    /// every one (roots may nest).
    pub rels: Vec<std::path::PathBuf>,
    /// The operator's flag for these roots, for messages.
    pub flag: &'static str,
}

/// Places `p` under one of `roots` (the directories the operator allowed with `flag`) by
/// its components alone: `.` and repeated `/` are dropped, `..` is refused. Malformed:
/// INVALID_ARGUMENT; no roots or outside them: FAILED_PRECONDITION naming the flag. Only
/// `p` as sent is ever named.
pub fn under_root(
    field: &str,
    p: &std::path::Path,
    roots: &[std::path::PathBuf],
    flag: &'static str,
) -> Result<UnderRoot, WorkloadError> {
    use std::path::{Component, PathBuf};

    use crate::spec::FieldError;
    if roots.is_empty() {
        return Err(WorkloadError::Precondition(format!(
            "{field}: this auraed allows none (start it with {flag} DIR)"
        )));
    }
    let mut norm = PathBuf::from("/");
    let mut comps = p.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(FieldError::new(field, format!("{:?} is not an absolute path", p)).into());
    }
    for c in comps {
        match c {
            Component::Normal(n) => norm.push(n),
            Component::CurDir => {}
            _ => {
                return Err(
                    FieldError::new(field, format!("{:?} contains a '..' component", p)).into(),
                );
            }
        }
    }
    let mut under: Vec<&PathBuf> = roots.iter().filter(|r| norm.starts_with(r)).collect();
    under.sort_by_key(|r| std::cmp::Reverse(r.components().count()));
    let Some(root) = under.first() else {
        return Err(WorkloadError::Precondition(format!(
            "{field}: {} is not under an allowed {flag}",
            p.display()
        )));
    };
    let rel = |r: &PathBuf| {
        norm.strip_prefix(r)
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default()
    };
    Ok(UnderRoot {
        sent: p.to_path_buf(),
        root: (*root).clone(),
        rel: rel(root),
        rels: under.iter().map(|r| rel(r)).collect(),
        flag,
    })
}

impl UnderRoot {
    /// Opens the path once, below its root, never following a symlink or magic link
    /// (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`):
    /// the fd is what gets mounted or booted, so nothing can be swapped between this
    /// check and its use. Close-on-exec. Missing or of the wrong kind: INVALID_ARGUMENT;
    /// a symlink on the way: FAILED_PRECONDITION. Errors name only the path sent.
    pub fn open(&self, field: &str, kind: HostPath) -> Result<std::os::fd::OwnedFd, WorkloadError> {
        use rustix::{
            fs::{FileType, Mode, OFlags, ResolveFlags},
            io::Errno,
        };

        use crate::spec::FieldError;
        let sent = self.sent.display();
        let flag = self.flag;
        let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        // The root itself: canonical since start-up, so no symlink may appear in it now.
        let root = rustix::fs::openat2(
            rustix::fs::CWD,
            &self.root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        )
        .map_err(|e| {
            WorkloadError::Precondition(format!(
                "{field}: {sent}: its {flag} cannot be opened ({e}): ask the operator"
            ))
        })?;
        let mut oflags = OFlags::PATH | OFlags::CLOEXEC;
        if kind == HostPath::Dir {
            oflags |= OFlags::DIRECTORY;
        }
        let rel = if self.rel.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            self.rel.as_path()
        };
        let fd = rustix::fs::openat2(
            &root,
            rel,
            oflags,
            Mode::empty(),
            resolve | ResolveFlags::BENEATH,
        )
        .map_err(|e| match e {
            Errno::NOENT => {
                FieldError::new(field, format!("{sent}: no such file or directory")).into()
            }
            Errno::NOTDIR if kind == HostPath::Dir => {
                FieldError::new(field, format!("{sent} is not a directory")).into()
            }
            Errno::NOTDIR => {
                FieldError::new(field, format!("{sent}: a parent is not a directory")).into()
            }
            Errno::LOOP => WorkloadError::Precondition(format!(
                "{field}: {sent}: symlinks under {flag} are not followed (name the real path)"
            )),
            Errno::XDEV => {
                WorkloadError::Precondition(format!("{field}: {sent} leaves its {flag}"))
            }
            e => WorkloadError::Precondition(format!("{field}: {sent}: {e}")),
        })?;
        let st = rustix::fs::fstat(&fd)
            .map_err(|e| WorkloadError::Precondition(format!("{field}: {sent}: {e}")))?;
        let write = match kind {
            HostPath::Dir => return Ok(fd),
            HostPath::DirOrFile => {
                return match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory | FileType::RegularFile => Ok(fd),
                    _ => Err(FieldError::new(
                        field,
                        format!("{sent} is neither a directory nor a regular file"),
                    )
                    .into()),
                };
            }
            HostPath::File { write } => write,
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FieldError::new(field, format!("{sent} is not a regular file")).into());
        }
        // Reopened through the fd itself (its magic link names the inode, not a path): the
        // file checked is the file opened, and nothing but a regular file was ever opened
        // for I/O (a FIFO or device could block or act on open).
        let mut how = OFlags::CLOEXEC | OFlags::NOCTTY;
        how |= if write { OFlags::RDWR } else { OFlags::RDONLY };
        rustix::fs::open(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)),
            how,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ROFS | Errno::ACCESS | Errno::PERM | Errno::TXTBSY if write => {
                WorkloadError::Precondition(format!(
                    "{field}: {sent} cannot be opened for writing ({e})"
                ))
            }
            e => WorkloadError::Precondition(format!("{field}: {sent}: {e}")),
        })
    }
}

/// [`under_root`] then [`UnderRoot::open`]: the fd of `p` and where it lies.
pub fn open_host_path(
    field: &str,
    p: &std::path::Path,
    kind: HostPath,
    roots: &[std::path::PathBuf],
    flag: &'static str,
) -> Result<(std::os::fd::OwnedFd, UnderRoot), WorkloadError> {
    let u = under_root(field, p, roots, flag)?;
    Ok((u.open(field, kind)?, u))
}

#[cfg(test)]
mod host_path_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use std::path::{Path, PathBuf};

    use super::*;

    fn roots(d: &Path) -> Vec<PathBuf> {
        vec![std::fs::canonicalize(d).unwrap()]
    }

    #[test]
    fn the_root_check_is_lexical_and_names_only_what_was_sent() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        for sent in ["/proc/self/fd/2", "/proc/self/cwd", "/etc", "/"] {
            let e = under_root("f", Path::new(sent), &r, "--volume-root").unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, WorkloadError::Precondition(_)), "{sent}: {m}");
            assert_eq!(
                m,
                format!("f: {sent} is not under an allowed --volume-root"),
                "nothing but the sent path"
            );
        }
        let root = &r[0];
        let e = under_root("f", &root.join("a/../../etc"), &r, "--volume-root").unwrap_err();
        assert!(matches!(e, WorkloadError::Invalid(_)), "{e}");
        let u = under_root(
            "f",
            Path::new(&format!("{}/./team-a//x/", root.display())),
            &r,
            "--volume-root",
        )
        .unwrap();
        assert_eq!(u.rel, Path::new("team-a/x"));
        assert_eq!(u.rels, [PathBuf::from("team-a/x")]);
        // A sibling with the root as a string prefix is not under it.
        let e = under_root(
            "f",
            Path::new(&format!("{}x/y", root.display())),
            &r,
            "--volume-root",
        )
        .unwrap_err();
        assert!(matches!(e, WorkloadError::Precondition(_)), "{e}");
        let e = under_root("f", Path::new("/x"), &[], "--volume-root").unwrap_err();
        assert!(e.to_string().contains("--volume-root DIR"), "{e}");
    }

    #[test]
    fn nested_roots_give_every_relative_path() {
        let d = tempfile::tempdir().unwrap();
        let outer = std::fs::canonicalize(d.path()).unwrap();
        let inner = outer.join("team-b");
        let u = under_root(
            "f",
            &inner.join("team-a/x"),
            &[outer.clone(), inner.clone()],
            "--volume-root",
        )
        .unwrap();
        assert_eq!(u.root, inner);
        assert_eq!(
            u.rels,
            [PathBuf::from("team-a/x"), PathBuf::from("team-b/team-a/x")]
        );
    }

    #[test]
    fn opening_never_follows_a_symlink_or_leaves_the_root() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        let root = &r[0];
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/file"), "x").unwrap();
        std::os::unix::fs::symlink("/", root.join("up")).unwrap();
        std::os::unix::fs::symlink("dir", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("/proc/self/fd/2", root.join("fd2")).unwrap();
        let open = |p: &str, k| open_host_path("f", &root.join(p), k, &r, "--volume-root");
        assert!(open("dir/sub", HostPath::Dir).is_ok());
        assert!(open("", HostPath::Dir).is_ok(), "the root itself");
        assert!(open("dir/file", HostPath::File { write: false }).is_ok());
        for (p, k) in [
            ("up", HostPath::Dir),
            ("up/etc", HostPath::Dir),
            ("rel/sub", HostPath::Dir),
            ("fd2", HostPath::File { write: false }),
            ("fd2", HostPath::Dir),
        ] {
            let e = open(p, k).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, WorkloadError::Precondition(_)), "{p}: {m}");
            let sent = root.join(p).display().to_string();
            assert!(m.contains(&sent), "{p}: {m}");
            assert!(
                !m.replace(&sent, "").contains('/'),
                "{p}: only the sent path is named: {m}"
            );
        }
        for (p, k) in [
            ("dir/file", HostPath::Dir),
            ("dir/sub", HostPath::File { write: false }),
            ("nope", HostPath::Dir),
        ] {
            let e = open(p, k).unwrap_err();
            assert!(matches!(e, WorkloadError::Invalid(_)), "{p}: {e}");
        }
    }

    #[test]
    fn a_file_is_opened_read_only_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        std::fs::write(r[0].join("disk"), "x").unwrap();
        let acc = |write| {
            let (fd, _) = open_host_path(
                "f",
                &r[0].join("disk"),
                HostPath::File { write },
                &r,
                "--vm-image-root",
            )
            .unwrap();
            rustix::fs::fcntl_getfl(&fd).unwrap() & rustix::fs::OFlags::RWMODE
        };
        assert_eq!(acc(false), rustix::fs::OFlags::RDONLY);
        assert_eq!(acc(true), rustix::fs::OFlags::RDWR);
    }
}
