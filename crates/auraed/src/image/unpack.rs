//! Safe extraction of one OCI layer (a tar stream, gzip or not) into its own directory,
//! in overlayfs form: whiteouts become 0:0 character devices and opaque directories get
//! `trusted.overlay.opaque=y`, so layers can be shared between images and stacked.
//!
//! We never use `tar::Archive::unpack` (RUSTSEC-2021-0080, RUSTSEC-2026-0067,
//! GHSA-3pv8-6f4r-ffg2); tar is used as a reader only, and every entry is created relative
//! to a directory fd of the layer root:
//! - entry names are normalised lexically; a `..` that would leave the root is an error,
//!   an absolute name is rooted at the layer root;
//! - parent directories are resolved with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS)`, so a symlink in a parent can never lead outside the root;
//! - the final component is never followed: an existing entry is removed (`unlinkat`)
//!   before a new one is made, files are created `O_CREAT|O_EXCL|O_NOFOLLOW`, and modes and
//!   owners are set on the new fd, never by path;
//! - hard links must name an existing non-directory inside the root; symlinks are stored,
//!   never followed during extraction;
//! - whiteouts are refused when reached through a symlink or when malformed (`.wh..`,
//!   `.wh.` of the root);
//! - device nodes are refused and setuid/setgid bits stripped unless the policy allows;
//! - bytes, entries, path length and depth are bounded, and a PAX size that disagrees with
//!   the header's is refused (file smuggling).

use std::{
    io::{self, Read, Write},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use rustix::fs::{AtFlags, Dev, FileType, Mode, OFlags, ResolveFlags, XattrFlags};

/// Bounds on one layer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Uncompressed tar bytes read (bounds gzip bombs too).
    pub max_stream_bytes: u64,
    /// Sum of regular file sizes.
    pub max_file_bytes: u64,
    pub max_entries: u64,
    pub max_path: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stream_bytes: 8 << 30,
            max_file_bytes: 8 << 30,
            max_entries: 1_000_000,
            max_path: 4095,
            max_depth: 128,
        }
    }
}

/// What the image policy allows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    pub allow_devices: bool,
    pub keep_setid: bool,
    /// Apply the entries' owners (needs root).
    pub chown: bool,
}

/// What an extraction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {path:?} escapes the layer root")]
    Escape { path: String },
    #[error("layer entry {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("layer exceeds its {what} limit ({limit})")]
    Limit { what: &'static str, limit: u64 },
    #[error("layer entry {path:?} is a device node, which the image policy does not allow")]
    Device { path: String },
    #[error("layer entry {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer is not a valid tar stream: {0}")]
    Tar(#[source] io::Error),
}

/// Counts and caps the bytes read from the (decompressed) stream.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
    hit: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Only an error if more data is really there.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? > 0 {
                self.hit = true;
                return Err(io::Error::other(format!(
                    "stream over {} bytes",
                    self.limit
                )));
            }
            return Ok(0);
        }
        let max = usize::try_from(self.left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Normalises an entry name into components below the root.
fn components(raw: &[u8], limits: &Limits) -> Result<Vec<String>, UnpackError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    if raw.len() > limits.max_path {
        return Err(UnpackError::Limit {
            what: "path length",
            limit: limits.max_path as u64,
        });
    }
    let text = std::str::from_utf8(raw).map_err(|_| UnpackError::Invalid {
        path: shown.clone(),
        reason: "name is not UTF-8".into(),
    })?;
    let mut out: Vec<String> = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(UnpackError::Escape { path: shown });
                }
            }
            c => out.push(c.to_owned()),
        }
    }
    if out.len() > limits.max_depth {
        return Err(UnpackError::Limit {
            what: "depth",
            limit: limits.max_depth as u64,
        });
    }
    Ok(out)
}

fn io_err(path: &str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Io {
        path: path.to_owned(),
        source,
    }
}

fn rx(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Opens (creating missing directories, mode 0755) the directory `parts` below `root`;
/// symlinks on the way resolve inside the root.
fn open_dir(root: &OwnedFd, parts: &[String], path: &str) -> Result<OwnedFd, UnpackError> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::openat2(root, ".", flags, Mode::empty(), resolve)
        .map_err(|e| io_err(path)(rx(e)))?;
    for (i, c) in parts.iter().enumerate() {
        let sub = parts[..=i].join("/");
        match rustix::fs::openat2(root, sub.as_str(), flags, Mode::empty(), resolve) {
            Ok(fd) => dir = fd,
            Err(rustix::io::Errno::NOENT) => {
                // `dir` is the parent we already resolved inside the root. A dangling
                // symlink there is refused rather than followed by creating its target.
                if rustix::fs::statat(&dir, c.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
                {
                    return Err(UnpackError::Invalid {
                        path: path.to_owned(),
                        reason: format!("parent {sub:?} is a symlink to a missing directory"),
                    });
                }
                rustix::fs::mkdirat(&dir, c.as_str(), Mode::from_raw_mode(0o755))
                    .map_err(|e| io_err(path)(rx(e)))?;
                dir = rustix::fs::openat2(root, sub.as_str(), flags, Mode::empty(), resolve)
                    .map_err(|e| io_err(path)(rx(e)))?;
            }
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(UnpackError::Invalid {
                    path: path.to_owned(),
                    reason: format!("parent {sub:?} is not a directory"),
                });
            }
            Err(e) => return Err(io_err(path)(rx(e))),
        }
    }
    Ok(dir)
}

/// Removes `name` in `dir` (recursively for a directory), never following symlinks.
fn remove(dir: &OwnedFd, name: &str) -> io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(rx(e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            let sub = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(rx)?;
            let names: Vec<String> = {
                let d = rustix::fs::Dir::read_from(&sub).map_err(rx)?;
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "." && n != "..")
                    .collect()
            };
            for n in names {
                remove(&sub, &n)?;
            }
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(rx)
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(rx),
    }
}

fn sanitize_mode(mode: u32, policy: &Policy) -> Mode {
    let mut m = mode & 0o7777;
    if !policy.keep_setid {
        m &= !0o6000;
    }
    Mode::from_raw_mode(m)
}

/// Extracts one layer from `stream` (plain tar; wrap gzip with [`gunzip`]) into `root`,
/// which must be an existing, empty directory.
pub fn unpack(
    stream: impl Read,
    root: &Path,
    limits: &Limits,
    policy: &Policy,
) -> Result<Report, UnpackError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err(&root.display().to_string())(rx(e)))?;
    let capped = Capped {
        inner: stream,
        left: limits.max_stream_bytes,
        limit: limits.max_stream_bytes,
        hit: false,
    };
    let mut archive = tar::Archive::new(capped);
    let mut report = Report::default();
    let entries = archive.entries().map_err(UnpackError::Tar)?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) if e.to_string().contains("stream over") => {
                return Err(UnpackError::Limit {
                    what: "uncompressed size",
                    limit: limits.max_stream_bytes,
                });
            }
            Err(e) => return Err(UnpackError::Tar(e)),
        };
        report.entries += 1;
        if report.entries > limits.max_entries {
            return Err(UnpackError::Limit {
                what: "entry count",
                limit: limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let header_size = entry.header().size().map_err(|e| UnpackError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        if header_size != entry.size() {
            return Err(UnpackError::Invalid {
                path: shown,
                reason: format!(
                    "PAX size {} disagrees with the header's {header_size}",
                    entry.size()
                ),
            });
        }
        let parts = components(&raw, limits)?;
        let Some((name, parents)) = parts.split_last() else {
            continue; // the root itself: nothing to create
        };
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);

        // Whiteouts.
        if let Some(target) = name.strip_prefix(".wh.") {
            let dir = open_dir_no_symlinks(&root_fd, parents, &shown)?;
            if target == ".wh..opq" {
                let d = rustix::fs::openat(
                    &dir,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err(&shown)(rx(e)))?;
                rustix::fs::fsetxattr(&d, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                    .map_err(|e| io_err(&shown)(rx(e)))?;
                report.opaque_dirs += 1;
                continue;
            }
            if target.is_empty() || target == "." || target == ".." || target.starts_with(".wh.") {
                return Err(UnpackError::Invalid {
                    path: shown,
                    reason: "malformed whiteout".into(),
                });
            }
            remove(&dir, target).map_err(io_err(&shown))?;
            rustix::fs::mknodat(
                &dir,
                target,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0),
                Dev::default(),
            )
            .map_err(|e| io_err(&shown)(rx(e)))?;
            report.whiteouts += 1;
            continue;
        }

        let dir = open_dir(&root_fd, parents, &shown)?;
        let name = name.as_str();
        match kind {
            tar::EntryType::Directory => {
                let existing = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).ok();
                if existing
                    .is_none_or(|st| FileType::from_raw_mode(st.st_mode) != FileType::Directory)
                {
                    remove(&dir, name).map_err(io_err(&shown))?;
                    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| io_err(&shown)(rx(e)))?;
                }
                let d = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err(&shown)(rx(e)))?;
                finish(&d, mode, &entry, policy, &shown)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                if report.file_bytes.saturating_add(size) > limits.max_file_bytes {
                    return Err(UnpackError::Limit {
                        what: "file bytes",
                        limit: limits.max_file_bytes,
                    });
                }
                remove(&dir, name).map_err(io_err(&shown))?;
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err(&shown)(rx(e)))?;
                let mut file = std::fs::File::from(fd);
                let copied =
                    io::copy(&mut (&mut entry).take(size), &mut file).map_err(io_err(&shown))?;
                if copied != size {
                    return Err(UnpackError::Invalid {
                        path: shown,
                        reason: format!("truncated: {copied} of {size} bytes"),
                    });
                }
                file.flush().map_err(io_err(&shown))?;
                report.file_bytes += size;
                finish(&OwnedFd::from(file), mode, &entry, policy, &shown)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Invalid {
                        path: shown.clone(),
                        reason: "symlink without a target".into(),
                    })?
                    .into_owned();
                if target.len() > limits.max_path {
                    return Err(UnpackError::Limit {
                        what: "path length",
                        limit: limits.max_path as u64,
                    });
                }
                remove(&dir, name).map_err(io_err(&shown))?;
                let target = String::from_utf8(target).map_err(|_| UnpackError::Invalid {
                    path: shown.clone(),
                    reason: "link target is not UTF-8".into(),
                })?;
                rustix::fs::symlinkat(target.as_str(), &dir, name)
                    .map_err(|e| io_err(&shown)(rx(e)))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::Invalid {
                        path: shown.clone(),
                        reason: "hard link without a target".into(),
                    })?
                    .into_owned();
                let tparts = components(&target, limits)?;
                if tparts.is_empty() {
                    return Err(UnpackError::Invalid {
                        path: shown,
                        reason: "hard link to the root".into(),
                    });
                }
                let (tname, tparents) = tparts.split_last().unwrap_or((&tparts[0], &[]));
                let tdir = open_dir_existing(&root_fd, tparents, &shown)?;
                let st = rustix::fs::statat(&tdir, tname.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|_| UnpackError::Invalid {
                        path: shown.clone(),
                        reason: format!(
                            "hard link target {:?} does not exist in the layer",
                            tparts.join("/")
                        ),
                    })?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Err(UnpackError::Invalid {
                        path: shown,
                        reason: "hard link to a directory".into(),
                    });
                }
                remove(&dir, name).map_err(io_err(&shown))?;
                rustix::fs::linkat(&tdir, tname.as_str(), &dir, name, AtFlags::empty())
                    .map_err(|e| io_err(&shown)(rx(e)))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if !policy.allow_devices {
                    return Err(UnpackError::Device { path: shown });
                }
                let (ft, dev) = match kind {
                    tar::EntryType::Char => (FileType::CharacterDevice, dev_of(&entry)),
                    tar::EntryType::Block => (FileType::BlockDevice, dev_of(&entry)),
                    _ => (FileType::Fifo, Dev::default()),
                };
                remove(&dir, name).map_err(io_err(&shown))?;
                rustix::fs::mknodat(&dir, name, ft, sanitize_mode(mode, policy), dev)
                    .map_err(|e| io_err(&shown)(rx(e)))?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                return Err(UnpackError::Invalid {
                    path: shown,
                    reason: format!("unsupported entry type {other:?}"),
                });
            }
        }
    }
    Ok(report)
}

fn dev_of<R: Read>(entry: &tar::Entry<'_, R>) -> Dev {
    let major = entry.header().device_major().ok().flatten().unwrap_or(0);
    let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
    rustix::fs::makedev(major, minor)
}

/// Mode (and owner) set on the new fd, never by path.
fn finish<R: Read>(
    fd: &OwnedFd,
    mode: u32,
    entry: &tar::Entry<'_, R>,
    policy: &Policy,
    path: &str,
) -> Result<(), UnpackError> {
    if policy.chown {
        let uid = entry
            .header()
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok());
        let gid = entry
            .header()
            .gid()
            .ok()
            .and_then(|g| u32::try_from(g).ok());
        rustix::fs::fchown(
            fd.as_fd(),
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
        )
        .map_err(|e| io_err(path)(rx(e)))?;
    }
    rustix::fs::fchmod(fd.as_fd(), sanitize_mode(mode, policy)).map_err(|e| io_err(path)(rx(e)))
}

/// Opens an existing directory below the root; symlinks resolve inside the root.
fn open_dir_existing(root: &OwnedFd, parts: &[String], path: &str) -> Result<OwnedFd, UnpackError> {
    let sub = if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    };
    rustix::fs::openat2(
        root,
        sub.as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|_| UnpackError::Invalid {
        path: path.to_owned(),
        reason: format!("directory {sub:?} does not exist in the layer"),
    })
}

/// Opens (creating) the directory of a whiteout; refuses any symlink on the way.
fn open_dir_no_symlinks(
    root: &OwnedFd,
    parts: &[String],
    path: &str,
) -> Result<OwnedFd, UnpackError> {
    let sub = if parts.is_empty() {
        ".".to_owned()
    } else {
        parts.join("/")
    };
    match rustix::fs::openat2(
        root,
        sub.as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::LOOP) => Err(UnpackError::Invalid {
            path: path.to_owned(),
            reason: "whiteout through a symlink".into(),
        }),
        Err(rustix::io::Errno::NOENT) => open_dir(root, parts, path),
        Err(rustix::io::Errno::NOTDIR) => Err(UnpackError::Invalid {
            path: path.to_owned(),
            reason: "whiteout below a non-directory".into(),
        }),
        Err(e) => Err(io_err(path)(rx(e))),
    }
}

/// A gzip decoder over `r` (layers are usually `application/vnd.oci.image.layer.v1.tar+gzip`).
pub fn gunzip<R: Read>(r: R) -> impl Read {
    flate2::read::GzDecoder::new(r)
}
