//! A cell's directories (`Container.cell_directories`): writable directories that belong
//! to a cell rather than to one container — a pod's emptyDir. Each lives at
//! `<root>/<cell name>/_dir.<name>` (a cell's name is labels joined by `/` and a label has
//! no `_`, so a directory never clashes with a child cell's), is made empty (mode 0777, as
//! kubelet makes an emptyDir) by the first container that names it, is mounted into every
//! container of the cell that names it, and goes with the cell: [`CellDirs::remove`] when
//! it is freed, [`CellDirs::remove_strays`] at a start that does not find it again.
//!
//! `<root>` is auraed's (0700): a container sees only the directories mounted into it, never
//! their parents, so nothing a workload writes can redirect where auraed creates, opens or
//! removes. What a workload left is removed whatever its shape (see
//! [`crate::workload::tree`]: links not followed, any depth), moved aside first so that a
//! cell allocated again under the name starts with none, and off the caller's thread.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use crate::spec::CellName;

/// Most directories one cell may have (each container may name at most 16).
pub const MAX_PER_CELL: usize = 64;

/// What a directory's name starts with below its cell's own directory.
const PREFIX: &str = "_dir.";

/// The cells' directories under one root (`<state>/cell-dirs`).
#[derive(Debug, Clone)]
pub struct CellDirs {
    root: PathBuf,
}

impl CellDirs {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn of_cell(&self, cell: &CellName) -> PathBuf {
        self.root.join(cell.as_str())
    }

    /// Directory `name` of `cell`, opened `O_PATH` (for its mount to be cloned from): made
    /// empty with mode 0777 first if the cell has none of that name yet, unless the cell
    /// has [`MAX_PER_CELL`] already. `name` is a checked DNS label.
    pub fn open(&self, cell: &CellName, name: &str) -> std::io::Result<OwnedFd> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let own = self.of_cell(cell);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&own)?;
        let dir = own.join(format!("{PREFIX}{name}"));
        let open = || {
            rustix::fs::open(
                &dir,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(std::io::Error::from)
        };
        match open() {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let has = std::fs::read_dir(&own)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
            .count();
        if has >= MAX_PER_CELL {
            return Err(std::io::Error::new(
                std::io::ErrorKind::QuotaExceeded,
                format!("the cell has {has} directories already (at most {MAX_PER_CELL})"),
            ));
        }
        // Made whole under a name of its own (its mode set: what kubelet gives an
        // emptyDir), then put in place: a crash in between never leaves a 0700 one there.
        let tmp = own.join(format!(".new-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o777))
            .and_then(|()| {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &tmp,
                    rustix::fs::CWD,
                    &dir,
                    rustix::fs::RenameFlags::NOREPLACE,
                )
                .map_err(std::io::Error::from)
            });
        match placed {
            Ok(()) => {}
            // Made meanwhile by another container's start: that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_dir(&tmp);
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&tmp);
                return Err(e);
            }
        }
        open()
    }

    /// Moves `cell`'s directories (and those of its children) aside at once (a cell
    /// allocated again under the name finds none) and returns where they went, for
    /// [`remove_tree`](crate::workload::tree::remove_tree) to remove off the caller's
    /// thread; `None` when it had none.
    pub fn take(&self, cell: &CellName) -> std::io::Result<Option<PathBuf>> {
        let trash = self
            .root
            .join(format!(".gone-{}", uuid::Uuid::new_v4().simple()));
        match std::fs::rename(self.of_cell(cell), &trash) {
            Ok(()) => Ok(Some(trash)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`take`](Self::take) and remove now (a test's, or a caller's already off the
    /// runtime's threads).
    pub fn remove(&self, cell: &CellName) -> std::io::Result<()> {
        match self.take(cell)? {
            Some(t) => crate::workload::tree::remove_tree(&t),
            None => Ok(()),
        }
    }

    /// At a start: removes the directories of every cell `kept` does not name (a cell
    /// freed or swept while they stayed: a crash between a free's steps). Goes only into
    /// kept cells' own directories, never into a cell directory itself. One warning per
    /// entry that cannot be removed.
    pub fn remove_strays(&self, kept: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut stack = vec![(self.root.clone(), String::new())];
        while let Some((d, prefix)) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let base = e.file_name().to_string_lossy().into_owned();
                if base.starts_with(PREFIX) && !prefix.is_empty() {
                    // A kept cell's directory (its parent was kept to be walked).
                    continue;
                }
                let rel = if prefix.is_empty() {
                    base
                } else {
                    format!("{prefix}/{base}")
                };
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && kept(&rel) {
                    stack.push((e.path(), rel));
                    continue;
                }
                let gone = if is_dir {
                    crate::workload::tree::remove_tree(&e.path())
                } else {
                    std::fs::remove_file(e.path())
                };
                if let Err(err) = gone {
                    warnings.push(format!(
                        "cell directory {} left by a previous auraed could not be removed: {err}",
                        e.path().display()
                    ));
                }
            }
        }
        warnings
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    fn name(s: &str) -> CellName {
        CellName::parse("cell", s).unwrap()
    }

    #[test]
    fn a_directory_is_made_once_shared_and_goes_with_its_cell() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dirs = CellDirs::new(tmp.path().join("cell-dirs"));
        let (a, ab) = (name("a"), name("a/b"));
        dirs.open(&a, "cache").unwrap();
        let path = tmp.path().join("cell-dirs/a/_dir.cache");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o777, "as kubelet makes an emptyDir");
        std::fs::write(path.join("kept"), b"x").unwrap();
        // Named again (another container, a restarted one): the same directory.
        dirs.open(&a, "cache").unwrap();
        assert!(path.join("kept").exists());
        dirs.open(&ab, "cache").unwrap();
        assert!(tmp.path().join("cell-dirs/a/b/_dir.cache").is_dir());
        // A link the workload made there is not followed by the removal.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"y").unwrap();
        std::os::unix::fs::symlink(&outside, path.join("link")).unwrap();
        dirs.remove(&ab).unwrap();
        assert!(!tmp.path().join("cell-dirs/a/b").exists());
        assert!(path.join("kept").exists(), "the parent's stays");
        dirs.remove(&a).unwrap();
        assert!(!tmp.path().join("cell-dirs/a").exists());
        assert!(outside.join("precious").exists());
        dirs.remove(&a).unwrap();
    }

    #[test]
    fn a_cell_has_at_most_its_share_of_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = CellDirs::new(tmp.path().to_path_buf());
        let a = name("a");
        for i in 0..MAX_PER_CELL {
            dirs.open(&a, &format!("d{i}")).unwrap();
        }
        let e = dirs.open(&a, "more").unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        // One it has is still opened.
        dirs.open(&a, "d0").unwrap();
    }

    #[test]
    fn strays_go_and_kept_cells_directories_are_not_entered() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = CellDirs::new(tmp.path().to_path_buf());
        for c in ["kept", "kept/child", "kept/gone", "gone"] {
            dirs.open(&name(c), "data").unwrap();
        }
        // In a kept cell's directory, something that looks like a cell's: its data.
        std::fs::create_dir(tmp.path().join("kept/_dir.data/gone")).unwrap();
        std::fs::write(tmp.path().join("stray-file"), b"").unwrap();
        let w = dirs.remove_strays(&|rel| rel == "kept" || rel == "kept/child");
        assert!(w.is_empty(), "{w:?}");
        assert!(tmp.path().join("kept/_dir.data/gone").is_dir());
        assert!(tmp.path().join("kept/child/_dir.data").is_dir());
        assert!(!tmp.path().join("kept/gone").exists());
        assert!(!tmp.path().join("gone").exists());
        assert!(!tmp.path().join("stray-file").exists());
    }
}
