//! Output capture: a child's stdout/stderr pipes pumped into its [`Log`], its stdin fed
//! from the request.

use std::{os::fd::OwnedFd, sync::Arc};

use super::log::{Log, Stream};

/// Copies a pipe into the log until EOF. A failed write to the log file (disk full, …)
/// is reported once per failure through `on_write_error` (an event, by the caller); the
/// output still reaches the in-memory log. A pipe's output is moved into the log's file
/// by [`Log::append_from`] (`splice`: taken from the pipe and in the file in one system
/// call, so a `kill -9` of auraed loses none of it while the log has its file — not a
/// log whose file cannot be opened or was given up); a terminal's is read and written.
pub async fn pump(
    read: OwnedFd,
    log: Arc<Log>,
    stream: Stream,
    on_write_error: impl Fn(String) + Send + 'static,
) {
    use std::os::fd::AsFd;
    use tokio::io::AsyncReadExt;
    let fifo = is_fifo(&read);
    let Ok(mut rx) = receiver(read) else {
        return;
    };
    let report = |log: &Log| {
        if let Some(e) = log.take_unreported_write_error() {
            on_write_error(e);
        }
    };
    if fifo {
        let mut buf = Vec::with_capacity(super::log::MOVE_BYTES);
        loop {
            if rx.readable().await.is_err() {
                return;
            }
            match rx.try_io(|| log.append_from(stream, rx.as_fd(), &mut buf)) {
                Ok(0) => return,
                Ok(_) => report(&log),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                log.append(stream, &buf[..n]);
                report(&log);
            }
        }
    }
}

fn is_fifo(fd: &OwnedFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo
    })
}

/// A reader of a pipe's read end, or of a terminal's master side (not a pipe, but a
/// character device tokio's pipe types read alike once it is non-blocking; its end is
/// EIO once no process holds the terminal).
pub fn receiver(fd: OwnedFd) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    use tokio::net::unix::pipe::Receiver;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo {
        return Receiver::from_owned_fd(fd);
    }
    nonblocking(&fd)?;
    Receiver::from_owned_fd_unchecked(fd)
}

/// A writer of a pipe's write end, or of a terminal's master side (see [`receiver`]).
pub fn sender(fd: OwnedFd) -> std::io::Result<tokio::net::unix::pipe::Sender> {
    use tokio::net::unix::pipe::Sender;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo {
        return Sender::from_owned_fd(fd);
    }
    nonblocking(&fd)?;
    Sender::from_owned_fd_unchecked(fd)
}

fn nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    let fl = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Writes `data` to the child's stdin, then closes it.
pub async fn feed(write: OwnedFd, data: Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(write) {
        let _ = tx.write_all(&data).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        os::fd::AsFd,
        process::{Command, Stdio},
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    /// Set in the pumping child this test starts: the log file it appends to.
    const CHILD: &str = "AURAE_TEST_PUMP_CHILD";
    const RECORD: usize = 13;
    /// 6.5 MB of records at most: below the log's rotation size (8 MiB).
    const MAX_RECORDS: u64 = 500_000;

    /// A pipe pumped into a log made on first write: closed without a byte, it makes
    /// neither the file nor its directory (the pipe reads ready at its end too); with
    /// bytes, the file holds exactly them, as does the memory.
    #[test]
    fn a_quiet_pipe_makes_no_log_file_and_a_chatty_one_its_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in [("quiet", &b""[..]), ("chatty", &b"one\ntwo\n"[..])] {
            let path = dir.path().join(name).join("w.log");
            let log = Arc::new(Log::on_first_write(path.clone()));
            let (rx, mut tx) = std::io::pipe().unwrap();
            tx.write_all(data).unwrap();
            drop(tx);
            rt.block_on(pump(rx.into(), log.clone(), Stream::Stdout, |e| {
                panic!("{e}")
            }));
            let (chunks, _) = log.read_from(0);
            let kept: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
            assert_eq!(kept, data, "{name}: in memory");
            if data.is_empty() {
                assert!(!dir.path().join(name).exists(), "{name}: a directory made");
            } else {
                assert_eq!(std::fs::read(&path).unwrap(), data, "{name}: in the file");
            }
        }
    }

    /// A `kill -9` of the process pumping a pipe into a log, at random points of a
    /// steady stream, again and again (each new pumper resumes the same log file and
    /// takes the same pipe, as a restarted auraed takes its executables' pipes back from
    /// the holder): what the file holds plus what is left in the pipe is every byte
    /// written, in order, none twice. A pumper that read a chunk and died before writing
    /// it lost that chunk.
    #[test]
    fn a_kill_9_of_the_pumper_loses_no_output() {
        if let Ok(path) = std::env::var(CHILD) {
            // The child: pump stdin (the pipe) into the log until killed.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let fd = std::io::stdin().as_fd().try_clone_to_owned().unwrap();
            let log = Arc::new(Log::resume(path.into()));
            rt.block_on(pump(fd, log, Stream::Stdout, |_| {}));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.log");
        let (mut rx, tx) = std::io::pipe().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let stop = stop.clone();
            let mut tx = tx;
            move || {
                let mut n = 0u64;
                let mut batch = String::new();
                while !stop.load(Ordering::Relaxed) {
                    // ~1.7 MB/s (~3.6 MB in a run), and never past MAX_RECORDS however
                    // slow the machine: the file never reaches its rotation.
                    if n < MAX_RECORDS {
                        batch.clear();
                        for _ in 0..128 {
                            batch += &format!("{n:012}\n");
                            n += 1;
                        }
                        tx.write_all(batch.as_bytes()).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                // The write end stays open until now: a pumper never sees the pipe end.
                n
            }
        });
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            | 1;
        println!("seed {seed}");
        let me = std::env::current_exe().unwrap();
        const KILLS: usize = 60;
        for _ in 0..KILLS {
            let mut child = Command::new(&me)
                .args([
                    "--exact",
                    "workload::output::tests::a_kill_9_of_the_pumper_loses_no_output",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, &path)
                .stdin(Stdio::from(rx.try_clone().unwrap()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // xorshift: 15–45 ms into the stream (the child's start takes some of it).
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_millis(15 + seed % 30));
            child.kill().unwrap();
            let st = child.wait().unwrap();
            assert!(st.code().is_none(), "the pumper ended by itself: {st:?}");
        }
        stop.store(true, Ordering::Relaxed);
        // What no pumper took: the rest of the pipe, until the writer is done.
        let mut rest = Vec::new();
        // The pumpers made the pipe's (shared) description non-blocking.
        let fl = rustix::fs::fcntl_getfl(&rx).unwrap();
        rustix::fs::fcntl_setfl(&rx, fl - rustix::fs::OFlags::NONBLOCK).unwrap();
        let drain = std::thread::spawn(move || {
            rx.read_to_end(&mut rest).unwrap();
            rest
        });
        let written = writer.join().unwrap();
        let rest = drain.join().unwrap();
        assert!(
            !path.with_extension("log.1").exists(),
            "rotated: write less"
        );
        let mut all = std::fs::read(&path).unwrap();
        let in_file = all.len();
        all.extend_from_slice(&rest);
        assert_eq!(all.len() % RECORD, 0, "a torn record");
        let mut next = 0u64;
        for r in all.chunks(RECORD) {
            let got: u64 = std::str::from_utf8(&r[..RECORD - 1])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                got, next,
                "record {next} missing or repeated (seed printed above)"
            );
            next += 1;
        }
        assert_eq!(
            next, written,
            "every record written is in the file or the pipe"
        );
        assert!(in_file > 0, "the pumpers moved nothing");
        println!(
            "{KILLS} kills: {written} records, {} in the file, {} left in the pipe",
            in_file / RECORD,
            rest.len() / RECORD
        );
    }
}
