//! `aer pod …`: RunPod and the Pods service (a container in a spawned instance).

use std::time::Duration;

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, pods_client::PodsClient};
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};
use tonic::{Status, transport::Channel};

use super::{
    env_pairs, exit,
    instance::IsolationArg,
    instance::isolation,
    invalid,
    lifecycle::{self, Lifecycle, kind},
    phase, size, stats_row, stream_logs, ts,
};
use crate::{
    output::{Format, Row, print},
    progress::{self, Watch},
    units::{parse_duration, parse_size, proto_duration},
};

#[derive(Debug, Subcommand)]
pub enum PodCmd {
    /// Run a container in an instance spawned for it alone, and wait until it is up (and
    /// its --port accepts connections), with a spinner on a terminal.
    Run(PodRunArgs),
    #[command(flatten)]
    Lifecycle(Lifecycle),
    /// The container's output (stdout and stderr), from the instance.
    Logs {
        /// The pod's name, e.g. web.
        name: String,
        /// Keep the stream open and print new output as it is written.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Replay from this byte offset of the log, e.g. 4096 [default: 0, the oldest byte
        /// still kept].
        #[arg(
            long = "from",
            value_name = "OFFSET",
            default_value_t = 0,
            hide_default_value = true
        )]
        from_offset: u64,
    },
}

#[derive(Debug, Args)]
pub struct PodRunArgs {
    /// The pod's name, a DNS label unique on this auraed (it also names the pod's instance
    /// and cell), e.g. web.
    name: String,
    /// The image to run, by tag or digest, e.g. registry.local:5000/aurae/busybox:latest.
    #[arg(long)]
    image: String,
    /// TCP port the workload listens on inside the pod, 1..=65535, e.g. 8080; `run` then
    /// returns once it accepts connections, and ENDPOINT shows where to reach it
    /// [default: none].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    port: Option<u32>,
    /// Memory limit of the container (its cell's memory.max), in bytes with a K, M, G or T
    /// suffix (powers of 1024), e.g. 256M; the instance is then sized to it plus its own
    /// share [default: no limit but the instance's].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Memory of the whole instance, i.e. what the pod may cost this machine, in bytes
    /// with a K, M, G or T suffix (powers of 1024), e.g. 1G; must leave room for the
    /// instance's own auraed (and kernel, in a microVM) beyond --memory [default: --memory
    /// plus that share, else 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    instance_memory: Option<u64>,
    /// How to isolate the pod's instance: a microVM (vm), a cell (cell), or a microVM where
    /// usable KVM exists, else a cell (auto).
    #[arg(long, value_enum, default_value_t = IsolationArg::Auto)]
    isolation: IsolationArg,
    /// Virtual CPUs of the instance's microVM, a count 1..=32, e.g. 2 [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// How long the instance may take to come up: a number with ms, s, m or h (plain =
    /// seconds), e.g. 90s or 2m; at most 10m [default: auraed's, 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ready_timeout: Option<Duration>,
    /// Environment variable of the container, KEY=VALUE, e.g. -e LOG=debug (repeatable;
    /// added to the image's, overriding it).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Override the image's entrypoint, one word per flag (repeat for more), e.g.
    /// --entrypoint sh --entrypoint=-c.
    #[arg(long, value_name = "CMD")]
    entrypoint: Vec<String>,
    /// Override the image's working directory, an absolute path in the container, e.g.
    /// /srv.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Override the image's user: a numeric user id, e.g. 1000.
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// Override the image's group: a numeric group id, e.g. 1000.
    #[arg(long, value_name = "N")]
    gid: Option<u32>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Run with no_new_privs (setuid and file capabilities grant nothing), even where the
    /// caller's grant would allow new privileges.
    #[arg(long)]
    no_new_privileges: bool,
    /// Arguments overriding the image's cmd, after `--`, e.g. -- -f -p 8080.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

impl PodRunArgs {
    /// The RunPod request these flags ask for; unset sizes and timeouts are left to auraed.
    fn proto(self) -> anyhow::Result<pb::Pod> {
        let container = pb::Container {
            image: self.image,
            entrypoint: self.entrypoint,
            args: self.args,
            env: env_pairs(&self.env)?,
            working_dir: self.workdir.unwrap_or_default(),
            uid: self.uid,
            gid: self.gid,
            read_only_root: self.read_only,
            volumes: Vec::new(),
            no_new_privileges: self.no_new_privileges,
            dns: None,
            files: Vec::new(),
            cell_directories: Vec::new(),
        };
        let limits = self.memory.map(|m| pb::CellLimits {
            memory_max_bytes: Some(m),
            ..Default::default()
        });
        let instance = pb::Instance {
            isolation: pb::Isolation::from(self.isolation) as i32,
            vcpus: self.vcpus.unwrap_or(0),
            memory_bytes: self.instance_memory.unwrap_or(0),
            ready_timeout: self.ready_timeout.map(proto_duration),
            ..Default::default()
        };
        Ok(pb::Pod {
            name: self.name,
            container: Some(container),
            listen_port: self.port.unwrap_or(0),
            limits,
            instance: Some(instance),
        })
    }
}

/// What the whole pod uses of this machine's memory, against its bound when it has one:
/// `12.5M / 256.0M`, or `12.5M`.
fn host_memory(s: &pb::PodStatus) -> String {
    let current = size(s.host_stats.as_ref().map(|h| h.memory_current_bytes));
    match s.host_memory_max_bytes {
        0 => current,
        max => format!("{current} / {}", size(Some(max))),
    }
}

/// A row as one JSON object (for stats nested in a status).
fn object(r: Row) -> Value {
    Value::Object(
        r.into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<Map<_, _>>(),
    )
}

/// What a table shows of a pod.
fn pod_row(s: &pb::PodStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("endpoint", json!(s.endpoint)),
        ("image", json!(s.image)),
        (
            "isolation",
            s.instance
                .as_ref()
                .map_or(Value::Null, |i| isolation(i.isolation)),
        ),
        ("host_memory", json!(host_memory(s))),
        ("exit", exit(s.exit.as_ref())),
        ("message", json!(s.message)),
    ]
}

/// The rest of a pod's status, for `-o json`: raw numbers beside the table's summary.
fn pod_detail(s: &pb::PodStatus) -> Row {
    let stats = |st: Option<&pb::ResourceStats>| st.map_or(Value::Null, |st| object(stats_row(st)));
    let instance = s.instance.as_ref();
    vec![
        ("container", json!(s.container)),
        ("created_at", ts(s.created_at.as_ref())),
        ("instance", json!(instance.map(|i| i.name.as_str()))),
        ("spiffe_id", json!(instance.map(|i| i.spiffe_id.as_str()))),
        (
            "isolation_reason",
            json!(instance.map(|i| i.isolation_reason.as_str())),
        ),
        (
            "host_memory_current_bytes",
            json!(s.host_stats.as_ref().map(|h| h.memory_current_bytes)),
        ),
        ("host_memory_max_bytes", json!(s.host_memory_max_bytes)),
        ("host_stats", stats(s.host_stats.as_ref())),
        ("cell_stats", stats(s.cell_stats.as_ref())),
    ]
}

kind!(
    PodsClient<Channel>,
    pb::PodStatus,
    pods,
    pod_row,
    pod_detail
);

pub async fn run(c: &Client, cmd: PodCmd, fmt: Format) -> Result<(), Status> {
    match cmd {
        PodCmd::Run(a) => {
            let pod = a.proto().map_err(invalid)?;
            let name = pod.name.clone();
            let watch = Watch {
                what: format!("running pod {name}"),
                first_phase: "pulling the image; spawning its instance",
                name: &name,
                kinds: vec![pb::Kind::Pod, pb::Kind::Instance],
                then: Some((
                    pb::Kind::Instance,
                    "handing over the image, starting the container",
                )),
            };
            let s = progress::wait(c, watch, c.runtime().run_pod(pod))
                .await?
                .into_inner();
            let row = lifecycle::shown::<PodsClient<Channel>>(fmt, &s);
            print(fmt, &[row], true);
        }
        PodCmd::Lifecycle(cmd) => lifecycle::run(c.pods(), cmd, fmt).await?,
        PodCmd::Logs {
            name,
            follow,
            from_offset,
        } => {
            let req = pb::LogsRequest {
                name,
                follow,
                from_offset,
            };
            let logs = c.pods().logs(req).await?;
            stream_logs(logs.into_inner()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    fn pod_run(line: &str) -> anyhow::Result<pb::Pod> {
        match parse(line) {
            Ok(Command::Pod(PodCmd::Run(a))) => a.proto(),
            other => panic!("aer {line}: not pod run: {other:?}"),
        }
    }

    #[test]
    fn pod_run_logs_and_lifecycle_parse() {
        let p = pod_run("pod run p1 --image x --port 80").unwrap();
        assert_eq!((p.name.as_str(), p.listen_port), ("p1", 80));
        assert_eq!(p.container.unwrap().image, "x");
        let p = pod_run("pod run p1 --image x").unwrap();
        assert_eq!(p.listen_port, 0);
        assert!(matches!(
            parse("pod logs p1 --follow").unwrap(),
            Command::Pod(PodCmd::Logs {
                follow: true,
                from_offset: 0,
                ..
            })
        ));
        assert!(matches!(
            parse("pod logs p1 -f --from 4096").unwrap(),
            Command::Pod(PodCmd::Logs { follow: true, from_offset: 4096, name }) if name == "p1"
        ));
        assert!(matches!(
            parse("pod logs p1").unwrap(),
            Command::Pod(PodCmd::Logs {
                follow: false,
                from_offset: 0,
                ..
            })
        ));
        assert!(parse("pod logs p1 --from -1").is_err());
        assert!(matches!(
            parse("pod free p1").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Free { name })) if name == "p1"
        ));
        for list in ["pod list", "pod ls"] {
            assert!(matches!(
                parse(list).unwrap(),
                Command::Pod(PodCmd::Lifecycle(Lifecycle::List))
            ));
        }
        assert!(matches!(
            parse("pod get p1").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Get { name })) if name == "p1"
        ));
    }

    #[test]
    fn pod_stop_and_wait_take_grace_and_timeout() {
        assert!(matches!(
            parse("pod stop p1 --grace 30s").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Stop { name, grace: Some(g) }))
                if name == "p1" && g == Duration::from_secs(30)
        ));
        assert!(matches!(
            parse("pod stop p1").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Stop { grace: None, .. }))
        ));
        assert!(matches!(
            parse("pod wait p1 --timeout 5m").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Wait { name, timeout: Some(t) }))
                if name == "p1" && t == Duration::from_secs(300)
        ));
        assert!(matches!(
            parse("pod wait p1").unwrap(),
            Command::Pod(PodCmd::Lifecycle(Lifecycle::Wait { timeout: None, .. }))
        ));
        assert!(parse("pod stop p1 --grace soon").is_err());
        assert!(parse("pod wait p1 --timeout 1d").is_err());
    }

    #[test]
    fn pod_run_builds_the_pod() {
        let p = pod_run(
            "pod run web --image reg/x:1 --port 8080 --memory 256M --isolation cell -e A=B \
             -- -f -p 8080",
        )
        .unwrap();
        assert_eq!(p.name, "web");
        assert_eq!(p.listen_port, 8080);
        assert_eq!(p.limits.unwrap().memory_max_bytes, Some(256 << 20));
        let i = p.instance.unwrap();
        assert_eq!(i.isolation, pb::Isolation::Cell as i32);
        assert_eq!(
            (i.memory_bytes, i.vcpus, i.ready_timeout),
            (0, 0, None),
            "the instance is sized by auraed"
        );
        let c = p.container.unwrap();
        assert_eq!(c.image, "reg/x:1");
        assert_eq!(c.env.len(), 1);
        assert_eq!(c.env["A"], "B");
        assert_eq!(c.args, ["-f", "-p", "8080"]);
        assert!(c.entrypoint.is_empty() && c.volumes.is_empty());
        assert_eq!((c.uid, c.gid, c.working_dir.as_str()), (None, None, ""));
        assert!(!c.read_only_root && !c.no_new_privileges);
    }

    #[test]
    fn pod_run_reads_every_flag() {
        let p = pod_run(
            "pod run db --image reg/pg@sha256:ab --instance-memory 1G --memory 512M \
             --isolation vm --vcpus 2 --ready-timeout 2m --entrypoint sh --entrypoint=-c \
             --workdir /srv --uid 1000 --gid 100 --read-only --no-new-privileges \
             -e X=1 --env Y=a=b -- 'exec pg'",
        )
        .unwrap();
        let i = p.instance.unwrap();
        assert_eq!(i.isolation, pb::Isolation::VirtualMachine as i32);
        assert_eq!((i.memory_bytes, i.vcpus), (1 << 30, 2));
        assert_eq!(
            i.ready_timeout.map(|d| (d.seconds, d.nanos)),
            Some((120, 0))
        );
        assert_eq!(i.name, "", "auraed names the instance after the pod");
        assert_eq!(p.limits.unwrap().memory_max_bytes, Some(512 << 20));
        assert_eq!(p.listen_port, 0);
        let c = p.container.unwrap();
        assert_eq!(c.entrypoint, ["sh", "-c"]);
        assert_eq!(c.args, ["exec pg"]);
        assert_eq!(
            (c.working_dir.as_str(), c.uid, c.gid),
            ("/srv", Some(1000), Some(100))
        );
        assert!(c.read_only_root && c.no_new_privileges);
        assert_eq!((c.env["X"].as_str(), c.env["Y"].as_str()), ("1", "a=b"));

        // Unset: no limits at all, auto isolation.
        let p = pod_run("pod run p --image i").unwrap();
        assert_eq!(p.limits, None);
        assert_eq!(p.instance.unwrap().isolation, pb::Isolation::Auto as i32);
    }

    #[test]
    fn pod_run_refuses_bad_flags() {
        assert!(parse("pod run p --image i --isolation kvm").is_err());
        assert!(parse("pod run p --image i --isolation").is_err());
        assert!(parse("pod run p --image i --port 0").is_err());
        assert!(parse("pod run p --image i --port 65536").is_err());
        assert!(parse("pod run p --image i --memory 1X").is_err());
        assert!(parse("pod run p --image i --instance-memory lots").is_err());
        assert!(parse("pod run p --image i --ready-timeout 1d").is_err());
        assert!(parse("pod run p --image i --uid -1").is_err());
        assert!(
            parse("pod run p --image i -v /a:/b").is_err(),
            "no host volumes"
        );
        assert!(parse("pod run p").is_err(), "--image is required");
        assert!(parse("pod run --image i").is_err(), "NAME is required");
        let e = pod_run("pod run p --image i -e NOEQ").unwrap_err();
        assert_eq!(e.to_string(), r#"--env "NOEQ": write KEY=VALUE"#);
    }

    fn status() -> pb::PodStatus {
        pb::PodStatus {
            name: "web".into(),
            phase: pb::Phase::Running as i32,
            instance: Some(pb::InstanceStatus {
                name: "web".into(),
                isolation: pb::Isolation::VirtualMachine as i32,
                spiffe_id: "spiffe://aurae.local/instance/node/web".into(),
                ..Default::default()
            }),
            endpoint: "10.200.0.2:8080".into(),
            image: "reg/x@sha256:ab".into(),
            container: "web".into(),
            host_stats: Some(pb::ResourceStats {
                memory_current_bytes: 96 << 20,
                ..Default::default()
            }),
            host_memory_max_bytes: 384 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn the_table_shows_a_summary_and_json_every_field() {
        let keys = |r: &Row| r.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        type P = PodsClient<Channel>;
        let s = status();
        let table = lifecycle::shown::<P>(Format::Table, &s);
        assert_eq!(
            keys(&table),
            [
                "name",
                "phase",
                "endpoint",
                "image",
                "isolation",
                "host_memory",
                "exit",
                "message"
            ]
        );
        let v = |r: &Row, k: &str| r.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(v(&table, "phase"), json!("running"));
        assert_eq!(v(&table, "isolation"), json!("vm"));
        assert_eq!(v(&table, "host_memory"), json!("96.0M / 384.0M"));
        assert_eq!(v(&table, "exit"), Value::Null);

        let all = lifecycle::shown::<P>(Format::Json, &s);
        assert_eq!(
            &keys(&all)[..table.len()],
            keys(&table),
            "JSON keeps the table's keys"
        );
        assert_eq!(v(&all, "host_memory_current_bytes"), json!(96 << 20));
        assert_eq!(v(&all, "host_memory_max_bytes"), json!(384 << 20));
        assert_eq!(v(&all, "host_stats")["memory_current"], json!(96 << 20));
        assert_eq!(v(&all, "cell_stats"), Value::Null);
        assert_eq!(
            v(&all, "spiffe_id"),
            json!("spiffe://aurae.local/instance/node/web")
        );
        for k in ["container", "created_at", "instance", "isolation_reason"] {
            assert!(keys(&all).contains(&k), "JSON lacks {k}");
        }
    }

    #[test]
    fn an_ended_pod_shows_its_exit_and_unbounded_memory() {
        let mut s = status();
        s.phase = pb::Phase::Exited as i32;
        s.exit = Some(pb::ExitStatus {
            how: Some(pb::exit_status::How::Signal(9)),
            oom_killed: true,
            ..Default::default()
        });
        s.host_memory_max_bytes = 0;
        s.instance.as_mut().unwrap().isolation = pb::Isolation::Cell as i32;
        let row = pod_row(&s);
        let v = |k: &str| row.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(v("exit"), json!("signal 9 (OOM)"));
        assert_eq!(v("host_memory"), json!("96.0M"));
        assert_eq!(v("isolation"), json!("cell"));
        s.host_stats = None;
        s.instance = None;
        let row = pod_row(&s);
        let v = |k: &str| row.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(v("host_memory"), json!("-"));
        assert_eq!(v("isolation"), Value::Null);
    }
}
