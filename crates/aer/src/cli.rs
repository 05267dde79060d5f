//! The command tree: global flags, one subcommand per noun, and the dispatcher that hands
//! each to its module under `cmd/` (where its arguments live beside what it calls).

use std::{path::PathBuf, process::ExitCode, str::FromStr};

use aurae_client::{Client, ClientConfig, config::Overrides};
use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand};
use tonic::Code;

use crate::{
    cmd::{
        attach,
        cell::{self, CellCmd},
        container::{self, RunCellArgs},
        daemon::{self, Detail, HealthArgs, ShutdownArgs},
        events::{self, EventsArgs},
        exec::{self, AttachArgs, ExecArgs},
        executable::{self, ExeCmd, RunArgs},
        image::{self, ImageCmd},
        instance::{self, InstanceCmd},
        pki::{self, PkiCmd},
        pod::{self, PodCmd},
        top::{self, TopArgs},
        vm::{self, VmCmd},
    },
    instance_path::{self, InstancePath},
    output::Format,
};

/// aer: the Aurae command-line client.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Output format: table (for people) or json (for scripts), e.g. -o json.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// How to reach auraed; each flag wins over the config file
/// ($AURAE_CONFIG or ~/.config/aurae/config.toml).
#[derive(Debug, ClapArgs)]
struct Conn {
    /// Config file (TOML: socket/endpoint, pki_dir, ca, cert, key, server_name), e.g.
    /// ~/.config/aurae/config.toml.
    #[arg(long, global = true, env = "AURAE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// auraed's Unix socket, a path, e.g. /run/aurae/auraed.sock [default:
    /// /run/aurae/auraed.sock].
    #[arg(long, global = true, conflicts_with = "endpoint", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// auraed's TCP address, HOST:PORT, e.g. 127.0.0.1:8443.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// PKI directory with ca.pem and the identity's .pem/.key, e.g. /tmp/aurae/pki
    /// [default: /etc/aurae/pki].
    #[arg(long, global = true, value_name = "DIR")]
    pki_dir: Option<PathBuf>,
    /// Identity in the PKI directory to present (NAME.pem / NAME.key), e.g. alice.
    #[arg(long, global = true, value_name = "NAME")]
    identity: Option<String>,
    /// Name to check auraed's certificate against, e.g. auraed.local [default: localhost,
    /// or the endpoint's host].
    #[arg(long, global = true, value_name = "NAME")]
    server_name: Option<String>,
    /// Run the command in a spawned instance instead: NAME (an instance of the auraed
    /// above), or a/b/c (instance c of instance b of instance a), reached one daemon after
    /// the other with the same CA and identity, each checked against the SPIFFE ID its
    /// parent reports; e.g. --instance web-1 or --instance web-1/job.
    #[arg(long, global = true, env = "AER_INSTANCE", value_name = "PATH",
          value_parser = InstancePath::from_str)]
    instance: Option<InstancePath>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The development PKI.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Is auraed serving? (gRPC health)
    Health(HealthArgs),
    /// auraed's version and identity, and what the caller is granted.
    Info,
    /// Client and daemon versions.
    Version,
    /// Run a process in a cell (RunExecutable).
    Run(RunArgs),
    /// Run a command inside a running container executable, e.g. `aer exec -it web/app --
    /// sh` (Executables/ExecStream); aer's exit code is the command's.
    Exec(ExecArgs),
    /// Attach to a running executable's own stdio, e.g. `aer attach -i web/cat`
    /// (Executables/Attach): its output from now, aer's stdin to it with -i; aer's exit
    /// code is its once it ends, Ctrl-C detaches.
    Attach(AttachArgs),
    /// Executables: get, list, stop, signal, wait, free, logs, stats.
    #[command(subcommand, alias = "exe")]
    Executable(ExeCmd),
    /// Cells: allocate, get, list, stop, free, stats.
    #[command(subcommand)]
    Cell(CellCmd),
    /// Images: pull, ls, rm.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Run a container image in a new cell (RunCell).
    RunCell(RunCellArgs),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Spawned auraed instances.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Pods: a container in a spawned instance.
    #[command(subcommand)]
    Pod(PodCmd),
    /// Watch lifecycle events.
    Events(EventsArgs),
    /// A live tree of cells, executables, containers, VMs, instances and pods with CPU %,
    /// memory, pids and IO, redrawn every --interval on a terminal (Ctrl-C ends it); one
    /// snapshot on a pipe, with --once or -o json. E.g. `aer top --interval 500ms`.
    Top(TopArgs),
    /// Ask auraed to shut down in order.
    Shutdown(ShutdownArgs),
    /// Print shell completions, e.g. `aer completions bash > /etc/bash_completion.d/aer`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Runs one command line: the PKI and completions here, everything else against auraed.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let fmt = args.output;
    let command = match args.command {
        Command::Pki(cmd) => return pki::run(&cmd, fmt).map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "aer", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        command => command,
    };
    let instance = args.conn.instance.clone();
    // `aer health --wait`: keep trying until auraed serves (a script right after starting it).
    let wait = match &command {
        Command::Health(a) => a.wait,
        _ => None,
    };
    let connected = async {
        let cfg = config(args.conn)?;
        let mut client = daemon::connect_waiting(&cfg, wait).await?;
        if let Some(path) = &instance {
            client = instance_path::resolve(&cfg, client, path).await?;
        }
        anyhow::Ok(client)
    };
    let client = match connected.await {
        Ok(c) => c,
        // `aer run` / `aer run-cell` exit like `podman run`: 125 when aer itself fails.
        Err(e) if matches!(command, Command::Run(_) | Command::RunCell(_)) => {
            eprintln!("aer: {}", aurae_client::errors::chain_text(e.as_ref()));
            return Ok(ExitCode::from(attach::AER_FAILED));
        }
        // auraed's answers (not found, denied, not running) keep their exit codes.
        Err(e) => {
            return match e.downcast::<tonic::Status>() {
                Ok(status) => Ok(status_exit(&status)),
                Err(e) => Err(e),
            };
        }
    };
    Ok(match command {
        // The workload's exit code, or 125 (see `cmd::attach`).
        Command::Run(a) => executable::start(&client, a, fmt).await,
        Command::RunCell(a) => container::run(&client, a, fmt).await,
        Command::Exec(a) => exec::run(&client, a)
            .await
            .unwrap_or_else(|status| status_exit(&status)),
        Command::Attach(a) => exec::attach(&client, a)
            .await
            .unwrap_or_else(|status| status_exit(&status)),
        command => match call(&client, command, fmt).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(status) => status_exit(&status),
        },
    })
}

/// Flags over the config file.
fn config(conn: Conn) -> anyhow::Result<ClientConfig> {
    Ok(ClientConfig::resolve(&Overrides {
        config: conn.config,
        socket: conn.socket,
        endpoint: conn.endpoint,
        pki_dir: conn.pki_dir,
        identity: conn.identity,
        server_name: conn.server_name,
    })?)
}

async fn call(c: &Client, cmd: Command, fmt: Format) -> Result<(), tonic::Status> {
    match cmd {
        // Handled in `run`.
        Command::Pki(_)
        | Command::Completions { .. }
        | Command::Run(_)
        | Command::RunCell(_)
        | Command::Exec(_)
        | Command::Attach(_) => Ok(()),
        Command::Health(a) => daemon::health(c, a, fmt).await,
        Command::Info => daemon::info(c, Detail::Everything, fmt).await,
        Command::Version => daemon::info(c, Detail::Versions, fmt).await,
        Command::Shutdown(a) => daemon::shutdown(c, a).await,
        Command::Executable(cmd) => executable::run(c, cmd, fmt).await,
        Command::Cell(cmd) => cell::run(c, cmd, fmt).await,
        Command::Image(cmd) => image::run(c, cmd, fmt).await,
        Command::Vm(cmd) => vm::run(c, cmd, fmt).await,
        Command::Instance(cmd) => instance::run(c, cmd, fmt).await,
        Command::Pod(cmd) => pod::run(c, cmd, fmt).await,
        Command::Events(a) => events::run(c, a, fmt).await,
        Command::Top(a) => top::run(c, a, fmt).await,
    }
}

/// What to do with a gRPC error: a one-line message with the code, and an exit code per
/// class so scripts can tell "denied" from "not found" from "not built yet".
fn status_exit(s: &tonic::Status) -> ExitCode {
    eprintln!("aer: {:?}: {}", s.code(), s.message());
    ExitCode::from(exit_code(s.code()))
}

fn exit_code(code: Code) -> u8 {
    match code {
        Code::InvalidArgument => 2,
        Code::NotFound => 3,
        Code::PermissionDenied | Code::Unauthenticated => 4,
        Code::Unimplemented => 5,
        Code::FailedPrecondition | Code::AlreadyExists => 6,
        Code::Unavailable | Code::DeadlineExceeded => 7,
        _ => 1,
    }
}

/// Parses the command line `aer LINE` as the binary would, for the tests of each noun's
/// module: words are split at white space, and a '…' quoted part is one word.
#[cfg(test)]
pub fn parse(line: &str) -> Result<Command, clap::Error> {
    let mut words = vec!["aer".to_owned()];
    for (i, part) in line.split('\'').enumerate() {
        if i % 2 == 1 {
            words.push(part.to_owned());
        } else {
            words.extend(part.split_whitespace().map(str::to_owned));
        }
    }
    Args::try_parse_from(words).map(|a| a.command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn global_flags_and_conflicts() {
        let a = Args::try_parse_from(["aer", "info", "-o", "json", "--socket", "/s"]).unwrap();
        assert_eq!(a.output, Format::Json);
        assert_eq!(a.conn.socket, Some(PathBuf::from("/s")));
        assert!(
            Args::try_parse_from(["aer", "--socket", "/a", "--endpoint", "b", "info"]).is_err()
        );
        assert!(parse("bogus").is_err());
        let a = Args::try_parse_from(["aer", "vm", "list", "--instance", "a/b-1/c"]).unwrap();
        let path = a.conn.instance.expect("--instance");
        assert_eq!(path.segments(), ["a", "b-1", "c"]);
        let a = Args::try_parse_from(["aer", "--instance", "web", "instance", "list"]).unwrap();
        assert_eq!(a.conn.instance.unwrap().to_string(), "web");
        for bad in ["", "/a", "a/", "a//b", "A", "a_b"] {
            assert!(
                Args::try_parse_from(["aer", "--instance", bad, "info"]).is_err(),
                "--instance {bad:?}"
            );
        }
        let cmd = Args::command();
        let flag = cmd.get_arguments().find(|a| a.get_id() == "instance");
        assert_eq!(
            flag.and_then(|a| a.get_env()),
            Some(std::ffi::OsStr::new("AER_INSTANCE"))
        );
        assert!(parse("").is_err(), "a command is required");
    }

    #[test]
    fn exit_codes_per_class() {
        assert_eq!(exit_code(Code::InvalidArgument), 2);
        assert_eq!(exit_code(Code::NotFound), 3);
        assert_eq!(exit_code(Code::PermissionDenied), 4);
        assert_eq!(exit_code(Code::Unauthenticated), 4);
        assert_eq!(exit_code(Code::Unimplemented), 5);
        assert_eq!(exit_code(Code::AlreadyExists), 6);
        assert_eq!(exit_code(Code::FailedPrecondition), 6);
        assert_eq!(exit_code(Code::DeadlineExceeded), 7);
        assert_eq!(exit_code(Code::Unavailable), 7);
        assert_eq!(exit_code(Code::Internal), 1);
    }
}

#[cfg(test)]
mod readme_tests {
    /// Every `aer` line of README.md's blocks that the walkthrough does not run (they need
    /// what the host lacks: cgroup controllers, KVM) still parses as written: a flag
    /// value the command would refuse (`--cpu-max 50%`) fails here instead of for a
    /// reader. (The blocks that run are run by `cargo xtask readme`.)
    #[test]
    fn the_readmes_aer_lines_that_are_not_run_still_parse() {
        let readme = include_str!("../../../README.md");
        let mut not_run = false;
        let mut in_block = false;
        let mut checked = 0;
        let mut line = String::new();
        for l in readme.lines() {
            if l.starts_with("<!-- not run:") {
                not_run = true;
                continue;
            }
            if l.starts_with("```") {
                if in_block {
                    not_run = false;
                }
                in_block = !in_block;
                continue;
            }
            if !(in_block && not_run) {
                continue;
            }
            // Continued lines join; a trailing comment goes.
            line.push_str(l.trim_end_matches('\\'));
            if l.ends_with('\\') {
                line.push(' ');
                continue;
            }
            let whole = std::mem::take(&mut line);
            let commands = whole.split(" #").next().unwrap_or_default();
            for command in commands.split(';').map(str::trim) {
                let Some(args) = command.strip_prefix("aer ").or_else(|| {
                    command
                        .split_once("$(aer ")
                        .map(|(_, r)| r.split(')').next().unwrap_or_default())
                }) else {
                    continue;
                };
                if args.contains('$') || args.contains('|') || args.contains('>') {
                    continue;
                }
                if let Err(e) = <super::Args as clap::Parser>::try_parse_from(words(args)) {
                    panic!("README: `aer {args}` does not parse: {e}");
                }
                checked += 1;
            }
        }
        println!("{checked} aer commands of README blocks not run parse");
        assert!(checked >= 3, "{checked} lines checked");
    }

    /// `aer` and the words of `line` as a shell splits them (single and double quotes).
    fn words(line: &str) -> Vec<String> {
        let mut out = vec!["aer".to_owned()];
        let (mut word, mut quote, mut any) = (String::new(), None, false);
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => word.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    any = true;
                }
                (None, c) if c.is_whitespace() => {
                    if any || !word.is_empty() {
                        out.push(std::mem::take(&mut word));
                    }
                    any = false;
                }
                (None, c) => word.push(c),
            }
        }
        if any || !word.is_empty() {
            out.push(word);
        }
        out
    }
}
