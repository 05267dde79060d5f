//! `Executables`: lifecycle of the executables `RunExecutable` started, and their logs.
//! An executable's name is checked against the grant through its cell's name.

use std::sync::Arc;

use aurae_proto::runtime::v0::{self as pb, executables_server::Executables};
use tonic::{Request, Response, Status};

use super::{
    convert,
    shared::{ResponseStream, authorized, grace, log_stream, timeout, visible},
    status::{internal, invalid},
};
use crate::{
    cell::Cells,
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
        let out = self.cells.exec_in(&er, m.argv.clone(), timeout).await?;
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
        Ok(Response::new(process_stats(&e)))
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

impl ExecutablesApi {
    /// `Exec` with the command's stdio streamed rather than collected (the CRI streaming
    /// server's exec): the same checks and authorization (the request's caller must be
    /// granted `Executables/Exec` and the executable's names), the process returned
    /// running; no timeout (the stream's end ends it: see the caller).
    pub async fn exec_streaming(
        &self,
        r: Request<pb::ExecRequest>,
        stdio: crate::cell::exec::ExecStdio,
    ) -> Result<crate::cell::exec::ExecProcess, Status> {
        let m = r.get_ref();
        exec_argv(&m.argv)?;
        let er = Self::reference(&r, m.executable.as_ref())?;
        Ok(self.cells.spawn_exec(&er, m.argv.clone(), stdio).await?)
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
