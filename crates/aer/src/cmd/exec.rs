//! `aer exec CELL/NAME -- COMMAND…`: a command inside a running container executable, as
//! `kubectl exec` and `docker exec` run one (Executables/ExecStream): its output copied live
//! to aer's stdout and stderr, aer's stdin to it with `-i`, a pseudo-terminal with `-t`
//! (aer's own terminal in raw mode while it runs, its size following aer's), and aer's
//! exit code the command's (128+N when signal N killed it, 125 when it ended without a
//! status). When auraed refuses (no such executable, not a container, denied) aer exits
//! with the code every aer command uses for that answer (2 invalid, 3 not found, 4
//! denied, 6 failed precondition, 7 unavailable). Leaving (Ctrl-C without `-t`, or aer
//! killed) cancels the call, which kills the command.
//!
//! `aer attach [-i] [-t] CELL/NAME` attaches to a running executable's own stdio
//! (Executables/Attach), as `kubectl attach` and `docker attach` do: its output from now
//! on, aer's stdin to it with `-i` (it must have been started with `aer run -i` or `-t`),
//! aer's terminal in raw mode and its size with `-t` (it must have a terminal), and aer's
//! exit code its own once it ends. Leaving (Ctrl-C without `-t`, or aer killed) detaches:
//! it runs on. aer's end of input ends aer's writing (an executable started with
//! `stdin_once`, as `aer run -i` starts one, then reads EOF).

use std::{
    io::{IsTerminal, Read, Write},
    process::ExitCode,
};

use aurae_client::{
    Client,
    session::{InputMessage, with_start},
};
use aurae_proto::runtime::v0 as pb;
use clap::Args;
use pb::{exec_event::What as Ev, exec_input::What as In};
use tokio::sync::mpsc;
use tonic::Status;

use super::{attach::AER_FAILED, executable::ExeRef};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Pass aer's stdin to the command (without it the command's stdin is /dev/null).
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Give the command a pseudo-terminal (its stdout and stderr both on it). With -i and
    /// aer's stdin a terminal, that terminal is in raw mode while the command runs.
    #[arg(short = 't', long)]
    tty: bool,
    #[command(flatten)]
    target: ExeRef,
    /// The command and its arguments, after `--` (looked up in the container's PATH unless
    /// it holds a '/'), e.g. -- sh -c 'echo $HOSTNAME'.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// Runs the command to its end; aer's exit code is its.
pub async fn run(c: &Client, a: ExecArgs) -> Result<ExitCode, Status> {
    let request = pb::ExecRequest {
        executable: Some(a.target.proto()?),
        argv: a.argv,
        timeout: None,
    };
    let size = a.tty.then(terminal_size).flatten();
    let (input, stream) = with_start(pb::ExecInput {
        what: Some(In::Start(pb::ExecStart {
            request: Some(request),
            stdin: a.stdin,
            tty: a.tty,
            size,
        })),
    });
    let events = c.executables().exec_stream(stream).await?.into_inner();
    copy_session(input, events, a.stdin, a.tty).await
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Pass aer's stdin to it (it must have been started with an input: `aer run -i` or
    /// `-t`).
    #[arg(short = 'i', long)]
    stdin: bool,
    /// It has a terminal: aer's terminal in raw mode (with -i) and its size sent.
    #[arg(short = 't', long)]
    tty: bool,
    #[command(flatten)]
    target: ExeRef,
}

/// Attaches until it ends (aer's exit code is its) or aer leaves (it runs on). `-t` with
/// `-i` needs aer's stdin to be a terminal (an attach passes no end of input into a
/// terminal: a pipe's end would go nowhere).
pub async fn attach(c: &Client, a: AttachArgs) -> Result<ExitCode, Status> {
    refuse_piped_tty(a.stdin, a.tty)?;
    attach_to(c, a.target.proto()?, a.stdin, a.tty, None).await
}

/// `-t` with `-i` and aer's stdin not a terminal: refused (as `docker run -it`).
pub fn refuse_piped_tty(stdin: bool, tty: bool) -> Result<(), Status> {
    if stdin && tty && !std::io::stdin().is_terminal() {
        return Err(Status::invalid_argument(
            "-t with -i: aer's stdin is not a terminal (pipe into -i without -t)",
        ));
    }
    Ok(())
}

/// Attaches to `exe` (its output from byte `from` of its log, else from now) until it
/// ends; aer's exit code is its. `aer run -i` attaches this way from 0.
pub async fn attach_to(
    c: &Client,
    exe: pb::ExecutableRef,
    stdin: bool,
    tty: bool,
    from: Option<u64>,
) -> Result<ExitCode, Status> {
    let (input, stream) = with_start(pb::AttachInput {
        what: Some(pb::attach_input::What::Start(pb::AttachStart {
            executable: Some(exe),
            stdin,
            from_offset: from,
            size: tty.then(terminal_size).flatten(),
        })),
    });
    let events = c.executables().attach(stream).await?.into_inner();
    copy_session(input, events, stdin, tty).await
}

/// Copies a started session: aer's stdin to it (with `stdin`), aer's terminal's size
/// (with `tty`, in raw mode while it runs), its output to aer's; aer's exit code its.
async fn copy_session<M: InputMessage>(
    input: mpsc::Sender<M>,
    mut events: tonic::Streaming<pb::ExecEvent>,
    stdin: bool,
    tty: bool,
) -> Result<ExitCode, Status> {
    // Raw mode only once it runs (an error above leaves the terminal as it was).
    let _raw = (tty && stdin && std::io::stdin().is_terminal())
        .then(RawMode::enter)
        .flatten();
    if stdin {
        feed_stdin(input.clone());
    }
    if tty && std::io::stdout().is_terminal() {
        follow_size(input.clone());
    }
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let Some(ev) = events.message().await? else {
            return Err(Status::unavailable(
                "the stream ended without its exit (auraed or the connection went away)",
            ));
        };
        match ev.what {
            Some(Ev::Stdout(d)) => {
                let _ = stdout.write_all(&d).and_then(|()| stdout.flush());
            }
            Some(Ev::Stderr(d)) => {
                let _ = stderr.write_all(&d).and_then(|()| stderr.flush());
            }
            Some(Ev::Exit(e)) => {
                drop(_raw);
                return Ok(ExitCode::from(exit_code(&e)));
            }
            None => {}
        }
    }
}

/// aer's exit code for the command's end: its code, 128+N for signal N, 125 unknown.
fn exit_code(e: &pb::ExitStatus) -> u8 {
    match e.how {
        Some(pb::exit_status::How::Code(c)) => u8::try_from(c).unwrap_or(AER_FAILED),
        Some(pb::exit_status::How::Signal(n)) => {
            u8::try_from(128 + n.clamp(0, 127)).unwrap_or(u8::MAX)
        }
        None => {
            eprintln!("aer: the command ended with no exit status");
            AER_FAILED
        }
    }
}

/// Copies aer's stdin to the session on a thread of its own (a blocking read: the process
/// may end while it waits), then says the input ended.
fn feed_stdin<M: InputMessage>(input: mpsc::Sender<M>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let (msg, last) = match stdin.read(&mut buf) {
                Ok(n) if n > 0 => (M::stdin(buf[..n].to_vec()), false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => (M::close_stdin(), true),
            };
            if input.blocking_send(msg).is_err() || last {
                return;
            }
        }
    });
}

/// aer's terminal's size (columns, rows), when its stdout is one.
fn terminal_size() -> Option<pb::TerminalSize> {
    let (rows, cols) = console::Term::stdout().size_checked()?;
    Some(pb::TerminalSize {
        width: cols.into(),
        height: rows.into(),
    })
}

/// Sends the terminal's new size each time it changes (SIGWINCH).
fn follow_size<M: InputMessage>(input: mpsc::Sender<M>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(sz) = terminal_size()
                && input.send(M::resize(sz)).await.is_err()
            {
                return;
            }
        }
    });
}

/// aer's terminal in raw mode (keys go to the command as typed: Ctrl-C is its, not aer's),
/// restored when dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}
