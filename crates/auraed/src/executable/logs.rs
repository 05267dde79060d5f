//! A bounded per-executable log: the newest bytes in memory (replay from any kept offset,
//! then follow live) and everything in a rotated file under the state directory.

use std::{collections::VecDeque, fs, io::Write, path::PathBuf, sync::Mutex, time::SystemTime};

use tokio::sync::watch;

/// Bytes kept in memory per executable.
pub const MEMORY_BYTES: usize = 1 << 20;
/// Size at which the log file rotates (one previous file, `.1`, is kept).
pub const FILE_BYTES: u64 = 8 << 20;

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
    pub at: SystemTime,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: VecDeque<Chunk>,
    /// Offset of the first byte still kept in memory.
    start: u64,
    /// Offset one past the last byte written.
    end: u64,
    kept: usize,
    file: Option<(PathBuf, fs::File, u64)>,
}

/// The log. Writers append; readers replay then follow through [`Log::subscribe`].
#[derive(Debug)]
pub struct Log {
    inner: Mutex<Inner>,
    /// (end offset, closed)
    tx: watch::Sender<(u64, bool)>,
}

impl Log {
    /// A log that also appends to `file` (created, mode 0600) when given.
    pub fn new(file: Option<PathBuf>) -> Self {
        let file = file.and_then(|p| {
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = p.parent() {
                let _ = fs::create_dir_all(dir);
            }
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&p)
                .ok()?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            Some((p, f, len))
        });
        Self {
            inner: Mutex::new(Inner {
                file,
                ..Inner::default()
            }),
            tx: watch::channel((0, false)).0,
        }
    }

    pub fn append(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        let offset = g.end;
        g.end += data.len() as u64;
        g.kept += data.len();
        g.chunks.push_back(Chunk {
            offset,
            stream,
            data: data.to_vec(),
            at: SystemTime::now(),
        });
        while g.kept > MEMORY_BYTES {
            let Some(c) = g.chunks.pop_front() else { break };
            g.kept -= c.data.len();
            g.start = c.offset + c.data.len() as u64;
        }
        if let Some((path, f, len)) = g.file.as_mut() {
            if f.write_all(data).is_ok() {
                *len += data.len() as u64;
            }
            if *len >= FILE_BYTES {
                let old = path.with_extension("log.1");
                let _ = fs::rename(&*path, old);
                if let Ok(nf) = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&*path)
                {
                    *f = nf;
                    *len = 0;
                }
            }
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
        let Ok(g) = self.inner.lock() else {
            return (Vec::new(), 0);
        };
        let dropped = g.start.saturating_sub(from);
        let out = g
            .chunks
            .iter()
            .filter(|c| c.offset + c.data.len() as u64 > from)
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
        let (c, dropped) = log.read_from(0);
        assert_eq!(dropped, 11, "the oldest bytes were dropped");
        assert_eq!(c.iter().map(|c| c.data.len()).sum::<usize>(), MEMORY_BYTES);
        assert_eq!(*log.subscribe().borrow(), (11 + MEMORY_BYTES as u64, false));
    }

    #[test]
    fn file_rotates() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x/e.log");
        let log = Log::new(Some(p.clone()));
        let block = vec![b'y'; 1 << 20];
        for _ in 0..9 {
            log.append(Stream::Stdout, &block);
        }
        assert!(p.with_extension("log.1").exists());
        assert!(fs::metadata(&p).unwrap().len() < FILE_BYTES);
    }
}
