//! A bounded per-executable log: the newest bytes in memory (replay from any kept offset,
//! then follow live) and everything in a rotated file under the state directory.
//!
//! Memory is bounded by what the log really holds, not by payload alone: every chunk is
//! charged its buffer's capacity plus the allocator's overhead, and the chunk queue its
//! slots, against [`MEMORY_BYTES`]. Small writes close together of the same stream are
//! coalesced into one chunk, so a process writing one byte at a time costs the same as
//! one writing lines. The files (the log and its one rotated predecessor, `.log.1`) are
//! always mode 0600 and removed together by [`Log::remove_files`]. A failing file write
//! is never silent: the first error and a count are kept for [`Log::write_error`].

use std::{
    collections::VecDeque,
    fs,
    io::{self, Write},
    os::fd::BorrowedFd,
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;

/// Bytes of memory a log may use for what it keeps (payload, buffers' spare capacity,
/// allocator overhead, the chunk queue).
pub const MEMORY_BYTES: usize = 1 << 20;
/// Size at which the log file rotates (one previous file, `.1`, is kept).
pub const FILE_BYTES: u64 = 8 << 20;
/// A write shorter than this is appended to the newest chunk when that chunk is shorter
/// than this too, of the same stream, and began less than [`COALESCE_WINDOW`] ago.
pub const COALESCE_BYTES: usize = 4 << 10;
/// How long a chunk may keep absorbing small writes: a chunk's time stamp is its first
/// byte's, so coalescing never moves a byte's time by more than this.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(250);
/// The most chunks kept (bounds the queue's own memory: at most this many slots).
pub const MAX_CHUNKS: usize = 4096;
/// What the allocator costs per buffer besides its capacity (glibc: an 8-byte header,
/// rounding to 16, 32 bytes at least), charged to each chunk.
pub const ALLOC_OVERHEAD: usize = 24;
/// How often opening the log file is retried after it failed.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    /// Offset of the first byte in the whole log.
    pub offset: u64,
    pub stream: Stream,
    pub data: Vec<u8>,
    /// When the chunk's first byte was written.
    pub at: SystemTime,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    /// What the chunk's buffer costs on the heap.
    fn heap_bytes(&self) -> usize {
        self.data.capacity().max(8) + ALLOC_OVERHEAD
    }
}

/// The log file: where it is, the open handle (none before the first write of a log made
/// on first write, while opening fails, or after [`Log::remove_files`]), its length.
#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    file: Option<fs::File>,
    len: u64,
    /// Last failed open, to retry at most every [`REOPEN_INTERVAL`].
    failed_open: Option<Instant>,
    removed: bool,
    /// Not made yet ([`Log::on_first_write`]): the first write creates it (and its
    /// directory).
    unmade: bool,
    /// A regular file (written at `len`, spliced into, rotated); else a device, written
    /// in order, never rotated.
    regular: bool,
    /// Its file system refused a `splice`: output is read and written.
    no_splice: bool,
}

impl FileSink {
    /// Not open yet: opened by [`Log::new`] at once, or by the first write when `unmade`.
    fn unopened(path: PathBuf, unmade: bool) -> Self {
        Self {
            path,
            file: None,
            len: 0,
            failed_open: None,
            removed: false,
            unmade,
            regular: true,
            no_splice: false,
        }
    }

    fn opened(&mut self, o: Opened) {
        self.file = Some(o.file);
        self.len = o.len;
        self.regular = o.regular;
    }
}

#[derive(Debug, Default)]
struct Inner {
    chunks: VecDeque<Chunk>,
    /// Offset of the first byte still kept in memory.
    start: u64,
    /// Offset one past the last byte written.
    end: u64,
    /// Heap bytes of the chunks' buffers (see [`Chunk::heap_bytes`]).
    heap: usize,
    file: Option<FileSink>,
    /// The first file error, and how many writes (or opens, renames) failed.
    write_error: Option<String>,
    write_failures: u64,
    /// Whether [`Log::take_unreported_write_error`] handed the first error out already.
    write_error_reported: bool,
}

/// The file's length and its last `max` bytes.
fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(max);
    f.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    f.take(len - from).read_to_end(&mut tail)?;
    Ok((from + tail.len() as u64, tail))
}

impl Inner {
    /// Everything the kept chunks cost: buffers plus the queue's slots.
    fn memory(&self) -> usize {
        self.heap + self.chunks.capacity() * std::mem::size_of::<Chunk>()
    }

    fn fail(&mut self, what: String) {
        self.write_failures += 1;
        if self.write_error.is_none() {
            tracing::warn!("log file: {what}");
            self.write_error = Some(what);
        }
    }

    /// Keeps `data` in memory: coalesced into the newest chunk when both are small, of the
    /// same stream and close in time; else a new chunk. Then evicts the oldest chunks
    /// until the memory bound holds.
    fn keep(&mut self, stream: Stream, data: &[u8], offset: u64) {
        let now = SystemTime::now();
        let coalesce = data.len() < COALESCE_BYTES
            && self.chunks.back().is_some_and(|last| {
                last.stream == stream
                    && last.end() == offset
                    && last.data.len() < COALESCE_BYTES
                    && now
                        .duration_since(last.at)
                        .is_ok_and(|d| d < COALESCE_WINDOW)
            });
        if coalesce && let Some(last) = self.chunks.back_mut() {
            let before = last.heap_bytes();
            last.data.extend_from_slice(data);
            self.heap = self.heap - before + last.heap_bytes();
        } else {
            // The newest chunk is done growing: give back its spare capacity.
            if let Some(last) = self.chunks.back_mut()
                && last.data.capacity() > last.data.len()
            {
                let before = last.heap_bytes();
                last.data.shrink_to_fit();
                self.heap = self.heap - before + last.heap_bytes();
            }
            // A write larger than the whole bound keeps only its newest bytes in memory
            // (alone, the queue is shrunk to at most 64 slots below).
            let room = single_chunk_room();
            let skip = data.len().saturating_sub(room);
            if skip > 0 {
                // Kept bytes stay contiguous: what precedes the cut goes too.
                self.chunks.clear();
                self.heap = 0;
            }
            let chunk = Chunk {
                offset: offset + skip as u64,
                stream,
                data: data[skip..].to_vec(),
                at: now,
            };
            // Make room first, so the queue never grows past MAX_CHUNKS slots.
            while self.chunks.len() >= MAX_CHUNKS {
                let Some(c) = self.chunks.pop_front() else {
                    break;
                };
                self.heap -= c.heap_bytes();
            }
            self.heap += chunk.heap_bytes();
            self.chunks.push_back(chunk);
        }
        while self.chunks.len() > 1 && self.memory() > MEMORY_BYTES {
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            self.heap -= c.heap_bytes();
        }
        // Few chunks left in a large queue (big writes after many small ones): shrink it.
        if self.chunks.capacity() > 64 && self.chunks.len() < self.chunks.capacity() / 4 {
            self.chunks.shrink_to(self.chunks.len() * 2);
        }
        self.start = self.chunks.front().map_or(self.end, |c| c.offset);
    }

    /// Opens the file when it is not (made on a log's first write), at most every
    /// [`REOPEN_INTERVAL`] after a failure; whether there is an open file to write. A
    /// failed open and a write while opening waits to be retried are counted.
    fn open_file(&mut self) -> bool {
        let Some(sink) = self.file.as_mut() else {
            return false;
        };
        if sink.removed {
            return false;
        }
        if sink.file.is_some() {
            return true;
        }
        if sink
            .failed_open
            .is_some_and(|t| t.elapsed() < REOPEN_INTERVAL)
        {
            self.write_failures += 1;
            return false;
        }
        match open_log(&sink.path, sink.unmade) {
            Ok(opened) => {
                sink.opened(opened);
                sink.failed_open = None;
                sink.unmade = false;
                true
            }
            Err(e) => {
                sink.failed_open = Some(Instant::now());
                let what = format!("opening {}: {e}", sink.path.display());
                self.fail(what);
                false
            }
        }
    }

    /// Appends `data` to the file, rotating it at [`FILE_BYTES`]; failures are recorded.
    fn write_file(&mut self, data: &[u8]) {
        if !self.open_file() {
            return;
        }
        let Some(sink) = self.file.as_mut() else {
            return;
        };
        let Some(f) = sink.file.as_mut() else {
            return;
        };
        let written = if sink.regular {
            f.write_all_at(data, sink.len)
        } else {
            f.write_all(data)
        };
        let failure = match written {
            Ok(()) => {
                if sink.regular {
                    sink.len += data.len() as u64;
                }
                None
            }
            Err(e) => {
                // Part of it may be written: the file's real length, as far as known.
                sink.len = f.metadata().map_or(sink.len, |m| m.len());
                Some(format!("writing {}: {e}", sink.path.display()))
            }
        };
        self.rotate_if_full(failure);
    }

    /// Moves what `pipe` holds (at most [`MOVE_BYTES`], and no further than
    /// [`FILE_BYTES`] into the file) to the end of the file in one `splice`, then reads it
    /// back into `buf` for memory. The move is one system call: a `kill -9` of auraed
    /// leaves each byte either still in the pipe (the holder keeps it for the next auraed)
    /// or in the file, never in a buffer of ours only. Without an open regular file that
    /// takes a splice, the caller reads instead ([`Moved::Read`]).
    fn splice_in(&mut self, pipe: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<Moved> {
        let Some(sink) = self.file.as_ref() else {
            return Ok(Moved::Read { write: true });
        };
        if sink.removed || sink.no_splice {
            return Ok(Moved::Read { write: true });
        }
        // Not open (a log made on first write, or after a failed open): only bytes may
        // open it — the pipe also reads ready at its end, and a process that wrote nothing
        // must cost no file. Bytes that come after this look are read and written.
        if sink.file.is_none() && rustix::io::ioctl_fionread(pipe).unwrap_or(0) == 0 {
            return Ok(Moved::Read { write: true });
        }
        if !self.open_file() {
            // Counted: the bytes go to memory only.
            return Ok(Moved::Read { write: false });
        }
        let Some(sink) = self.file.as_mut() else {
            return Ok(Moved::Read { write: true });
        };
        let Some(f) = sink.file.as_ref().filter(|_| sink.regular) else {
            // A device (such as /dev/null) is written, never spliced into or read back.
            return Ok(Moved::Read { write: true });
        };
        // Past the rotation size only when renaming the full file failed: go on writing.
        let room = match usize::try_from(FILE_BYTES.saturating_sub(sink.len)) {
            Ok(0) | Err(_) => MOVE_BYTES,
            Ok(room) => room.min(MOVE_BYTES),
        };
        let at = sink.len;
        let mut end = at;
        let moved = rustix::pipe::splice(
            pipe,
            None,
            f,
            Some(&mut end),
            room,
            rustix::pipe::SpliceFlags::NONBLOCK,
        );
        let n = match moved {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
            Err(
                rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP,
            ) => {
                // A file system that takes no splice: read and write from now on.
                sink.no_splice = true;
                return Ok(Moved::Read { write: true });
            }
            Err(e) => {
                // Nothing moved (disk full, …): read into memory, the failure counted.
                let what = format!("writing {}: {e}", sink.path.display());
                self.fail(what);
                return Ok(Moved::Read { write: false });
            }
        };
        sink.len = end;
        buf.clear();
        buf.resize(n, 0);
        let back = f.read_exact_at(buf, at);
        let path = sink.path.clone();
        if let Err(e) = back {
            // In the file, not in memory (a read-back failing where the bytes were just
            // written: an I/O error): reported, and a reader of the memory skips them.
            buf.clear();
            self.fail(format!("reading {} back: {e}", path.display()));
        }
        self.rotate_if_full(None);
        Ok(Moved::Spliced(n))
    }

    /// Rotates the file once it reached [`FILE_BYTES`]; records `failure` (or the
    /// rotation's own).
    fn rotate_if_full(&mut self, mut failure: Option<String>) {
        if let Some(sink) = self.file.as_mut()
            && sink.len >= FILE_BYTES
        {
            let old = rotated(&sink.path);
            // Close first: whatever happens next, nothing more goes to the rotated file.
            sink.file = None;
            sink.len = 0;
            if let Err(e) = fs::rename(&sink.path, &old) {
                failure.get_or_insert(format!(
                    "rotating {} to {}: {e}",
                    sink.path.display(),
                    old.display()
                ));
            }
            match open_log(&sink.path, false) {
                Ok(opened) => sink.opened(opened),
                Err(e) => {
                    sink.failed_open = Some(Instant::now());
                    failure.get_or_insert(format!("reopening {}: {e}", sink.path.display()));
                }
            }
        }
        if let Some(what) = failure {
            self.fail(what);
        }
    }
}

/// What [`Inner::splice_in`] did.
enum Moved {
    /// This many bytes moved into the file (0: the pipe's end); the caller's buffer holds
    /// them (or nothing, when reading them back failed).
    Spliced(usize),
    /// Not moved: the caller reads the pipe, and writes what it read to the file when
    /// `write` (no file, or a device; not after a failed open or splice, counted already).
    Read { write: bool },
}

/// The most bytes one move from a pipe takes (a whole default pipe buffer with 4 KiB
/// pages).
pub const MOVE_BYTES: usize = 64 << 10;

/// The most bytes one chunk may hold: the bound less its allocator overhead and a queue of
/// 64 slots.
fn single_chunk_room() -> usize {
    MEMORY_BYTES
        .saturating_sub(ALLOC_OVERHEAD + 64 * std::mem::size_of::<Chunk>())
        .max(1)
}

/// `<name>.log.1`, the one rotated predecessor of `<name>.log`.
fn rotated(path: &Path) -> PathBuf {
    path.with_extension("log.1")
}

/// Opens (creating) the log file, mode 0600 — also when it already existed with another
/// mode. Not `O_APPEND` (a `splice` into such a file is refused): every write to a regular
/// file is at its known end ([`FileSink::len`]; a file truncated under auraed's feet gets
/// a hole up to there), a device is written in order. With `create_dir` (only when the log is made: a later
/// reopen must not bring back a directory a cell's free removed), its directory is created
/// 0700.
fn open_log(path: &Path, create_dir: bool) -> io::Result<Opened> {
    if create_dir
        && let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    let meta = f.metadata()?;
    // Only a regular file is ours to change (never a device such as /dev/null).
    if meta.is_file() && meta.permissions().mode() & 0o777 != 0o600 {
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(Opened {
        len: meta.len(),
        regular: meta.is_file(),
        file: f,
    })
}

/// A log file just opened: the handle, its length, whether it is a regular file.
struct Opened {
    file: fs::File,
    len: u64,
    regular: bool,
}

/// The log. Writers append; readers replay then follow through [`Log::subscribe`].
#[derive(Debug)]
pub struct Log {
    inner: Mutex<Inner>,
    /// (end offset, closed)
    tx: watch::Sender<(u64, bool)>,
}

impl Log {
    /// A log that also appends to `file` (created, mode 0600) when given. A file that
    /// cannot be opened is retried on later writes and reported by [`Log::write_error`].
    pub fn new(file: Option<PathBuf>) -> Self {
        let mut inner = Inner::default();
        if let Some(path) = file {
            let mut sink = FileSink::unopened(path, false);
            match open_log(&sink.path, true) {
                Ok(opened) => sink.opened(opened),
                Err(e) => {
                    inner.fail(format!("opening {}: {e}", sink.path.display()));
                    sink.failed_open = Some(Instant::now());
                }
            }
            inner.file = Some(sink);
        }
        Self {
            inner: Mutex::new(inner),
            tx: watch::channel((0, false)).0,
        }
    }

    /// A log whose file (and the file's directory) is made by its first write, not now:
    /// a process that writes nothing (most short ones) costs no file on the state disk,
    /// made when it starts and deleted when it is freed. The file is `file` all the same
    /// ([`Log::path`]); once the owner gives it up ([`Log::remove_files`]) nothing makes
    /// it again.
    pub fn on_first_write(file: PathBuf) -> Self {
        let inner = Inner {
            file: Some(FileSink::unopened(file, true)),
            ..Default::default()
        };
        Self {
            inner: Mutex::new(inner),
            tx: watch::channel((0, false)).0,
        }
    }

    /// The log of a process found again after an auraed restart: the newest bytes of its
    /// file (at most a quarter of the memory bound) are kept for replay at the offsets
    /// they have in the file, and new output appends after them. The file does not say
    /// which stream a byte came from: the replayed tail reads as stdout.
    pub fn resume(path: PathBuf) -> Self {
        // A process that had written nothing has no file: made by its first output, as
        // at its start.
        let log = if path.exists() {
            Self::new(Some(path.clone()))
        } else {
            Self::on_first_write(path.clone())
        };
        match read_tail(&path, (MEMORY_BYTES / 4) as u64) {
            Ok((len, tail)) => {
                let mut g = log.lock();
                let start = len - tail.len() as u64;
                g.start = start;
                g.end = len;
                g.keep(Stream::Stdout, &tail, start);
                drop(g);
                log.tx.send_modify(|s| s.0 = len);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log
                .lock()
                .fail(format!("reading {} back: {e}", path.display())),
        }
        log
    }

    /// The log's file, if it has one.
    pub fn path(&self) -> Option<PathBuf> {
        self.lock().file.as_ref().map(|f| f.path.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn append(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut g = self.lock();
        g.write_file(data);
        self.taken(g, stream, data, data.len());
    }

    /// Moves what the pipe `pipe` (non-blocking) holds into the log, at most
    /// [`MOVE_BYTES`]: into the file in one `splice` when the log has an open regular file
    /// (then read back for the memory: a crash never loses a byte taken from the pipe),
    /// else read into memory (and written). `buf` is scratch space. Ok(0): the pipe's end;
    /// `WouldBlock`: nothing to take.
    pub fn append_from(
        &self,
        stream: Stream,
        pipe: BorrowedFd<'_>,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let mut g = self.lock();
        let n = match g.splice_in(pipe, buf)? {
            Moved::Spliced(n) => n,
            Moved::Read { write } => {
                buf.clear();
                buf.resize(MOVE_BYTES, 0);
                let n = rustix::io::read(pipe, &mut buf[..])?;
                buf.truncate(n);
                if write && n > 0 {
                    g.write_file(buf);
                }
                n
            }
        };
        if n > 0 {
            self.taken(g, stream, buf, n);
        }
        Ok(n)
    }

    /// Counts `n` bytes taken at the log's end, keeps `data` (those bytes; empty when they
    /// could not be read back from the file) in memory, and tells the watchers.
    fn taken(
        &self,
        mut g: std::sync::MutexGuard<'_, Inner>,
        stream: Stream,
        data: &[u8],
        n: usize,
    ) {
        let offset = g.end;
        g.end += n as u64;
        if !data.is_empty() {
            g.keep(stream, data, offset);
        }
        let end = g.end;
        drop(g);
        self.tx.send_modify(|s| s.0 = end);
    }

    /// No more output will come (the process's pipes reached EOF).
    pub fn close(&self) {
        self.tx.send_modify(|s| s.1 = true);
    }

    /// Chunks at or after `from`, and how many earlier bytes were already dropped from
    /// memory (`from` below the kept start).
    pub fn read_from(&self, from: u64) -> (Vec<Chunk>, u64) {
        let g = self.lock();
        let dropped = g.start.saturating_sub(from);
        // Chunks are in offset order: skip those that end at or before `from`.
        let first = g.chunks.partition_point(|c| c.end() <= from);
        let out = g
            .chunks
            .range(first..)
            .map(|c| {
                if c.offset >= from {
                    c.clone()
                } else {
                    // Cut the chunk that straddles `from`.
                    let skip = usize::try_from(from - c.offset).unwrap_or(0);
                    Chunk {
                        offset: from,
                        stream: c.stream,
                        data: c.data[skip..].to_vec(),
                        at: c.at,
                    }
                }
            })
            .collect();
        (out, dropped)
    }

    /// Watches (end offset, closed).
    pub fn subscribe(&self) -> watch::Receiver<(u64, bool)> {
        self.tx.subscribe()
    }

    /// Everything kept in memory, concatenated (tests and short outputs).
    pub fn text(&self) -> String {
        let (chunks, _) = self.read_from(0);
        String::from_utf8_lossy(
            &chunks
                .iter()
                .flat_map(|c| c.data.clone())
                .collect::<Vec<u8>>(),
        )
        .into_owned()
    }

    /// Bytes of memory the kept chunks cost: at most [`MEMORY_BYTES`].
    pub fn memory_bytes(&self) -> usize {
        self.lock().memory()
    }

    /// The first failure to open, write or rotate the log file, with how many failed in
    /// all; `None` while every write reached the file.
    pub fn write_error(&self) -> Option<String> {
        let g = self.lock();
        let first = g.write_error.as_ref()?;
        Some(match g.write_failures {
            0 | 1 => first.clone(),
            n => format!("{first} (and {} more failed log writes)", n - 1),
        })
    }

    /// [`Log::write_error`] the first time it is asked after the first failure, then `None`:
    /// for a caller that reports the failure once (an event) as soon as it sees it.
    pub fn take_unreported_write_error(&self) -> Option<String> {
        let reported = {
            let mut g = self.lock();
            if g.write_error.is_none() || g.write_error_reported {
                return None;
            }
            g.write_error_reported = true;
            true
        };
        reported.then(|| self.write_error()).flatten()
    }

    /// How many writes (opens, renames) of the log file failed.
    pub fn write_failures(&self) -> u64 {
        self.lock().write_failures
    }

    /// Deletes the log file and its rotated predecessor; nothing is written to disk after
    /// this (the output still goes to memory). Missing files are not an error.
    pub fn remove_files(&self) -> io::Result<()> {
        let mut g = self.lock();
        let Some(sink) = g.file.as_mut() else {
            return Ok(());
        };
        sink.removed = true;
        sink.file = None;
        if sink.unmade {
            // Never written: nothing was made.
            return Ok(());
        }
        let mut result = Ok(());
        for p in [sink.path.clone(), rotated(&sink.path)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod resume_tests {
    use super::*;

    #[test]
    fn a_resumed_log_replays_the_file_tail_at_its_offsets_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let first = Log::new(Some(path.clone()));
        first.append(Stream::Stdout, b"before the crash\n");
        drop(first);
        let log = Log::resume(path.clone());
        let (chunks, dropped) = log.read_from(0);
        assert_eq!(dropped, 0);
        let text: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(text, b"before the crash\n");
        log.append(Stream::Stderr, b"after\n");
        let (chunks, _) = log.read_from(17);
        assert_eq!(chunks[0].offset, 17);
        assert_eq!(chunks[0].data, b"after\n");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"before the crash\nafter\n".to_vec()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_from_offsets_and_bounded_memory() {
        let log = Log::new(None);
        log.append(Stream::Stdout, b"hello ");
        log.append(Stream::Stderr, b"world");
        assert_eq!(log.text(), "hello world");
        let (c, dropped) = log.read_from(3);
        assert_eq!(dropped, 0);
        assert_eq!(c[0].data, b"lo ");
        assert_eq!(c[1].stream, Stream::Stderr);
        let big = vec![b'x'; MEMORY_BYTES];
        log.append(Stream::Stdout, &big);
        // One write larger than the bound keeps its newest bytes that fit, alone (the
        // kept bytes are always contiguous).
        let (c, dropped) = log.read_from(0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].data.len(), single_chunk_room());
        assert_eq!(c[0].end(), 11 + MEMORY_BYTES as u64);
        assert_eq!(
            dropped as usize,
            11 + MEMORY_BYTES - single_chunk_room(),
            "the oldest bytes were dropped"
        );
        assert!(log.memory_bytes() <= MEMORY_BYTES);
        assert_eq!(*log.subscribe().borrow(), (11 + MEMORY_BYTES as u64, false));
    }

    fn rss_kib() -> u64 {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// The case: a process writing one byte at a time.
    #[test]
    fn a_million_one_byte_writes_stay_within_the_bound() {
        for interleaved in [false, true] {
            let rss0 = rss_kib();
            let log = Log::new(None);
            let mut peak = 0;
            for i in 0..1_000_000u32 {
                let stream = if interleaved && i % 2 == 1 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                log.append(stream, &[b'a' + (i % 26) as u8]);
                if i % 1000 == 0 {
                    peak = peak.max(log.memory_bytes());
                }
            }
            peak = peak.max(log.memory_bytes());
            let (chunks, dropped) = log.read_from(0);
            let kept: usize = chunks.iter().map(|c| c.data.len()).sum();
            println!(
                "1 000 000 one-byte writes ({}): accounted memory peak {} KiB (bound {} KiB), \
                 {} chunks, {kept} bytes kept, {dropped} dropped; process RSS {} -> {} KiB \
                 (whole test process, other tests run alongside)",
                if interleaved {
                    "stdout/stderr interleaved"
                } else {
                    "one stream"
                },
                peak / 1024,
                MEMORY_BYTES / 1024,
                chunks.len(),
                rss0,
                rss_kib()
            );
            assert!(peak <= MEMORY_BYTES, "accounted {peak} > {MEMORY_BYTES}");
            assert!(chunks.len() <= MAX_CHUNKS);
            assert_eq!(dropped as usize + kept, 1_000_000);
            // The kept bytes are the newest, in order.
            for (j, b) in chunks.iter().flat_map(|c| c.data.iter()).enumerate() {
                let i = dropped as usize + j;
                assert_eq!(*b, b'a' + (i % 26) as u8, "byte {i}");
            }
            if !interleaved {
                assert!(
                    kept > MEMORY_BYTES / 2,
                    "coalesced chunks keep most of the bound as payload: {kept}"
                );
            }
        }
    }

    #[test]
    fn replay_is_exact_from_every_offset_across_coalescing() {
        let log = Log::new(None);
        let mut all = Vec::new();
        let mut streams = Vec::new();
        // Small writes (coalesced), a stream switch, a large write, more small writes.
        for i in 0..3000u32 {
            let stream = if (1000..1100).contains(&i) {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            let data: Vec<u8> = if i == 2000 {
                vec![b'L'; 10_000]
            } else {
                format!("{i},").into_bytes()
            };
            streams.extend(std::iter::repeat_n(stream, data.len()));
            all.extend_from_slice(&data);
            log.append(stream, &data);
        }
        let (chunks, _) = log.read_from(0);
        assert!(
            chunks.len() < 100,
            "small writes were coalesced: {} chunks",
            chunks.len()
        );
        for from in (0..=all.len() as u64).step_by(7).chain([all.len() as u64]) {
            let (chunks, dropped) = log.read_from(from);
            assert_eq!(dropped, 0);
            let mut next = from;
            let mut got = Vec::new();
            for c in &chunks {
                assert_eq!(c.offset, next, "chunks are contiguous from {from}");
                for (k, _) in c.data.iter().enumerate() {
                    assert_eq!(c.stream, streams[c.offset as usize + k]);
                }
                next = c.end();
                got.extend_from_slice(&c.data);
            }
            assert_eq!(got, all[from as usize..], "replay from {from}");
        }
        // A follower that read up to the end sees only the new bytes once the last chunk
        // grew by coalescing.
        let end = all.len() as u64;
        log.append(Stream::Stdout, b"tail");
        let (c, _) = log.read_from(end);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].offset, c[0].data.as_slice()), (end, &b"tail"[..]));
    }

    #[test]
    fn file_rotates_with_mode_0600_and_remove_files_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x/e.log");
        let log = Log::new(Some(p.clone()));
        let block = vec![b'y'; 1 << 20];
        for _ in 0..9 {
            log.append(Stream::Stdout, &block);
        }
        let old = p.with_extension("log.1");
        assert!(old.exists());
        assert!(fs::metadata(&p).unwrap().len() < FILE_BYTES);
        for f in [&p, &old] {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
        }
        let dir_mode = fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(log.write_error(), None);
        log.remove_files().unwrap();
        assert_eq!(
            fs::read_dir(p.parent().unwrap()).unwrap().count(),
            0,
            "no log file is left"
        );
        // Output after the removal stays in memory and never re-creates a file.
        for _ in 0..9 {
            log.append(Stream::Stdout, &block);
        }
        assert!(!p.exists() && !old.exists());
        log.remove_files().unwrap();
    }

    /// A log made on first write: no file, no directory until output comes; then both
    /// (0700, 0600) with everything written; once given up, output after it makes neither
    /// again (a cell's free removes the directory after giving its logs up).
    #[test]
    fn a_log_made_on_first_write_costs_no_file_until_then() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("cell/e.log");
        let log = Log::on_first_write(p.clone());
        assert_eq!(log.path(), Some(p.clone()));
        assert!(!p.parent().unwrap().exists(), "nothing made before a write");
        log.append(Stream::Stdout, b"");
        assert!(
            !p.parent().unwrap().exists(),
            "an empty write makes nothing"
        );
        log.append(Stream::Stdout, b"one\n");
        log.append(Stream::Stderr, b"two\n");
        assert_eq!(fs::read(&p).unwrap(), b"one\ntwo\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir = fs::metadata(p.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        assert_eq!(log.write_error(), None);
        // Given up before anything was written: nothing is made afterwards.
        let q = tmp.path().join("gone/e.log");
        let quiet = Log::on_first_write(q.clone());
        quiet.remove_files().unwrap();
        quiet.append(Stream::Stdout, b"late\n");
        assert!(!q.parent().unwrap().exists());
        let (c, _) = quiet.read_from(0);
        assert_eq!(c[0].data, b"late\n", "kept in memory");
        // Resumed after a restart with no file (it had written nothing): none made yet.
        let r = tmp.path().join("again/e.log");
        let resumed = Log::resume(r.clone());
        assert!(!r.parent().unwrap().exists());
        resumed.append(Stream::Stdout, b"now\n");
        assert_eq!(fs::read(&r).unwrap(), b"now\n");
    }

    #[test]
    fn an_existing_file_is_made_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("e.log");
        fs::write(&p, b"old\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let log = Log::new(Some(p.clone()));
        log.append(Stream::Stdout, b"new\n");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&p).unwrap(), b"old\nnew\n");
    }

    #[test]
    fn write_errors_are_reported() {
        // Every write to /dev/full fails with ENOSPC (a device: its mode is left alone,
        // and remove_files is never called on it).
        let log = Log::new(Some(PathBuf::from("/dev/full")));
        assert_eq!(log.write_error(), None);
        assert_eq!(log.take_unreported_write_error(), None);
        log.append(Stream::Stdout, b"a");
        log.append(Stream::Stderr, b"b");
        log.append(Stream::Stdout, b"c");
        let e = log.write_error().unwrap();
        println!("write error: {e}");
        assert!(e.contains("/dev/full") && e.contains("os error 28"), "{e}");
        assert!(e.contains("2 more"), "{e}");
        assert_eq!(log.write_failures(), 3);
        assert_eq!(log.take_unreported_write_error(), Some(e.clone()));
        assert_eq!(log.take_unreported_write_error(), None, "handed out once");
        assert_eq!(log.write_error(), Some(e), "still there for the status");
        assert_eq!(log.text(), "abc", "memory still has the output");

        // A file that cannot be opened: reported, and retried later.
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("not-a-dir");
        fs::write(&blocker, b"").unwrap();
        let log = Log::new(Some(blocker.join("e.log")));
        let e = log.write_error().unwrap();
        assert!(e.contains("opening"), "{e}");
        log.append(Stream::Stdout, b"x");
        assert_eq!(log.write_failures(), 2);
    }
}
