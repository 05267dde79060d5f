//! The initramfs of a microVM instance, built per spawn in memory (a sealed memfd, never a
//! file on a disk): our own binary as `/init` (the child runs the parent's very build,
//! read from the sealed copy), the modules its kernel needs, its identity and policy under
//! `/etc/aurae`, and `/etc/aurae/instance.json`, which tells the child's PID 1 that it is a
//! spawned instance (its parent, depth, renewal endpoint).
//!
//! Format: the kernel's "newc" cpio (`070701`), uncompressed.

use std::{os::fd::OwnedFd, path::Path};

/// One archive member.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, rdev: (u32, u32), name: &str) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        u32::try_from(size).unwrap_or(u32::MAX),
        0,
        0,
        rdev.0,
        rdev.1,
        u32::try_from(namesize).unwrap_or(u32::MAX),
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes `entries` as a newc archive.
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match e {
            Entry::Dir { path, mode } => header(&mut out, ino, 0o040_000 | mode, 0, (0, 0), path),
            Entry::File { path, mode, data } => {
                header(&mut out, ino, 0o100_000 | mode, data.len(), (0, 0), path);
                out.extend_from_slice(data);
                pad(&mut out);
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => header(&mut out, ino, 0o020_000 | mode, 0, (*major, *minor), path),
        }
    }
    header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!");
    out
}

/// The files every instance's initramfs has besides its secrets: directories, the
/// console, `/init` (our own binary, from the sealed copy) and the modules in
/// `modules` (`order` and `<name>.ko`), if given.
pub fn base(sealed: &OwnedFd, modules: Option<&Path>) -> Result<Vec<Entry>, String> {
    let mut e = Vec::new();
    for d in [
        "dev",
        "etc",
        "etc/aurae",
        "etc/aurae/pki",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "var/lib",
    ] {
        e.push(Entry::Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    e.push(Entry::CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    // Read at offsets: the sealed copy's file offset is shared by every user.
    let f = std::fs::File::from(sealed.try_clone().map_err(|e| format!("our binary: {e}"))?);
    let len = f.metadata().map_err(|e| format!("our binary: {e}"))?.len();
    let mut me = vec![0u8; usize::try_from(len).map_err(|e| format!("our binary: {e}"))?];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut me, 0)
        .map_err(|e| format!("our binary: {e}"))?;
    e.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: me,
    });
    if let Some(dir) = modules {
        let order = std::fs::read_to_string(dir.join("order"))
            .map_err(|err| format!("{}/order: {err}", dir.display()))?;
        for m in order.split_whitespace() {
            if m.contains('/') || m.starts_with('.') {
                return Err(format!("{}/order: bad module name {m:?}", dir.display()));
            }
            let p = dir.join(format!("{m}.ko"));
            let data = std::fs::read(&p).map_err(|err| format!("{}: {err}", p.display()))?;
            e.push(Entry::File {
                path: format!("lib/modules/{m}.ko"),
                mode: 0o644,
                data,
            });
        }
        e.push(Entry::File {
            path: "lib/modules/order".into(),
            mode: 0o644,
            data: order.into_bytes(),
        });
    }
    Ok(e)
}

/// The archive in a sealed memfd.
pub fn sealed(entries: &[Entry]) -> Result<OwnedFd, String> {
    aurae_sys::memfd::sealed_bytes(&write(entries), "aurae-instance-initramfs")
        .map_err(|e| format!("initramfs memfd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_members_are_aligned_and_end_with_the_trailer() {
        let a = write(&[
            Entry::Dir {
                path: "etc".into(),
                mode: 0o755,
            },
            Entry::File {
                path: "etc/x".into(),
                mode: 0o600,
                data: b"hello".to_vec(),
            },
        ]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("etc/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        // The file's header: mode 0100600, size 5.
        let at = text.find("etc/x").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "00008180");
        assert_eq!(&text[at + 54..at + 62], "00000005");
    }
}
