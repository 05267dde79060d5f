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
pub struct Input {
    /// A terminal: the fd is its master side (its output is read from the same side).
    pub tty: bool,
    /// Its stdin is closed when the first attach that wrote to it ends.
    pub once: bool,
    state: Mutex<State>,
    /// Called when what its record says changes (claimed, closed): the executable's
    /// record is written again, before the holder lets go of anything.
    on_change: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("tty", &self.tty)
            .field("once", &self.once)
            .field("state", &self.state)
            .finish()
    }
}

#[derive(Debug)]
struct State {
    /// None once closed.
    fd: Option<OwnedFd>,
    /// The holder's copy of a stdin pipe's write end (its number and file), let go when
    /// the input closes. Never for a terminal: that copy keeps the output too.
    held: Option<(Arc<Holder>, i32, FileId)>,
    /// With `once`: an attach asked to write it (its end closes it; recorded, so a
    /// restart in between closes it too).
    claimed: bool,
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
                claimed: false,
            }),
            on_change: std::sync::OnceLock::new(),
        }
    }

    /// What to call when what its record says changes (set once, after the executable
    /// exists).
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    fn changed(&self) {
        if let Some(f) = self.on_change.get() {
            f();
        }
    }

    /// Whether an attach asked to write it (with `once`).
    pub fn claimed(&self) -> bool {
        self.state().claimed
    }

    /// An attach asks to write it: with `once`, recorded (its end will close it).
    pub fn claim(&self) {
        if !self.once {
            return;
        }
        let first = {
            let mut s = self.state();
            !std::mem::replace(&mut s.claimed, true)
        };
        if first {
            self.changed();
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
    /// end goes. The record stops naming the holder's copy before it is let go (a number
    /// the holder released may soon hold another workload's fd).
    pub fn close(&self) {
        let (fd, held) = {
            let mut s = self.state();
            (s.fd.take(), s.held.take())
        };
        if fd.is_none() {
            return;
        }
        drop(fd);
        self.changed();
        if let Some((holder, number, id)) = held
            && let Err(e) = crate::workload::off_runtime(|| holder.release(&[number], &[id]))
        {
            tracing::warn!("the holder did not let go of a closed stdin: {e}");
        }
    }
}
