//! `aer run` (RunExecutable) and `aer executable …` (the Executables service).

use std::{process::ExitCode, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::Status;

use super::{
    attach::{AttachArgs, Made, Started, launch},
    container::ContainerArgs,
    env_pairs, exit, invalid, phase, stats_row, stream_logs, ts,
};
use crate::{
    output::{Format, Row, print},
    units::{parse_duration, proto_duration},
};

#[derive(Debug, Args)]
#[command(after_help = super::attach::AFTER_HELP)]
pub struct RunArgs {
    /// The cell to run it in (it must exist: `aer cell allocate`), e.g. web or web/api.
    #[arg(long)]
    cell: String,
    /// Its name in the cell, a DNS label (a-z, 0-9, '-', at most 63), e.g. hello
    /// [default: auraed picks one].
    #[arg(long, default_value = "", hide_default_value = true)]
    name: String,
    /// An environment variable, KEY=VALUE, e.g. -e PATH=/bin (repeatable; nothing is
    /// inherited from aer or auraed).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Its working directory, an absolute path, e.g. /srv/app [default: /].
    #[arg(
        long,
        default_value = "",
        hide_default_value = true,
        value_name = "DIR"
    )]
    cwd: String,
    /// The uid it runs as, e.g. 1000 [default: the cell's; 0 needs a policy grant
    /// (allow_uid_zero)].
    #[arg(long)]
    uid: Option<u32>,
    /// The gid it runs as, e.g. 1000 [default: the cell's; 0 needs a policy grant].
    #[arg(long)]
    gid: Option<u32>,
    /// Run it as a container from this image reference, e.g.
    /// 127.0.0.1:5000/aurae/busybox:latest, beside the cell's other processes (a sidecar);
    /// the arguments after `--` then override the image's cmd.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    #[command(flatten)]
    container: ContainerArgs,
    #[command(flatten)]
    attach: AttachArgs,
    /// Keep its stdin open for input (`docker run -i`): in the foreground aer's stdin goes
    /// to it and aer's end of input closes it; with -d it stays open for `aer attach -i`.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give it a pseudo-terminal of its own (its stdout and stderr both on it); in the
    /// foreground with -i, aer's terminal is in raw mode while it runs.
    #[arg(short = 't', long)]
    tty: bool,
    /// Give it a cgroup of its own below its cell's (implied by any limit below): its
    /// usage is its own (`aer executable stats`), what it leaves running there dies with
    /// it, and `aer executable update` changes its limits while it runs.
    #[arg(long)]
    own_cgroup: bool,
    /// Limits of its own cgroup (bounded by its cell's too).
    #[command(flatten)]
    limits: super::cell::LimitArgs,
    /// The program (an absolute path, executed directly: no shell) and its arguments,
    /// after `--`, e.g. -- /bin/sh -c 'echo hi'.
    #[arg(last = true, value_name = "ARGV")]
    argv: Vec<String>,
}

impl RunArgs {
    /// The executable to start: a plain process, or a container when `--image` is given.
    /// `detach`: started with -d (then its stdin is not closed by the first attach).
    fn proto(self, detach: bool) -> Result<pb::Executable, Status> {
        let env = env_pairs(&self.env).map_err(invalid)?;
        let interactive = (self.interactive || self.tty).then_some(pb::Interactive {
            stdin: self.interactive,
            // In the foreground aer's end of input is the workload's (`docker run -i`).
            stdin_once: self.interactive && !detach,
            tty: self.tty,
        });
        let limits = self.limits.proto().map_err(invalid)?;
        let limits = (self.own_cgroup || limits != pb::CellLimits::default()).then_some(limits);
        let Some(image) = self.image else {
            if self.argv.is_empty() {
                return Err(Status::invalid_argument(
                    "argv: give the program (an absolute path) after `--`, or --image to run \
                     a container",
                ));
            }
            return Ok(pb::Executable {
                cell: self.cell,
                name: self.name,
                argv: self.argv,
                env,
                working_dir: self.cwd,
                uid: self.uid,
                gid: self.gid,
                interactive,
                limits,
                ..Default::default()
            });
        };
        let container = self
            .container
            .proto(image, self.argv, env, self.uid, self.gid)
            .map_err(invalid)?;
        Ok(pb::Executable {
            cell: self.cell,
            name: self.name,
            container: Some(container),
            interactive,
            limits,
            ..Default::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ExeRef {
    /// The executable as CELL/NAME, e.g. web/hello (`aer executable list` shows them).
    id: String,
}

impl ExeRef {
    pub(crate) fn proto(&self) -> Result<pb::ExecutableRef, Status> {
        let (cell, name) = self.id.rsplit_once('/').ok_or_else(|| {
            Status::invalid_argument(format!(
                "{:?}: give the executable as CELL/NAME, e.g. web/echo-1",
                self.id
            ))
        })?;
        Ok(pb::ExecutableRef {
            cell: cell.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ExeCmd {
    /// Show one executable: phase, pid, exit status, argv.
    Get(ExeRef),
    /// Show the executables of every cell (or of the cells under a prefix).
    #[command(visible_alias = "ls")]
    List {
        /// Only executables of cells whose name starts with this path prefix, e.g. web
        /// [default: all the caller may see].
        #[arg(
            long,
            default_value = "",
            hide_default_value = true,
            value_name = "CELL"
        )]
        cell_prefix: String,
    },
    /// SIGTERM, then SIGKILL once the grace period is over; shows how it ended.
    Stop {
        #[command(flatten)]
        r: ExeRef,
        /// How long to wait after SIGTERM before SIGKILL: a number with ms, s, m or h
        /// (plain = seconds), at most 10m, e.g. 5s [default: auraed's, 10s].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Send it a signal.
    Signal {
        #[command(flatten)]
        r: ExeRef,
        /// The signal's number, 1..=64, e.g. 15 (SIGTERM), 9 (SIGKILL), 1 (SIGHUP).
        signal: i32,
    },
    /// Wait until it has exited, and show how it ended.
    Wait {
        #[command(flatten)]
        r: ExeRef,
        /// Give up after this long (DEADLINE_EXCEEDED): a number with ms, s, m or h (plain
        /// = seconds), at most 10m, e.g. 30s [default: wait until auraed's call limit].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Forget an executable that has exited, and its log.
    Free(ExeRef),
    /// Its stdout and stderr, from the oldest byte auraed still keeps.
    Logs {
        #[command(flatten)]
        r: ExeRef,
        /// Keep following new output until its stdout and stderr close.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Its CPU and memory use (from its own cgroup when it has one, else from /proc),
    /// while it runs.
    Stats(ExeRef),
    /// Change the limits of a running executable's own cgroup (started with
    /// --own-cgroup or a limit): the limits given are written, the others stay.
    Update {
        #[command(flatten)]
        r: ExeRef,
        #[command(flatten)]
        limits: super::cell::LimitArgs,
    },
}

fn exe_row(s: &pb::ExecutableStatus) -> Row {
    vec![
        ("id", json!(format!("{}/{}", s.cell, s.name))),
        ("phase", phase(s.phase)),
        ("pid", json!(s.pid)),
        ("exit", exit(s.exit.as_ref())),
        ("started_at", ts(s.started_at.as_ref())),
        ("argv", json!(s.argv)),
        ("limits", json!(s.limits.as_ref().map(own_limits))),
        ("message", json!(s.message)),
    ]
}

/// The limits of an executable's own cgroup as its files would read, e.g.
/// `memory.max=67108864 pids.max=16` (empty: a group without limits).
fn own_limits(l: &pb::CellLimits) -> String {
    let mut out = Vec::new();
    let mut put = |file: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push(format!("{file}={v}"));
        }
    };
    put("cpu.weight", l.cpu_weight.map(|v| v.to_string()));
    put(
        "cpu.max",
        l.cpu_max.as_ref().map(|c| match c.quota_us {
            0 => format!("max/{}", c.period_us),
            q => format!("{q}/{}", c.period_us),
        }),
    );
    put(
        "cpuset.cpus",
        (!l.cpuset_cpus.is_empty()).then(|| l.cpuset_cpus.clone()),
    );
    put("memory.min", l.memory_min_bytes.map(|v| v.to_string()));
    put("memory.low", l.memory_low_bytes.map(|v| v.to_string()));
    put("memory.high", l.memory_high_bytes.map(|v| v.to_string()));
    put("memory.max", l.memory_max_bytes.map(|v| v.to_string()));
    put("pids.max", l.pids_max.map(|v| v.to_string()));
    out.join(" ")
}

/// `aer run`: starts a process (or a sidecar container) in an existing cell, then streams
/// its output and exits with its exit code (see [`super::attach`]), or with `-d` prints
/// its id.
pub async fn start(c: &Client, mut a: RunArgs, fmt: Format) -> ExitCode {
    if (a.interactive || a.tty) && !a.attach.detach {
        let attach = std::mem::take(&mut a.attach);
        let (stdin, tty) = (a.interactive, a.tty);
        return super::attach::interactive(c, a.proto(false), &attach, stdin, tty).await;
    }
    let attach = std::mem::take(&mut a.attach);
    let create = async {
        let mut e = a.proto(attach.detach)?;
        e.run = attach.run_options();
        let exe = c.runtime().run_executable(e).await?.into_inner();
        let image_digest = exe.image_digest.clone();
        Ok(Started {
            exe,
            made: Made::Executable,
            image_digest,
        })
    };
    launch(c, &attach, fmt, create).await
}

/// `aer executable …`.
pub async fn run(c: &Client, cmd: ExeCmd, fmt: Format) -> Result<(), Status> {
    let mut x = c.executables();
    let one =
        |s: tonic::Response<pb::ExecutableStatus>| print(fmt, &[exe_row(&s.into_inner())], true);
    match cmd {
        ExeCmd::Get(r) => one(x.get(r.proto()?).await?),
        ExeCmd::List { cell_prefix } => {
            let l = x.list(pb::ListExecutablesRequest { cell_prefix }).await?;
            let rows: Vec<Row> = l.into_inner().executables.iter().map(exe_row).collect();
            print(fmt, &rows, false);
        }
        ExeCmd::Stop { r, grace } => {
            let req = pb::StopExecutableRequest {
                executable: Some(r.proto()?),
                grace_period: grace.map(proto_duration),
            };
            one(x.stop(req).await?);
        }
        ExeCmd::Signal { r, signal } => {
            let executable = Some(r.proto()?);
            let req = pb::SignalExecutableRequest { executable, signal };
            one(x.signal(req).await?);
        }
        ExeCmd::Wait { r, timeout } => {
            let req = pb::WaitExecutableRequest {
                executable: Some(r.proto()?),
                timeout: timeout.map(proto_duration),
            };
            one(x.wait(req).await?);
        }
        ExeCmd::Free(r) => {
            x.free(r.proto()?).await?;
        }
        ExeCmd::Logs { r, follow } => {
            let req = pb::ExecutableLogsRequest {
                executable: Some(r.proto()?),
                follow,
                from_offset: 0,
            };
            stream_logs(x.logs(req).await?.into_inner()).await?;
        }
        ExeCmd::Stats(r) => {
            let s = x.stats(r.proto()?).await?.into_inner();
            print(fmt, &[stats_row(&s)], true);
        }
        ExeCmd::Update { r, limits } => {
            let req = pb::UpdateExecutableRequest {
                executable: Some(r.proto()?),
                limits: Some(limits.proto().map_err(invalid)?),
            };
            one(x.update(req).await?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    fn run_args(line: &str) -> Result<pb::Executable, Status> {
        let Command::Run(a) = parse(line).unwrap() else {
            panic!("not aer run")
        };
        let detach = a.attach.detach;
        a.proto(detach)
    }

    #[test]
    fn a_limit_or_own_cgroup_asks_for_a_cgroup_of_its_own() {
        assert!(
            run_args("run --cell web -- /bin/true")
                .unwrap()
                .limits
                .is_none()
        );
        let e = run_args("run --own-cgroup --cell web -- /bin/true").unwrap();
        assert_eq!(e.limits, Some(pb::CellLimits::default()));
        let e = run_args("run --memory-max 64M --pids-max 16 --cell web -- /bin/true").unwrap();
        let l = e.limits.unwrap();
        assert_eq!((l.memory_max_bytes, l.pids_max), (Some(64 << 20), Some(16)));
        assert_eq!(own_limits(&l), "memory.max=67108864 pids.max=16");
        let e = run_args("run --cpu-max 50000/100000 --cell web --image r/x:1").unwrap();
        assert_eq!(own_limits(&e.limits.unwrap()), "cpu.max=50000/100000");
    }

    #[test]
    fn i_and_t_ask_for_an_input_closed_at_the_end_of_aers_in_the_foreground() {
        let e = run_args("run -i -t --cell web -- /bin/sh").unwrap();
        let i = e.interactive.unwrap();
        assert!(i.stdin && i.stdin_once && i.tty);
        let e = run_args("run -d -i --cell web -- /bin/cat").unwrap();
        let i = e.interactive.unwrap();
        assert!(
            i.stdin && !i.stdin_once && !i.tty,
            "kept open for aer attach"
        );
        assert!(
            run_args("run --cell web -- /bin/true")
                .unwrap()
                .interactive
                .is_none()
        );
    }

    #[test]
    fn run_takes_argv_exactly_after_the_dashes() {
        let e =
            run_args("run --cell web --name hello -e A=1 --cwd / --uid 7 -- /bin/echo --name x")
                .unwrap();
        assert_eq!((e.cell.as_str(), e.name.as_str()), ("web", "hello"));
        assert_eq!(e.argv, ["/bin/echo", "--name", "x"]);
        assert_eq!(e.env["A"], "1");
        assert_eq!((e.working_dir.as_str(), e.uid, e.gid), ("/", Some(7), None));
        assert!(e.container.is_none());
    }

    #[test]
    fn run_needs_a_program_or_an_image() {
        let e = run_args("run --cell web").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "argv: give the program (an absolute path) after `--`, or --image to run a container"
        );
        let e = run_args("run --cell web -e NOEQ -- /bin/true").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = run_args("run --cell web --image img -- -c true").unwrap();
        let c = e.container.unwrap();
        assert_eq!(
            (c.image.as_str(), c.args.join(" ")),
            ("img", "-c true".into())
        );
        assert!(e.argv.is_empty());
    }

    #[test]
    fn executable_refs_are_cell_slash_name() {
        let Command::Executable(ExeCmd::Stop { r, grace }) =
            parse("exe stop web/api/echo-1 --grace 5s").unwrap()
        else {
            panic!("not executable stop")
        };
        let r = r.proto().unwrap();
        assert_eq!((r.cell.as_str(), r.name.as_str()), ("web/api", "echo-1"));
        assert_eq!(grace, Some(Duration::from_secs(5)));
        let bad = ExeRef { id: "web".into() }.proto().unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("CELL/NAME"), "{bad}");
        assert!(matches!(
            parse("executable logs web/x -f").unwrap(),
            Command::Executable(ExeCmd::Logs { follow: true, .. })
        ));
        assert!(parse("executable signal web/x TERM").is_err());
    }
}
