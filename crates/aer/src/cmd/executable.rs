//! `aer run` (RunExecutable) and `aer executable …` (the Executables service).

use std::time::Duration;

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::Status;

use super::{
    container::ContainerArgs, env_pairs, exit, invalid, phase, stats_row, stream_logs, ts,
};
use crate::{
    output::{Format, Row, print},
    units::{parse_duration, proto_duration},
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The cell to run in.
    #[arg(long)]
    cell: String,
    /// Name of the executable (default: auraed picks one).
    #[arg(long, default_value = "")]
    name: String,
    /// Environment variable KEY=VALUE (repeatable; nothing is inherited).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory.
    #[arg(long, default_value = "")]
    cwd: String,
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    gid: Option<u32>,
    /// Run it as a container from this image, beside the cell's other processes (a
    /// sidecar); the arguments after `--` then override the image's cmd.
    #[arg(long)]
    image: Option<String>,
    #[command(flatten)]
    container: ContainerArgs,
    /// Program (absolute path) and arguments, after `--`.
    #[arg(last = true)]
    argv: Vec<String>,
}

impl RunArgs {
    /// The executable to start: a plain process, or a container when `--image` is given.
    fn proto(self) -> Result<pb::Executable, Status> {
        let env = env_pairs(&self.env).map_err(invalid)?;
        let Some(image) = self.image else {
            if self.argv.is_empty() {
                return Err(Status::invalid_argument(
                    "give the program after `--` (or --image to run a container)",
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
                stdin: Vec::new(),
                container: None,
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
            ..Default::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ExeRef {
    /// cell/name of the executable, e.g. web/echo-1.
    id: String,
}

impl ExeRef {
    fn proto(&self) -> Result<pb::ExecutableRef, Status> {
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
    Get(ExeRef),
    List {
        #[arg(long, default_value = "")]
        cell_prefix: String,
    },
    Stop {
        #[command(flatten)]
        r: ExeRef,
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    Signal {
        #[command(flatten)]
        r: ExeRef,
        /// Signal number, e.g. 15.
        signal: i32,
    },
    Wait {
        #[command(flatten)]
        r: ExeRef,
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    Free(ExeRef),
    Logs {
        #[command(flatten)]
        r: ExeRef,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    Stats(ExeRef),
}

fn exe_row(s: &pb::ExecutableStatus) -> Row {
    vec![
        ("id", json!(format!("{}/{}", s.cell, s.name))),
        ("phase", phase(s.phase)),
        ("pid", json!(s.pid)),
        ("exit", exit(s.exit.as_ref())),
        ("started_at", ts(s.started_at.as_ref())),
        ("argv", json!(s.argv)),
        ("message", json!(s.message)),
    ]
}

/// `aer run`: starts a process (or a sidecar container) in an existing cell.
pub async fn start(c: &Client, a: RunArgs, fmt: Format) -> Result<(), Status> {
    let s = c.runtime().run_executable(a.proto()?).await?.into_inner();
    print(fmt, &[exe_row(&s)], true);
    Ok(())
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
        a.proto()
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
            "give the program after `--` (or --image to run a container)"
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
