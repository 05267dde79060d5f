//! The command tree and what each command calls.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use aurae_client::{Client, ClientConfig, config::Overrides};
use aurae_identity::{Pki, SpiffeId, pki::DEFAULT_TRUST_DOMAIN};
use aurae_proto::runtime::v0 as pb;
use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use tonic::Code;

use crate::{
    output::{Format, Row, print},
    units::{parse_duration, parse_size, proto_duration},
};

/// aer: the Aurae command-line client.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// How to reach auraed; each flag wins over the config file
/// ($AURAE_CONFIG or ~/.config/aurae/config.toml).
#[derive(Debug, ClapArgs)]
struct Conn {
    /// Config file (TOML: socket/endpoint, pki_dir, ca, cert, key, server_name).
    #[arg(long, global = true, env = "AURAE_CONFIG")]
    config: Option<PathBuf>,
    /// auraed's Unix socket [default: /run/aurae/auraed.sock].
    #[arg(long, global = true, conflicts_with = "endpoint")]
    socket: Option<PathBuf>,
    /// auraed's TCP address, host:port.
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// PKI directory with ca.pem and the identity's .pem/.key [default: /etc/aurae/pki].
    #[arg(long, global = true)]
    pki_dir: Option<PathBuf>,
    /// Identity in the PKI directory to present (NAME.pem / NAME.key).
    #[arg(long, global = true)]
    identity: Option<String>,
    /// Name to check auraed's certificate against [default: localhost, or the endpoint's host].
    #[arg(long, global = true)]
    server_name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The development PKI.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Is auraed serving? (gRPC health)
    Health {
        /// A service name, e.g. aurae.runtime.v0.Runtime ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// auraed's version and identity, and what the caller is granted.
    Info,
    /// Client and daemon versions.
    Version,
    /// Run a process in a cell (RunExecutable).
    Run(RunArgs),
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
    Events {
        /// Only names under this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Replay kept events after this sequence number first.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Ask auraed to shut down in order.
    Shutdown {
        /// Time workloads get to stop, e.g. 10s.
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum PkiCmd {
    /// Create a CA, auraed's identity and the admin identity in DIR; the CA key goes to
    /// its own directory outside DIR (auraed refuses to start next to it).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Where the CA key ca.key goes; never inside DIR [default: DIR-ca, beside DIR].
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Extra DNS name or IP address for auraed's certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a client identity NAME.pem/NAME.key in DIR, signed by the CA of DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Where the CA key ca.key is [default: DIR-ca, beside DIR].
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long)]
        name: String,
        /// Its SPIFFE ID path, e.g. /operator/alice [default: /operator/NAME].
        #[arg(long)]
        path: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

#[derive(Debug, ClapArgs)]
struct RunArgs {
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

/// Container options shared by `aer run --image` and `aer run-cell`.
#[derive(Debug, ClapArgs)]
struct ContainerArgs {
    /// Override the image's entrypoint (repeat for each word).
    #[arg(long)]
    entrypoint: Vec<String>,
    /// Override the image's working directory.
    #[arg(long)]
    workdir: Option<String>,
    /// Mount the image root read-only.
    #[arg(long)]
    read_only: bool,
    /// `HOST:CONTAINER[:ro]`: a host directory under one of auraed's --volume-root (repeatable).
    #[arg(long = "volume", short = 'v')]
    volumes: Vec<String>,
}

impl ContainerArgs {
    fn proto(
        &self,
        image: String,
        args: Vec<String>,
        env: std::collections::HashMap<String, String>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> anyhow::Result<pb::Container> {
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                let parts: Vec<&str> = v.split(':').collect();
                match parts.as_slice() {
                    [h, c] => Ok((h, c, false)),
                    [h, c, "ro"] => Ok((h, c, true)),
                    [h, c, "rw"] => Ok((h, c, false)),
                    _ => Err(anyhow::anyhow!("--volume {v}: use HOST:CONTAINER[:ro]")),
                }
                .map(|(h, c, ro)| pb::Volume {
                    host_path: (*h).to_owned(),
                    container_path: (*c).to_owned(),
                    read_only: ro,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(pb::Container {
            image,
            entrypoint: self.entrypoint.clone(),
            args,
            env,
            working_dir: self.workdir.clone().unwrap_or_default(),
            uid,
            gid,
            read_only_root: self.read_only,
            volumes,
        })
    }
}

#[derive(Debug, ClapArgs)]
struct ExeRef {
    /// cell/name of the executable, e.g. web/echo-1.
    id: String,
}

impl ExeRef {
    fn proto(&self) -> anyhow::Result<pb::ExecutableRef> {
        let (cell, name) = self.id.rsplit_once('/').ok_or_else(|| {
            anyhow!(
                "{:?}: give the executable as CELL/NAME, e.g. web/echo-1",
                self.id
            )
        })?;
        Ok(pb::ExecutableRef {
            cell: cell.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[derive(Debug, Subcommand)]
enum ExeCmd {
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

#[derive(Debug, ClapArgs)]
struct LimitArgs {
    #[arg(long)]
    cpu_weight: Option<u64>,
    /// CPU quota per period, e.g. 50000/100000 (µs).
    #[arg(long)]
    cpu_max: Option<String>,
    #[arg(long, default_value = "")]
    cpuset_cpus: String,
    #[arg(long, value_parser = parse_size)]
    memory_min: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    memory_low: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    memory_high: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    memory_max: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    memory_swap_max: Option<u64>,
    #[arg(long)]
    pids_max: Option<u64>,
    #[arg(long)]
    io_weight: Option<u64>,
}

impl LimitArgs {
    fn proto(&self) -> anyhow::Result<pb::CellLimits> {
        let cpu_max = match &self.cpu_max {
            None => None,
            Some(s) => {
                let (q, p) = s.split_once('/').unwrap_or((s.as_str(), "0"));
                let quota_us = if q == "max" {
                    0
                } else {
                    q.parse().context("--cpu-max quota")?
                };
                Some(pb::CpuMax {
                    quota_us,
                    period_us: p.parse().context("--cpu-max period")?,
                })
            }
        };
        Ok(pb::CellLimits {
            cpu_weight: self.cpu_weight,
            cpu_max,
            cpuset_cpus: self.cpuset_cpus.clone(),
            memory_min_bytes: self.memory_min,
            memory_low_bytes: self.memory_low,
            memory_high_bytes: self.memory_high,
            memory_max_bytes: self.memory_max,
            memory_swap_max_bytes: self.memory_swap_max,
            pids_max: self.pids_max,
            io_weight: self.io_weight,
            ..Default::default()
        })
    }
}

#[derive(Debug, ClapArgs)]
struct NsArgs {
    /// Share a host namespace: pid, net, ipc, uts, mount, cgroup (repeatable; needs a policy grant).
    #[arg(long = "share-host")]
    share: Vec<String>,
    /// Run the cell in a new user namespace.
    #[arg(long)]
    userns: bool,
}

impl NsArgs {
    fn proto(&self) -> anyhow::Result<pb::CellNamespaces> {
        let mut n = pb::CellNamespaces {
            user_namespace: self.userns,
            ..Default::default()
        };
        for s in &self.share {
            match s.as_str() {
                "pid" => n.share_host_pid = true,
                "net" => n.share_host_net = true,
                "ipc" => n.share_host_ipc = true,
                "uts" => n.share_host_uts = true,
                "mount" => n.share_host_mount = true,
                "cgroup" => n.share_host_cgroup = true,
                other => bail!("--share-host {other}: use pid, net, ipc, uts, mount or cgroup"),
            }
        }
        Ok(n)
    }
}

#[derive(Debug, Subcommand)]
enum CellCmd {
    /// Create a cell, e.g. `aer cell allocate web --memory-max 64M --pids-max 32`.
    Allocate {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        ns: NsArgs,
    },
    Get {
        name: String,
    },
    List {
        #[arg(long, default_value = "")]
        prefix: String,
    },
    Stop {
        name: String,
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    Free {
        name: String,
    },
    Stats {
        name: String,
    },
    /// Cells as a tree, with their limits and usage.
    Tree {
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

fn size(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / f64::from(1u32 << 30)),
        Some(b) if b >= 1 << 20 => format!("{:.1}M", b as f64 / f64::from(1u32 << 20)),
        Some(b) if b >= 1 << 10 => format!("{:.1}K", b as f64 / 1024.0),
        Some(b) => format!("{b}"),
    }
}

#[derive(Debug, ClapArgs)]
struct RunCellArgs {
    /// The new cell's name.
    name: String,
    #[arg(long)]
    image: String,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Override the image's user.
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    gid: Option<u32>,
    #[command(flatten)]
    container: ContainerArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    ns: NsArgs,
    /// Arguments overriding the image's cmd, after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Pull an image into auraed's store, with progress per layer.
    Pull { image: String },
    /// Images in the store.
    Ls,
    /// Forget an image reference.
    Rm { image: String },
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    Run {
        name: String,
        #[arg(long)]
        kernel: String,
        #[arg(long, default_value = "")]
        initramfs: String,
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_parser = parse_size, default_value = "256M")]
        memory: u64,
        /// A block device `PATH[:rw]` under one of auraed's --vm-image-root (repeatable;
        /// the first is /dev/vda). Read-only unless `:rw` (which needs a grant with
        /// allow_writable_drives and the path in its volumes); `:ro` is accepted.
        #[arg(long = "drive")]
        drives: Vec<String>,
        /// Attach a network interface (a TAP on auraed's bridge; the address is leased).
        #[arg(long)]
        net: bool,
    },
    Get {
        name: String,
    },
    List,
    Stop {
        name: String,
    },
    Wait {
        name: String,
    },
    Free {
        name: String,
    },
    Console {
        name: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCmd {
    Spawn {
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        memory: u64,
    },
    Get {
        name: String,
    },
    List,
    Stop {
        name: String,
    },
    Wait {
        name: String,
    },
    Free {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    Run {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 0)]
        port: u32,
    },
    Get {
        name: String,
    },
    List,
    Stop {
        name: String,
    },
    Wait {
        name: String,
    },
    Free {
        name: String,
    },
    Logs {
        name: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn env_pairs(v: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    v.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("--env {kv:?}: write KEY=VALUE"))
        })
        .collect()
}

fn name(n: &str) -> pb::NameRef {
    pb::NameRef { name: n.to_owned() }
}

fn ts(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(format!("{}.{:03}", t.seconds, t.nanos / 1_000_000))
    })
}

fn phase(p: i32) -> Value {
    json!(pb::Phase::try_from(p).map_or_else(
        |_| format!("unknown({p})"),
        |p| p.as_str_name().trim_start_matches("PHASE_").to_lowercase()
    ))
}

fn exit(e: Option<&pb::ExitStatus>) -> Value {
    match e.and_then(|e| e.how.as_ref().map(|h| (h, e.oom_killed))) {
        Some((pb::exit_status::How::Code(c), oom)) => json!(if oom {
            format!("code {c} (OOM)")
        } else {
            format!("code {c}")
        }),
        Some((pb::exit_status::How::Signal(s), oom)) => json!(if oom {
            format!("signal {s} (OOM)")
        } else {
            format!("signal {s}")
        }),
        None => Value::Null,
    }
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

fn cell_row(s: &pb::CellStatus) -> Row {
    let l = s.limits.clone().unwrap_or_default();
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("executables", json!(s.executables.len())),
        ("memory_max", json!(l.memory_max_bytes)),
        ("pids_max", json!(l.pids_max)),
        ("cpu_weight", json!(l.cpu_weight)),
        ("image", json!(s.image_digest)),
        ("message", json!(s.message)),
    ]
}

fn vm_row(s: &pb::VirtualMachineStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("vmm_pid", json!(s.vmm_pid)),
        ("addresses", json!(s.addresses)),
        ("exit", exit(s.exit.as_ref())),
        ("message", json!(s.message)),
    ]
}

fn instance_row(s: &pb::InstanceStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("spiffe_id", json!(s.spiffe_id)),
        ("endpoint", json!(s.endpoint)),
        ("message", json!(s.message)),
    ]
}

fn pod_row(s: &pb::PodStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("endpoint", json!(s.endpoint)),
        ("message", json!(s.message)),
    ]
}

fn stats_row(s: &pb::ResourceStats) -> Row {
    vec![
        ("cpu_usage_usec", json!(s.cpu_usage_usec)),
        ("cpu_throttled_usec", json!(s.cpu_throttled_usec)),
        ("memory_current", json!(s.memory_current_bytes)),
        ("memory_peak", json!(s.memory_peak_bytes)),
        ("pids_current", json!(s.pids_current)),
        ("oom_kills", json!(s.oom_kills)),
    ]
}

/// What to do with a gRPC error: a one-line message with the code, and an exit code per
/// class so scripts can tell "denied" from "not found" from "not built yet".
fn status_exit(s: &tonic::Status) -> ExitCode {
    eprintln!("aer: {:?}: {}", s.code(), s.message());
    ExitCode::from(match s.code() {
        Code::InvalidArgument => 2,
        Code::NotFound => 3,
        Code::PermissionDenied | Code::Unauthenticated => 4,
        Code::Unimplemented => 5,
        Code::FailedPrecondition | Code::AlreadyExists => 6,
        Code::Unavailable | Code::DeadlineExceeded => 7,
        _ => 1,
    })
}

async fn stream_logs(mut s: tonic::Streaming<pb::LogChunk>) -> Result<(), tonic::Status> {
    use std::io::Write;
    while let Some(chunk) = s.message().await? {
        let mut out: Box<dyn Write> = if chunk.stream == pb::LogStream::Stderr as i32 {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        };
        let _ = out.write_all(&chunk.data);
        let _ = out.flush();
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let fmt = args.output;
    // Commands that need no daemon.
    match &args.command {
        Command::Pki(cmd) => return pki(cmd, fmt).map(|_| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Args::command(), "aer", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cfg = ClientConfig::resolve(&Overrides {
        config: args.conn.config.clone(),
        socket: args.conn.socket.clone(),
        endpoint: args.conn.endpoint.clone(),
        pki_dir: args.conn.pki_dir.clone(),
        identity: args.conn.identity.clone(),
        server_name: args.conn.server_name.clone(),
    })?;
    let client = Client::connect(&cfg).await?;
    match call(&client, args.command, fmt).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(status) => Ok(status_exit(&status)),
    }
}

fn pki_paths(
    dir: &std::path::Path,
    ca_key_dir: Option<&std::path::Path>,
) -> aurae_identity::PkiPaths {
    match ca_key_dir {
        Some(k) => aurae_identity::PkiPaths::with_ca_key_dir(dir, k),
        None => aurae_identity::PkiPaths::new(dir),
    }
}

fn pki(cmd: &PkiCmd, fmt: Format) -> anyhow::Result<()> {
    match cmd {
        PkiCmd::Init {
            dir,
            ca_key_dir,
            trust_domain,
            sans,
        } => {
            let p = Pki::init_paths(&pki_paths(dir, ca_key_dir.as_deref()), trust_domain, sans)?;
            print(
                fmt,
                &[vec![
                    ("dir", json!(p.dir)),
                    ("ca", json!(p.ca_cert)),
                    ("ca_key", json!(p.ca_key)),
                    ("server", json!(p.server_cert)),
                    (
                        "server_id",
                        json!(format!("spiffe://{trust_domain}/auraed")),
                    ),
                    ("admin", json!(p.admin_cert)),
                    (
                        "admin_id",
                        json!(format!("spiffe://{trust_domain}/operator/admin")),
                    ),
                ]],
                true,
            );
        }
        PkiCmd::Issue {
            dir,
            ca_key_dir,
            name,
            path,
            days,
        } => {
            let ca = aurae_identity::tls::load_certs(&dir.join("ca.pem"))?;
            let td = ca
                .first()
                .and_then(aurae_identity::tls::ca_trust_domain)
                .ok_or_else(|| {
                    anyhow!(
                        "{}: the CA certificate names no trust domain",
                        dir.display()
                    )
                })?;
            let path = path.clone().unwrap_or_else(|| format!("/operator/{name}"));
            let id = SpiffeId::new(&td, &path)?;
            let (cert, key) =
                Pki::issue_client_paths(&pki_paths(dir, ca_key_dir.as_deref()), name, &id, *days)?;
            print(
                fmt,
                &[vec![
                    ("id", json!(id.to_string())),
                    ("cert", json!(cert)),
                    ("key", json!(key)),
                ]],
                true,
            );
        }
    }
    Ok(())
}

async fn call(c: &Client, cmd: Command, fmt: Format) -> Result<(), tonic::Status> {
    let grace = |g: Option<Duration>| g.map(proto_duration);
    match cmd {
        Command::Pki(_) | Command::Completions { .. } => {}
        Command::Health { service } => {
            let r = c
                .health()
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            let status = tonic_health::pb::health_check_response::ServingStatus::try_from(r.status)
                .map_or("UNKNOWN", |s| s.as_str_name());
            print(
                fmt,
                &[vec![("service", json!(service)), ("status", json!(status))]],
                true,
            );
        }
        Command::Info | Command::Version => {
            let i = c.daemon().info(pb::InfoRequest {}).await?.into_inner();
            let mut row: Row = vec![
                ("aer_version", json!(env!("CARGO_PKG_VERSION"))),
                ("auraed_version", json!(i.version)),
            ];
            if matches!(cmd, Command::Info) {
                row.extend([
                    ("mode", json!(i.mode)),
                    ("server_id", json!(i.server_id)),
                    ("you", json!(i.peer_id)),
                    ("started_at", ts(i.started_at.as_ref())),
                    ("cgroup_controllers", json!(i.cgroup_controllers)),
                    ("granted_methods", json!(i.granted_methods)),
                    ("granted_names", json!(i.granted_prefixes)),
                    ("granted_extras", json!(i.granted_extras)),
                    ("warnings", json!(i.warnings)),
                ]);
            }
            print(fmt, &[row], true);
        }
        Command::Run(a) => {
            let bad = |e: anyhow::Error| tonic::Status::invalid_argument(e.to_string());
            let env = env_pairs(&a.env).map_err(bad)?;
            let exe = match a.image {
                Some(image) => pb::Executable {
                    cell: a.cell,
                    name: a.name,
                    container: Some(
                        a.container
                            .proto(image, a.argv, env, a.uid, a.gid)
                            .map_err(bad)?,
                    ),
                    ..Default::default()
                },
                None if a.argv.is_empty() => {
                    return Err(tonic::Status::invalid_argument(
                        "give the program after `--` (or --image to run a container)",
                    ));
                }
                None => pb::Executable {
                    cell: a.cell,
                    name: a.name,
                    argv: a.argv,
                    env,
                    working_dir: a.cwd,
                    uid: a.uid,
                    gid: a.gid,
                    stdin: Vec::new(),
                    container: None,
                },
            };
            let s = c.runtime().run_executable(exe).await?.into_inner();
            print(fmt, &[exe_row(&s)], true);
        }
        Command::Executable(e) => executable(c, e, fmt).await?,
        Command::Image(cmd) => image(c, cmd, fmt).await?,
        Command::Cell(cmd) => cell(c, cmd, fmt).await?,
        Command::RunCell(a) => {
            let bad = |e: anyhow::Error| tonic::Status::invalid_argument(e.to_string());
            let cell = pb::Cell {
                name: a.name,
                limits: Some(a.limits.proto().map_err(bad)?),
                namespaces: Some(a.ns.proto().map_err(bad)?),
                container: Some(
                    a.container
                        .proto(
                            a.image,
                            a.args,
                            env_pairs(&a.env).map_err(bad)?,
                            a.uid,
                            a.gid,
                        )
                        .map_err(bad)?,
                ),
            };
            let s = c.runtime().run_cell(cell).await?.into_inner();
            print(fmt, &[cell_row(&s)], true);
        }
        Command::Vm(cmd) => {
            let mut v = c.virtual_machines();
            match cmd {
                VmCmd::Run {
                    name,
                    kernel,
                    initramfs,
                    cmdline,
                    vcpus,
                    memory,
                    drives,
                    net,
                } => {
                    let drives = drives
                        .iter()
                        .map(|d| match (d.strip_suffix(":rw"), d.strip_suffix(":ro")) {
                            (Some(p), _) => pb::Drive {
                                path: p.to_owned(),
                                read_only: false,
                                writable: true,
                            },
                            (None, p) => pb::Drive {
                                path: p.unwrap_or(d).to_owned(),
                                read_only: false,
                                writable: false,
                            },
                        })
                        .collect();
                    let s = c
                        .runtime()
                        .run_virtual_machine(pb::VirtualMachine {
                            name,
                            kernel_path: kernel,
                            initramfs_path: initramfs,
                            cmdline,
                            vcpus,
                            memory_bytes: memory,
                            drives,
                            interfaces: if net {
                                vec![pb::NetworkInterface::default()]
                            } else {
                                Vec::new()
                            },
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[vm_row(&s)], true);
                }
                VmCmd::Get { name: n } => {
                    print(fmt, &[vm_row(&v.get(name(&n)).await?.into_inner())], true)
                }
                VmCmd::List => {
                    let l = v.list(pb::ListRequest::default()).await?.into_inner();
                    print(
                        fmt,
                        &l.virtual_machines.iter().map(vm_row).collect::<Vec<_>>(),
                        false,
                    );
                }
                VmCmd::Stop { name: n } => {
                    let s = v
                        .stop(pb::StopRequest {
                            name: n,
                            grace_period: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[vm_row(&s)], true);
                }
                VmCmd::Wait { name: n } => {
                    let s = v
                        .wait(pb::WaitRequest {
                            name: n,
                            timeout: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[vm_row(&s)], true);
                }
                VmCmd::Free { name: n } => {
                    v.free(name(&n)).await?;
                }
                VmCmd::Console { name: n, follow } => {
                    let s = v
                        .console(pb::LogsRequest {
                            name: n,
                            follow,
                            from_offset: 0,
                        })
                        .await?
                        .into_inner();
                    stream_logs(s).await?;
                }
            }
        }
        Command::Instance(cmd) => {
            let mut i = c.instances();
            match cmd {
                InstanceCmd::Spawn {
                    name: n,
                    vcpus,
                    memory,
                } => {
                    let s = c
                        .runtime()
                        .spawn(pb::Instance {
                            name: n,
                            vcpus,
                            memory_bytes: memory,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[instance_row(&s)], true);
                }
                InstanceCmd::Get { name: n } => print(
                    fmt,
                    &[instance_row(&i.get(name(&n)).await?.into_inner())],
                    true,
                ),
                InstanceCmd::List => {
                    let l = i.list(pb::ListRequest::default()).await?.into_inner();
                    print(
                        fmt,
                        &l.instances.iter().map(instance_row).collect::<Vec<_>>(),
                        false,
                    );
                }
                InstanceCmd::Stop { name: n } => {
                    let s = i
                        .stop(pb::StopRequest {
                            name: n,
                            grace_period: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[instance_row(&s)], true);
                }
                InstanceCmd::Wait { name: n } => {
                    let s = i
                        .wait(pb::WaitRequest {
                            name: n,
                            timeout: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[instance_row(&s)], true);
                }
                InstanceCmd::Free { name: n } => {
                    i.free(name(&n)).await?;
                }
            }
        }
        Command::Pod(cmd) => {
            let mut p = c.pods();
            match cmd {
                PodCmd::Run {
                    name: n,
                    image,
                    port,
                } => {
                    let s = c
                        .runtime()
                        .run_pod(pb::Pod {
                            name: n,
                            container: Some(pb::Container {
                                image,
                                ..Default::default()
                            }),
                            listen_port: port,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[pod_row(&s)], true);
                }
                PodCmd::Get { name: n } => {
                    print(fmt, &[pod_row(&p.get(name(&n)).await?.into_inner())], true)
                }
                PodCmd::List => {
                    let l = p.list(pb::ListRequest::default()).await?.into_inner();
                    print(fmt, &l.pods.iter().map(pod_row).collect::<Vec<_>>(), false);
                }
                PodCmd::Stop { name: n } => {
                    let s = p
                        .stop(pb::StopRequest {
                            name: n,
                            grace_period: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[pod_row(&s)], true);
                }
                PodCmd::Wait { name: n } => {
                    let s = p
                        .wait(pb::WaitRequest {
                            name: n,
                            timeout: None,
                        })
                        .await?
                        .into_inner();
                    print(fmt, &[pod_row(&s)], true);
                }
                PodCmd::Free { name: n } => {
                    p.free(name(&n)).await?;
                }
                PodCmd::Logs { name: n, follow } => {
                    let s = p
                        .logs(pb::LogsRequest {
                            name: n,
                            follow,
                            from_offset: 0,
                        })
                        .await?
                        .into_inner();
                    stream_logs(s).await?;
                }
            }
        }
        Command::Events { prefix, after } => {
            let mut s = c
                .events()
                .watch(pb::WatchEventsRequest {
                    kinds: vec![],
                    name_prefix: prefix,
                    after_sequence: after,
                })
                .await?
                .into_inner();
            while let Some(e) = s.message().await? {
                let kind = pb::Kind::try_from(e.kind).map_or("?", |k| k.as_str_name());
                let ty = pb::EventType::try_from(e.r#type).map_or("?", |t| t.as_str_name());
                print(
                    fmt,
                    &[vec![
                        ("seq", json!(e.sequence)),
                        ("at", ts(e.at.as_ref())),
                        ("kind", json!(kind)),
                        ("name", json!(e.name)),
                        ("type", json!(ty)),
                        ("exit", exit(e.exit.as_ref())),
                        ("message", json!(e.message)),
                    ]],
                    false,
                );
            }
        }
        Command::Shutdown { grace: g } => {
            c.daemon()
                .shutdown(pb::ShutdownRequest {
                    grace_period: grace(g),
                    reboot: false,
                })
                .await?;
            println!("auraed is shutting down");
        }
    }
    Ok(())
}

async fn executable(c: &Client, cmd: ExeCmd, fmt: Format) -> Result<(), tonic::Status> {
    let bad = |e: anyhow::Error| tonic::Status::invalid_argument(e.to_string());
    let mut x = c.executables();
    match cmd {
        ExeCmd::Get(r) => print(
            fmt,
            &[exe_row(&x.get(r.proto().map_err(bad)?).await?.into_inner())],
            true,
        ),
        ExeCmd::List { cell_prefix } => {
            let l = x
                .list(pb::ListExecutablesRequest { cell_prefix })
                .await?
                .into_inner();
            print(
                fmt,
                &l.executables.iter().map(exe_row).collect::<Vec<_>>(),
                false,
            );
        }
        ExeCmd::Stop { r, grace } => {
            let s = x
                .stop(pb::StopExecutableRequest {
                    executable: Some(r.proto().map_err(bad)?),
                    grace_period: grace.map(proto_duration),
                })
                .await?
                .into_inner();
            print(fmt, &[exe_row(&s)], true);
        }
        ExeCmd::Signal { r, signal } => {
            let s = x
                .signal(pb::SignalExecutableRequest {
                    executable: Some(r.proto().map_err(bad)?),
                    signal,
                })
                .await?
                .into_inner();
            print(fmt, &[exe_row(&s)], true);
        }
        ExeCmd::Wait { r, timeout } => {
            let s = x
                .wait(pb::WaitExecutableRequest {
                    executable: Some(r.proto().map_err(bad)?),
                    timeout: timeout.map(proto_duration),
                })
                .await?
                .into_inner();
            print(fmt, &[exe_row(&s)], true);
        }
        ExeCmd::Free(r) => {
            x.free(r.proto().map_err(bad)?).await?;
        }
        ExeCmd::Logs { r, follow } => {
            let s = x
                .logs(pb::ExecutableLogsRequest {
                    executable: Some(r.proto().map_err(bad)?),
                    follow,
                    from_offset: 0,
                })
                .await?
                .into_inner();
            stream_logs(s).await?;
        }
        ExeCmd::Stats(r) => print(
            fmt,
            &[stats_row(
                &x.stats(r.proto().map_err(bad)?).await?.into_inner(),
            )],
            true,
        ),
    }
    Ok(())
}

async fn cell(c: &Client, cmd: CellCmd, fmt: Format) -> Result<(), tonic::Status> {
    let bad = |e: anyhow::Error| tonic::Status::invalid_argument(e.to_string());
    let mut x = c.cells();
    match cmd {
        CellCmd::Allocate {
            name: n,
            limits,
            ns,
        } => {
            let s = x
                .allocate(pb::Cell {
                    name: n,
                    limits: Some(limits.proto().map_err(bad)?),
                    namespaces: Some(ns.proto().map_err(bad)?),
                    container: None,
                })
                .await?
                .into_inner();
            print(fmt, &[cell_row(&s)], true);
        }
        CellCmd::Get { name: n } => {
            print(fmt, &[cell_row(&x.get(name(&n)).await?.into_inner())], true)
        }
        CellCmd::List { prefix } => {
            let l = x
                .list(pb::ListRequest {
                    name_prefix: prefix,
                })
                .await?
                .into_inner();
            print(
                fmt,
                &l.cells.iter().map(cell_row).collect::<Vec<_>>(),
                false,
            );
        }
        CellCmd::Stop { name: n, grace } => {
            let s = x
                .stop(pb::StopRequest {
                    name: n,
                    grace_period: grace.map(proto_duration),
                })
                .await?
                .into_inner();
            print(fmt, &[cell_row(&s)], true);
        }
        CellCmd::Free { name: n } => {
            x.free(name(&n)).await?;
            println!("freed {n}");
        }
        CellCmd::Stats { name: n } => print(
            fmt,
            &[stats_row(&x.stats(name(&n)).await?.into_inner())],
            true,
        ),
        CellCmd::Tree { prefix } => {
            let mut cells = x
                .list(pb::ListRequest {
                    name_prefix: prefix,
                })
                .await?
                .into_inner()
                .cells;
            cells.sort_by(|a, b| a.name.cmp(&b.name));
            let mut rows = Vec::new();
            for cell in &cells {
                let st = x
                    .stats(name(&cell.name))
                    .await
                    .map(|r| r.into_inner())
                    .unwrap_or_default();
                let l = cell.limits.clone().unwrap_or_default();
                let depth = cell.name.matches('/').count();
                let label = cell.name.rsplit('/').next().unwrap_or(&cell.name);
                let cpu = l.cpu_max.map_or("-".to_owned(), |c| {
                    if c.quota_us == 0 {
                        "max".to_owned()
                    } else {
                        format!("{}/{}", c.quota_us, c.period_us)
                    }
                });
                rows.push(vec![
                    (
                        "cell",
                        json!(if fmt == Format::Json {
                            cell.name.clone()
                        } else {
                            format!("{}{label}", "  ".repeat(depth))
                        }),
                    ),
                    ("phase", phase(cell.phase)),
                    ("executables", json!(cell.executables.len())),
                    (
                        "memory",
                        json!(format!(
                            "{} / {}",
                            size(Some(st.memory_current_bytes)),
                            size(l.memory_max_bytes)
                        )),
                    ),
                    (
                        "pids",
                        json!(format!(
                            "{} / {}",
                            st.pids_current,
                            l.pids_max.map_or("-".into(), |p| p.to_string())
                        )),
                    ),
                    ("cpu_max", json!(cpu)),
                    ("cpu_usage_ms", json!(st.cpu_usage_usec / 1000)),
                ]);
            }
            print(fmt, &rows, false);
        }
    }
    Ok(())
}

async fn image(c: &Client, cmd: ImageCmd, fmt: Format) -> Result<(), tonic::Status> {
    let mut x = c.images();
    match cmd {
        ImageCmd::Pull { image } => {
            let mut s = x.pull(pb::PullImageRequest { image }).await?.into_inner();
            let mut last_pct = std::collections::HashMap::new();
            while let Some(p) = s.message().await? {
                if let Some(i) = p.image {
                    print(
                        fmt,
                        &[vec![
                            ("reference", json!(i.reference)),
                            ("digest", json!(i.digest)),
                            ("layers", json!(i.layers)),
                            ("fetched_bytes", json!(i.fetched_bytes)),
                        ]],
                        true,
                    );
                    continue;
                }
                // One line per layer and phase, and every 25 % while downloading.
                let pct = (p.done_bytes * 100)
                    .checked_div(p.total_bytes)
                    .unwrap_or(100)
                    / 25;
                let key = (p.layer.clone(), p.phase.clone());
                if fmt == Format::Table && last_pct.insert(key, pct) != Some(pct) {
                    let short = p.layer.get(7..19).unwrap_or(&p.layer);
                    eprintln!(
                        "{short}  {:<11} {:>10} / {}",
                        p.phase,
                        size(Some(p.done_bytes)),
                        size(Some(p.total_bytes))
                    );
                }
            }
        }
        ImageCmd::Ls => {
            let l = x.list(pb::ListImagesRequest {}).await?.into_inner();
            let rows: Vec<Row> = l
                .images
                .iter()
                .map(|i| {
                    vec![
                        ("reference", json!(i.reference)),
                        ("digest", json!(i.digest)),
                        ("layers", json!(i.layers)),
                        ("size", json!(size(Some(i.size_bytes)))),
                    ]
                })
                .collect();
            print(fmt, &rows, false);
        }
        ImageCmd::Rm { image } => {
            let r = x
                .remove(pb::RemoveImageRequest { image })
                .await?
                .into_inner();
            println!("removed {}", r.reference);
        }
    }
    Ok(())
}
