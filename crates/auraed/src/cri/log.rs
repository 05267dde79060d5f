//! Container logs in the CRI format, at the path kubelet names: one line per line of
//! output, `<RFC 3339 time> <stdout|stderr> <F|P> <text>` (`P`: a partial line, more of
//! it follows; `F`: the line's end). A writer follows the executable's log (our own
//! output capture) and keeps, at most once a second and at its end, how far it got, so a
//! restarted auraed continues there (a line may then be written twice, none is lost).

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use tokio_stream::StreamExt;
use tonic::Status;
use tracing::warn;

use super::Cri;

/// A partial line longer than this is written as `P` lines of this size.
const MAX_LINE: usize = 16 * 1024;

/// Opens (creating, appending, 0640) a container's CRI log file `path`, which must lie
/// below `root` (`--cri-log-root`): resolved from an fd of `root` with `openat2`, never
/// leaving it, following no symlink and no magic link on the way, never blocking on a FIFO
/// nor taking a terminal; it must be a regular file with one link.
pub fn open(root: &Path, path: &Path) -> Result<File, Status> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let refused = |why: String| {
        Status::failed_precondition(format!(
            "the container's log file {}: {why}",
            path.display()
        ))
    };
    let rel = path
        .strip_prefix(root)
        .ok()
        .filter(|r| !r.as_os_str().is_empty())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "log path {}: must lie below --cri-log-root {}",
                path.display(),
                root.display()
            ))
        })?;
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(format!("--cri-log-root {}: {e}", root.display())))?;
    let fd = rustix::fs::openat2(
        &dir,
        rel,
        OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::APPEND
            | OFlags::CLOEXEC
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::NOCTTY,
        Mode::from_raw_mode(0o640),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| refused(e.to_string()))?;
    let file = File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() && std::os::unix::fs::MetadataExt::nlink(&m) == 1 => Ok(file),
        Ok(_) => Err(refused("not a regular file with one link".into())),
        Err(e) => Err(refused(e.to_string())),
    }
}

/// One line of the CRI log format.
pub fn line(at: Option<&prost_types::Timestamp>, stream: i32, full: bool, text: &[u8]) -> Vec<u8> {
    let at = at
        .cloned()
        .unwrap_or_else(|| std::time::SystemTime::now().into());
    let stream = if stream == pb::LogStream::Stderr as i32 {
        "stderr"
    } else {
        "stdout"
    };
    let mut out = format!("{at} {stream} {} ", if full { 'F' } else { 'P' }).into_bytes();
    out.extend_from_slice(text);
    out.push(b'\n');
    out
}

/// Splits chunks of one stream into CRI lines; what has no newline yet waits for more.
#[derive(Debug, Default)]
pub struct Lines {
    partial: [Vec<u8>; 2],
}

impl Lines {
    /// The CRI lines `data` completes (stream 0 stdout, 1 stderr).
    pub fn push(
        &mut self,
        at: Option<&prost_types::Timestamp>,
        stream: i32,
        data: &[u8],
    ) -> Vec<u8> {
        let i = usize::from(stream == pb::LogStream::Stderr as i32);
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            let buf = &mut self.partial[i];
            buf.extend_from_slice(&rest[..n]);
            out.extend(line(at, stream, true, buf));
            buf.clear();
            rest = &rest[n + 1..];
        }
        let buf = &mut self.partial[i];
        buf.extend_from_slice(rest);
        while buf.len() >= MAX_LINE {
            let tail = buf.split_off(MAX_LINE);
            out.extend(line(at, stream, false, buf));
            *buf = tail;
        }
        out
    }

    /// What is left at the end: each stream's unfinished line, as a finished one.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, stream) in [(0, pb::LogStream::Stdout), (1, pb::LogStream::Stderr)] {
            if !self.partial[i].is_empty() {
                out.extend(line(None, stream as i32, true, &self.partial[i]));
                self.partial[i].clear();
            }
        }
        out
    }
}

#[derive(Debug)]
struct Writer {
    task: tokio::task::JoinHandle<()>,
    file: Arc<Mutex<File>>,
    path: std::path::PathBuf,
}

/// The running writers, by container id.
#[derive(Debug, Default)]
pub struct Writers {
    running: Mutex<HashMap<String, Writer>>,
}

impl Writers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Writer>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the writer of container `id` into `file`, following `logs` where its
    /// sandbox is.
    pub(super) fn start(
        &self,
        id: &str,
        file: File,
        place: super::place::Place,
        mut logs: pb::ExecutableLogsRequest,
        cri: Arc<Cri>,
    ) {
        let path = cri
            .lock()
            .containers
            .get(id)
            .map(|c| std::path::PathBuf::from(&c.log_path))
            .unwrap_or_default();
        let file = Arc::new(Mutex::new(file));
        logs.from_offset = cri.log_offset(id);
        let task = tokio::spawn(follow(cri, id.to_owned(), file.clone(), place, logs));
        if let Some(old) = self
            .lock()
            .insert(id.to_owned(), Writer { task, file, path })
        {
            old.task.abort();
        }
    }

    /// Opens the log file anew (ReopenContainerLog: after kubelet rotated it).
    pub fn reopen(&self, id: &str, root: &Path) -> Result<(), Status> {
        let running = self.lock();
        let Some(w) = running.get(id).filter(|w| !w.task.is_finished()) else {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running: no log to reopen"
            )));
        };
        let fresh = open(root, &w.path)?;
        *w.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Waits (bounded) for the writer of `id` to write what its executable wrote, then
    /// forgets it.
    pub async fn finish(&self, id: &str) {
        let w = self.lock().remove(id);
        if let Some(mut w) = w
            && tokio::time::timeout(Duration::from_secs(2), &mut w.task)
                .await
                .is_err()
        {
            w.task.abort();
        }
    }

    pub fn stop_all(&self) {
        for (_, w) in self.lock().drain() {
            w.task.abort();
        }
    }
}

/// Follows an executable's log to its end, writing CRI lines.
async fn follow(
    cri: Arc<Cri>,
    id: String,
    file: Arc<Mutex<File>>,
    place: super::place::Place,
    logs: pb::ExecutableLogsRequest,
) {
    let mut stream = match place.exe_logs(logs).await {
        Ok(s) => s,
        Err(e) => {
            warn!(container = %id, "CRI log: following the container's output failed: {}", e.message());
            return;
        }
    };
    let mut lines = Lines::default();
    let mut failures = 0u64;
    let mut offset = None;
    let mut saved = Instant::now();
    let write = |bytes: &[u8], failures: &mut u64| {
        if bytes.is_empty() {
            return;
        }
        let r = file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(bytes);
        if let Err(e) = r {
            *failures += 1;
            if *failures == 1 {
                warn!(container = %id, "CRI log: writing the log file failed (later failures are counted): {e}");
            }
        }
    };
    while let Some(item) = stream.next().await {
        let chunk = match item {
            Ok(c) => c,
            Err(e) => {
                warn!(container = %id, "CRI log: the container's output stream failed: {}", e.message());
                break;
            }
        };
        if chunk.dropped > 0 {
            let note = format!(
                "[auraed: {} bytes of this container's output were lost before this line]",
                chunk.dropped
            );
            write(
                &line(
                    chunk.at.as_ref(),
                    pb::LogStream::Stderr as i32,
                    true,
                    note.as_bytes(),
                ),
                &mut failures,
            );
        }
        let out = lines.push(chunk.at.as_ref(), chunk.stream, &chunk.data);
        write(&out, &mut failures);
        offset = Some(chunk.offset + chunk.data.len() as u64);
        cri.set_log_reached(&id, chunk.offset + chunk.data.len() as u64);
        if saved.elapsed() >= Duration::from_secs(1) {
            cri.set_log_offset(&id, chunk.offset + chunk.data.len() as u64);
            saved = Instant::now();
        }
    }
    write(&lines.finish(), &mut failures);
    if let Some(o) = offset {
        cri.set_log_offset(&id, o);
    }
    if failures > 0 {
        warn!(container = %id, failures, "CRI log: writes to the log file failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: 1_764_633_600,
            nanos: 5,
        }
    }

    #[test]
    fn output_becomes_cri_lines_with_partials_kept_for_later() {
        let mut l = Lines::default();
        let out = l.push(Some(&ts()), pb::LogStream::Stdout as i32, b"one\ntw");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "2025-12-02T00:00:00.000000005Z stdout F one\n");
        let out = l.push(Some(&ts()), pb::LogStream::Stderr as i32, b"err\n");
        assert!(String::from_utf8(out).unwrap().ends_with(" stderr F err\n"));
        let out = l.push(Some(&ts()), pb::LogStream::Stdout as i32, b"o\n");
        assert!(String::from_utf8(out).unwrap().ends_with(" stdout F two\n"));
        assert!(l.push(Some(&ts()), 1, b"x").is_empty());
        let end = String::from_utf8(l.finish()).unwrap();
        assert!(end.ends_with(" stdout F x\n"), "{end}");
        assert!(l.finish().is_empty());
    }

    #[test]
    fn a_long_line_is_cut_into_partial_lines() {
        let mut l = Lines::default();
        let big = vec![b'a'; MAX_LINE * 2 + 10];
        let text = String::from_utf8(l.push(None, 1, &big)).unwrap();
        let got: Vec<&str> = text.lines().collect();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|g| g.contains(" stdout P ")));
        let end = String::from_utf8(l.finish()).unwrap();
        assert!(end.contains(" stdout F ") && end.trim_end().ends_with(&"a".repeat(10)));
    }

    #[test]
    fn the_log_file_stays_below_the_root_and_is_a_regular_file_never_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pods");
        std::fs::create_dir_all(root.join("p/c")).unwrap();
        let p = root.join("p/c/0.log");
        let mut f = open(&root, &p).unwrap();
        f.write_all(b"x").unwrap();
        // A link as the file, a link on the way, a directory, a FIFO, a hard link, a path
        // outside the root: all refused, nothing written outside.
        std::os::unix::fs::symlink(&p, root.join("p/c/link.log")).unwrap();
        assert!(open(&root, &root.join("p/c/link.log")).is_err());
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("p/esc")).unwrap();
        assert!(open(&root, &root.join("p/esc/0.log")).is_err());
        assert!(!outside.join("0.log").exists());
        assert!(open(&root, &root.join("p/c")).is_err());
        nix::unistd::mkfifo(
            &root.join("p/c/fifo.log"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(
            open(&root, &root.join("p/c/fifo.log")).is_err(),
            "no block on a FIFO"
        );
        std::fs::hard_link(&p, root.join("p/c/hard.log")).unwrap();
        assert!(open(&root, &p).is_err(), "a file with two links");
        let e = open(&root, &outside.join("x.log")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(open(&root, &root.join("p/../../outside/y.log")).is_err());
        assert!(!outside.join("y.log").exists());
    }
}
