//! `Executables`: lifecycle of the executables `RunExecutable` started, and their logs.
//! An executable's name is checked against the grant through its cell's name.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, executables_server::Executables};
use tonic::{Request, Response, Status};

use super::{
    authz::Caller,
    convert,
    shared::{ResponseStream, authorized, grace, log_stream, timeout, visible},
    status::{internal, invalid},
};
use crate::{
    cell::{
        Cells,
        exec::ExecStdio,
        session::{Session, end_of_input},
    },
    executable::{Executable, ExecutableRef},
    spec::FieldError,
};

#[derive(Debug, Clone)]
pub struct ExecutablesApi {
    cells: Arc<Cells>,
}

impl ExecutablesApi {
    pub fn new(cells: Arc<Cells>) -> Self {
        Self { cells }
    }

    /// Validates and authorizes an executable reference (the `executable` field).
    fn reference<T>(
        r: &Request<T>,
        er: Option<&pb::ExecutableRef>,
    ) -> Result<ExecutableRef, Status> {
        let parsed = ExecutableRef::parse("executable", er);
        Ok(authorized(r, parsed, |er| er.cell.as_str())?.1)
    }

    /// Validates and authorizes an executable reference, and finds it.
    fn find<T>(
        &self,
        r: &Request<T>,
        er: Option<&pb::ExecutableRef>,
    ) -> Result<Arc<Executable>, Status> {
        Ok(self.cells.executable(&Self::reference(r, er)?)?)
    }
}

#[tonic::async_trait]
impl Executables for ExecutablesApi {
    async fn get(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let e = self.find(&r, Some(r.get_ref()))?;
        Ok(Response::new(convert::executable(&e)))
    }
    async fn list(
        &self,
        r: Request<pb::ListExecutablesRequest>,
    ) -> Result<Response<pb::ListExecutablesResponse>, Status> {
        let show = visible(&r, "cell_prefix", &r.get_ref().cell_prefix)?;
        let executables = self.cells.executables(show);
        Ok(Response::new(pb::ListExecutablesResponse {
            executables: executables.iter().map(|e| convert::executable(e)).collect(),
        }))
    }
    async fn stop(
        &self,
        r: Request<pb::StopExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let g = grace("grace_period", m.grace_period.as_ref()).map_err(invalid)?;
        let e = self.find(&r, m.executable.as_ref())?;
        e.stop(g).await.map_err(internal)?;
        Ok(Response::new(convert::executable(&e)))
    }
    async fn signal(
        &self,
        r: Request<pb::SignalExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        if !(1..=64).contains(&m.signal) {
            let reason = format!("{} is outside 1..=64", m.signal);
            return Err(invalid(FieldError::new("signal", reason)));
        }
        let e = self.find(&r, m.executable.as_ref())?;
        if !e.signal(m.signal).map_err(internal)? {
            return Err(Status::failed_precondition(format!(
                "executable {}/{} has exited: nothing was signalled",
                e.cell, e.name
            )));
        }
        Ok(Response::new(convert::executable(&e)))
    }
    async fn wait(
        &self,
        r: Request<pb::WaitExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let timeout = timeout(m.timeout.as_ref())?;
        let e = self.find(&r, m.executable.as_ref())?;
        match e.wait(timeout).await {
            Some(_) => Ok(Response::new(convert::executable(&e))),
            None => Err(Status::deadline_exceeded(format!(
                "executable {}/{} is still running",
                e.cell, e.name
            ))),
        }
    }
    async fn free(&self, r: Request<pb::ExecutableRef>) -> Result<Response<pb::Freed>, Status> {
        let er = Self::reference(&r, Some(r.get_ref()))?;
        self.cells.free_executable(&er)?;
        let name = format!("{}/{}", er.cell, er.name);
        Ok(Response::new(pb::Freed { name }))
    }
    async fn exec(
        &self,
        r: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let m = r.get_ref();
        exec_argv(&m.argv)?;
        let timeout = crate::spec::duration(
            "timeout",
            m.timeout.as_ref(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(600),
        )
        .map_err(invalid)?;
        let er = Self::reference(&r, m.executable.as_ref())?;
        let may = may_run_as(&r, &er, "which an exec takes")?;
        let out = self
            .cells
            .exec_in(&er, m.argv.clone(), timeout, may)
            .await?;
        Ok(Response::new(pb::ExecResponse {
            exit: Some(crate::events::exit_status(
                Some(out.exit),
                false,
                std::time::SystemTime::now(),
            )),
            stdout: out.stdout,
            stderr: out.stderr,
            truncated: out.truncated,
        }))
    }
    type ExecStreamStream = ResponseStream<pb::ExecEvent>;
    async fn exec_stream(
        &self,
        r: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        let (meta, ext, mut input) = r.into_parts();
        let first = input.message().await?;
        let Some(pb::ExecInput {
            what: Some(pb::exec_input::What::Start(start)),
        }) = first
        else {
            return Err(invalid(FieldError::new(
                "start",
                "the first message must be `start` (what to run and how)",
            )));
        };
        let size = match (start.tty, start.size) {
            (true, Some(sz)) => Some(terminal_size("start.size", &sz)?),
            (false, Some(_)) => {
                return Err(invalid(FieldError::new(
                    "start.size",
                    "is for a terminal: set `tty` too",
                )));
            }
            (_, None) => None,
        };
        let stdio = if start.tty {
            ExecStdio::Terminal
        } else {
            ExecStdio::Pipes { stdin: start.stdin }
        };
        let request = Request::from_parts(meta, ext, start.request.unwrap_or_default());
        let argv = request.get_ref().argv.clone();
        let process = self.exec_streaming(request, stdio).await?;
        let session = Session::local(process).map_err(|e| internal(&e))?;
        if let (Some(resize), Some((w, h))) = (&session.resize, size) {
            resize(w, h);
        }
        tracing::info!(argv = ?argv, session = %session.what, tty = start.tty, "interactive exec started");
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        tokio::spawn(serve_session(session, input, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    type AttachStream = ResponseStream<pb::ExecEvent>;
    async fn attach(
        &self,
        r: Request<tonic::Streaming<pb::AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (meta, ext, mut input) = r.into_parts();
        let first = input.message().await?;
        let Some(pb::AttachInput {
            what: Some(pb::attach_input::What::Start(start)),
        }) = first
        else {
            return Err(invalid(FieldError::new(
                "start",
                "the first message must be `start` (which executable, and whether to write its input)",
            )));
        };
        let request = Request::from_parts(meta, ext, ());
        let (session, size) = self.attach_session(&request, &start)?;
        if let (Some(resize), Some((w, h))) = (&session.resize, size) {
            resize(w, h);
        }
        tracing::info!(session = %session.what, stdin = start.stdin, "attached");
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        tokio::spawn(serve_session(session, input, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    type LogsStream = ResponseStream<pb::LogChunk>;
    async fn logs(
        &self,
        r: Request<pb::ExecutableLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let m = r.get_ref();
        let e = self.find(&r, m.executable.as_ref())?;
        let stream = log_stream(e.log.clone(), m.from_offset, m.follow);
        Ok(Response::new(stream))
    }
    async fn stats(
        &self,
        r: Request<pb::ExecutableRef>,
    ) -> Result<Response<pb::ResourceStats>, Status> {
        let e = self.find(&r, Some(r.get_ref()))?;
        let stats = match self.cells.own_group_stats(&e) {
            // A figure whose controller this host lacks reads 0 from the group: the main
            // process's own (from /proc) stands in for it.
            Some(s) => {
                let (group, own) = (convert::stats(&s), process_stats(&e));
                let or = |g: u64, p: u64| if g == 0 { p } else { g };
                pb::ResourceStats {
                    memory_current_bytes: or(group.memory_current_bytes, own.memory_current_bytes),
                    memory_peak_bytes: or(group.memory_peak_bytes, own.memory_peak_bytes),
                    pids_current: or(group.pids_current, own.pids_current),
                    io_read_bytes: or(group.io_read_bytes, own.io_read_bytes),
                    io_write_bytes: or(group.io_write_bytes, own.io_write_bytes),
                    ..group
                }
            }
            None => process_stats(&e),
        };
        Ok(Response::new(stats))
    }
    async fn update_files(
        &self,
        r: Request<pb::UpdateFilesRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let files = crate::container::spec::parse_files("", &m.files).map_err(|mut e| {
            e.field = e.field.trim_start_matches('.').to_owned();
            invalid(e)
        })?;
        let er = Self::reference(&r, m.executable.as_ref())?;
        let cells = self.cells.clone();
        let e = tokio::task::spawn_blocking(move || cells.update_files(&er, &files))
            .await
            .map_err(|e| Status::internal(format!("update task: {e}")))??;
        Ok(Response::new(convert::executable(&e)))
    }
    async fn update(
        &self,
        r: Request<pb::UpdateExecutableRequest>,
    ) -> Result<Response<pb::ExecutableStatus>, Status> {
        let m = r.get_ref();
        let limits = m.limits.clone().ok_or_else(|| {
            invalid(FieldError::new(
                "limits",
                "is missing: give the limits to write",
            ))
        })?;
        let oom_group = limits.memory_oom_group;
        let update = crate::executable::spec::own_limits("limits", Some(limits))
            .map_err(invalid)?
            .unwrap_or_default();
        let er = Self::reference(&r, m.executable.as_ref())?;
        // Off the runtime's threads: lowering memory.max makes the kernel reclaim first.
        let cells = self.cells.clone();
        let e = tokio::task::spawn_blocking(move || cells.update_limits(&er, &update, oom_group))
            .await
            .map_err(|e| Status::internal(format!("update task: {e}")))??;
        Ok(Response::new(convert::executable(&e)))
    }
}

/// An exec's command line: not empty, at most 4096 arguments and 256 KiB.
fn exec_argv(argv: &[String]) -> Result<(), Status> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(invalid(FieldError::new(
            "argv",
            "is empty: give the command to run",
        )));
    }
    if argv.len() > 4096 || argv.iter().map(String::len).sum::<usize>() > 256 << 10 {
        return Err(invalid(FieldError::new(
            "argv",
            "is longer than 4096 arguments or 256 KiB",
        )));
    }
    Ok(())
}

/// A terminal size from a client: columns and rows, each 1..=65535.
fn terminal_size(field: &str, sz: &pb::TerminalSize) -> Result<(u16, u16), Status> {
    let dim = |v: u32, what: &str| {
        u16::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
            invalid(FieldError::new(
                format!("{field}.{what}"),
                format!("{v} is outside 1..=65535"),
            ))
        })
    };
    Ok((dim(sz.width, "width")?, dim(sz.height, "height")?))
}

type Events = tokio::sync::mpsc::Sender<Result<pb::ExecEvent, Status>>;

/// A message of an interactive session's client (ExecStream's or Attach's, after `start`).
enum ClientMessage {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize(pb::TerminalSize),
    /// A second `start`, or a message with nothing set: ignored.
    Other,
}

impl From<pb::ExecInput> for ClientMessage {
    fn from(m: pb::ExecInput) -> Self {
        use pb::exec_input::What;
        match m.what {
            Some(What::Stdin(d)) => Self::Stdin(d),
            Some(What::CloseStdin(true)) => Self::CloseStdin,
            Some(What::Resize(sz)) => Self::Resize(sz),
            _ => Self::Other,
        }
    }
}

impl From<pb::AttachInput> for ClientMessage {
    fn from(m: pb::AttachInput) -> Self {
        use pb::attach_input::What;
        match m.what {
            Some(What::Stdin(d)) => Self::Stdin(d),
            Some(What::CloseStdin(true)) => Self::CloseStdin,
            Some(What::Resize(sz)) => Self::Resize(sz),
            _ => Self::Other,
        }
    }
}

/// Copies an interactive session to and from its client until it ends: input, terminal
/// sizes and the end of input from the client; output as it comes, then its exit. A
/// client that goes away (its call cancelled) has an exec's command killed; an attach
/// detaches.
async fn serve_session<M: Into<ClientMessage>>(
    session: Session,
    mut input: tonic::Streaming<M>,
    tx: Events,
) {
    use tokio::io::AsyncWriteExt;
    let Session {
        stdout,
        stderr,
        mut stdin,
        resize,
        mut exit,
        kill,
        detaches,
        what,
    } = session;
    // An attach's end of input is the end of its writing, never an EOF character.
    let tty = resize.is_some() && !detaches;
    let mut pumps = Vec::new();
    for (r, make) in [
        (
            stdout,
            pb::exec_event::What::Stdout as fn(Vec<u8>) -> pb::exec_event::What,
        ),
        (stderr, pb::exec_event::What::Stderr),
    ] {
        if let Some(r) = r {
            pumps.push(tokio::spawn(pump_events(r, tx.clone(), make)));
        }
    }
    let mut reading = true;
    // Its end, or None: its client left first.
    let ended = loop {
        tokio::select! {
            s = &mut exit => break Some(s),
            () = tx.closed() => break None,
            m = input.message(), if reading => match m.map(|m| m.map(Into::into)) {
                Ok(Some(ClientMessage::Stdin(data))) => {
                    // A command that does not read its input must not hide its end or
                    // its client's leaving: the write races both.
                    if let Some(w) = stdin.as_mut() {
                        tokio::select! {
                            r = w.write_all(&data) => if r.is_err() {
                                stdin = None;
                            },
                            s = &mut exit => break Some(s),
                            () = tx.closed() => break None,
                        }
                    }
                }
                Ok(Some(ClientMessage::Resize(sz))) => {
                    if let (Some(resize), Ok((w, h))) = (&resize, terminal_size("resize", &sz)) {
                        resize(w, h);
                    }
                }
                Ok(Some(ClientMessage::CloseStdin)) => {
                    end_of_input(&mut stdin, tty).await;
                }
                Ok(Some(ClientMessage::Other)) => {}
                // The client's side closed: so is the input.
                Ok(None) | Err(_) => {
                    reading = false;
                    end_of_input(&mut stdin, tty).await;
                }
            },
        }
    };
    let Some(status) = ended else {
        // An exec's command is killed (and its end waited for); an attach lets go.
        kill();
        if !detaches {
            let _ = exit.await;
        }
        for p in &pumps {
            p.abort();
        }
        if detaches {
            tracing::info!(session = %what, "the client detached");
        } else {
            tracing::warn!(session = %what, "interactive exec: the client left before it ended: killed");
        }
        return;
    };
    drop(stdin);
    let drained = tokio::time::timeout(crate::cell::session::OUTPUT_GRACE, async {
        for p in &mut pumps {
            let _ = p.await;
        }
    })
    .await;
    if drained.is_err() {
        // Something the command started still holds its output: it ends here anyway.
        for p in &pumps {
            p.abort();
        }
    }
    let _ = tx
        .send(Ok(pb::ExecEvent {
            what: Some(pb::exec_event::What::Exit(crate::events::exit_status(
                status,
                false,
                std::time::SystemTime::now(),
            ))),
        }))
        .await;
}

/// Sends what `r` reads as events until its end.
async fn pump_events(
    mut r: crate::cell::session::Read,
    tx: Events,
    make: fn(Vec<u8>) -> pb::exec_event::What,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let ev = pb::ExecEvent {
                    what: Some(make(buf[..n].to_vec())),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl ExecutablesApi {
    /// An attach as `Executables/Attach` starts it, for the caller of `r` (authorized on
    /// the executable's names; the method was checked on the way in): the session and
    /// the terminal's first size. Also the CRI streaming server's attach.
    pub fn attach_session<T>(
        &self,
        r: &Request<T>,
        start: &pb::AttachStart,
    ) -> Result<(Session, Option<(u16, u16)>), Status> {
        let exe = self.find(r, start.executable.as_ref())?;
        let tty = exe.input.as_ref().is_some_and(|i| i.tty);
        let size = match (tty, &start.size) {
            (true, Some(sz)) => Some(terminal_size("start.size", sz)?),
            (false, Some(_)) => {
                return Err(invalid(FieldError::new(
                    "start.size",
                    format!(
                        "executable {}/{} has no terminal (it was not started with interactive.tty)",
                        exe.cell, exe.name
                    ),
                )));
            }
            (_, None) => None,
        };
        if start.stdin && !exe.exited() {
            // Writing a process's input is acting as it: the caller must be one that may
            // run as its user (read as the attach starts; a pid reused meanwhile is not
            // the executable's and is refused).
            let (uid, gid) = crate::cell::exec::process_ids(exe.pid)?;
            if exe
                .pidfd
                .as_ref()
                .is_some_and(|p| crate::workload::supervise::has_exited(p))
            {
                return Err(Status::failed_precondition(format!(
                    "executable {}/{} ended while the attach read its user",
                    exe.cell, exe.name
                )));
            }
            let er = ExecutableRef {
                cell: exe.cell.clone(),
                name: exe.name.clone(),
            };
            may_run_as(r, &er, "which start.stdin writes to as it")?(uid, gid)
                .map_err(Status::permission_denied)?;
        }
        let session = Session::attach(exe, start.stdin, start.from_offset)?;
        Ok((session, size))
    }

    /// `Exec` with the command's stdio streamed rather than collected (the CRI streaming
    /// server's exec): the same checks and authorization (the request's caller must be
    /// granted `Executables/Exec` and the executable's names), the process returned
    /// running; no timeout (the stream's end ends it: see the caller).
    pub async fn exec_streaming(
        &self,
        r: Request<pb::ExecRequest>,
        stdio: ExecStdio,
    ) -> Result<crate::cell::exec::ExecProcess, Status> {
        let m = r.get_ref();
        exec_argv(&m.argv)?;
        let er = Self::reference(&r, m.executable.as_ref())?;
        let may = may_run_as(&r, &er, "which an exec takes")?;
        Ok(self
            .cells
            .spawn_exec(&er, m.argv.clone(), stdio, may)
            .await?)
    }
}

/// An executable's own usage from /proc (cgroup figures are per cell). Read while it
/// runs; the pidfd check afterwards makes sure the pid was still ours.
pub fn process_stats(e: &Executable) -> pb::ResourceStats {
    if e.exited() {
        return pb::ResourceStats::default();
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", e.pid)).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{}/status", e.pid)).unwrap_or_default();
    let io = std::fs::read_to_string(format!("/proc/{}/io", e.pid)).unwrap_or_default();
    if e.pidfd.as_ref().is_none_or(|p| p.send_signal(0).is_err()) {
        return pb::ResourceStats::default();
    }
    let field = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    pb::ResourceStats {
        io_read_bytes: field("read_bytes:"),
        io_write_bytes: field("write_bytes:"),
        ..proc_stats(&stat, &status)
    }
}

/// Usage from the text of `/proc/PID/stat` and `/proc/PID/status`; what is missing reads 0.
pub fn proc_stats(stat: &str, status: &str) -> pb::ResourceStats {
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = 100u64; // USER_HZ on Linux
    let (utime, stime) = (ticks(11) * 1_000_000 / hz, ticks(12) * 1_000_000 / hz);
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    pb::ResourceStats {
        cpu_usage_usec: utime + stime,
        cpu_user_usec: utime,
        cpu_system_usec: stime,
        memory_current_bytes: kib("VmRSS:"),
        memory_peak_bytes: kib("VmHWM:"),
        pids_current: kib("Threads:") / 1024,
        ..Default::default()
    }
}

/// What the caller of `r` may act as in `er` (an exec's command takes its process's ids;
/// an attach writing its input acts as it): the ids its grant allows, checked once they
/// are read; `how` says in the refusal how the ids would have been taken.
fn may_run_as<T>(
    r: &Request<T>,
    er: &ExecutableRef,
    how: &'static str,
) -> Result<crate::cell::exec::MayRunAs, Status> {
    let caller = Caller::of(r)?;
    let name = format!("{}/{}", er.cell, er.name);
    Ok(Box::new(move |uid, gid| {
        super::runtime::authorize_ids(&caller, Some(uid), Some(gid), &name).map_err(|e| {
            format!(
                "executable {name} runs as uid {uid}, gid {gid}, {how}: {}",
                e.message()
            )
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stats_read_ticks_after_the_command_and_kib_from_status() {
        // utime (field 14) 250 ticks, stime (field 15) 50; a command with spaces and ')'.
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        let status = "Name:\tcmd\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nThreads:\t3\n";
        let s = proc_stats(stat, status);
        assert_eq!((s.cpu_user_usec, s.cpu_system_usec), (2_500_000, 500_000));
        assert_eq!(s.cpu_usage_usec, 3_000_000);
        assert_eq!(s.memory_current_bytes, 1024 * 1024);
        assert_eq!(s.memory_peak_bytes, 2048 * 1024);
        assert_eq!(s.pids_current, 3);
        assert_eq!(proc_stats("", ""), pb::ResourceStats::default());
    }
}
