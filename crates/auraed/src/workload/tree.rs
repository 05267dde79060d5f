//! Removing a directory tree a workload wrote (a container's upper directory, a cell's
//! directory) without trusting its shape: `std::fs::remove_dir_all` recurses once per level
//! (a stack frame and an open directory each), so a tree a tenant made a million levels
//! deep would overflow the stack of the thread removing it, or run out of fds, and auraed
//! with it. [`remove_tree`] keeps two directories open and no recursion: every
//! subdirectory met is moved up to the top (a rename within the tree) and emptied from
//! there in turn, so the depth it works at is always one. Links are removed, never
//! followed.
//!
//! A tree taken out of the way (renamed aside by its owner, so the name is free at once)
//! is deleted off the caller's path by [`discard`]: one deleter thread for all of them —
//! freed containers' directories, freed cells' directories —, one tree at a time however
//! many frees come at once (never a pool's worth of threads walking upper layers);
//! [`deletions_done`] waits for it at shutdown.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{OnceLock, mpsc},
    time::Duration,
};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

fn open_dir(dir: impl AsFd, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Empties `dir` (open): files and links unlinked, subdirectories moved into `top` under
/// fresh names (`counter`), to be emptied as entries of `top` later. `dir` may be `top`.
fn empty_one(top: &OwnedFd, dir: &OwnedFd, is_top: bool, counter: &mut u64) -> io::Result<()> {
    let names = rustix::fs::Dir::read_from(dir).map_err(io::Error::from)?;
    for e in names {
        let e = e.map_err(io::Error::from)?;
        let name = e.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        // (An entry the listing shows again after it went, as a listing of a directory
        // that changes may: gone is what we want.)
        let gone = |r: rustix::io::Result<()>| match r {
            Err(rustix::io::Errno::NOENT) => Ok(()),
            r => r.map_err(io::Error::from),
        };
        let is_dir = match e.file_type() {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => {
                match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(s) => rustix::fs::FileType::from_raw_mode(s.st_mode).is_dir(),
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            _ => false,
        };
        if !is_dir {
            gone(rustix::fs::unlinkat(dir, name, AtFlags::empty()))?;
            continue;
        }
        // An empty directory goes at once; another is emptied from the top.
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => continue,
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        if is_top {
            // Already at the top: emptied in place (its subdirectories come up here).
            let sub = match open_dir(dir, name) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            empty_one(top, &sub, false, counter)?;
            gone(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR))?;
            continue;
        }
        loop {
            *counter += 1;
            let fresh = format!(".rm{counter}");
            match rustix::fs::renameat_with(dir, name, top, fresh.as_str(), RenameFlags::NOREPLACE)
            {
                Ok(()) | Err(rustix::io::Errno::NOENT) => break,
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Removes the directory tree at `path` (a missing one is fine); see the module.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let top = match rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // Not a directory (a file or a link at the path): removed as such.
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
            return std::fs::remove_file(path);
        }
        Err(e) => return Err(e.into()),
    };
    let mut counter = 0;
    // Each pass empties what the top holds; subdirectories moved up meanwhile are taken
    // by the next one. Every pass removes something, so this ends.
    loop {
        empty_one(&top, &top, true, &mut counter)?;
        let mut left = rustix::fs::Dir::read_from(&top).map_err(io::Error::from)?;
        let more = left.any(|e| e.is_ok_and(|e| e.file_name() != c"." && e.file_name() != c".."));
        if !more {
            break;
        }
    }
    drop(top);
    std::fs::remove_dir(path)
}

/// [`remove_tree`], a failure logged as removing `what`.
pub fn remove_logged(path: &Path, what: &str) {
    if let Err(e) = remove_tree(path) {
        tracing::warn!(dir = %path.display(), error = %e, "removing {what}");
    }
}

/// Deletes the tree at `path` — already out of its owner's way — on the deleter thread,
/// or here and now where no thread can be started; a failure is logged as removing
/// `what`.
pub fn discard(path: PathBuf, what: String) {
    match deleter() {
        Some(d) => {
            if let Err(mpsc::SendError(Deletion::Tree(path, what))) =
                d.send(Deletion::Tree(path, what))
            {
                remove_logged(&path, &what);
            }
        }
        None => remove_logged(&path, &what),
    }
}

/// What the deleter thread is asked.
enum Deletion {
    Tree(PathBuf, String),
    /// Answered once everything sent before is deleted.
    Done(mpsc::Sender<()>),
}

/// The deleter: one thread, started on first use, deleting discarded trees in turn.
/// `None` if it cannot be started.
fn deleter() -> Option<&'static mpsc::Sender<Deletion>> {
    static DELETER: OnceLock<Option<mpsc::Sender<Deletion>>> = OnceLock::new();
    DELETER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Deletion>();
            let started = std::thread::Builder::new()
                .name("aurae-deleter".into())
                .spawn(move || {
                    for job in rx {
                        match job {
                            Deletion::Tree(p, what) => remove_logged(&p, &what),
                            Deletion::Done(reply) => {
                                let _ = reply.send(());
                            }
                        }
                    }
                });
            match started {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "no deleter thread: freed workloads' directories are deleted on the free's path");
                    None
                }
            }
        })
        .as_ref()
}

/// Waits (at most `within`) until the deleter has deleted every tree discarded before
/// this call; `false` if it has not by then (what is left is deleted at the next start).
/// A shutdown's last step: nothing freed is left on the disk.
pub fn deletions_done(within: Duration) -> bool {
    let Some(d) = deleter() else {
        return true;
    };
    let (tx, rx) = mpsc::channel();
    if d.send(Deletion::Done(tx)).is_err() {
        return true;
    }
    rx.recv_timeout(within).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    /// Discarded trees go on the one deleter thread, in turn; `deletions_done` returns once
    /// all sent before it are gone (a cell's and a container's alike), a link's target
    /// stays, a missing tree is no error.
    #[test]
    fn discarded_trees_are_gone_once_the_deleter_says_done() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("precious");
        std::fs::write(&outside, b"x").unwrap();
        let trees: Vec<PathBuf> = (0..20)
            .map(|i| {
                let t = tmp.path().join(format!(".gone-{i}"));
                std::fs::create_dir_all(t.join("a/b/c")).unwrap();
                std::fs::write(t.join("a/b/c/f"), b"data").unwrap();
                std::os::unix::fs::symlink(&outside, t.join("a/link")).unwrap();
                t
            })
            .collect();
        for t in &trees {
            discard(t.clone(), format!("test tree {}", t.display()));
        }
        discard(tmp.path().join("never-made"), "a missing tree".into());
        assert!(deletions_done(Duration::from_secs(30)));
        for t in &trees {
            assert!(!t.exists(), "{}", t.display());
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"x");
    }

    #[test]
    fn a_deep_wide_tree_with_links_goes_and_what_they_point_at_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        let root = tmp.path().join("tree");
        // 3000 levels deep (longer than PATH_MAX: made as a tenant's `mkdir d; cd d` does;
        // a recursion per level would hold 3000 directories open), with files, links and
        // names that look like the remover's own at every hundredth level.
        std::fs::create_dir(&root).unwrap();
        let mut d = rustix::fs::open(&root, OFlags::DIRECTORY, Mode::empty()).unwrap();
        for i in 0..3000 {
            rustix::fs::mkdirat(&d, "d", Mode::from_raw_mode(0o755)).unwrap();
            d = open_dir(&d, c"d").unwrap();
            if i % 100 == 0 {
                let f = rustix::fs::openat(
                    &d,
                    "f",
                    OFlags::CREATE | OFlags::WRONLY,
                    Mode::from_raw_mode(0o644),
                )
                .unwrap();
                drop(f);
                rustix::fs::mkdirat(&d, ".rm1", Mode::from_raw_mode(0o755)).unwrap();
                rustix::fs::symlinkat(&outside, &d, "link").unwrap();
            }
        }
        drop(d);
        // And wide: 500 non-empty siblings.
        for i in 0..500 {
            let s = root.join(format!("w{i}/x"));
            std::fs::create_dir_all(&s).unwrap();
            std::fs::write(s.join("f"), b"z").unwrap();
        }
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.join("precious").exists());
        // Missing: fine; a link at the path: the link goes, not its target.
        remove_tree(&root).unwrap();
        std::os::unix::fs::symlink(&outside, &root).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists() && outside.join("precious").exists());
    }
}
