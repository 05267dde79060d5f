//! Output capture: a child's stdout/stderr pipes pumped into its [`Log`], its stdin fed
//! from the request.

use std::{os::fd::OwnedFd, sync::Arc};

use super::log::{Log, Stream};

/// Copies a pipe into the log until EOF. A failed write to the log file (disk full, …)
/// is reported once per failure through `on_write_error` (an event, by the caller); the
/// output still reaches the in-memory log.
pub async fn pump(
    read: OwnedFd,
    log: Arc<Log>,
    stream: Stream,
    on_write_error: impl Fn(String) + Send + 'static,
) {
    use tokio::io::AsyncReadExt;
    let Ok(mut rx) = receiver(read) else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                log.append(stream, &buf[..n]);
                if let Some(e) = log.take_unreported_write_error() {
                    on_write_error(e);
                }
            }
        }
    }
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
