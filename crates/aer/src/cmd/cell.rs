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
    pub fn proto(&self) -> anyhow::Result<pb::CellLimits> {
        Ok(pb::CellLimits {
            cpu_weight: self.cpu_weight,
            cpu_max: self.cpu_max.as_deref().map(cpu_max).transpose()?,
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
    /// Share a host namespace: pid, net, ipc, uts, mount, cgroup (repeatable; needs a policy grant).
    #[arg(long = "share-host")]
    share: Vec<String>,
    /// Run the cell in a new user namespace.
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
        CellCmd::Allocate { name, limits, ns } => {
            let cell = pb::Cell {
                name,
                limits: Some(limits.proto().map_err(invalid)?),
                namespaces: Some(ns.proto().map_err(invalid)?),
                container: None,
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

/// `aer cell tree`: every cell under the prefix, indented below its parent, with usage
/// against its limits (a cell whose stats fail shows zero usage).
async fn tree(x: &mut CellsClient<Channel>, prefix: String, fmt: Format) -> Result<(), Status> {
    let mut cells = list(x, prefix).await?;
    cells.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows = Vec::new();
    for cell in &cells {
        let st = x
            .stats(name(&cell.name))
            .await
            .map(|r| r.into_inner())
            .unwrap_or_default();
        rows.push(tree_row(cell, &st, fmt));
    }
    print(fmt, &rows, false);
    Ok(())
}

fn tree_row(cell: &pb::CellStatus, st: &pb::ResourceStats, fmt: Format) -> Row {
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
        let Command::Cell(CellCmd::Allocate { name, limits, ns }) = parse(line).unwrap() else {
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
