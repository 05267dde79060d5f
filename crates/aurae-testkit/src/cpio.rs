//! A minimal cpio "newc" writer for initramfs images (directories, files, symlinks,
//! device nodes), so test images need no external tool.

use std::io::{self, Write};

/// One archive entry.
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
    Symlink {
        path: String,
        target: String,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Writes `entries` (parents before children) and the trailer.
pub fn write(out: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    let mut ino = 1u32;
    let mut written = 0usize;
    let mut put = |out: &mut dyn Write,
                   name: &str,
                   mode: u32,
                   data: &[u8],
                   rmaj: u32,
                   rmin: u32,
                   nlink: u32|
     -> io::Result<()> {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}{maj:08X}{min:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            mtime = 0,
            size = data.len(),
            maj = 0,
            min = 0,
            check = 0
        );
        ino += 1;
        out.write_all(header.as_bytes())?;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        written += header.len() + namesize;
        let pad = (4 - written % 4) % 4;
        out.write_all(&[0; 3][..pad])?;
        written += pad;
        out.write_all(data)?;
        written += data.len();
        let pad = (4 - written % 4) % 4;
        out.write_all(&[0; 3][..pad])?;
        written += pad;
        Ok(())
    };
    for e in entries {
        match e {
            Entry::Dir { path, mode } => put(out, path, 0o040_000 | mode, &[], 0, 0, 2)?,
            Entry::File { path, mode, data } => put(out, path, 0o100_000 | mode, data, 0, 0, 1)?,
            Entry::Symlink { path, target } => {
                put(out, path, 0o120_777, target.as_bytes(), 0, 0, 1)?
            }
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => put(out, path, 0o020_000 | mode, &[], *major, *minor, 1)?,
        }
    }
    put(out, "TRAILER!!!", 0, &[], 0, 0, 1)
}

/// The entries of the directory tree at `src`, named under `prefix` (parents before
/// children): directories, regular files, symlinks, and character devices (overlay
/// whiteouts). Modes are kept; owners become root.
pub fn tree(src: &std::path::Path, prefix: &str) -> io::Result<Vec<Entry>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = vec![Entry::Dir {
        path: prefix.to_owned(),
        mode: std::fs::metadata(src)?.mode() & 0o7777,
    }];
    let mut names: Vec<_> = std::fs::read_dir(src)?.collect::<Result<_, _>>()?;
    names.sort_by_key(std::fs::DirEntry::file_name);
    for e in names {
        let path = format!("{prefix}/{}", e.file_name().to_string_lossy());
        let md = std::fs::symlink_metadata(e.path())?;
        let mode = md.mode() & 0o7777;
        let ft = md.file_type();
        if ft.is_dir() {
            out.extend(tree(&e.path(), &path)?);
        } else if ft.is_symlink() {
            out.push(Entry::Symlink {
                path,
                target: std::fs::read_link(e.path())?.to_string_lossy().into_owned(),
            });
        } else if ft.is_file() {
            out.push(Entry::File {
                path,
                mode,
                data: std::fs::read(e.path())?,
            });
        } else if ft.is_char_device() {
            let dev = md.rdev();
            out.push(Entry::CharDev {
                path,
                mode,
                major: nix::sys::stat::major(dev) as u32,
                minor: nix::sys::stat::minor(dev) as u32,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_alignment() {
        let mut buf = Vec::new();
        write(
            &mut buf,
            &[Entry::File {
                path: "init".into(),
                mode: 0o755,
                data: b"abc".to_vec(),
            }],
        )
        .unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("init\0") && text.contains("abc") && text.contains("TRAILER!!!"));
    }
}
