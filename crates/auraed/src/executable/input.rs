//! An interactive executable's input (see [`super::spec::Interactive`]): the write end of
//! its stdin pipe, or its terminal's master side, kept by auraed for Attach to write to.
//! The holder keeps a copy too, so a crash of auraed neither closes the executable's
//! stdin (it would read EOF) nor loses its terminal; a restarted auraed takes it back.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
};

use crate::workload::holder::{FileId, Holder};

/// The input of an executable started with `interactive.stdin` or `tty`.
#[derive(Debug)]
pub struct Input {
    /// A terminal: the fd is its master side (its output is read from the same side).
    pub tty: bool,
    /// Its stdin is closed when the first attach that wrote to it ends.
    pub once: bool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// None once closed.
    fd: Option<OwnedFd>,
    /// The holder's copy of a stdin pipe's write end (its number and file), let go when
    /// the input closes. Never for a terminal: that copy keeps the output too.
    held: Option<(Arc<Holder>, i32, FileId)>,
}

impl Input {
    pub fn new(
        fd: OwnedFd,
        tty: bool,
        once: bool,
        held: Option<(Arc<Holder>, i32, FileId)>,
    ) -> Self {
        Self {
            tty,
            once,
            state: Mutex::new(State {
                fd: Some(fd),
                held: if tty { None } else { held },
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it is still open.
    pub fn is_open(&self) -> bool {
        self.state().fd.is_some()
    }

    /// A writer of its own for one attach (a duplicate of the fd); `None` once closed.
    pub fn writer(&self) -> io::Result<Option<OwnedFd>> {
        self.state().fd.as_ref().map(OwnedFd::try_clone).transpose()
    }

    /// Sets the terminal's size (columns, rows); nothing without a terminal.
    pub fn resize(&self, width: u16, height: u16) {
        if !self.tty {
            return;
        }
        if let Some(fd) = &self.state().fd {
            let _ = aurae_sys::pty::set_window_size(fd.as_fd(), width, height);
        }
    }

    /// Closes it: auraed's end and the holder's copy (the executable reads EOF once no
    /// attach still writes). A terminal stays open for its output: only auraed's writing
    /// end goes.
    pub fn close(&self) {
        let (fd, held) = {
            let mut s = self.state();
            (s.fd.take(), s.held.take())
        };
        drop(fd);
        if let Some((holder, number, id)) = held
            && let Err(e) =
                crate::workload::holder::off_runtime(|| holder.release(&[number], &[id]))
        {
            tracing::warn!("the holder did not let go of a closed stdin: {e}");
        }
    }
}
