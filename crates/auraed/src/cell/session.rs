//! An interactive exec as the side that talks to its user sees it, wherever the command
//! runs: its output to read, its input to write, its terminal's size to set, its end to
//! wait for, and a way to kill it. The CRI streaming server copies a [`Session`] to and
//! from kubelet's SPDY connection; `Executables/ExecStream` copies one to and from a gRPC
//! stream. [`Session::local`] is a command of this auraed; a session in an instance is
//! built over that instance's `ExecStream` (`cri::place`).

use std::{future::Future, os::fd::OwnedFd, pin::Pin};

use aurae_sys::ExitStatus;

use super::exec::ExecProcess;

/// How long an exec's output may go on after its command ended (a child of it holding
/// the pipes).
pub const OUTPUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub type Read = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub type Write = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// An interactive exec's ends.
pub struct Session {
    /// What it writes: its stdout, or with a terminal everything the terminal shows.
    pub stdout: Option<Read>,
    /// Its stderr (None with a terminal).
    pub stderr: Option<Read>,
    /// Its input: its stdin pipe, or the terminal's input (None: its stdin is /dev/null).
    pub stdin: Option<Write>,
    /// Sets its terminal's size (columns, rows); None: no terminal.
    pub resize: Option<Box<dyn Fn(u16, u16) + Send + Sync>>,
    /// Its end (None: it is not known how, e.g. the instance it ran in went away).
    pub exit: Pin<Box<dyn Future<Output = Option<ExitStatus>> + Send>>,
    /// Kills it (its user went away).
    pub kill: Box<dyn FnOnce() + Send>,
    /// For logs: its pid here, or where it runs.
    pub what: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.what)
    }
}

impl Session {
    /// A command started by this auraed (killed if its ends cannot be made).
    pub fn local(p: ExecProcess) -> std::io::Result<Self> {
        let pidfd = p.child.pidfd.clone();
        Self::wrap(p).inspect_err(|_| {
            let _ = pidfd.send_signal(nix::libc::SIGKILL);
        })
    }

    fn wrap(p: ExecProcess) -> std::io::Result<Self> {
        use tokio::net::unix::pipe::{Receiver, Sender};
        let mut s = Self {
            stdout: None,
            stderr: None,
            stdin: None,
            resize: None,
            what: format!("pid {}", p.child.pid),
            exit: Box::pin(async move { p.child.exit.await.ok() }),
            kill: {
                let pidfd = p.child.pidfd.clone();
                Box::new(move || {
                    let _ = pidfd.send_signal(nix::libc::SIGKILL);
                })
            },
        };
        if let Some(master) = p.terminal {
            let (rx, tx, ctl) = terminal_ends(master)?;
            s.stdout = Some(Box::new(rx));
            s.stdin = Some(Box::new(tx));
            s.resize = Some(Box::new(move |w, h| {
                use std::os::fd::AsFd;
                let _ = aurae_sys::pty::set_window_size(ctl.as_fd(), w, h);
            }));
        }
        if let Some(fd) = p.stdout {
            s.stdout = Some(Box::new(Receiver::from_owned_fd(fd)?));
        }
        if let Some(fd) = p.stderr {
            s.stderr = Some(Box::new(Receiver::from_owned_fd(fd)?));
        }
        if let Some(fd) = p.stdin {
            s.stdin = Some(Box::new(Sender::from_owned_fd(fd)?));
        }
        Ok(s)
    }
}

/// The end of an interactive exec's input: its stdin pipe is closed; a terminal gets its
/// EOF character (and stays open: its output goes on).
pub async fn end_of_input(stdin: &mut Option<Write>, tty: bool) {
    use tokio::io::AsyncWriteExt;
    if tty {
        if let Some(w) = stdin.as_mut() {
            let _ = w.write_all(&[4]).await;
        }
    } else {
        *stdin = None;
    }
}

/// A terminal's master side as tokio reads and writes it (non-blocking, one description
/// shared by the three fds): its output, its input, and the fd its size is set on.
fn terminal_ends(
    master: OwnedFd,
) -> std::io::Result<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
    OwnedFd,
)> {
    use tokio::net::unix::pipe::{Receiver, Sender};
    let fl = rustix::fs::fcntl_getfl(&master)?;
    rustix::fs::fcntl_setfl(&master, fl | rustix::fs::OFlags::NONBLOCK)?;
    // Not a pipe, but a character device tokio's pipe types read and write alike.
    let rx = Receiver::from_owned_fd_unchecked(master.try_clone()?)?;
    let tx = Sender::from_owned_fd_unchecked(master.try_clone()?)?;
    Ok((rx, tx, master))
}
