//! A volume copied into a container's files (`Container.files`): how a node's own files
//! reach a container that runs in a spawned instance, which cannot see the node's disk.
//! The volume was resolved and opened once when the plan was made (below a volume root,
//! the grant checked, `O_PATH`); it is read from that fd only: a file reopened through
//! it, a directory walked with `openat2` beneath it. A directory's symlinks are followed
//! only while they stay inside it (`RESOLVE_BENEATH`: kubelet's atomically-written
//! volumes are `token -> ..data/token`), and its `..`-prefixed entries (kubelet's own
//! bookkeeping: `..data`, `..2026_…`) are not copied.

use std::{
    io::Read,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use super::spec::{MAX_FILE_BYTES, MAX_FILE_ENTRIES};

/// Deepest directory copied.
const MAX_DEPTH: usize = 4;

/// What a volume holds, copied.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// A regular file: its content and permission bits.
    File(Vec<u8>, u32),
    /// A directory: its regular files by relative name, with their permission bits.
    Dir(Vec<(PathBuf, Vec<u8>, u32)>),
}

/// Budget left for one container's copies.
#[derive(Debug)]
pub struct Budget {
    pub bytes: usize,
    pub entries: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            bytes: MAX_FILE_BYTES,
            entries: MAX_FILE_ENTRIES,
        }
    }
}

fn too_big(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!(
            "{what}: more than a container may be given ({} KiB, {MAX_FILE_ENTRIES} entries, {MAX_DEPTH} levels)",
            MAX_FILE_BYTES >> 10
        ),
    )
}

/// Reads at most the budget's bytes of `f`.
fn read_bounded(f: OwnedFd, budget: &mut Budget, what: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::from(f)
        .take(budget.bytes as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > budget.bytes {
        return Err(too_big(what));
    }
    budget.bytes -= out.len();
    Ok(out)
}

fn mode_of(fd: &OwnedFd) -> std::io::Result<(rustix::fs::FileType, u32)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((
        rustix::fs::FileType::from_raw_mode(st.st_mode),
        st.st_mode & 0o777,
    ))
}

/// Copies the volume opened as `source` (`O_PATH`, a regular file when `file`).
pub fn copy(source: &OwnedFd, file: bool, budget: &mut Budget) -> std::io::Result<Copied> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    if file {
        // Reopened through the fd itself: the very file the plan opened.
        let f = rustix::fs::open(
            format!("/proc/self/fd/{}", source.as_raw_fd()),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let (same, (kind, mode)) = (
            crate::workload::holder::file_id(f.as_fd())?
                == crate::workload::holder::file_id(source.as_fd())?,
            mode_of(&f)?,
        );
        if !same || kind != FileType::RegularFile {
            return Err(std::io::Error::other(
                "not the regular file that was checked",
            ));
        }
        let content = read_bounded(f, budget, "the file")?;
        return Ok(Copied::File(content, mode));
    }
    let dir = rustix::fs::openat2(
        source,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?;
    let mut out = Vec::new();
    walk(&dir, Path::new(""), 1, budget, &mut out)?;
    Ok(Copied::Dir(out))
}

fn walk(
    dir: &OwnedFd,
    prefix: &Path,
    depth: usize,
    budget: &mut Budget,
    out: &mut Vec<(PathBuf, Vec<u8>, u32)>,
) -> std::io::Result<()> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // ".", "..", and kubelet's own entries ("..data", "..2026_…").
        if name.starts_with("..") || name == "." {
            continue;
        }
        names.push(name);
    }
    names.sort();
    for name in names {
        let rel = prefix.join(&name);
        let what = rel.display().to_string();
        let f = rustix::fs::openat2(
            dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| std::io::Error::new(e.kind(), format!("{what}: {e}")))?;
        match mode_of(&f)? {
            (FileType::RegularFile, mode) => {
                if budget.entries == 0 {
                    return Err(too_big(&what));
                }
                budget.entries -= 1;
                let content = read_bounded(f, budget, &what)?;
                out.push((rel, content, mode));
            }
            (FileType::Directory, _) if depth < MAX_DEPTH => {
                walk(&f, &rel, depth + 1, budget, out)?;
            }
            (FileType::Directory, _) => return Err(too_big(&what)),
            (kind, _) => {
                return Err(std::io::Error::other(format!(
                    "{what} is a {kind:?}, not a regular file or a directory"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    fn opath(p: &Path) -> OwnedFd {
        rustix::fs::open(
            p,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    /// kubelet's atomically-written layout: the names are symlinks into `..data`, which
    /// points at a timestamped directory; only the names come out, with their contents.
    #[test]
    fn a_kubelet_volume_is_copied_by_its_names_and_nothing_leaves_it() {
        use std::os::unix::fs::symlink;
        let t = tempfile::tempdir().unwrap();
        let vol = t.path().join("kube-api-access");
        let ts = vol.join("..2026_12_03_12_00_00.1");
        std::fs::create_dir_all(ts.join("sub")).unwrap();
        std::fs::write(ts.join("token"), "tok").unwrap();
        std::fs::write(ts.join("namespace"), "default").unwrap();
        std::fs::write(ts.join("sub/key"), "v").unwrap();
        symlink("..2026_12_03_12_00_00.1", vol.join("..data")).unwrap();
        for n in ["token", "namespace", "sub"] {
            symlink(format!("..data/{n}"), vol.join(n)).unwrap();
        }
        let got = copy(&opath(&vol), false, &mut Budget::default()).unwrap();
        assert_eq!(
            got,
            Copied::Dir(vec![
                (PathBuf::from("namespace"), b"default".to_vec(), 0o644),
                (PathBuf::from("sub/key"), b"v".to_vec(), 0o644),
                (PathBuf::from("token"), b"tok".to_vec(), 0o644),
            ])
        );
        // A link out of the directory is refused, not followed.
        std::fs::write(t.path().join("secret"), "host").unwrap();
        symlink("../secret", vol.join("escape")).unwrap();
        let e = copy(&opath(&vol), false, &mut Budget::default()).unwrap_err();
        assert!(e.to_string().contains("escape"), "{e}");
        std::fs::remove_file(vol.join("escape")).unwrap();
        // Too much is refused.
        let mut small = Budget {
            bytes: 5,
            entries: 10,
        };
        assert_eq!(
            copy(&opath(&vol), false, &mut small).unwrap_err().kind(),
            std::io::ErrorKind::FileTooLarge
        );
        // A file, with its mode.
        let f = t.path().join("hosts");
        std::fs::write(&f, "127.0.0.1 localhost\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(
            copy(&opath(&f), true, &mut Budget::default()).unwrap(),
            Copied::File(b"127.0.0.1 localhost\n".to_vec(), 0o600)
        );
        // A FIFO in a directory is refused (and opening it does not block).
        nix::unistd::mkfifo(
            &vol.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let e = copy(&opath(&vol), false, &mut Budget::default()).unwrap_err();
        assert!(e.to_string().contains("pipe"), "{e}");
    }
}
