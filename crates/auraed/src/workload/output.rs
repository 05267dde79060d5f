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
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) else {
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

/// Writes `data` to the child's stdin, then closes it.
pub async fn feed(write: OwnedFd, data: Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(write) {
        let _ = tx.write_all(&data).await;
    }
}
