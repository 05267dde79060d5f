//! `aer cell …`: the Cells service, and the limit and namespace options `aer run-cell`
//! shares.

use std::time::Duration;

use anyhow::{Context as _, bail};
use aurae_client::Client;
use aurae_proto::runtime::v0::{self as pb, cells_client::CellsClient};
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::{Status, transport::Channel};

use super::{invalid, name, phase, size, stats_row};
use crate::{
    output::{Format, Row, print},
    units::{parse_duration, parse_size, proto_duration},
};

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// CPU weight against sibling cells (cgroup cpu.weight), 1..=10000, e.g. 200
    /// [default: the kernel's, 100].
    #[arg(long, value_name = "N")]
    cpu_weight: Option<u64>,
    /// CPU quota per period in µs (cgroup cpu.max), QUOTA/PERIOD or max/PERIOD, e.g.
    /// 50000/100000 for half a CPU [default: no quota].
    #[arg(long, value_name = "QUOTA/PERIOD", value_parser = cpu_max)]
    cpu_max: Option<pb::CpuMax>,
    /// CPUs the cell may run on (cgroup cpuset.cpus), in the kernel's list format, e.g.
    /// 0-1,3 [default: all].
    #[arg(
        long,
        value_name = "LIST",
        default_value = "",
        hide_default_value = true
    )]
    cpuset_cpus: String,
    /// Memory the cell is guaranteed (cgroup memory.min), in bytes with a K, M, G or T
    /// suffix (powers of 1024), e.g. 32M [default: none].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_min: Option<u64>,
    /// Memory protected on a best-effort basis (cgroup memory.low), e.g. 64M [default:
    /// none].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_low: Option<u64>,
    /// Memory above which the cell is throttled and reclaimed (cgroup memory.high), e.g.
    /// 1G [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_high: Option<u64>,
    /// Memory limit, past which the OOM killer acts (cgroup memory.max), in bytes with a
    /// K, M, G or T suffix (powers of 1024), e.g. 512M or 2G [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_max: Option<u64>,
    /// Swap limit (cgroup memory.swap.max), e.g. 0 for no swap or 256M [default: no
    /// limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_swap_max: Option<u64>,
    /// Most processes and threads at once (cgroup pids.max), e.g. 32 [default: no
    /// limit].
    #[arg(long, value_name = "N")]
    pids_max: Option<u64>,
    /// IO weight against sibling cells (cgroup io.weight), 1..=10000, e.g. 200 [default:
    /// the kernel's, 100].
    #[arg(long, value_name = "N")]
    io_weight: Option<u64>,
}

impl LimitArgs {
    pub fn proto(&self) -> anyhow::Result<pb::CellLimits> {
        Ok(pb::CellLimits {
            cpu_weight: self.cpu_weight,
            cpu_max: self.cpu_max,
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

/// `QUOTA/PERIOD` in µs; a quota of `max` is 0 (no limit), a missing period 0 (auraed's).
fn cpu_max(s: &str) -> anyhow::Result<pb::CpuMax> {
    let (q, p) = s.split_once('/').unwrap_or((s, "0"));
    let quota_us = if q == "max" {
        0
    } else {
        q.parse().context("--cpu-max quota")?
    };
    Ok(pb::CpuMax {
        quota_us,
        period_us: p.parse().context("--cpu-max period")?,
    })
}

#[derive(Debug, Args)]
pub struct NsArgs {
    /// Share a host namespace: pid, net, ipc, uts, mount or cgroup (repeatable; needs a
    /// policy grant), e.g. --share-host net.
    #[arg(long = "share-host", value_name = "NS")]
    share: Vec<String>,
    /// Run the cell in a new user namespace (root inside, unprivileged outside).
    #[arg(long)]
    userns: bool,
}

impl NsArgs {
    pub fn proto(&self) -> anyhow::Result<pb::CellNamespaces> {
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
pub enum CellCmd {
    /// Create a cell, e.g. `aer cell allocate web --memory-max 64M --pids-max 32`.
    Allocate {
        /// The cell's name: DNS labels joined by '/', a child below its parent, e.g. web
        /// or web/api.
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        ns: NsArgs,
        /// Let the cell's processes open /dev/kvm to run VMs of their own (QEMU, another
        /// VMM); needs the grant's allow_kvm and a parent cell that has it, e.g. --kvm.
        #[arg(long)]
        kvm: bool,
    },
    /// Show one cell, e.g. `aer cell get web/api`.
    Get {
        /// The cell's full name, e.g. web/api.
        name: String,
    },
    /// Show the cells, e.g. `aer cell list --prefix web/`.
    List {
        /// Only cells whose name starts with this, e.g. web/ [default: every cell the
        /// caller may see].
        #[arg(
            long,
            value_name = "PREFIX",
            default_value = "",
            hide_default_value = true
        )]
        prefix: String,
    },
    /// Stop every process in a cell: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// The cell's full name, e.g. web.
        name: String,
        /// How long to wait after SIGTERM before killing: a number with ms, s, m or h
        /// (plain = seconds), at most 10m, e.g. 5s [default: auraed's, 10s].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Remove a cell and everything in it.
    Free {
        /// The cell's full name, e.g. web.
        name: String,
    },
    /// A cell's usage (cgroup cpu.stat, memory, pids, io).
    Stats {
        /// The cell's full name, e.g. web.
        name: String,
    },
    /// Cells as a tree, with their limits and usage.
    Tree {
        /// Only cells whose name starts with this, e.g. web [default: every cell the
        /// caller may see].
        #[arg(
            long,
            value_name = "PREFIX",
            default_value = "",
            hide_default_value = true
        )]
        prefix: String,
    },
}

pub fn cell_row(s: &pb::CellStatus) -> Row {
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

pub async fn run(c: &Client, cmd: CellCmd, fmt: Format) -> Result<(), Status> {
    let mut x = c.cells();
    let one = |s: tonic::Response<pb::CellStatus>| print(fmt, &[cell_row(&s.into_inner())], true);
    match cmd {
        CellCmd::Allocate {
            name,
            limits,
            ns,
            kvm,
        } => {
            let cell = pb::Cell {
                name,
                limits: Some(limits.proto().map_err(invalid)?),
                namespaces: Some(ns.proto().map_err(invalid)?),
                devices: kvm.then_some(pb::CellDevices { kvm }),
                ..Default::default()
            };
            one(x.allocate(cell).await?);
        }
        CellCmd::Get { name: n } => one(x.get(name(&n)).await?),
        CellCmd::List { prefix } => {
            let cells = list(&mut x, prefix).await?;
            print(fmt, &cells.iter().map(cell_row).collect::<Vec<_>>(), false);
        }
        CellCmd::Stop { name, grace } => {
            let grace_period = grace.map(proto_duration);
            one(x.stop(pb::StopRequest { name, grace_period }).await?);
        }
        CellCmd::Free { name: n } => {
            x.free(name(&n)).await?;
            println!("freed {n}");
        }
        CellCmd::Stats { name: n } => {
            let s = x.stats(name(&n)).await?.into_inner();
            print(fmt, &[stats_row(&s)], true);
        }
        CellCmd::Tree { prefix } => tree(&mut x, prefix, fmt).await?,
    }
    Ok(())
}

async fn list(
    x: &mut CellsClient<Channel>,
    name_prefix: String,
) -> Result<Vec<pb::CellStatus>, Status> {
    Ok(x.list(pb::ListRequest { name_prefix })
        .await?
        .into_inner()
        .cells)
}

/// Every cell under the prefix, sorted by name (so each comes right after its parent and
/// its parent's earlier children), with its usage: `None` where Stats failed (the cell was
/// freed in between, or Stats is not granted). Shared by `aer cell tree` and `aer top`.
pub async fn walk(
    x: &mut CellsClient<Channel>,
    prefix: String,
) -> Result<Vec<(pb::CellStatus, Option<pb::ResourceStats>)>, Status> {
    let mut cells = list(x, prefix).await?;
    cells.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(cells.len());
    for cell in cells {
        let st = x.stats(name(&cell.name)).await.map(|r| r.into_inner()).ok();
        out.push((cell, st));
    }
    Ok(out)
}

/// A cell's depth below the top (`web` 0, `web/api` 1) and its last label.
pub fn depth_and_label(name: &str) -> (usize, &str) {
    (
        name.matches('/').count(),
        name.rsplit('/').next().unwrap_or(name),
    )
}

/// `aer cell tree`: every cell under the prefix, indented below its parent, with usage
/// against its limits (a cell whose stats fail shows zero usage).
async fn tree(x: &mut CellsClient<Channel>, prefix: String, fmt: Format) -> Result<(), Status> {
    let rows: Vec<Row> = walk(x, prefix)
        .await?
        .iter()
        .map(|(cell, st)| tree_row(cell, &st.unwrap_or_default(), fmt))
        .collect();
    print(fmt, &rows, false);
    Ok(())
}

fn tree_row(cell: &pb::CellStatus, st: &pb::ResourceStats, fmt: Format) -> Row {
    let l = cell.limits.clone().unwrap_or_default();
    let (depth, label) = depth_and_label(&cell.name);
    let cpu = l.cpu_max.map_or("-".to_owned(), |c| {
        if c.quota_us == 0 {
            "max".to_owned()
        } else {
            format!("{}/{}", c.quota_us, c.period_us)
        }
    });
    let memory = format!(
        "{} / {}",
        size(Some(st.memory_current_bytes)),
        size(l.memory_max_bytes)
    );
    let pids_max = l.pids_max.map_or("-".into(), |p| p.to_string());
    vec![
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
        ("memory", json!(memory)),
        ("pids", json!(format!("{} / {pids_max}", st.pids_current))),
        ("cpu_max", json!(cpu)),
        ("cpu_usage_ms", json!(st.cpu_usage_usec / 1000)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    fn allocate(line: &str) -> (String, LimitArgs, NsArgs) {
        let Command::Cell(CellCmd::Allocate {
            name, limits, ns, ..
        }) = parse(line).unwrap()
        else {
            panic!("not cell allocate")
        };
        (name, limits, ns)
    }

    #[test]
    fn allocate_reads_limits_in_real_units() {
        let (name, limits, ns) = allocate(
            "cell allocate web --memory-max 64M --pids-max 32 --cpu-max 50000/100000 \
             --memory-high 1GiB --cpuset-cpus 0-1",
        );
        assert_eq!(name, "web");
        let l = limits.proto().unwrap();
        assert_eq!(l.memory_max_bytes, Some(64 << 20));
        assert_eq!(l.memory_high_bytes, Some(1 << 30));
        assert_eq!(l.pids_max, Some(32));
        assert_eq!(l.cpuset_cpus, "0-1");
        let c = l.cpu_max.unwrap();
        assert_eq!((c.quota_us, c.period_us), (50_000, 100_000));
        assert_eq!(ns.proto().unwrap(), pb::CellNamespaces::default());
        assert!(parse("cell allocate web --memory-max 12Q").is_err());
    }

    #[test]
    fn cpu_max_and_share_host_are_checked() {
        let c = cpu_max("max/100000").unwrap();
        assert_eq!((c.quota_us, c.period_us), (0, 100_000));
        let c = cpu_max("20000").unwrap();
        assert_eq!((c.quota_us, c.period_us), (20_000, 0));
        assert_eq!(cpu_max("abc/1").unwrap_err().to_string(), "--cpu-max quota");
        assert_eq!(cpu_max("1/x").unwrap_err().to_string(), "--cpu-max period");
        let (_, _, ns) = allocate("cell allocate w --share-host net --userns");
        let n = ns.proto().unwrap();
        assert!(n.share_host_net && n.user_namespace && !n.share_host_pid);
        let (_, _, ns) = allocate("cell allocate w --share-host foo");
        assert!(ns.proto().is_err());
    }

    #[test]
    fn cell_verbs_parse() {
        assert!(matches!(
            parse("cell stop web --grace 500ms").unwrap(),
            Command::Cell(CellCmd::Stop { grace: Some(g), .. }) if g == Duration::from_millis(500)
        ));
        assert!(matches!(
            parse("cell tree").unwrap(),
            Command::Cell(CellCmd::Tree { prefix }) if prefix.is_empty()
        ));
        assert!(matches!(
            parse("cell list --prefix web/").unwrap(),
            Command::Cell(CellCmd::List { prefix }) if prefix == "web/"
        ));
        assert!(parse("cell free").is_err(), "free needs a name");
    }
}
