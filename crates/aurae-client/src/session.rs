//! The client messages of an interactive session (`Executables/ExecStream`,
//! `Executables/Attach`) after its `start`: input, its end, terminal sizes. One trait, so a
//! client (aer, auraed calling into an instance) feeds either call the same way.

use aurae_proto::runtime::v0 as pb;

/// A message a session's client sends after `start`.
pub trait InputMessage: Send + 'static {
    /// Bytes for its stdin (with a terminal: the terminal's input).
    fn stdin(data: Vec<u8>) -> Self;
    /// The end of this client's input.
    fn close_stdin() -> Self;
    /// The terminal's size changed (columns, rows).
    fn resize(size: pb::TerminalSize) -> Self;
}

impl InputMessage for pb::ExecInput {
    fn stdin(data: Vec<u8>) -> Self {
        Self {
            what: Some(pb::exec_input::What::Stdin(data)),
        }
    }
    fn close_stdin() -> Self {
        Self {
            what: Some(pb::exec_input::What::CloseStdin(true)),
        }
    }
    fn resize(size: pb::TerminalSize) -> Self {
        Self {
            what: Some(pb::exec_input::What::Resize(size)),
        }
    }
}

impl InputMessage for pb::AttachInput {
    fn stdin(data: Vec<u8>) -> Self {
        Self {
            what: Some(pb::attach_input::What::Stdin(data)),
        }
    }
    fn close_stdin() -> Self {
        Self {
            what: Some(pb::attach_input::What::CloseStdin(true)),
        }
    }
    fn resize(size: pb::TerminalSize) -> Self {
        Self {
            what: Some(pb::attach_input::What::Resize(size)),
        }
    }
}

/// A session's input channel with its `start` already in it: the sender for what follows,
/// and the stream the call sends (its first message the start).
pub fn with_start<M: Send + 'static>(
    start: M,
) -> (
    tokio::sync::mpsc::Sender<M>,
    tokio_stream::wrappers::ReceiverStream<M>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // A fresh channel has room: the start goes first.
    let _ = tx.try_send(start);
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
}
