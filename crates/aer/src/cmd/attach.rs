//! `aer run` and `aer run-cell` in the foreground, like `podman run` or
//! `systemd-run --wait --pipe`: the workload's stdout and stderr are copied live to aer's
//! own, aer waits for its end and exits with its exit code (128+N when signal N killed it).
//! Ctrl-C or SIGTERM to aer stops the workload (Executables/Stop: SIGTERM, the grace
//! period, SIGKILL) and aer keeps waiting for it; a second one kills it at once (SIGKILL).
//! `--rm` frees what the command created once the workload has ended. aer's own failures
//! (bad flags, auraed unreachable, an RPC error) exit [`AER_FAILED`] (125, as podman).
//!
//! The output comes from Executables/Logs with `follow` from offset 0, so nothing written
//! before the stream opened is lost. auraed ends that stream once the process's stdout and
//! stderr pipes both reach EOF and everything read from them was sent: normally right
//! after the process exits. A process it started in the background can keep the pipes
//! open after it has exited; aer then stops following [`OPEN_OUTPUT_IDLE`] after the last
//! output (at most [`OPEN_OUTPUT_MAX`] after the exit), copies what auraed holds up to
//! that moment, and says so on stderr.

use std::{
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::{Args, CommandFactory};
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tonic::{Code, Status};

use super::phase;
use crate::{
    output::{Format, print},
    units::{parse_duration, proto_duration},
};

/// aer's exit code when aer itself failed (as `podman run`): any other code is the
/// workload's.
pub const AER_FAILED: u8 = 125;

/// After the workload has exited, how long aer keeps following output that is still open
/// with nothing new on it.
pub const OPEN_OUTPUT_IDLE: Duration = Duration::from_secs(2);
/// After the workload has exited, the longest aer follows output that is still open.
pub const OPEN_OUTPUT_MAX: Duration = Duration::from_secs(10);
/// The longest grace period auraed accepts for a stop.
const MAX_STOP_GRACE: Duration = Duration::from_secs(600);
/// Each Wait call asks auraed for at most this long (auraed bounds a call to 11 minutes);
/// aer asks again until the workload has ended.
const WAIT_SLICE: Duration = Duration::from_secs(300);

/// What `aer run --help` and `aer run-cell --help` say after the options.
pub const AFTER_HELP: &str = "\
In the foreground (without -d), the workload's stdout and stderr go to aer's, and aer exits \
with its exit code: 128+N when signal N killed it, 125 when aer itself failed (bad flags, \
auraed unreachable, an RPC error). Ctrl-C or SIGTERM stops the workload (SIGTERM, then SIGKILL \
after --stop-grace) and aer waits for its end; a second Ctrl-C kills it at once.

Examples:
  aer run --cell web --rm -- /bin/sh -c 'echo hi; exit 3'     # prints hi, exits 3
  aer run-cell job --rm --image 127.0.0.1:5000/aurae/busybox:latest -- echo hi
  aer run-cell batch -d --rm --image 127.0.0.1:5000/aurae/busybox:latest -- sleep 5
                                                              # freed by auraed at its end
  id=$(aer run -d --cell web --name api -- /srv/api)          # prints web/api";

/// The foreground options `aer run` and `aer run-cell` share.
#[derive(Debug, Default, Args)]
pub struct AttachArgs {
    /// Detach: return once it has started, printing its id (CELL/NAME; with -o json also
    /// its cell, name and pid) instead of streaming its output and waiting for its end.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Once the workload has ended (also after Ctrl-C or an aer error), free what this
    /// command created: for `aer run` the executable and its log, for `aer run-cell` the
    /// whole cell. With -d auraed frees it when it ends (free on exit, the call's
    /// run.remove): its output is gone with it.
    #[arg(long)]
    pub rm: bool,
    /// On Ctrl-C or SIGTERM to aer: how long the workload has after its SIGTERM before it is
    /// killed: a number with ms, s, m or h (plain = seconds), at most 10m, e.g. 30s
    /// [default: auraed's, 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "detach")]
    pub stop_grace: Option<Duration>,
}

impl AttachArgs {
    /// `--stop-grace` within auraed's bound.
    fn check_grace(&self) -> Result<(), Status> {
        match self.stop_grace {
            Some(g) if g > MAX_STOP_GRACE => Err(Status::invalid_argument(format!(
                "--stop-grace {g:?}: at most 10m (auraed's longest grace period)"
            ))),
            _ => Ok(()),
        }
    }

    /// The call's run options: with `-d --rm`, auraed frees it at its end (in the
    /// foreground aer frees it itself once it has shown the whole output).
    pub fn run_options(&self) -> Option<pb::RunOptions> {
        (self.detach && self.rm).then(|| pb::RunOptions {
            remove: true,
            ..Default::default()
        })
    }
}

/// What the command created, for `--rm`.
#[derive(Debug, Clone)]
pub enum Made {
    /// `aer run`: an executable in an existing cell.
    Executable,
    /// `aer run-cell`: a cell of its own (freeing it frees its executable), and when
    /// auraed created it (a cell of that name created at another time is not aer's).
    Cell(String, Option<prost_types::Timestamp>),
}

/// A workload that was started: its executable and what to free for `--rm`.
#[derive(Debug)]
pub struct Started {
    pub exe: pb::ExecutableStatus,
    pub made: Made,
    /// For a container: its image's manifest digest.
    pub image_digest: String,
}

/// Runs one `aer run` / `aer run-cell`: `create` starts the workload; then either print its
/// id (`-d`) or attach to it. Returns the exit code aer ends with.
pub async fn launch(
    c: &Client,
    a: &AttachArgs,
    fmt: Format,
    create: impl Future<Output = Result<Started, Status>>,
) -> ExitCode {
    if let Err(e) = a.check_grace() {
        return failed(&e);
    }
    // Installed before anything is created: a Ctrl-C from now on stops the workload
    // (once it exists) instead of killing aer and leaving it behind.
    let mut signals = if a.detach {
        None
    } else {
        match Signals::install_or_report() {
            Ok(s) => Some(s),
            Err(code) => return code,
        }
    };
    let started = match create.await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let Some(signals) = signals.as_mut() else {
        print_started(fmt, &started);
        return ExitCode::SUCCESS;
    };
    let exe = pb::ExecutableRef {
        cell: started.exe.cell.clone(),
        name: started.exe.name.clone(),
    };
    let id = format!("{}/{}", exe.cell, exe.name);
    let code = match attach(c, &exe, a.stop_grace, signals).await {
        Ok(status) => {
            let (code, note) = workload_exit(&status);
            if let Some(note) = note {
                eprintln!("aer: {id} {note}");
            }
            code
        }
        Err(e) => {
            report(&e);
            if !a.rm {
                eprintln!(
                    "aer: {id} may still be running: `aer executable logs {id} -f`, \
                     `aer executable stop {id}`"
                );
            }
            AER_FAILED
        }
    };
    if a.rm
        && let Err(e) = remove(c, &started, a.stop_grace).await
    {
        let what = match &started.made {
            Made::Executable => format!("executable {id}"),
            Made::Cell(cell, _) => format!("cell {cell}"),
        };
        eprintln!(
            "aer: --rm: could not free {what}: {:?}: {}",
            e.code(),
            e.message()
        );
    }
    ExitCode::from(code)
}

/// `aer run -i` / `-t` in the foreground: starts it with its input kept (and its
/// terminal), attaches to its own stdio from its first byte (aer's stdin to it, aer's end
/// of input its stdin's end), exits with its exit code; `--rm` frees it once it ended.
/// Ctrl-C or SIGTERM to aer (without a terminal in raw mode) stops it as `aer run` does
/// (a second kills it) and aer waits for its end. `-t` with `-i` needs aer's stdin to be
/// a terminal (as `docker run -it`): a pipe has no end a terminal could pass on.
pub async fn interactive(
    c: &Client,
    exe: Result<pb::Executable, Status>,
    a: &AttachArgs,
    stdin: bool,
    tty: bool,
) -> ExitCode {
    if let Err(e) = super::exec::refuse_piped_tty(stdin, tty).and_then(|()| a.check_grace()) {
        return failed(&e);
    }
    let mut signals = match Signals::install_or_report() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let started = async { Ok::<_, Status>(c.runtime().run_executable(exe?).await?.into_inner()) };
    let exe = match started.await {
        Ok(e) => e,
        Err(e) => return failed(&e),
    };
    let r = pb::ExecutableRef {
        cell: exe.cell.clone(),
        name: exe.name.clone(),
    };
    let id = format!("{}/{}", r.cell, r.name);
    let attached = super::exec::attach_to(c, r.clone(), stdin, tty, Some(0));
    tokio::pin!(attached);
    let mut interrupts = 0u32;
    let result = loop {
        tokio::select! {
            res = &mut attached => break res,
            sig = signals.recv() => {
                interrupts += 1;
                forward(c, &r, &id, sig, interrupts, a.stop_grace);
            }
        }
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::from(AER_FAILED)
        }
    };
    if a.rm {
        let started = Started {
            image_digest: exe.image_digest.clone(),
            exe,
            made: Made::Executable,
        };
        if let Err(e) = remove(c, &started, a.stop_grace).await {
            eprintln!(
                "aer: --rm: could not free {id}: {:?}: {}",
                e.code(),
                e.message()
            );
        }
    }
    code
}

/// An error of aer's own (before or around the workload): reported, exit 125.
pub fn failed(e: &Status) -> ExitCode {
    report(e);
    ExitCode::from(AER_FAILED)
}

fn report(e: &Status) {
    eprintln!("aer: {:?}: {}", e.code(), e.message());
}

/// `-d`: the executable's id alone (a script's `$(aer run -d …)`), or in JSON its id, cell,
/// name, pid and phase (and a container's image digest).
fn print_started(fmt: Format, s: &Started) {
    let id = format!("{}/{}", s.exe.cell, s.exe.name);
    match fmt {
        Format::Table => println!("{id}"),
        Format::Json => {
            let mut row = vec![
                ("id", json!(id)),
                ("cell", json!(s.exe.cell)),
                ("name", json!(s.exe.name)),
                ("pid", json!(s.exe.pid)),
                ("phase", phase(s.exe.phase)),
            ];
            if !s.image_digest.is_empty() {
                row.push(("image_digest", json!(s.image_digest)));
            }
            print(fmt, &[row], true);
        }
    }
}

/// SIGINT and SIGTERM to aer while it is attached.
#[derive(Debug)]
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// [`Signals::install`], a failure reported (aer then exits 125).
    fn install_or_report() -> Result<Self, ExitCode> {
        Self::install().map_err(|e| {
            eprintln!("aer: cannot handle SIGINT/SIGTERM: {e}");
            ExitCode::from(AER_FAILED)
        })
    }

    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The next one that arrives: its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = self.int.recv() => "SIGINT",
            Some(()) = self.term.recv() => "SIGTERM",
            // Only when the signal driver is gone: nothing more will come.
            else => std::future::pending().await,
        }
    }
}

/// Copies the executable's output to aer's stdout and stderr until it has ended and its
/// output is complete; forwards Ctrl-C / SIGTERM. Returns its final status.
async fn attach(
    c: &Client,
    exe: &pb::ExecutableRef,
    grace: Option<Duration>,
    signals: &mut Signals,
) -> Result<pb::ExecutableStatus, Status> {
    let id = format!("{}/{}", exe.cell, exe.name);
    let mut out = Copier::default();
    let r = follow(c, exe, &id, grace, signals, &mut out).await;
    if out.lost > 0 {
        eprintln!(
            "aer: {} bytes of {id}'s output were lost: auraed keeps the newest 1 MiB of it and \
             it wrote faster than aer read",
            out.lost
        );
    }
    r
}

async fn follow(
    c: &Client,
    exe: &pb::ExecutableRef,
    id: &str,
    grace: Option<Duration>,
    signals: &mut Signals,
    out: &mut Copier,
) -> Result<pb::ExecutableStatus, Status> {
    // Freed by someone else already (it can end, be seen ended and be freed before this
    // first call): its end was not seen here either.
    let mut logs = Some(
        open_logs(c, exe, 0, true)
            .await
            .map_err(|e| freed_before_end(e, id))?,
    );
    let wait = wait_end(c.executables(), exe.clone());
    tokio::pin!(wait);
    let mut ended: Option<pb::ExecutableStatus> = None;
    // Once it has ended: when to stop following output that is still open, and whether it
    // was followed again already (see below).
    let mut give_up = Instant::now();
    let mut cap = Instant::now();
    let mut refollowed = false;
    let mut interrupts = 0u32;
    loop {
        if ended.is_some() && logs.is_none() {
            break;
        }
        tokio::select! {
            m = next_chunk(&mut logs), if logs.is_some() => match m {
                Ok(Some(chunk)) => {
                    out.write(&chunk);
                    if ended.is_some() {
                        give_up = (Instant::now() + OPEN_OUTPUT_IDLE).min(cap);
                    }
                }
                Ok(None) => logs = None,
                Err(e) if freed_after_end(&e, &ended, id) => logs = None,
                Err(e) => return Err(freed_before_end(e, id)),
            },
            r = &mut wait, if ended.is_none() => {
                ended = Some(r.map_err(|e| freed_before_end(e, id))?);
                cap = Instant::now() + OPEN_OUTPUT_MAX;
                give_up = Instant::now() + OPEN_OUTPUT_IDLE;
            }
            () = tokio::time::sleep_until(give_up.into()), if ended.is_some() => {
                if refollowed {
                    logs = None;
                    match drain(c, exe, out).await {
                        Ok(()) => eprintln!(
                            "aer: {id} has ended but its output is still open (a process it \
                             started holds it); not following it further: \
                             `aer executable logs {id} -f`"
                        ),
                        Err(e) if freed_after_end(&e, &ended, id) => {}
                        Err(e) => return Err(e),
                    }
                } else {
                    // A stream can stall once the output has closed while auraed was still
                    // sending what came before; a fresh one from where the copy stands ends
                    // as soon as it has sent the rest, unless the output is really open.
                    match open_logs(c, exe, out.next, true).await {
                        Ok(l) => logs = Some(l),
                        Err(e) if freed_after_end(&e, &ended, id) => logs = None,
                        Err(e) => return Err(e),
                    }
                    refollowed = true;
                    give_up = Instant::now() + OPEN_OUTPUT_IDLE;
                }
            }
            sig = signals.recv() => {
                if ended.is_some() {
                    // Ended, only its output is still open: stop following it.
                    logs = None;
                    eprintln!("aer: {sig}: not following {id}'s output further");
                } else {
                    interrupts += 1;
                    forward(c, exe, id, sig, interrupts, grace);
                }
            }
        }
    }
    ended.ok_or_else(|| Status::internal("the executable's end was not seen"))
}

/// Whether `e` says the executable is gone after aer saw it end (someone freed it while aer
/// still copied output a process it started held open): then there is nothing more to
/// copy, and its end is known. Says so on stderr.
fn freed_after_end(e: &Status, ended: &Option<pb::ExecutableStatus>, id: &str) -> bool {
    let gone = e.code() == Code::NotFound && ended.is_some();
    if gone {
        eprintln!(
            "aer: {id} was freed by someone else after it ended; not following its output further"
        );
    }
    gone
}

/// A NotFound before aer saw the end: someone freed the executable (its status with it)
/// under aer; said as such, and that aer will not free what may now use the name.
fn freed_before_end(e: Status, id: &str) -> Status {
    if e.code() == Code::NotFound {
        Status::not_found(format!(
            "{id} was freed by someone else before aer saw its end: its exit status is \
             unknown; not freeing it"
        ))
    } else {
        e
    }
}

/// Executables/Logs of `exe` from byte `from`.
async fn open_logs(
    c: &Client,
    exe: &pb::ExecutableRef,
    from: u64,
    follow: bool,
) -> Result<tonic::Streaming<pb::LogChunk>, Status> {
    let req = pb::ExecutableLogsRequest {
        executable: Some(exe.clone()),
        follow,
        from_offset: from,
    };
    Ok(c.executables().logs(req).await?.into_inner())
}

/// The next chunk of a log stream that is open.
async fn next_chunk(
    s: &mut Option<tonic::Streaming<pb::LogChunk>>,
) -> Result<Option<pb::LogChunk>, Status> {
    match s {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// What is in the log from where the copy stands, without following.
async fn drain(c: &Client, exe: &pb::ExecutableRef, out: &mut Copier) -> Result<(), Status> {
    let mut s = open_logs(c, exe, out.next, false).await?;
    while let Some(chunk) = s.message().await? {
        out.write(&chunk);
    }
    Ok(())
}

/// Ctrl-C or SIGTERM to aer: the first stops the workload (in the background: aer keeps
/// copying its output and waiting for its end), the next ones kill it.
fn forward(
    c: &Client,
    exe: &pb::ExecutableRef,
    id: &str,
    sig: &str,
    nth: u32,
    grace: Option<Duration>,
) {
    let mut x = c.executables();
    let exe = exe.clone();
    let id = id.to_owned();
    if nth == 1 {
        let after = grace.map_or_else(|| "auraed's grace period".into(), |g| format!("{g:?}"));
        eprintln!(
            "aer: {sig}: stopping {id} (SIGTERM, SIGKILL after {after}); again to kill it now"
        );
        let req = pb::StopExecutableRequest {
            executable: Some(exe),
            grace_period: grace.map(proto_duration),
        };
        tokio::spawn(async move {
            if let Err(e) = x.stop(req).await {
                eprintln!("aer: stopping {id}: {:?}: {}", e.code(), e.message());
            }
        });
    } else {
        eprintln!("aer: {sig}: killing {id} (SIGKILL)");
        let req = pb::SignalExecutableRequest {
            executable: Some(exe),
            signal: 9,
        };
        tokio::spawn(async move {
            match x.signal(req).await {
                // It ended meanwhile: nothing to kill.
                Err(e) if e.code() == Code::FailedPrecondition => {}
                Err(e) => eprintln!("aer: killing {id}: {:?}: {}", e.code(), e.message()),
                Ok(_) => {}
            }
        });
    }
}

/// Waits (slice after slice) until the executable has ended.
async fn wait_end(
    mut x: pb::executables_client::ExecutablesClient<tonic::transport::Channel>,
    exe: pb::ExecutableRef,
) -> Result<pb::ExecutableStatus, Status> {
    loop {
        let req = pb::WaitExecutableRequest {
            executable: Some(exe.clone()),
            timeout: Some(proto_duration(WAIT_SLICE)),
        };
        match x.wait(req).await {
            Ok(s) => return Ok(s.into_inner()),
            Err(e) if e.code() == Code::DeadlineExceeded => {}
            Err(e) => return Err(e),
        }
    }
}

/// Copies log chunks to stdout / stderr in order, and counts what was lost.
#[derive(Debug, Default)]
struct Copier {
    /// The log offset just after what was copied.
    next: u64,
    /// Bytes skipped: auraed keeps a bounded log, and a reader that fell far behind finds
    /// the oldest of what it has not read yet rotated away.
    lost: u64,
}

impl Copier {
    /// What of `chunk` is new (overlap with what was copied is not printed twice); a gap
    /// before it (rotated away) counts as lost.
    fn admit<'a>(&mut self, chunk: &'a pb::LogChunk) -> &'a [u8] {
        self.lost += chunk.offset.saturating_sub(self.next);
        let skip = usize::try_from(self.next.saturating_sub(chunk.offset))
            .unwrap_or(usize::MAX)
            .min(chunk.data.len());
        self.next = self.next.max(chunk.offset + chunk.data.len() as u64);
        &chunk.data[skip..]
    }

    fn write(&mut self, chunk: &pb::LogChunk) {
        let data = self.admit(chunk);
        // A closed stdout (`aer run … | head -1`) is not aer's failure: the workload runs
        // on, and aer still waits for its exit code.
        if chunk.stream == pb::LogStream::Stderr as i32 {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(data);
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(data);
            let _ = o.flush();
        }
    }
}

/// aer's exit code for how the workload ended, and a note for stderr: the exit code itself,
/// 128+N when signal N killed it (with the signal's name, or `(OOM)` when the OOM killer
/// did it), 125 when auraed does not know how it ended.
pub fn workload_exit(s: &pb::ExecutableStatus) -> (u8, Option<String>) {
    let Some(e) = &s.exit else {
        let why = if s.message.is_empty() {
            String::new()
        } else {
            format!(": {}", s.message)
        };
        return (AER_FAILED, Some(format!("ended with no exit status{why}")));
    };
    match e.how {
        Some(pb::exit_status::How::Code(c)) => {
            let code = u8::try_from(c).unwrap_or(AER_FAILED);
            let note = e
                .oom_killed
                .then(|| format!("exited with code {c}; the OOM killer ran in its cell"));
            (code, note)
        }
        Some(pb::exit_status::How::Signal(n)) => {
            let code = u8::try_from(128 + n.clamp(0, 127)).unwrap_or(u8::MAX);
            let what = if e.oom_killed {
                "OOM".to_owned()
            } else {
                signal_name(n).map_or_else(|| format!("signal {n}"), str::to_owned)
            };
            (code, Some(format!("killed by signal {n} ({what})")))
        }
        None => (
            AER_FAILED,
            Some("ended; auraed does not know how (it restarted while it ran)".into()),
        ),
    }
}

fn signal_name(n: i32) -> Option<&'static str> {
    Some(match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return None,
    })
}

/// Why what auraed now holds under the name is not what aer created (`None`: it is): the
/// name was freed and used again meanwhile (by another client, or another aer), so `--rm`
/// must leave it alone. `then` is when aer's own was started or created.
fn replaced(
    what: &str,
    then: Option<&prost_types::Timestamp>,
    now: Option<&prost_types::Timestamp>,
) -> Option<String> {
    (then != now).then(|| {
        format!(
            "{what} was freed and created again by someone else meanwhile (started {}, not {}); \
             not freeing it",
            now.map_or_else(|| "?".into(), |t| crate::time::rfc3339(t.seconds, t.nanos)),
            then.map_or_else(|| "?".into(), |t| crate::time::rfc3339(t.seconds, t.nanos)),
        )
    })
}

/// `--rm`: frees the executable (stopping it first if an aer error left it running) or
/// the whole cell (Cells/Free kills what is left) — only while the name still holds what
/// aer created (checked just before: another client may have freed it and used the name
/// again; auraed has no conditional free, so a window of one round trip remains).
async fn remove(c: &Client, started: &Started, grace: Option<Duration>) -> Result<(), Status> {
    let exe = pb::ExecutableRef {
        cell: started.exe.cell.clone(),
        name: started.exe.name.clone(),
    };
    match &started.made {
        Made::Cell(cell, created_at) => {
            let name = pb::NameRef { name: cell.clone() };
            let mut cells = c.cells();
            let now = match cells.get(name.clone()).await {
                Ok(s) => s.into_inner(),
                // Freed already (by someone else): nothing of aer's is left.
                Err(e) if e.code() == Code::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if let Some(why) = replaced(
                &format!("cell {cell}"),
                created_at.as_ref(),
                now.created_at.as_ref(),
            ) {
                return Err(Status::failed_precondition(why));
            }
            cells.free(name).await?;
        }
        Made::Executable => {
            let mut x = c.executables();
            let now = match x.get(exe.clone()).await {
                Ok(s) => s.into_inner(),
                Err(e) if e.code() == Code::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if let Some(why) = replaced(
                &format!("executable {}/{}", exe.cell, exe.name),
                started.exe.started_at.as_ref(),
                now.started_at.as_ref(),
            ) {
                return Err(Status::failed_precondition(why));
            }
            match x.free(exe.clone()).await {
                Err(e) if e.code() == Code::FailedPrecondition => {
                    x.stop(pb::StopExecutableRequest {
                        executable: Some(exe.clone()),
                        grace_period: grace.map(proto_duration),
                    })
                    .await?;
                    x.free(exe.clone()).await?;
                }
                r => {
                    r?;
                }
            }
        }
    }
    Ok(())
}

/// A command line clap refused (or `--help` / `--version`): printed, and the exit code:
/// for `aer run` / `aer run-cell` 125 (aer's own failure, as podman), else clap's own.
pub fn refused(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    let code = if e.use_stderr() && launches(std::env::args_os()) {
        AER_FAILED
    } else {
        u8::try_from(e.exit_code()).unwrap_or(2)
    };
    ExitCode::from(code)
}

/// Whether the command line is `aer run …` or `aer run-cell …` (read leniently: it may be
/// one clap refused).
fn launches(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    crate::cli::Args::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()
        .is_some_and(|m| matches!(m.subcommand_name(), Some("run" | "run-cell")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(how: Option<pb::exit_status::How>, oom_killed: bool) -> pb::ExecutableStatus {
        pb::ExecutableStatus {
            exit: Some(pb::ExitStatus {
                how,
                oom_killed,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_are_the_workloads_or_128_plus_the_signal() {
        use pb::exit_status::How;
        assert_eq!(workload_exit(&ended(Some(How::Code(0)), false)), (0, None));
        assert_eq!(workload_exit(&ended(Some(How::Code(3)), false)), (3, None));
        assert_eq!(workload_exit(&ended(Some(How::Code(255)), false)).0, 255);
        let (code, note) = workload_exit(&ended(Some(How::Signal(15)), false));
        assert_eq!(code, 143);
        assert_eq!(note.unwrap(), "killed by signal 15 (SIGTERM)");
        let (code, note) = workload_exit(&ended(Some(How::Signal(9)), true));
        assert_eq!(code, 137);
        assert_eq!(note.unwrap(), "killed by signal 9 (OOM)");
        assert_eq!(workload_exit(&ended(Some(How::Signal(2)), false)).0, 130);
        let (code, note) = workload_exit(&ended(Some(How::Signal(40)), false));
        assert_eq!(
            (code, note.unwrap().as_str()),
            (168, "killed by signal 40 (signal 40)")
        );
        let (_, note) = workload_exit(&ended(Some(How::Code(1)), true));
        assert!(note.unwrap().contains("OOM killer"));
        // Unknown endings are aer's 125, never a made-up workload code.
        assert_eq!(workload_exit(&ended(None, false)).0, AER_FAILED);
        assert_eq!(
            workload_exit(&pb::ExecutableStatus::default()).0,
            AER_FAILED
        );
    }

    #[test]
    fn the_copier_skips_overlap_and_counts_gaps() {
        let mut c = Copier::default();
        let chunk = |offset: u64, data: &[u8], dropped: u64| pb::LogChunk {
            offset,
            data: data.to_vec(),
            dropped,
            ..Default::default()
        };
        let a = chunk(0, b"hello ", 0);
        assert_eq!(c.admit(&a), b"hello ");
        assert_eq!(c.next, 6);
        // A drain from offset 6 that auraed cut mid-chunk, then one overlapping.
        let b = chunk(6, b"world\n", 0);
        assert_eq!(c.admit(&b), b"world\n");
        let overlap = chunk(9, b"ld\nmore", 0);
        assert_eq!(c.admit(&overlap), b"more");
        assert_eq!(c.next, 16);
        let old = chunk(0, b"hello ", 0);
        assert_eq!(c.admit(&old), b"", "nothing twice");
        assert_eq!((c.next, c.lost), (16, 0), "and never backwards");
        // Gaps (rotated away) are lost, counted from the offsets; a chunk's `dropped`
        // (auraed's count of the same gap; older auraed repeated it on every chunk of a
        // batch) is not added again.
        assert_eq!(c.admit(&chunk(20, b"x", 4)), b"x");
        assert_eq!(c.admit(&chunk(21, b"y", 4)), b"y");
        assert_eq!(c.admit(&chunk(100, b"z", 83)), b"z");
        assert_eq!((c.next, c.lost), (101, 4 + 78));
    }

    #[test]
    fn rm_leaves_a_name_that_was_used_again() {
        let t = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        let mine = t(1_700_000_000, 5);
        assert_eq!(replaced("cell job", Some(&mine), Some(&mine)), None);
        let why = replaced("cell job", Some(&mine), Some(&t(1_700_000_000, 6))).unwrap();
        assert!(
            why.starts_with("cell job was freed and created again"),
            "{why}"
        );
        assert!(why.ends_with("not freeing it"), "{why}");
        assert!(replaced("executable c/x", Some(&mine), None).is_some());
        assert!(replaced("executable c/x", None, Some(&mine)).is_some());
    }

    #[test]
    fn run_and_run_cell_are_recognised_even_when_refused() {
        let argv = |line: &str| {
            std::iter::once("aer")
                .chain(line.split_whitespace())
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        assert!(launches(argv("run -- /bin/true")), "missing --cell");
        assert!(launches(argv("--socket /s run --cell c --bogus")));
        assert!(launches(argv("-o json run-cell --image x")), "missing name");
        assert!(launches(argv("run-cell web --image i --rm -d")));
        assert!(!launches(argv("cell allocate")));
        assert!(!launches(argv("executable wait")));
        assert!(!launches(argv("bogus run")));
    }
}
