//! The evil-layer corpus: each archive is extracted into `<outside>/root` next to a
//! sentinel file; afterwards the sentinel must be unchanged (content and mode), nothing new
//! may exist outside the root, and the expected result (success inside the root, or a
//! precise error) must hold. Cases follow containerd's archive breakout tests, the tar-rs
//! advisories, and resource bombs. Needs root (whiteouts are 0:0 devices, opaque markers
//! are trusted.* xattrs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
};

use aurae_testkit::tier::{self, Tier};
use auraed::image::unpack::{Limits, Policy, UnpackError, gunzip, unpack};

#[derive(Default)]
struct Tar(Vec<u8>);

impl Tar {
    fn raw(
        &mut self,
        name: &str,
        typ: tar::EntryType,
        link: &str,
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name.as_bytes());
            g.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(typ);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(name, tar::EntryType::Regular, "", data, 0o644)
    }
    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(name, tar::EntryType::Directory, "", b"", mode)
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Symlink, target, b"", 0o777)
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Link, target, b"", 0o644)
    }
    fn pax(&mut self, records: &[(&str, &str)]) -> &mut Self {
        let mut body = String::new();
        for (k, v) in records {
            let rest = format!(" {k}={v}\n");
            let mut len = rest.len() + 1;
            while format!("{len}{rest}").len() != len {
                len += 1;
            }
            body.push_str(&format!("{len}{rest}"));
        }
        self.raw("pax", tar::EntryType::XHeader, "", body.as_bytes(), 0o644)
    }
    fn done(&mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        std::mem::take(&mut self.0)
    }
}

/// Infinite-ish archive of empty files, produced lazily (never held in memory).
struct ManyEntries {
    i: u64,
    n: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ManyEntries {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.i == self.n {
                return Ok(0);
            }
            self.buf = Tar::default().file(&format!("f{}", self.i), b"").0.clone();
            self.i += 1;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Makes an archive stream, given the outside directory's path.
type Builder = Box<dyn FnOnce(&str) -> Box<dyn Read>>;

#[derive(Debug)]
enum Want {
    Ok(&'static [&'static str]),
    Escape,
    Invalid(&'static str),
    Limit(&'static str),
    Device,
}

fn check(name: &str, build: impl FnOnce(&str) -> Box<dyn Read>, limits: Limits, want: Want) {
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path();
    let root = o.join("root");
    std::fs::create_dir(&root).unwrap();
    let sentinel = o.join("sentinel");
    std::fs::write(&sentinel, "safe").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o400)).unwrap();
    let stream = build(o.to_str().unwrap());
    let got = unpack(stream, &root, &limits, &Policy::default());
    // Nothing outside the root changed.
    assert_eq!(
        std::fs::read_to_string(&sentinel).unwrap(),
        "safe",
        "{name}: sentinel content"
    );
    assert_eq!(
        std::fs::metadata(&sentinel).unwrap().permissions().mode() & 0o7777,
        0o400,
        "{name}: sentinel mode"
    );
    let mut outside_names: Vec<String> = std::fs::read_dir(o)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside_names.sort();
    assert_eq!(
        outside_names,
        ["root", "sentinel"],
        "{name}: something appeared outside the root"
    );
    for p in ["/escaped", "/abs-file", "/evil"] {
        assert!(
            !Path::new(p).exists(),
            "{name}: {p} was created on the host"
        );
    }
    match (&want, &got) {
        (Want::Ok(paths), Ok(_)) => {
            for p in *paths {
                assert!(
                    std::fs::symlink_metadata(root.join(p)).is_ok(),
                    "{name}: {p} missing inside the root"
                );
            }
        }
        (Want::Escape, Err(UnpackError::Escape { .. }))
        | (Want::Device, Err(UnpackError::Device { .. })) => {}
        (Want::Invalid(s), Err(e @ UnpackError::Invalid { .. })) => {
            assert!(e.to_string().contains(s), "{name}: {e}")
        }
        (Want::Limit(s), Err(e @ UnpackError::Limit { .. })) => {
            assert!(e.to_string().contains(s), "{name}: {e}")
        }
        _ => panic!("{name}: wanted {want:?}, got {got:?}"),
    }
}

fn tar_of(f: impl FnOnce(&mut Tar, &str)) -> impl FnOnce(&str) -> Box<dyn Read> {
    move |outside: &str| {
        let mut t = Tar::default();
        f(&mut t, outside);
        Box::new(std::io::Cursor::new(t.done())) as Box<dyn Read>
    }
}

#[test]
fn the_evil_layer_corpus_never_escapes() {
    if !tier::check(
        "the_evil_layer_corpus_never_escapes",
        Tier::Host,
        tier::needs_root(),
    ) {
        return;
    }
    let l = Limits::default();
    let mut n = 0;
    let mut case = |name: &str, build: Builder, limits: Limits, want: Want| {
        check(name, build, limits, want);
        n += 1;
    };
    case(
        "DotDot",
        Box::new(tar_of(|t, _| {
            t.file("../escape", b"x");
        })),
        l,
        Want::Escape,
    );
    case(
        "DotDotDeep",
        Box::new(tar_of(|t, _| {
            t.file("a/../../escape", b"x");
        })),
        l,
        Want::Escape,
    );
    case(
        "AbsoluteName",
        Box::new(tar_of(|t, _| {
            t.file("/abs-file", b"x");
        })),
        l,
        Want::Ok(&["abs-file"]),
    );
    case(
        "SymlinkAbsolute",
        Box::new(tar_of(|t, _| {
            t.symlink("link", "/").file("link/escaped", b"x");
        })),
        l,
        Want::Ok(&["escaped"]),
    );
    case(
        "SymlinkUpAndOut",
        Box::new(tar_of(|t, _| {
            t.symlink("link", "../../../../").file("link/escaped", b"x");
        })),
        l,
        Want::Ok(&["escaped"]),
    );
    case(
        "SymlinkMultipleAbsolute",
        Box::new(tar_of(|t, _| {
            t.symlink("l1", "/")
                .symlink("l2", "/l1")
                .file("l2/escaped", b"x");
        })),
        l,
        Want::Ok(&["escaped"]),
    );
    case(
        "SymlinkMultipleRelative",
        Box::new(tar_of(|t, _| {
            t.symlink("l1", "..")
                .symlink("l2", "l1/..")
                .file("l2/escaped", b"x");
        })),
        l,
        Want::Ok(&["escaped"]),
    );
    case(
        "SymlinkParentDirectory",
        Box::new(tar_of(|t, _| {
            t.symlink("dir", "..").file("dir/escaped", b"x");
        })),
        l,
        Want::Ok(&["escaped"]),
    );
    case(
        "SymlinkToOutsideAbsolute",
        Box::new(tar_of(|t, o| {
            t.symlink("out", o).file("out/sentinel", b"pwned");
        })),
        l,
        Want::Invalid("symlink to a missing directory"),
    );
    case(
        "SymlinkThenFileOverwrite",
        Box::new(tar_of(|t, _| {
            t.symlink("s", "../sentinel").file("s", b"pwned");
        })),
        l,
        Want::Ok(&["s"]),
    );
    case(
        "SymlinkSlashEnded",
        Box::new(tar_of(|t, o| {
            t.symlink("s", &format!("{o}/")).file("s/escaped", b"x");
        })),
        l,
        Want::Invalid("symlink to a missing directory"),
    );
    case(
        "SymlinkEmptyFilename",
        Box::new(tar_of(|t, _| {
            t.symlink("", "/etc");
        })),
        l,
        Want::Ok(&[]),
    );
    case(
        "HardlinkUpAndOut",
        Box::new(tar_of(|t, _| {
            t.hardlink("h", "../sentinel");
        })),
        l,
        Want::Escape,
    );
    case(
        "HardlinkRelativeLong",
        Box::new(tar_of(|t, _| {
            t.hardlink("h", "a/b/../../../../sentinel");
        })),
        l,
        Want::Escape,
    );
    case(
        "HardlinkAbsolute",
        Box::new(tar_of(|t, o| {
            t.hardlink("h", &format!("{o}/sentinel"));
        })),
        l,
        Want::Invalid("does not exist in the layer"),
    );
    case(
        "HardlinkSymlinkRelative",
        Box::new(tar_of(|t, _| {
            t.symlink("s", "../").hardlink("h", "s/sentinel");
        })),
        l,
        Want::Invalid("does not exist in the layer"),
    );
    case(
        "HardlinkSymlinkAbsolute",
        Box::new(tar_of(|t, o| {
            t.symlink("s", o).hardlink("h", "s/sentinel");
        })),
        l,
        Want::Invalid("does not exist in the layer"),
    );
    case(
        "HardlinkSymlinkChmod",
        Box::new(tar_of(|t, o| {
            t.symlink("s", &format!("{o}/sentinel"))
                .hardlink("h", "s")
                .raw("h", tar::EntryType::Regular, "", b"x", 0o777);
        })),
        l,
        Want::Ok(&["h"]),
    );
    case(
        "HardlinkSymlinkBeforeCreateTarget",
        Box::new(tar_of(|t, _| {
            t.symlink("s", "target")
                .hardlink("h", "s")
                .file("target", b"x");
        })),
        l,
        Want::Ok(&["h", "target"]),
    );
    case(
        "HardlinkDirectory",
        Box::new(tar_of(|t, _| {
            t.dir("d", 0o755).hardlink("h", "d");
        })),
        l,
        Want::Invalid("hard link to a directory"),
    );
    case(
        "DirectoryOverrideSymlink",
        Box::new(tar_of(|t, o| {
            t.symlink("d", o)
                .dir("d", 0o777)
                .file("d/sentinel", b"pwned");
        })),
        l,
        Want::Ok(&["d/sentinel"]),
    );
    case(
        "DirectoryOverrideSymlinkChmod",
        Box::new(tar_of(|t, o| {
            t.symlink("s", &format!("{o}/sentinel")).dir("s", 0o777);
        })),
        l,
        Want::Ok(&["s"]),
    );
    case(
        "WhiteoutRootParent",
        Box::new(tar_of(|t, _| {
            t.file("../.wh.sentinel", b"");
        })),
        l,
        Want::Escape,
    );
    case(
        "WhiteoutEmptyName",
        Box::new(tar_of(|t, _| {
            t.file(".wh.", b"");
        })),
        l,
        Want::Invalid("malformed whiteout"),
    );
    case(
        "WhiteoutCurrentDirectory",
        Box::new(tar_of(|t, _| {
            t.file(".wh..", b"");
        })),
        l,
        Want::Invalid("malformed whiteout"),
    );
    case(
        "WhiteoutParent",
        Box::new(tar_of(|t, _| {
            t.file(".wh...", b"");
        })),
        l,
        Want::Invalid("malformed whiteout"),
    );
    case(
        "WhiteoutSymlink",
        Box::new(tar_of(|t, o| {
            t.symlink("s", o).file("s/.wh.sentinel", b"");
        })),
        l,
        Want::Invalid("whiteout through a symlink"),
    );
    case(
        "WhiteoutSymlinkPath",
        Box::new(tar_of(|t, _| {
            t.symlink("s", "..").file("s/.wh.sentinel", b"");
        })),
        l,
        Want::Invalid("whiteout through a symlink"),
    );
    case(
        "WhiteoutDeadSymlinkParent",
        Box::new(tar_of(|t, _| {
            t.symlink("s", "nowhere").file("s/.wh.x", b"");
        })),
        l,
        Want::Invalid("whiteout through a symlink"),
    );
    case(
        "WhiteoutAndOpaqueInside",
        Box::new(tar_of(|t, _| {
            t.dir("d", 0o755)
                .file("d/.wh.gone", b"")
                .file("d/.wh..wh..opq", b"");
        })),
        l,
        Want::Ok(&["d/gone"]),
    );
    case(
        "PaxUstarSizeDisagreement",
        Box::new(tar_of(|t, _| {
            t.pax(&[("size", "3")]).file("smuggled", b"0123456789");
        })),
        l,
        Want::Invalid("disagrees"),
    );
    case(
        "DeviceNode",
        Box::new(tar_of(|t, _| {
            t.raw("dev/evil", tar::EntryType::Char, "", b"", 0o666);
        })),
        l,
        Want::Device,
    );
    case(
        "Fifo",
        Box::new(tar_of(|t, _| {
            t.raw("fifo", tar::EntryType::Fifo, "", b"", 0o666);
        })),
        l,
        Want::Device,
    );
    let long = "a/".repeat(2049);
    case(
        "FourKiBPath",
        Box::new(tar_of(move |t, _| {
            t.pax(&[("path", &long)]).file("x", b"");
        })),
        l,
        Want::Limit("path length"),
    );
    case(
        "DeepPath",
        Box::new(tar_of(|t, _| {
            t.pax(&[("path", &"d/".repeat(200))]).file("x", b"");
        })),
        l,
        Want::Limit("depth"),
    );
    case(
        "GzipBomb",
        Box::new(|_: &str| {
            // 256 MiB of zeros in one file, gzipped to about 256 KiB; the cap stops it early.
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let mut h = tar::Header::new_gnu();
            h.set_path("bomb").unwrap();
            h.set_size(256 << 20);
            h.set_mode(0o644);
            h.set_cksum();
            gz.write_all(h.as_bytes()).unwrap();
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..256 {
                gz.write_all(&zeros).unwrap();
            }
            Box::new(gunzip(std::io::Cursor::new(gz.finish().unwrap()))) as Box<dyn Read>
        }),
        Limits {
            max_stream_bytes: 16 << 20,
            max_file_bytes: 16 << 20,
            ..l
        },
        Want::Limit("file bytes"),
    );
    case(
        "MillionEntries",
        Box::new(|_: &str| {
            Box::new(ManyEntries {
                i: 0,
                n: 1_000_000,
                buf: Vec::new(),
                pos: 0,
            }) as Box<dyn Read>
        }),
        Limits {
            max_entries: 10_000,
            ..l
        },
        Want::Limit("entry count"),
    );
    println!("evil layer corpus: {n} cases, 0 escapes");
}

#[test]
fn setuid_bits_are_stripped_and_layers_unpack() {
    if !tier::check(
        "setuid_bits_are_stripped_and_layers_unpack",
        Tier::Host,
        tier::needs_root(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::default();
    t.dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .raw("usr/bin/su", tar::EntryType::Regular, "", b"#!", 0o4755)
        .symlink("bin", "usr/bin")
        .hardlink("usr/bin/su2", "usr/bin/su");
    let r = unpack(
        std::io::Cursor::new(t.done()),
        dir.path(),
        &Limits::default(),
        &Policy::default(),
    )
    .unwrap();
    assert_eq!(r.entries, 5);
    let m = std::fs::metadata(dir.path().join("usr/bin/su"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(m, 0o755, "setuid stripped");
    assert_eq!(
        std::fs::read_link(dir.path().join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read(dir.path().join("usr/bin/su2")).unwrap(),
        b"#!"
    );
    let wh = tempfile::tempdir().unwrap();
    let mut t = Tar::default();
    t.file(".wh.etc", b"");
    unpack(
        std::io::Cursor::new(t.done()),
        wh.path(),
        &Limits::default(),
        &Policy::default(),
    )
    .unwrap();
    assert!(
        std::fs::symlink_metadata(wh.path().join("etc"))
            .unwrap()
            .file_type()
            .is_char_device(),
        "overlay whiteout"
    );
}
