//! An interactive exec as the side that talks to its user sees it, wherever the command
//! runs: its output to read, its input to write, its terminal's size to set, its end to
//! wait for, and a way to kill it. The CRI streaming server copies a [`Session`] to and
//! from kubelet's SPDY connection; `Executables/ExecStream` copies one to and from a gRPC
//! stream. [`Session::local`] is a command of this auraed; a session in an instance is
//! built over that instance's `ExecStream` (`cri::place`).

use std::{future::Future, os::fd::OwnedFd, pin::Pin, sync::Arc};

use aurae_sys::ExitStatus;

use super::exec::ExecProcess;
use crate::{executable::Executable, workload::WorkloadError};

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
    /// Ends it as its user goes away: an exec's command is killed; an attach lets go of
    /// its ends (the executable runs on, see `detaches`).
    pub kill: Box<dyn FnOnce() + Send>,
    /// An attach to an executable's own stdio: its user leaving detaches (the executable
    /// runs on and its end is not waited for), and the end of its user's input is only
    /// the end of this attach's writing (no EOF character into a terminal).
    pub detaches: bool,
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
            detaches: false,
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

impl Session {
    /// Attaches to the running executable `exe` (an exited one only with `from`): its
    /// output from byte `from` of its log (None: from now) until its output ends, its input when `stdin` (it must have been
    /// started with one), its terminal's size. With `stdin_once`, its stdin is closed
    /// when this attach's input ends or this attach goes.
    pub fn attach(
        exe: Arc<Executable>,
        stdin: bool,
        from: Option<u64>,
    ) -> Result<Self, WorkloadError> {
        let id = format!("{}/{}", exe.cell, exe.name);
        // An exited one is attached to only for its output from an offset (a client that
        // started it and attaches from its first byte, after a quick exit): then its
        // input goes nowhere.
        let exited = exe.exited();
        if exited && from.is_none() {
            return Err(WorkloadError::Precondition(format!(
                "executable {id} has exited: there is nothing to attach to"
            )));
        }
        let input = exe.input.clone();
        let writer = if stdin {
            let closed = || {
                WorkloadError::Precondition(format!(
                    "executable {id}'s stdin was closed (it was started stdin_once and an attach to it has ended, or it has exited)"
                ))
            };
            let Some(i) = &input else {
                if exe.interactive.any() && !exited {
                    return Err(closed());
                }
                return Err(WorkloadError::Invalid(crate::spec::FieldError::new(
                    "stdin",
                    format!(
                        "executable {id} was started without an input of its own (interactive.stdin or tty)"
                    ),
                )));
            };
            match i.writer().map_err(WorkloadError::io)? {
                Some(fd) => {
                    let tx = crate::workload::output::sender(fd).map_err(WorkloadError::io)?;
                    // stdin_once: this attach's end closes it (recorded now, so a restart
                    // in between closes it too).
                    let close = (i.once && !i.tty).then(|| {
                        i.claim();
                        CloseOnDrop(i.clone())
                    });
                    Some(Box::new(AttachInput { tx, _close: close }) as Write)
                }
                None if exited => None,
                None => return Err(closed()),
            }
        } else {
            None
        };
        let tty = input.as_ref().is_some_and(|i| i.tty);
        let (out_r, out_w) = tokio::io::duplex(64 << 10);
        let (err_r, err_w) = tokio::io::duplex(64 << 10);
        let log = exe.log.clone();
        let from = from.unwrap_or_else(|| log.subscribe().borrow().0);
        let following = tokio::spawn(follow(log, from, out_w, (!tty).then_some(err_w)));
        let waited = exe.clone();
        Ok(Self {
            stdout: Some(Box::new(out_r)),
            stderr: (!tty).then(|| Box::new(err_r) as Read),
            stdin: writer,
            resize: input.filter(|i| i.tty).map(|i| {
                Box::new(move |w, h| i.resize(w, h)) as Box<dyn Fn(u16, u16) + Send + Sync>
            }),
            exit: Box::pin(async move { waited.wait(None).await.and_then(|e| e.status) }),
            kill: Box::new(move || following.abort()),
            detaches: true,
            what: format!("attach to {id}"),
        })
    }
}

/// Closes an executable's stdin when dropped (an attach to one started `stdin_once`).
struct CloseOnDrop(Arc<crate::executable::Input>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// An attach's writer into the executable's input.
struct AttachInput {
    tx: tokio::net::unix::pipe::Sender,
    _close: Option<CloseOnDrop>,
}

impl tokio::io::AsyncWrite for AttachInput {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tx).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}

/// Copies a log from `from` into the attach's output ends (stderr's chunks into `err`, or
/// into `out` when there is none) until the log is closed and read, or the attach goes.
async fn follow(
    log: Arc<crate::workload::log::Log>,
    from: u64,
    mut out: tokio::io::DuplexStream,
    mut err: Option<tokio::io::DuplexStream>,
) {
    use crate::workload::log::Stream;
    use tokio::io::AsyncWriteExt;
    let mut next = from;
    let mut updates = log.subscribe();
    loop {
        // Closed before reading: this read then holds everything (as Logs does).
        let closed = updates.borrow_and_update().1;
        let (chunks, _) = log.read_from(next);
        for c in chunks {
            next = c.offset + c.data.len() as u64;
            let to = match (&mut err, c.stream) {
                (Some(e), Stream::Stderr) => e,
                _ => &mut out,
            };
            if to.write_all(&c.data).await.is_err() {
                return;
            }
        }
        if closed || updates.changed().await.is_err() {
            return;
        }
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
/// shared by the three fds: `workload::output`'s reader and writer): its output, its
/// input, and the fd its size is set on.
fn terminal_ends(
    master: OwnedFd,
) -> std::io::Result<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
    OwnedFd,
)> {
    use crate::workload::output::{receiver, sender};
    Ok((
        receiver(master.try_clone()?)?,
        sender(master.try_clone()?)?,
        master,
    ))
}
