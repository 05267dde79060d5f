//! Kernels booted from the ELF inside them. A bzImage (`/boot/vmlinuz-*`) is a small
//! decompressor around the real kernel, an xz-compressed ELF `vmlinux`; booted as given,
//! the guest decompresses and relocates itself first, which costs 7–9 s of a nested
//! microVM boot here (SPECIFICATION.md, "Virtual machines"). auraed decompresses that ELF
//! once, on its own thread beside the first boot (which goes as given, so no boot waits
//! for it), and keeps it in `<state dir>/vm-kernels/<sha256 of the bzImage>.elf`; a later
//! boot of the same bytes boots the kept ELF through the VMM's ELF path.
//!
//! What a kept ELF changes for the guest: its kernel runs at its link address, without
//! the decompressor's KASLR (as every `vmlinux` boot, Firecracker's too);
//! `--vm-kernel-as-given` keeps every bzImage booted as given.
//!
//! The bzImage is the operator's file (below `--vm-image-root`), but its payload is read
//! as hostile: its size comes from the image's own trailer and is capped
//! ([`MAX_ELF_BYTES`]), the decoder's memory is capped ([`DECODER_MEMORY_KIB`]), the
//! output must be exactly that size and an x86-64 ELF, and it is written as
//! `.partial-<digest>` (0600, root's 0700 directory) and renamed only when complete and
//! synced. A crash mid-way leaves a partial file, which the next auraed removes and reports.
//! Files are told apart by content (SHA-256, checked again before and after the ELF is
//! made), remembered per (device, inode, size, mtime, ctime) so an unchanged file is hashed
//! once per auraed. (A file rewritten in place to the same size within one tick of the
//! kernel's clock keeps its ctime: only a writer of the image root can do that, and the
//! next auraed hashes it again.)

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{BufReader, BufWriter, Read, Write},
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// The directory under the state directory.
pub const DIR: &str = "vm-kernels";

/// The largest ELF kept (Debian's 6.1 kernel is 63 MiB).
pub const MAX_ELF_BYTES: u64 = 512 << 20;

/// The largest dictionary the xz decoder is let allocate (kernels use 32 MiB at most).
pub const DECODER_MEMORY_KIB: u32 = 128 << 10;

/// How many kept ELFs stay; the oldest made goes first.
pub const KEEP: usize = 4;

/// Most ELFs waiting to be made at once (one is made at a time); past it a bzImage boots
/// as given and is taken up again at a later boot.
pub const MAX_WAITING: usize = 4;

const PARTIAL: &str = ".partial-";
const SUFFIX: &str = ".elf";

/// Where a bzImage's compressed ELF is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// Its first byte in the file.
    pub offset: u64,
    /// Its compressed bytes (without the 4-byte size after them).
    pub length: u64,
    /// What it decompresses to, from the size the image appends to it.
    pub size: u64,
}

/// Reads `n` bytes at `at`; `None` past the end.
fn read_at(file: &File, at: u64, n: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0; n];
    match file.read_exact_at(&mut buf, at) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The xz-compressed payload of the bzImage `file`, or why it is booted as given (not a
/// bzImage, too old a boot protocol, another compression, a size out of bounds).
pub fn xz_payload(file: &File) -> Result<Payload, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let header = read_at(file, 0, 0x250)
        .map_err(|e| e.to_string())?
        .ok_or("too short for a bzImage")?;
    let u32_at = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if &header[0x202..0x206] != b"HdrS" {
        return Err("not a bzImage (no `HdrS` header)".into());
    }
    let version = u16::from_le_bytes([header[0x206], header[0x207]]);
    if version < 0x208 {
        return Err(format!(
            "boot protocol {version:#06x} has no payload fields (2.08 or later)"
        ));
    }
    let setup_sects = match header[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let offset = (setup_sects + 1) * 512 + u64::from(u32_at(0x248));
    let length = u64::from(u32_at(0x24c));
    if length < 4 + 6 || offset.checked_add(length).is_none_or(|end| end > len) {
        return Err(format!(
            "its payload ({length} bytes at {offset}) is not inside its {len} bytes"
        ));
    }
    let magic = read_at(file, offset, 6)
        .map_err(|e| e.to_string())?
        .ok_or("payload past the end")?;
    if magic != b"\xfd7zXZ\0" {
        return Err(format!(
            "its payload is not xz-compressed (magic {magic:02x?}); booted as given"
        ));
    }
    let trailer = read_at(file, offset + length - 4, 4)
        .map_err(|e| e.to_string())?
        .ok_or("payload past the end")?;
    let size = u64::from(u32::from_le_bytes([
        trailer[0], trailer[1], trailer[2], trailer[3],
    ]));
    if !(64..=MAX_ELF_BYTES).contains(&size) {
        return Err(format!(
            "its payload says it decompresses to {size} bytes (64 to {MAX_ELF_BYTES} kept)"
        ));
    }
    let payload = Payload {
        offset,
        length: length - 4,
        size,
    };
    check_stream(file, &payload)?;
    Ok(payload)
}

/// Reads an xz variable-length integer at `*at` in `b`.
fn vli(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The decoder allocates the dictionary a block's LZMA2 filter asks for, whatever it is:
/// before decoding, the stream must hold one block (its index, read from the footer) whose
/// filters are x86 BCJ and LZMA2 with a dictionary of at most [`DECODER_MEMORY_KIB`].
fn check_stream(file: &File, p: &Payload) -> Result<(), String> {
    let short = || "its xz stream is cut short".to_owned();
    let read = |at: u64, n: usize| -> Result<Vec<u8>, String> {
        read_at(file, at, n)
            .map_err(|e| e.to_string())?
            .ok_or_else(short)
    };
    if p.length < 12 + 12 {
        return Err(short());
    }
    let footer = read(p.offset + p.length - 12, 12)?;
    if &footer[10..12] != b"YZ" {
        return Err("its xz stream has no footer where its payload ends".into());
    }
    let backward = (u64::from(u32::from_le_bytes([
        footer[4], footer[5], footer[6], footer[7],
    ])) + 1)
        * 4;
    let index_at = (p.length - 12)
        .checked_sub(backward)
        .filter(|at| *at >= 12)
        .ok_or_else(short)?;
    let index = read(p.offset + index_at, backward.min(64) as usize)?;
    // The index of one block (unpadded and uncompressed sizes) accounts for the whole
    // payload: one stream of one block, of the size the image says.
    let mut at = 1;
    if index[0] != 0 || vli(&index, &mut at) != Some(1) {
        return Err("its xz stream is not one block".into());
    }
    let unpadded = vli(&index, &mut at).ok_or_else(short)?;
    let uncompressed = vli(&index, &mut at).ok_or_else(short)?;
    let whole = unpadded
        .checked_add(3)
        .map(|u| u & !3)
        .and_then(|b| b.checked_add(12 + backward + 12));
    if whole != Some(p.length) || uncompressed != p.size {
        return Err(format!(
            "its xz stream is not one block of the payload's {} bytes decompressing to {}",
            p.length, p.size
        ));
    }
    let block = read(p.offset + 12, (p.length - 12).min(1024) as usize)?;
    let header_len = (usize::from(block[0]) + 1) * 4;
    if block[0] == 0 || header_len > block.len() {
        return Err("its xz block header is not valid".into());
    }
    let flags = block[1];
    let mut at = 2;
    if flags & 0x40 != 0 {
        vli(&block, &mut at).ok_or_else(short)?;
    }
    if flags & 0x80 != 0 {
        vli(&block, &mut at).ok_or_else(short)?;
    }
    let mut dict = None;
    for _ in 0..=(flags & 0x03) {
        let id = vli(&block, &mut at).ok_or_else(short)?;
        let len = usize::try_from(vli(&block, &mut at).ok_or_else(short)?).map_err(|_| short())?;
        let props = block
            .get(at..at.checked_add(len).ok_or_else(short)?)
            .filter(|_| at + len <= header_len)
            .ok_or_else(short)?;
        at += len;
        match (id, props) {
            (0x04, _) => {}
            (0x21, [b]) if *b <= 40 => {
                dict = Some(if *b == 40 {
                    u64::from(u32::MAX)
                } else {
                    (2 | u64::from(b & 1)) << (b / 2 + 11)
                });
            }
            _ => {
                return Err(format!(
                    "its xz block has filter {id:#x} (x86 BCJ and LZMA2 are read)"
                ));
            }
        }
    }
    match dict {
        Some(d) if d <= u64::from(DECODER_MEMORY_KIB) << 10 => Ok(()),
        Some(d) => Err(format!(
            "its xz dictionary is {d} bytes (at most {} read)",
            u64::from(DECODER_MEMORY_KIB) << 10
        )),
        None => Err("its xz block has no LZMA2 filter".into()),
    }
}

/// Reads a file from `pos` to `end` through `pread` (no shared file offset).
struct Slice<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Decompresses `payload` of `file` into `out`: exactly `payload.size` bytes, an x86-64
/// ELF, or an error saying what was wrong (nothing past the size is read).
pub fn decompress(file: &File, payload: &Payload, out: &mut impl Write) -> Result<(), String> {
    let src = Slice {
        file,
        pos: payload.offset,
        end: payload.offset + payload.length,
    };
    // One stream, its dictionary checked by `check_stream` (this decoder has no limit).
    let mut xz = lzma_rust2::XzReader::new(BufReader::with_capacity(256 << 10, src), false);
    let bad = |e: std::io::Error| format!("decompressing its payload: {e}");
    let mut head = [0u8; 20];
    xz.read_exact(&mut head).map_err(bad)?;
    // `\x7fELF`, 64-bit, little-endian, version 1, and e_machine x86-64 (62).
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 || head[18..20] != [62, 0] {
        return Err("its payload is not an x86-64 ELF".into());
    }
    out.write_all(&head).map_err(|e| e.to_string())?;
    let rest = payload.size - head.len() as u64;
    let copied = std::io::copy(&mut (&mut xz).take(rest), out).map_err(bad)?;
    if copied != rest {
        return Err(format!(
            "its payload decompressed to {} bytes, its trailer says {}",
            copied + head.len() as u64,
            payload.size
        ));
    }
    let mut more = [0u8; 1];
    if xz.read(&mut more).map_err(bad)? != 0 {
        return Err(format!(
            "its payload decompresses to more than the {} bytes its trailer says",
            payload.size
        ));
    }
    Ok(())
}

/// What a file (by device, inode, size and times) was found to be.
#[derive(Debug, Clone)]
enum Known {
    /// Booted as given (why, said once).
    AsGiven,
    /// A bzImage with an ELF inside: its SHA-256, and where that ELF is in it (valid for
    /// those bytes: the maker hashes the file again before it reads the payload).
    Digest(String, Payload),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(file: &File) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Debug, Default)]
struct Memo {
    known: HashMap<FileKey, Known>,
    filling: HashSet<String>,
}

/// The kept ELFs of the bzImages auraed has booted.
#[derive(Debug)]
pub struct KernelElfs {
    dir: PathBuf,
    memo: Mutex<Memo>,
    /// Held while an ELF is made: one decoder (its dictionary, a core) at a time.
    making: Mutex<()>,
}

/// Feeds the whole of `file` to `h` (through `pread`: no shared file offset).
pub fn hash_file(h: &mut Sha256, file: &File) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
}

fn sha256_of(file: &File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_file(&mut h, file)?;
    Ok(format!("{:x}", h.finalize()))
}

impl KernelElfs {
    /// Opens (creating it, 0700) the directory; removes what a crashed auraed left half
    /// written there and returns those names.
    pub fn open(dir: PathBuf) -> Result<(Self, Vec<String>), String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&dir)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL) {
                let _ = std::fs::remove_file(e.path());
                removed.push(name);
            }
        }
        Ok((
            Self {
                dir,
                memo: Mutex::default(),
                making: Mutex::new(()),
            },
            removed,
        ))
    }

    fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}{SUFFIX}"))
    }

    fn open_kept(&self, digest: &str) -> Option<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(self.path_of(digest))
            .ok()
    }

    /// The kept ELF to boot instead of `kernel` (an open bzImage, `name` for messages),
    /// if there is one. When there is none and `kernel` is a bzImage with an xz ELF
    /// inside, that ELF is made on a thread of its own (reported when done or failed) for
    /// the next boot; this boot goes as given. Blocking (the first time a file is seen,
    /// it is read whole to hash it).
    pub fn elf_for(self: &Arc<Self>, kernel: &File, name: &Path) -> Option<File> {
        let key = match FileKey::of(kernel) {
            Ok(k) => k,
            Err(e) => {
                warn!(kernel = %name.display(), "cannot stat the kernel, booted as given: {e}");
                return None;
            }
        };
        let known = self.memo.lock().ok()?.known.get(&key).cloned();
        let (digest, payload) = match known {
            Some(Known::AsGiven) => return None,
            Some(Known::Digest(d, p)) => (d, p),
            None => {
                let found = xz_payload(kernel).and_then(|p| {
                    sha256_of(kernel)
                        .map(|d| (d, p))
                        .map_err(|e| format!("reading it: {e}"))
                });
                let known = match &found {
                    Ok((d, p)) => Known::Digest(d.clone(), *p),
                    Err(why) => {
                        info!(kernel = %name.display(), "kernel booted as given: {why}");
                        Known::AsGiven
                    }
                };
                self.memo.lock().ok()?.known.insert(key, known);
                found.ok()?
            }
        };
        if let Some(elf) = self.open_kept(&digest) {
            return Some(elf);
        }
        self.fill(kernel, key, digest, payload, name);
        None
    }

    /// Makes the ELF of `kernel` (whose content is `digest`, its ELF at `payload`) on a
    /// thread of its own, unless one is being made.
    fn fill(
        self: &Arc<Self>,
        kernel: &File,
        key: FileKey,
        digest: String,
        payload: Payload,
        name: &Path,
    ) {
        let Ok(mut memo) = self.memo.lock() else {
            return;
        };
        if memo.filling.contains(&digest) {
            return;
        }
        if memo.filling.len() >= MAX_WAITING {
            info!(kernel = %name.display(), "booted as given: {MAX_WAITING} kernel ELFs are waiting to be made already; taken up at a later boot");
            return;
        }
        memo.filling.insert(digest.clone());
        drop(memo);
        let digest_copy = digest.clone();
        let (me, label) = (self.clone(), name.to_owned());
        let spawned = kernel.try_clone().and_then(|kernel| {
            std::thread::Builder::new()
                .name("kernel-elf".into())
                .spawn(move || {
                    // Below the VMs it is made for (nice 10: this thread only).
                    let tid = rustix::process::Pid::from_raw(nix::unistd::gettid().as_raw());
                    let _ = rustix::process::setpriority_process(tid, 10);
                    let one = me.making.lock();
                    let started = std::time::Instant::now();
                    let made = me.make(&kernel, &digest, &payload);
                    drop(one);
                    if let Ok(mut memo) = me.memo.lock() {
                        memo.filling.remove(&digest);
                        if made.is_err() {
                            memo.known.insert(key, Known::AsGiven);
                        }
                    }
                    match made {
                        Ok(size) => info!(
                            kernel = %label.display(),
                            elf_bytes = size,
                            took_ms = started.elapsed().as_millis() as u64,
                            "kept the ELF inside this bzImage: its next boots skip the guest's decompression"
                        ),
                        Err(e) => warn!(
                            kernel = %label.display(),
                            "kernel stays booted as given: its ELF could not be kept: {e}"
                        ),
                    }
                })
        });
        if let Err(e) = spawned {
            warn!(kernel = %name.display(), "kernel booted as given: no thread to keep its ELF: {e}");
            if let Ok(mut memo) = self.memo.lock() {
                memo.filling.retain(|d| *d != digest_copy);
            }
        }
    }

    /// Decompresses `kernel`'s ELF (at `payload`, found in the bytes whose SHA-256 is
    /// `digest`) into `<digest>.elf` (through a partial file, synced before its rename)
    /// and removes the oldest kept ones past [`KEEP`].
    fn make(&self, kernel: &File, digest: &str, payload: &Payload) -> Result<u64, String> {
        // The bytes decompressed are the bytes hashed (and `payload` was found in): the
        // file is hashed again before and after (a file rewritten meanwhile is not kept
        // under the old content's name).
        let same = || match sha256_of(kernel) {
            Ok(d) if d == digest => Ok(()),
            Ok(_) => Err("it changed while its ELF was being made".to_owned()),
            Err(e) => Err(format!("reading it: {e}")),
        };
        same()?;
        let partial = self.dir.join(format!("{PARTIAL}{digest}"));
        let _ = std::fs::remove_file(&partial);
        let result = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&partial)
                .map_err(|e| format!("creating {}: {e}", partial.display()))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            decompress(kernel, payload, &mut out)?;
            same()?;
            let file = out
                .into_inner()
                .map_err(|e| format!("writing {}: {}", partial.display(), e.error()))?;
            file.sync_all()
                .map_err(|e| format!("syncing {}: {e}", partial.display()))?;
            std::fs::rename(&partial, self.path_of(digest))
                .map_err(|e| format!("renaming {}: {e}", partial.display()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result?;
        self.trim(digest);
        Ok(payload.size)
    }

    /// Keeps the [`KEEP`] newest ELFs (never `keep`).
    fn trim(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(SUFFIX) && !n.starts_with('.') && n != format!("{keep}{SUFFIX}")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        kept.sort();
        let extra = (kept.len() + 1).saturating_sub(KEEP);
        for (_, path) in kept.into_iter().take(extra) {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(elf = %path.display(), "removed the oldest kept kernel ELF"),
                Err(e) => warn!(elf = %path.display(), "cannot remove a kept kernel ELF: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
