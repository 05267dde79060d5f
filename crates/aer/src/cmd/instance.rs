//! `aer instance …`: Spawn and the Instances service (spawned auraed instances).

use std::time::Duration;

use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, instances_client::InstancesClient};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::{Status, transport::Channel};

use super::{
    dur, exit,
    lifecycle::{self, Lifecycle, kind},
    phase, ts,
};
use crate::{
    output::{Format, Row, print},
    progress::{self, Watch},
    units::{parse_duration, parse_size, proto_duration},
};

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Start a new auraed instance with its own SPIFFE identity, and wait until it is ready
    /// (a spinner on a terminal), e.g. `aer instance spawn web-1 --isolation cell`.
    Spawn(SpawnArgs),
    /// Instance templates: microVM instances snapshotted once, restored for each spawn of
    /// the same kernel, auraed and size (`aer instance template ls`, `… rm NAME`).
    #[command(subcommand)]
    Template(TemplateCmd),
    #[command(flatten)]
    Lifecycle(Lifecycle),
}

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// The stored templates: name, size, when built, how long it took, whether current.
    #[command(visible_alias = "ls")]
    List {
        /// Only templates whose names start with this, e.g. t-1x512m.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Removes a stored template (the next spawn with --template required builds it
    /// again), e.g. `aer instance template rm t-1x512m-0123456789abcdef`.
    #[command(visible_alias = "rm")]
    Remove {
        /// The template's name, as `aer instance template ls` shows it.
        name: String,
    },
}

/// Whether a microVM instance is restored from a template, as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TemplateArg {
    /// Restore from the matching template when one is stored; boot otherwise.
    Auto,
    /// Always boot the kernel.
    Never,
    /// Restore from the matching template, building it first when none is stored.
    Required,
}

impl From<TemplateArg> for pb::TemplateUse {
    fn from(t: TemplateArg) -> Self {
        match t {
            TemplateArg::Auto => Self::TemplateAuto,
            TemplateArg::Never => Self::TemplateNever,
            TemplateArg::Required => Self::TemplateRequired,
        }
    }
}

/// How a spawned instance is isolated, as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// A microVM where usable KVM exists, else an isolated cell.
    Auto,
    /// A microVM.
    Vm,
    /// An isolated cell.
    Cell,
}

impl From<IsolationArg> for pb::Isolation {
    fn from(i: IsolationArg) -> Self {
        match i {
            IsolationArg::Auto => Self::Auto,
            IsolationArg::Vm => Self::VirtualMachine,
            IsolationArg::Cell => Self::Cell,
        }
    }
}

/// An isolation as the word `--isolation` takes: auto, vm or cell.
pub fn isolation(i: i32) -> Value {
    json!(match pb::Isolation::try_from(i) {
        Ok(pb::Isolation::Auto) => "auto".to_owned(),
        Ok(pb::Isolation::VirtualMachine) => "vm".to_owned(),
        Ok(pb::Isolation::Cell) => "cell".to_owned(),
        Err(_) => format!("unknown({i})"),
    })
}

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The instance's name, a DNS label unique on this auraed, e.g. web-1.
    name: String,
    /// How to isolate it: a microVM (vm), a cell (cell), or a microVM where usable KVM
    /// exists, else a cell (auto).
    #[arg(long, value_enum, default_value_t = IsolationArg::Auto)]
    isolation: IsolationArg,
    /// Virtual CPUs for the microVM, a count 1..=32, e.g. 2.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Memory in bytes, with a K, M, G or T suffix (powers of 1024), e.g. 512M or 1G.
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    memory: u64,
    /// How long the instance may take to answer health with its SPIFFE ID: a number with
    /// ms, s, m or h (plain = seconds), e.g. 90s or 2m; at most 10m [default: auraed's, 60s].
    #[arg(long, value_parser = parse_duration)]
    ready_timeout: Option<Duration>,
    /// How long the instance's SVID is valid before it renews it: a number with ms, s, m
    /// or h (plain = seconds), 2m to 24h, e.g. 1h [default: auraed's, 1h].
    #[arg(long, value_parser = parse_duration)]
    svid_ttl: Option<Duration>,
    /// Guest kernel for the microVM, a path on auraed's machine, e.g.
    /// /srv/vm-images/vmlinuz [default: the one auraed was configured with].
    #[arg(long, default_value = "", hide_default_value = true)]
    kernel: String,
    /// Guest initramfs for the microVM, a path on auraed's machine, e.g.
    /// /srv/vm-images/initrd [default: the one auraed was configured with].
    #[arg(long, default_value = "", hide_default_value = true)]
    initramfs: String,
    /// Restore the microVM from a template (a snapshot of an instance booted once):
    /// auto (when one is stored), never, or required (built first when missing).
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    template: TemplateArg,
}

impl SpawnArgs {
    fn proto(self) -> pb::Instance {
        pb::Instance {
            name: self.name,
            isolation: pb::Isolation::from(self.isolation) as i32,
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            kernel_path: self.kernel,
            initramfs_path: self.initramfs,
            ready_timeout: self.ready_timeout.map(proto_duration),
            svid_ttl: self.svid_ttl.map(proto_duration),
            template: pb::TemplateUse::from(self.template) as i32,
        }
    }
}

/// What a table shows of an instance.
fn instance_row(s: &pb::InstanceStatus) -> Row {
    vec![
        ("name", json!(s.name)),
        ("phase", phase(s.phase)),
        ("isolation", isolation(s.isolation)),
        ("spiffe_id", json!(s.spiffe_id)),
        ("endpoint", json!(s.endpoint)),
        ("ready_time", dur(s.ready_time.as_ref())),
        ("message", json!(s.message)),
    ]
}

/// The rest of an instance's status, for `-o json`.
fn instance_detail(s: &pb::InstanceStatus) -> Row {
    vec![
        ("isolation_reason", json!(s.isolation_reason)),
        ("template", json!(s.template)),
        ("boot_reason", json!(s.boot_reason)),
        ("addresses", json!(s.addresses)),
        ("depth", json!(s.depth)),
        ("started_at", ts(s.started_at.as_ref())),
        ("boot_time", dur(s.boot_time.as_ref())),
        ("svid_expires_at", ts(s.svid_expires_at.as_ref())),
        ("exit", exit(s.exit.as_ref())),
    ]
}

/// What a table shows of a template.
fn template_row(t: &pb::InstanceTemplate) -> Row {
    vec![
        ("name", json!(t.name)),
        ("vcpus", json!(t.vcpus)),
        ("memory_bytes", json!(t.memory_bytes)),
        ("created_at", ts(t.created_at.as_ref())),
        ("build_time", dur(t.build_time.as_ref())),
        ("disk_bytes", json!(t.state_bytes + t.memory_disk_bytes)),
        ("current", json!(t.current)),
    ]
}

kind!(
    InstancesClient<Channel>,
    pb::InstanceStatus,
    instances,
    instance_row,
    instance_detail
);

pub async fn run(c: &Client, cmd: InstanceCmd, fmt: Format) -> Result<(), Status> {
    match cmd {
        InstanceCmd::Spawn(a) => {
            let inst = a.proto();
            let name = inst.name.clone();
            let watch = Watch {
                what: format!("spawning instance {name}"),
                first_phase: "starting its auraed; waiting for its health",
                name: &name,
                kinds: vec![pb::Kind::Instance],
                then: None,
            };
            let s = progress::wait(c, watch, c.runtime().spawn(inst))
                .await?
                .into_inner();
            let row = lifecycle::shown::<InstancesClient<Channel>>(fmt, &s);
            print(fmt, &[row], true);
        }
        InstanceCmd::Template(TemplateCmd::List { prefix }) => {
            let list = c
                .instances()
                .list_templates(pb::ListRequest {
                    name_prefix: prefix,
                })
                .await?
                .into_inner();
            let rows: Vec<Row> = list.templates.iter().map(template_row).collect();
            print(fmt, &rows, false);
        }
        InstanceCmd::Template(TemplateCmd::Remove { name }) => {
            let freed = c
                .instances()
                .remove_template(pb::NameRef { name })
                .await?
                .into_inner();
            print(fmt, &[vec![("removed", json!(freed.name))]], true);
        }
        InstanceCmd::Lifecycle(cmd) => lifecycle::run(c.instances(), cmd, fmt).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    fn spawn(line: &str) -> pb::Instance {
        match parse(line) {
            Ok(Command::Instance(InstanceCmd::Spawn(a))) => a.proto(),
            other => panic!("aer {line}: not instance spawn: {other:?}"),
        }
    }

    #[test]
    fn instance_spawn_and_lifecycle_parse() {
        let i = spawn("instance spawn i1 --memory 1G");
        assert_eq!(
            (i.name.as_str(), i.vcpus, i.memory_bytes),
            ("i1", 1, 1 << 30)
        );
        let i = spawn("instance spawn i2");
        assert_eq!(i.memory_bytes, 512 << 20);
        assert_eq!(i.isolation, pb::Isolation::Auto as i32);
        assert_eq!((i.ready_timeout, i.svid_ttl), (None, None));
        assert_eq!(
            (i.kernel_path.as_str(), i.initramfs_path.as_str()),
            ("", "")
        );
        assert!(matches!(
            parse("instance wait i1").unwrap(),
            Command::Instance(InstanceCmd::Lifecycle(Lifecycle::Wait { name, .. })) if name == "i1"
        ));
        for list in ["instance list", "instance ls"] {
            assert!(matches!(
                parse(list).unwrap(),
                Command::Instance(InstanceCmd::Lifecycle(Lifecycle::List))
            ));
        }
        assert!(parse("instance console i1").is_err());
    }

    #[test]
    fn templates_parse() {
        assert_eq!(
            spawn("instance spawn t1").template,
            pb::TemplateUse::TemplateAuto as i32
        );
        assert_eq!(
            spawn("instance spawn t1 --template required").template,
            pb::TemplateUse::TemplateRequired as i32
        );
        assert_eq!(
            spawn("instance spawn t1 --template never").template,
            pb::TemplateUse::TemplateNever as i32
        );
        assert!(parse("instance spawn t1 --template always").is_err());
        for line in [
            "instance template ls",
            "instance template list --prefix t-1x",
        ] {
            assert!(
                matches!(
                    parse(line).unwrap(),
                    Command::Instance(InstanceCmd::Template(TemplateCmd::List { .. }))
                ),
                "{line}"
            );
        }
        assert!(matches!(
            parse("instance template rm t-1x512m-00").unwrap(),
            Command::Instance(InstanceCmd::Template(TemplateCmd::Remove { name })) if name == "t-1x512m-00"
        ));
        assert!(parse("instance template rm").is_err(), "NAME is required");
        let row = template_row(&pb::InstanceTemplate {
            name: "t-1x512m-00".into(),
            vcpus: 1,
            memory_bytes: 512 << 20,
            current: true,
            ..Default::default()
        });
        assert_eq!(row[0].1, json!("t-1x512m-00"));
        assert_eq!(row[6].1, json!(true));
    }

    #[test]
    fn instance_spawn_reads_every_flag() {
        let i = spawn(
            "instance spawn web --isolation vm --vcpus 2 --memory 256M --ready-timeout 90s \
             --svid-ttl 1h --kernel /srv/vm-images/vmlinuz --initramfs /srv/vm-images/initrd",
        );
        assert_eq!(i.name, "web");
        assert_eq!(i.isolation, pb::Isolation::VirtualMachine as i32);
        assert_eq!((i.vcpus, i.memory_bytes), (2, 256 << 20));
        let secs = |d: Option<prost_types::Duration>| d.map(|d| (d.seconds, d.nanos));
        assert_eq!(secs(i.ready_timeout), Some((90, 0)));
        assert_eq!(secs(i.svid_ttl), Some((3600, 0)));
        assert_eq!(i.kernel_path, "/srv/vm-images/vmlinuz");
        assert_eq!(i.initramfs_path, "/srv/vm-images/initrd");
        let i = spawn("instance spawn c1 --isolation cell --ready-timeout 5m --svid-ttl 120");
        assert_eq!(i.isolation, pb::Isolation::Cell as i32);
        assert_eq!(secs(i.ready_timeout), Some((300, 0)));
        assert_eq!(secs(i.svid_ttl), Some((120, 0)));
        assert!(parse("instance spawn x --isolation kvm").is_err());
        assert!(parse("instance spawn x --ready-timeout 1d").is_err());
        assert!(parse("instance spawn x --svid-ttl soon").is_err());
        assert!(parse("instance spawn x --memory 1X").is_err());
        assert!(parse("instance spawn").is_err(), "NAME is required");
    }

    #[test]
    fn isolation_words_map_both_ways() {
        for (word, arg, pb_val) in [
            ("auto", IsolationArg::Auto, pb::Isolation::Auto),
            ("vm", IsolationArg::Vm, pb::Isolation::VirtualMachine),
            ("cell", IsolationArg::Cell, pb::Isolation::Cell),
        ] {
            assert_eq!(IsolationArg::from_str(word, false), Ok(arg));
            assert_eq!(pb::Isolation::from(arg), pb_val);
            assert_eq!(isolation(pb_val as i32), json!(word));
        }
        assert_eq!(isolation(9), json!("unknown(9)"));
    }

    #[test]
    fn json_shows_every_field_and_the_table_a_summary() {
        let s = pb::InstanceStatus {
            name: "web".into(),
            phase: pb::Phase::Running as i32,
            isolation: pb::Isolation::Cell as i32,
            spiffe_id: "spiffe://aurae.local/instance/node/web".into(),
            endpoint: "10.200.0.2:8443".into(),
            isolation_reason: "no usable KVM".into(),
            ready_time: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            addresses: vec!["10.200.0.2".into()],
            depth: 1,
            ..Default::default()
        };
        let keys = |r: &Row| r.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        type I = InstancesClient<Channel>;
        let table = lifecycle::shown::<I>(Format::Table, &s);
        assert_eq!(
            keys(&table),
            [
                "name",
                "phase",
                "isolation",
                "spiffe_id",
                "endpoint",
                "ready_time",
                "message"
            ]
        );
        assert_eq!(table[2].1, json!("cell"));
        assert_eq!(table[5].1, json!("2.500s"));
        let all = lifecycle::shown::<I>(Format::Json, &s);
        for k in [
            "isolation_reason",
            "template",
            "boot_reason",
            "addresses",
            "depth",
            "started_at",
            "boot_time",
            "svid_expires_at",
            "exit",
        ] {
            assert!(keys(&all).contains(&k), "JSON lacks {k}");
        }
        assert_eq!(all.len(), table.len() + 9);
    }
}
