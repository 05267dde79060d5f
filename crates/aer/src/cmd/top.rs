//! `aer top`: a live tree of everything auraed runs: cells (nested) with their executables
//! and containers, virtual machines, spawned instances, and pods with their container and
//! instance; CPU % (cpu_usage_usec deltas between refreshes over the time between them),
//! memory against its limit, pids against pids.max, IO read / written, and the state.
//!
//! On a terminal it redraws in place every `--interval` on the alternate screen (plain
//! ANSI: enter, home, erase; the screen is restored on exit, Ctrl-C, SIGTERM and errors),
//! fitted to the terminal's width. On a pipe, with `--once`/`-n 1` or `-o json` it prints
//! snapshots: a plain table without escape codes, or the tree as nested JSON objects.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    time::{Duration, Instant, SystemTime},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use clap::Args;
use serde::Serialize;
use tonic::{Code, Status};

use crate::{
    cmd::{
        cell::{depth_and_label, walk},
        size,
    },
    output::{Format, printable},
    units::parse_duration,
};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often to refresh: a number with ms, s, m or h (plain = seconds), at least
    /// 100ms, e.g. 500ms or 2s.
    #[arg(long, short = 'd', value_name = "DURATION", value_parser = parse_interval,
          default_value = "2s")]
    interval: Duration,
    /// Stop after this many refreshes, a count of at least 1, e.g. 10 [default: until
    /// Ctrl-C on a terminal; 1 on a pipe or with -o json].
    #[arg(long, short = 'n', value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,
    /// Print one snapshot and exit (a plain table, or one JSON object with -o json): the
    /// same as -n 1.
    #[arg(long, conflicts_with = "iterations")]
    once: bool,
    /// Only what is named under this prefix, e.g. web (the cells web, web/api …, and the
    /// VMs, instances and pods whose names start with it) [default: everything the
    /// caller may see].
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "",
        hide_default_value = true
    )]
    prefix: String,
}

/// `--interval`: a duration of at least 100 ms.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is too short: refresh at most every 100ms"));
    }
    Ok(d)
}

/// How long a snapshot (pipe, `--once`, JSON) measures CPU over before it prints.
const SNAPSHOT_SAMPLE: Duration = Duration::from_millis(500);

pub async fn run(c: &Client, a: TopArgs, fmt: Format) -> Result<(), Status> {
    // `-n 1` is `--once`: one plain snapshot, even on a terminal.
    let once = a.once || a.iterations == Some(1);
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    let live = fmt == Format::Table && !once && !dumb && std::io::stdout().is_terminal();
    let frames = if once {
        1
    } else {
        a.iterations.unwrap_or(if live { u64::MAX } else { 1 })
    };
    let mut sampler = Sampler::new(c, a.prefix.clone(), a.interval).await?;
    if live {
        live_loop(&mut sampler, a.interval, frames).await
    } else {
        snapshots(&mut sampler, a.interval, frames, fmt).await
    }
}

// ---------------------------------------------------------------------------------------
// The tree.

/// What a node of the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Cell,
    Executable,
    Container,
    Vm,
    Instance,
    Pod,
}

impl NodeKind {
    fn word(self) -> &'static str {
        match self {
            Self::Cell => "cell",
            Self::Executable => "executable",
            Self::Container => "container",
            Self::Vm => "vm",
            Self::Instance => "instance",
            Self::Pod => "pod",
        }
    }
}

/// One thing auraed runs, with its usage and what runs below it. Figures auraed does not
/// measure for it (a VM's, or memory without the memory controller) are `None`.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub kind: NodeKind,
    /// The full name: `web/api` for a cell, `web/api/server` for an executable, the name
    /// of a VM, instance or pod, `pod/container` for a pod's container.
    pub name: String,
    /// What the tree shows for it (the last label of a cell).
    #[serde(skip)]
    pub label: String,
    /// The phase: starting, running, stopping, exited or failed.
    pub state: String,
    /// CPU time used since the last refresh over the time between them, in % of one CPU.
    pub cpu_percent: Option<f64>,
    pub cpu_usage_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_max_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub pids_max: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    /// A pid, an image, an address, how it ended or why it failed.
    pub info: String,
    pub children: Vec<Node>,
}

impl Node {
    fn new(kind: NodeKind, name: String, label: String, phase: i32) -> Self {
        Self {
            kind,
            name,
            label,
            state: crate::cmd::phase_name(phase),
            cpu_percent: None,
            cpu_usage_usec: None,
            memory_bytes: None,
            memory_max_bytes: None,
            pids: None,
            pids_max: None,
            io_read_bytes: None,
            io_write_bytes: None,
            info: String::new(),
            children: Vec::new(),
        }
    }

    /// Every node of this subtree, this one first.
    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Node)) {
        f(self);
        for c in &self.children {
            c.visit(f);
        }
    }
}

/// How it ended, for INFO: `code 3`, `signal 9 (OOM)`.
fn exit_word(e: Option<&pb::ExitStatus>) -> Option<String> {
    match crate::cmd::exit(e) {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// A digest shortened for a table: `sha256:0123456789ab`.
fn short_digest(d: &str) -> &str {
    d.get(..19).unwrap_or(d)
}

/// Puts `node` below the deepest node of `roots` whose name is a path prefix of its
/// name, or at the top. Cells come sorted by name, so parents are placed first.
fn nest(roots: &mut Vec<Node>, node: Node) {
    let parent = roots.iter_mut().rev().find(|n| {
        n.kind == NodeKind::Cell
            && node
                .name
                .strip_prefix(n.name.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    });
    match parent {
        Some(p) => nest(&mut p.children, node),
        None => roots.push(node),
    }
}

/// CPU % of one CPU between two readings of a cumulative counter: the µs used in between
/// over the µs elapsed. `None` without an earlier reading, when no time passed, or when the
/// counter went backwards (the workload was replaced under the same name): never negative.
pub fn cpu_percent(prev: Option<(u64, Instant)>, now: (u64, Instant)) -> Option<f64> {
    let (before, then) = prev?;
    let used = now.0.checked_sub(before)?;
    let elapsed = now.1.checked_duration_since(then)?.as_micros();
    if elapsed == 0 {
        return None;
    }
    Some(used as f64 * 100.0 / elapsed as f64)
}

/// The daemon as the header shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonLine {
    pub version: String,
    pub server_id: String,
    pub mode: String,
    pub depth: u32,
    /// Seconds since auraed started, as of this snapshot.
    pub uptime_s: Option<u64>,
}

/// Counts and sums over the tree.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub cells: usize,
    pub executables: usize,
    pub executables_running: usize,
    pub containers: usize,
    pub vms: usize,
    pub instances: usize,
    pub pods: usize,
    /// Sum over the top of the tree (a cell's figures include its children's).
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
}

/// One refresh: the daemon, the totals, anything that could not be listed, and the tree.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub daemon: Option<DaemonLine>,
    pub interval_ms: u64,
    pub totals: Totals,
    /// Kinds that could not be listed, and why (e.g. not granted).
    pub notes: Vec<String>,
    pub tree: Vec<Node>,
}

impl Snapshot {
    fn total(&mut self) {
        let mut t = Totals::default();
        for root in &self.tree {
            root.visit(&mut |n| match n.kind {
                NodeKind::Cell => t.cells += 1,
                NodeKind::Executable => {
                    t.executables += 1;
                    if n.state == "running" {
                        t.executables_running += 1;
                    }
                }
                NodeKind::Container => t.containers += 1,
                NodeKind::Vm => t.vms += 1,
                NodeKind::Instance => t.instances += 1,
                NodeKind::Pod => t.pods += 1,
            });
        }
        let cpu: Vec<f64> = self.tree.iter().filter_map(|n| n.cpu_percent).collect();
        t.cpu_percent = (!cpu.is_empty()).then(|| cpu.iter().sum());
        let mem: Vec<u64> = self.tree.iter().filter_map(|n| n.memory_bytes).collect();
        t.memory_bytes = (!mem.is_empty()).then(|| mem.iter().sum());
        self.totals = t;
    }
}

// ---------------------------------------------------------------------------------------
// Sampling.

/// Reads the tree from auraed.
struct Sampler {
    c: Client,
    prefix: String,
    interval: Duration,
    info: Option<pb::DaemonInfo>,
    meter: Meter,
}

/// Turns stats into a node's figures, remembering each CPU counter's last reading (by
/// kind and name) for the next refresh's CPU %.
#[derive(Debug, Default)]
struct Meter {
    /// Cgroup controllers auraed's cells have: without `memory`, `pids` or `io`, a
    /// cell's figure for it is unknown rather than 0.
    controllers: Vec<String>,
    prev: HashMap<String, (u64, Instant)>,
    next: HashMap<String, (u64, Instant)>,
}

impl Meter {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// Records a reading of the cumulative CPU counter `key` and returns its rate.
    fn rate(&mut self, key: String, usec: u64) -> Option<f64> {
        let now = (usec, Instant::now());
        let pct = cpu_percent(self.prev.get(&key).copied(), now);
        self.next.insert(key, now);
        pct
    }

    /// Fills a node's usage from `st`; `cgroup` figures (memory, pids, io) only where the
    /// controller is there.
    fn usage(&mut self, n: &mut Node, key: String, st: &pb::ResourceStats, cgroup: bool) {
        n.cpu_percent = self.rate(key, st.cpu_usage_usec);
        n.cpu_usage_usec = Some(st.cpu_usage_usec);
        let known = |c: &str| !cgroup || self.has(c);
        if known("memory") {
            n.memory_bytes = Some(st.memory_current_bytes);
        }
        if known("pids") {
            n.pids = Some(st.pids_current);
        }
        if known("io") {
            n.io_read_bytes = Some(st.io_read_bytes);
            n.io_write_bytes = Some(st.io_write_bytes);
        }
    }

    /// A refresh is done: its readings are the next one's earlier readings (and what went
    /// away is forgotten).
    fn turn(&mut self) {
        self.prev = std::mem::take(&mut self.next);
    }
}

/// What listing one kind gave: its items, or none and a note where the error leaves the
/// rest of the tree worth showing (not granted, not built, no cgroup for cells).
fn listed<T>(
    notes: &mut Vec<String>,
    what: &str,
    r: Result<Vec<T>, Status>,
) -> Result<Vec<T>, Status> {
    match r {
        Err(e) if skippable(&e) => {
            notes.push(format!("{what}: {:?}: {}", e.code(), e.message()));
            Ok(Vec::new())
        }
        r => r,
    }
}

/// Whether an error listing one kind leaves the rest of the tree worth showing.
fn skippable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::PermissionDenied | Code::Unimplemented | Code::FailedPrecondition
    )
}

impl Sampler {
    async fn new(c: &Client, prefix: String, interval: Duration) -> Result<Self, Status> {
        let info = match c.daemon().info(pb::InfoRequest {}).await {
            Ok(i) => Some(i.into_inner()),
            Err(e) if skippable(&e) => None,
            Err(e) => return Err(e),
        };
        let controllers = info
            .as_ref()
            .map(|i| i.cgroup_controllers.clone())
            .unwrap_or_default();
        Ok(Self {
            c: c.clone(),
            prefix,
            interval,
            info,
            meter: Meter {
                controllers,
                ..Meter::default()
            },
        })
    }

    async fn sample(&mut self) -> Result<Snapshot, Status> {
        self.meter.next.clear();
        let mut notes = Vec::new();
        let mut tree = Vec::new();
        let cells = walk(&mut self.c.cells(), self.prefix.clone()).await;
        for (cell, st) in listed(&mut notes, "cells", cells)? {
            let node = self.cell_node(&cell, st.as_ref()).await;
            nest(&mut tree, node);
        }
        let req = || pb::ListRequest {
            name_prefix: self.prefix.clone(),
        };
        let vms = self.c.virtual_machines().list(req()).await;
        let vms = listed(
            &mut notes,
            "vms",
            vms.map(|r| r.into_inner().virtual_machines),
        )?;
        let instances = self.c.instances().list(req()).await;
        let instances = listed(
            &mut notes,
            "instances",
            instances.map(|r| r.into_inner().instances),
        )?;
        let pods = self.c.pods().list(req()).await;
        let pods = listed(&mut notes, "pods", pods.map(|r| r.into_inner().pods))?;
        tree.extend(beside_cells(&mut self.meter, &vms, &instances, &pods));
        self.meter.turn();
        let uptime = self
            .info
            .as_ref()
            .and_then(|i| i.started_at.as_ref())
            .and_then(|t| {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                now.checked_sub(u64::try_from(t.seconds).ok()?)
            });
        let mut snap = Snapshot {
            daemon: self.info.as_ref().map(|i| DaemonLine {
                version: i.version.clone(),
                server_id: i.server_id.clone(),
                mode: i.mode.clone(),
                depth: i.depth,
                uptime_s: uptime,
            }),
            interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            totals: Totals::default(),
            notes,
            tree,
        };
        snap.total();
        Ok(snap)
    }

    async fn cell_node(&mut self, cell: &pb::CellStatus, st: Option<&pb::ResourceStats>) -> Node {
        let (_, label) = depth_and_label(&cell.name);
        let mut n = Node::new(
            NodeKind::Cell,
            cell.name.clone(),
            label.to_owned(),
            cell.phase,
        );
        let limits = cell.limits.clone().unwrap_or_default();
        n.memory_max_bytes = limits.memory_max_bytes;
        n.pids_max = limits.pids_max;
        if let Some(st) = st {
            self.meter
                .usage(&mut n, format!("cell {}", cell.name), st, true);
        }
        n.info = if !cell.message.is_empty() {
            cell.message.clone()
        } else if !cell.image_digest.is_empty() {
            format!("image {}", short_digest(&cell.image_digest))
        } else {
            String::new()
        };
        let mut exes = cell.executables.clone();
        exes.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &exes {
            let node = self.executable_node(e).await;
            n.children.push(node);
        }
        n
    }

    async fn executable_node(&mut self, e: &pb::ExecutableStatus) -> Node {
        let kind = if e.image_digest.is_empty() {
            NodeKind::Executable
        } else {
            NodeKind::Container
        };
        let mut n = Node::new(
            kind,
            format!("{}/{}", e.cell, e.name),
            e.name.clone(),
            e.phase,
        );
        let running = matches!(
            pb::Phase::try_from(e.phase),
            Ok(pb::Phase::Running | pb::Phase::Stopping)
        );
        if running {
            let r = pb::ExecutableRef {
                cell: e.cell.clone(),
                name: e.name.clone(),
            };
            if let Ok(st) = self.c.executables().stats(r).await {
                let key = format!("executable {}/{}", e.cell, e.name);
                self.meter.usage(&mut n, key, &st.into_inner(), false);
            }
        }
        let mut info = Vec::new();
        if let Some(x) = exit_word(e.exit.as_ref()) {
            info.push(x);
        }
        if e.pid > 0 && running {
            info.push(format!("pid {}", e.pid));
        }
        if !e.message.is_empty() {
            info.push(e.message.clone());
        }
        if kind == NodeKind::Container {
            info.push(format!("image {}", short_digest(&e.image_digest)));
        } else if !e.argv.is_empty() {
            info.push(e.argv.join(" "));
        }
        n.info = info.join("  ");
        n
    }
}

/// Everything beside the cells: VMs, then instances, then pods. A pod's own instance
/// shows below its pod, not again at the top.
fn beside_cells(
    m: &mut Meter,
    vms: &[pb::VirtualMachineStatus],
    instances: &[pb::InstanceStatus],
    pods: &[pb::PodStatus],
) -> Vec<Node> {
    let pod_instances: Vec<&str> = pods
        .iter()
        .filter_map(|p| p.instance.as_ref().map(|i| i.name.as_str()))
        .collect();
    let mut out: Vec<Node> = vms.iter().map(vm_node).collect();
    out.extend(
        instances
            .iter()
            .filter(|i| !pod_instances.contains(&i.name.as_str()))
            .map(instance_node),
    );
    out.extend(pods.iter().map(|p| pod_node(m, p)));
    out
}

/// A pod: its usage on this machine (its cgroup here), its container (as the instance
/// measures it) and its instance below it.
fn pod_node(m: &mut Meter, p: &pb::PodStatus) -> Node {
    let mut n = Node::new(NodeKind::Pod, p.name.clone(), p.name.clone(), p.phase);
    if let Some(st) = &p.host_stats {
        // The pod's cgroup here: its figures are there when the controller is.
        m.usage(&mut n, format!("pod {}", p.name), st, true);
    }
    n.memory_max_bytes = (p.host_memory_max_bytes > 0).then_some(p.host_memory_max_bytes);
    let mut info = Vec::new();
    if let Some(x) = exit_word(p.exit.as_ref()) {
        info.push(x);
    }
    if !p.endpoint.is_empty() {
        info.push(p.endpoint.clone());
    }
    if !p.message.is_empty() {
        info.push(p.message.clone());
    }
    if !p.image.is_empty() {
        info.push(p.image.clone());
    }
    n.info = info.join("  ");

    if !p.container.is_empty() {
        let phase = p
            .cell
            .as_ref()
            .and_then(|c| c.executables.iter().find(|e| e.name == p.container))
            .map_or(p.phase, |e| e.phase);
        let mut c = Node::new(
            NodeKind::Container,
            format!("{}/{}", p.name, p.container),
            p.container.clone(),
            phase,
        );
        if let Some(st) = &p.cell_stats {
            // Measured by the instance's auraed, whose controllers we do not know:
            // shown as it reports them.
            let key = format!("pod-container {}", p.name);
            m.usage(&mut c, key, st, false);
        }
        if let Some(cell) = &p.cell {
            let l = cell.limits.clone().unwrap_or_default();
            c.memory_max_bytes = l.memory_max_bytes;
            c.pids_max = l.pids_max;
        }
        n.children.push(c);
    }
    if let Some(i) = &p.instance {
        n.children.push(instance_node(i));
    }
    n
}

fn vm_node(v: &pb::VirtualMachineStatus) -> Node {
    let mut n = Node::new(NodeKind::Vm, v.name.clone(), v.name.clone(), v.phase);
    let mut info = Vec::new();
    if let Some(x) = exit_word(v.exit.as_ref()) {
        info.push(x);
    }
    if v.vmm_pid > 0 {
        info.push(format!("vmm pid {}", v.vmm_pid));
    }
    if !v.addresses.is_empty() {
        info.push(v.addresses.join(","));
    }
    if !v.message.is_empty() {
        info.push(v.message.clone());
    }
    n.info = info.join("  ");
    n
}

fn instance_node(i: &pb::InstanceStatus) -> Node {
    let mut n = Node::new(NodeKind::Instance, i.name.clone(), i.name.clone(), i.phase);
    let isolation = match pb::Isolation::try_from(i.isolation) {
        Ok(pb::Isolation::VirtualMachine) => "microVM",
        Ok(pb::Isolation::Cell) => "cell",
        _ => "auto",
    };
    let mut info = vec![isolation.to_owned()];
    if let Some(x) = exit_word(i.exit.as_ref()) {
        info.push(x);
    }
    if !i.endpoint.is_empty() {
        info.push(i.endpoint.clone());
    }
    if !i.message.is_empty() {
        info.push(i.message.clone());
    }
    n.info = info.join("  ");
    n
}

// ---------------------------------------------------------------------------------------
// Rendering.

/// Columns `s` takes on a terminal.
fn width_of(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

fn char_width(c: char) -> usize {
    let mut buf = [0u8; 4];
    console::measure_text_width(c.encode_utf8(&mut buf))
}

/// `s` cut to at most `w` columns, ending in `…` when cut.
pub fn truncate(s: &str, w: usize) -> String {
    if width_of(s) <= w {
        return s.to_owned();
    }
    if w == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let cw = char_width(c);
        if used + cw > w - 1 {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('…');
    out
}

/// `s` cut or padded with spaces to exactly `w` columns.
fn fit(s: &str, w: usize) -> String {
    let mut t = truncate(s, w);
    let pad = w.saturating_sub(width_of(&t));
    t.extend(std::iter::repeat_n(' ', pad));
    t
}

fn right(s: &str, w: usize) -> String {
    let t = truncate(s, w);
    format!("{}{t}", " ".repeat(w.saturating_sub(width_of(&t))))
}

fn pct(p: Option<f64>) -> String {
    p.map_or("-".into(), |p| format!("{p:.1}"))
}

/// `used / limit`, `used` without a limit, `-` when unknown.
fn against(used: Option<String>, limit: Option<String>) -> String {
    match (used, limit) {
        (None, _) => "-".into(),
        (Some(u), None) => u,
        (Some(u), Some(l)) => format!("{u} / {l}"),
    }
}

fn uptime(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

fn every(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

const HEADERS: [&str; 8] = [
    "NAME",
    "KIND",
    "STATE",
    "CPU%",
    "MEM / LIMIT",
    "PIDS / MAX",
    "IO R / W",
    "INFO",
];

/// The table's cells for every node, depth first, the name drawn as a tree.
fn rows(tree: &[Node]) -> Vec<[String; 8]> {
    fn walk(nodes: &[Node], indent: &str, top: bool, out: &mut Vec<[String; 8]>) {
        for (i, n) in nodes.iter().enumerate() {
            let last = i + 1 == nodes.len();
            let (branch, more) = match (top, last) {
                (true, _) => ("", ""),
                (false, false) => ("├─ ", "│  "),
                (false, true) => ("└─ ", "   "),
            };
            let name = format!("{indent}{branch}{}", printable(&n.label));
            let mem = against(
                n.memory_bytes.map(|b| size(Some(b))),
                n.memory_max_bytes.map(|b| size(Some(b))),
            );
            let pids = against(
                n.pids.map(|p| p.to_string()),
                n.pids_max.map(|p| p.to_string()),
            );
            let io = match (n.io_read_bytes, n.io_write_bytes) {
                (Some(r), Some(w)) => format!("{} / {}", size(Some(r)), size(Some(w))),
                _ => "-".into(),
            };
            out.push([
                name,
                n.kind.word().to_owned(),
                printable(&n.state),
                pct(n.cpu_percent),
                mem,
                pids,
                io,
                printable(&n.info),
            ]);
            walk(&n.children, &format!("{indent}{more}"), false, out);
        }
    }
    let mut out = Vec::new();
    walk(tree, "", true, &mut out);
    out
}

/// Column widths for `rows` in `width` columns (None: as wide as they need). INFO gives
/// way first (left out below 8 columns: width 0), then NAME (down to 8); whatever still
/// does not fit is cut at the edge.
pub fn widths(rows: &[[String; 8]], width: Option<usize>) -> [usize; 8] {
    let mut w = HEADERS.map(width_of);
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(width_of(cell));
            }
        }
    }
    let Some(total) = width else { return w };
    // Two spaces between shown columns.
    let need = |w: &[usize; 8]| {
        let shown = w.iter().filter(|c| **c > 0).count();
        w.iter().sum::<usize>() + 2 * shown.saturating_sub(1)
    };
    if need(&w) > total {
        let over = need(&w) - total;
        w[7] = w[7].saturating_sub(over);
        if w[7] < 8 {
            w[7] = 0;
        }
    }
    if need(&w) > total {
        let over = need(&w) - total;
        w[0] = w[0].saturating_sub(over).max(8);
    }
    w
}

/// The snapshot as lines of text (no escape codes), each at most `width` columns when
/// given, and at most `height` lines (the rest summed up in the last line).
pub fn render(s: &Snapshot, width: Option<usize>, height: Option<usize>) -> Vec<String> {
    let mut lines = Vec::new();
    lines.push(match &s.daemon {
        Some(d) => {
            let mut l = format!(
                "auraed {}  {}",
                printable(&d.version),
                printable(&d.server_id)
            );
            if let Some(u) = d.uptime_s {
                l.push_str(&format!("  up {}", uptime(u)));
            }
            if d.depth > 0 {
                l.push_str(&format!("  (instance, depth {})", d.depth));
            }
            l
        }
        None => "auraed (Daemon/Info not granted)".to_owned(),
    });
    let t = &s.totals;
    let mut l = format!(
        "cells {}  executables {} ({} running)  containers {}  vms {}  instances {}  pods {}",
        t.cells, t.executables, t.executables_running, t.containers, t.vms, t.instances, t.pods
    );
    if let Some(c) = t.cpu_percent {
        l.push_str(&format!("  cpu {c:.1}%"));
    }
    if let Some(m) = t.memory_bytes {
        l.push_str(&format!("  mem {}", size(Some(m))));
    }
    l.push_str(&format!("  every {}", every(s.interval_ms)));
    lines.push(l);
    for n in &s.notes {
        lines.push(format!("not shown: {}", printable(n)));
    }
    lines.push(String::new());

    let rows = rows(&s.tree);
    let w = widths(&rows, width);
    let line = |cells: [&str; 8]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(w).enumerate() {
            if w == 0 {
                continue;
            }
            if i > 0 {
                out.push_str("  ");
            }
            // Numbers align right, text left.
            if (3..=6).contains(&i) {
                out.push_str(&right(c, w));
            } else {
                out.push_str(&fit(c, w));
            }
        }
        out.trim_end().to_owned()
    };
    lines.push(line(HEADERS));
    let room = height.map(|h| h.saturating_sub(lines.len()));
    let shown = match room {
        Some(r) if rows.len() > r => r.saturating_sub(1),
        _ => rows.len(),
    };
    for r in rows.iter().take(shown) {
        lines.push(line([
            &r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7],
        ]));
    }
    if shown < rows.len() {
        lines.push(format!("… {} more", rows.len() - shown));
    }
    if rows.is_empty() {
        lines.push("(nothing runs)".to_owned());
    }
    match width {
        Some(w) => lines.iter().map(|l| truncate(l, w)).collect(),
        None => lines,
    }
}

// ---------------------------------------------------------------------------------------
// Output.

fn io_status(e: std::io::Error) -> Status {
    Status::internal(format!("writing the output: {e}"))
}

/// Pipe, `--once` or JSON: a baseline, then `frames` snapshots (the first after
/// [`SNAPSHOT_SAMPLE`] or the interval, whichever is shorter, so it has CPU %).
async fn snapshots(
    sampler: &mut Sampler,
    interval: Duration,
    frames: u64,
    fmt: Format,
) -> Result<(), Status> {
    sampler.sample().await?;
    let mut out = std::io::stdout().lock();
    for i in 0..frames {
        tokio::time::sleep(if i == 0 {
            interval.min(SNAPSHOT_SAMPLE)
        } else {
            interval
        })
        .await;
        let snap = sampler.sample().await?;
        let text = match fmt {
            Format::Json if frames == 1 => serde_json::to_string_pretty(&snap),
            Format::Json => serde_json::to_string(&snap),
            Format::Table => {
                let mut lines = render(&snap, None, None);
                if i + 1 < frames {
                    lines.push(String::new());
                }
                Ok(lines.join("\n"))
            }
        }
        .map_err(|e| Status::internal(format!("encoding the snapshot: {e}")))?;
        match writeln!(out, "{text}").and_then(|()| out.flush()) {
            Ok(()) => {}
            // `aer top | head`: the reader has seen enough.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(io_status(e)),
        }
    }
    Ok(())
}

/// The terminal's size: $COLUMNS / $LINES when set (as with `ls`), else what the
/// terminal reports, else 80×24.
fn screen_size() -> (usize, usize) {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|v| *v > 0)
    };
    let term = console::Term::stdout().size_checked();
    let cols = env("COLUMNS")
        .or(term.map(|(_, c)| usize::from(c)))
        .unwrap_or(80);
    let rows = env("LINES")
        .or(term.map(|(r, _)| usize::from(r)))
        .unwrap_or(24);
    (cols.max(20), rows.max(5))
}

const ENTER: &str = "\x1b[?1049h\x1b[?25l";
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
const HOME: &str = "\x1b[H";
/// Erase to the end of the line / of the screen.
const ERASE_LINE: &str = "\x1b[K";
const ERASE_BELOW: &str = "\x1b[J";

/// The alternate screen, held while `aer top` draws: left (and the cursor shown again)
/// when dropped, whatever the way out (Ctrl-C, an error, a panic unwinding).
struct Screen {
    out: std::io::Stdout,
}

impl Screen {
    fn enter() -> Result<Self, Status> {
        let mut out = std::io::stdout();
        out.write_all(ENTER.as_bytes())
            .and_then(|()| out.flush())
            .map_err(io_status)?;
        Ok(Self { out })
    }

    fn draw(&mut self, lines: &[String]) -> Result<(), Status> {
        let mut frame = String::from(HOME);
        for (i, l) in lines.iter().enumerate() {
            if i > 0 {
                frame.push_str("\r\n");
            }
            frame.push_str(l);
            frame.push_str(ERASE_LINE);
        }
        frame.push_str(ERASE_BELOW);
        let mut out = self.out.lock();
        out.write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .map_err(io_status)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = self.out.lock();
        let _ = out.write_all(LEAVE.as_bytes());
        let _ = out.flush();
    }
}

/// Resolves when the user asks `aer top` to end: Ctrl-C (SIGINT), SIGTERM or SIGHUP.
struct Stop {
    /// Registered once, up front: a signal that comes while a frame is drawn waits here
    /// for the next `requested` instead of being missed.
    signals: Vec<tokio::signal::unix::Signal>,
}

impl Stop {
    fn new() -> Result<Self, Status> {
        use tokio::signal::unix::{SignalKind, signal};
        let signals = [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ]
        .into_iter()
        .map(signal)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::internal(format!("handling Ctrl-C: {e}")))?;
        Ok(Self { signals })
    }

    async fn requested(&mut self) {
        let [int, term, hup] = self.signals.as_mut_slice() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
    }
}

/// On a terminal: redraw every `interval` until stopped (or `frames` were drawn). An error
/// before the first frame ends `aer top` with it; later ones show in the header while it
/// keeps trying.
async fn live_loop(sampler: &mut Sampler, interval: Duration, frames: u64) -> Result<(), Status> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut stop = Stop::new()?;
    let mut winch = signal(SignalKind::window_change()).ok();
    let mut screen = Screen::enter()?;
    let mut last: Option<Snapshot> = None;
    let mut drawn = 0u64;
    loop {
        let sampled = tokio::select! {
            r = sampler.sample() => r,
            () = stop.requested() => return Ok(()),
        };
        match sampled {
            Ok(s) => last = Some(s),
            Err(e) => match last.as_mut() {
                None => return Err(e),
                Some(s) => {
                    s.notes = vec![format!(
                        "everything: {:?}: {} (showing the last answer; retrying)",
                        e.code(),
                        e.message()
                    )];
                }
            },
        }
        let (w, h) = screen_size();
        if let Some(s) = &last {
            screen.draw(&render(s, Some(w), Some(h)))?;
        }
        drawn += 1;
        if drawn >= frames {
            return Ok(());
        }
        let wait = tokio::time::sleep(interval);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                () = stop.requested() => return Ok(()),
                Some(()) = async {
                    match winch.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Resized: redraw what we have at the new size.
                    let (w, h) = screen_size();
                    if let Some(s) = &last {
                        screen.draw(&render(s, Some(w), Some(h)))?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse};

    #[test]
    fn cpu_percent_is_the_delta_over_the_elapsed_time() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        // 1 s of CPU in 2 s: 50 %.
        let p = cpu_percent(Some((3_000_000, t0)), (4_000_000, t1)).unwrap();
        assert!((p - 50.0).abs() < 1e-9, "{p}");
        // Two CPUs busy for 500 ms: 200 % (of one CPU).
        let t2 = t0 + Duration::from_millis(500);
        let p = cpu_percent(Some((0, t0)), (1_000_000, t2)).unwrap();
        assert!((p - 200.0).abs() < 1e-9, "{p}");
        // Idle: 0.
        assert_eq!(cpu_percent(Some((7, t0)), (7, t1)), Some(0.0));
        // No earlier reading, no time passed, or a counter that went backwards (a new
        // workload under the same name): unknown, never negative.
        assert_eq!(cpu_percent(None, (7, t1)), None);
        assert_eq!(cpu_percent(Some((1, t1)), (9, t1)), None);
        assert_eq!(cpu_percent(Some((9_000_000, t0)), (1_000, t1)), None);
        assert_eq!(cpu_percent(Some((1, t1)), (9, t0)), None, "time backwards");
    }

    #[test]
    fn truncation_fits_the_width_and_marks_the_cut() {
        assert_eq!(truncate("web", 5), "web");
        assert_eq!(truncate("webserver", 5), "webs…");
        assert_eq!(width_of(&truncate("webserver", 5)), 5);
        assert_eq!(truncate("abc", 0), "");
        assert_eq!(truncate("abc", 1), "…");
        assert_eq!(fit("ab", 4), "ab  ");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(right("7", 3), "  7");
        // Tree glyphs take one column each; wide characters two.
        assert_eq!(width_of("└─ b"), 4);
        assert_eq!(width_of("日本"), 4);
        assert_eq!(truncate("日本語", 5), "日本…");
        // Escape sequences and line breaks from auraed cannot reach the terminal.
        assert_eq!(printable("a\x1b[2Jb\nc"), "a [2Jb c");
    }

    fn exe(name: &str, state: &str, cpu: Option<f64>) -> Node {
        let mut n = Node::new(
            NodeKind::Executable,
            format!("a/b/{name}"),
            name.into(),
            pb::Phase::Running as i32,
        );
        n.state = state.into();
        n.cpu_percent = cpu;
        n.info = "pid 42  /bin/sh -c while :; do :; done".into();
        n
    }

    fn cell(name: &str) -> Node {
        let (_, label) = depth_and_label(name);
        let mut n = Node::new(
            NodeKind::Cell,
            name.into(),
            label.into(),
            pb::Phase::Running as i32,
        );
        n.memory_bytes = Some(3 << 20);
        n.memory_max_bytes = Some(64 << 20);
        n.cpu_percent = Some(12.5);
        n
    }

    fn snapshot() -> Snapshot {
        let mut tree = Vec::new();
        nest(&mut tree, cell("a"));
        let mut b = cell("a/b");
        b.children.push(exe("spin", "running", Some(99.5)));
        nest(&mut tree, b);
        nest(&mut tree, cell("a/c"));
        nest(&mut tree, cell("z"));
        let mut s = Snapshot {
            daemon: Some(DaemonLine {
                version: "0.1.0".into(),
                server_id: "spiffe://aurae.test/auraed".into(),
                mode: "daemon".into(),
                depth: 0,
                uptime_s: Some(3725),
            }),
            interval_ms: 2000,
            totals: Totals::default(),
            notes: vec![],
            tree,
        };
        s.total();
        s
    }

    #[test]
    fn cells_nest_below_their_parents_and_totals_add_up() {
        let s = snapshot();
        let names: Vec<&str> = s.tree.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "z"]);
        let a = &s.tree[0];
        let kids: Vec<&str> = a.children.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(kids, ["a/b", "a/c"]);
        assert_eq!(a.children[0].children[0].name, "a/b/spin");
        assert_eq!(
            (
                s.totals.cells,
                s.totals.executables,
                s.totals.executables_running
            ),
            (4, 1, 1)
        );
        // Only the top counts: a cell's cgroup includes its children.
        assert_eq!(s.totals.cpu_percent, Some(25.0));
        assert_eq!(s.totals.memory_bytes, Some(6 << 20));
        // A name that only shares a prefix is no child: "ab" is not below "a".
        let mut t = Vec::new();
        nest(&mut t, cell("a"));
        nest(&mut t, cell("ab"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_table_draws_a_tree_within_the_width() {
        let s = snapshot();
        let lines = render(&s, None, None);
        assert!(lines[0].starts_with("auraed 0.1.0  spiffe://aurae.test/auraed  up 1h02m"));
        assert!(
            lines[1].contains("cells 4  executables 1 (1 running)"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("cpu 25.0%") && lines[1].contains("every 2s"));
        let body: Vec<&String> = lines
            .iter()
            .skip_while(|l| !l.starts_with("NAME"))
            .collect();
        assert!(body[1].starts_with("a "), "{body:?}");
        assert!(body[2].starts_with("├─ b "), "{body:?}");
        assert!(body[3].starts_with("│  └─ spin "), "{body:?}");
        assert!(body[4].starts_with("└─ c "), "{body:?}");
        assert!(body[5].starts_with("z "), "{body:?}");
        assert!(body[3].contains("99.5") && body[3].contains("executable"));
        assert!(body[1].contains("3.0M / 64.0M"));
        assert!(lines.iter().all(|l| !l.contains('\x1b')));

        for w in [40, 60, 100] {
            for l in render(&s, Some(w), None) {
                assert!(width_of(&l) <= w, "{w}: {l:?}");
            }
        }
        // Narrower: INFO gives way before NAME, then is left out; then names are cut,
        // keeping 8 columns.
        let w = widths(&rows(&s.tree), Some(100));
        assert!(w[7] >= 8 && w[0] == width_of("│  └─ spin"), "{w:?}");
        let narrow = render(&s, Some(80), None);
        assert!(
            narrow
                .iter()
                .any(|l| l.starts_with("│  └─ spin  executable")),
            "{narrow:?}"
        );
        assert!(narrow.iter().all(|l| !l.contains("INFO")), "{narrow:?}");
        let narrower = render(&s, Some(70), None);
        assert!(
            narrower
                .iter()
                .any(|l| l.starts_with("│  └─ s…  executable")),
            "{narrower:?}"
        );
        // Short: the rest is counted, not scrolled.
        let short = render(&s, Some(100), Some(7));
        assert_eq!(short.len(), 7, "{short:?}");
        assert_eq!(short.last().unwrap(), "… 3 more");
    }

    #[test]
    fn json_nests_the_tree() {
        let v = serde_json::to_value(snapshot()).unwrap();
        assert_eq!(v["tree"][0]["name"], "a");
        assert_eq!(v["tree"][0]["kind"], "cell");
        assert_eq!(v["tree"][0]["children"][0]["name"], "a/b");
        assert_eq!(
            v["tree"][0]["children"][0]["children"][0]["kind"],
            "executable"
        );
        assert_eq!(
            v["tree"][0]["children"][0]["children"][0]["cpu_percent"],
            99.5
        );
        assert_eq!(v["totals"]["cells"], 4);
        assert!(v["tree"][0].get("label").is_none());
    }

    #[test]
    fn top_flags_parse() {
        let Command::Top(a) = parse("top").unwrap() else {
            panic!("not top")
        };
        assert_eq!(a.interval, Duration::from_secs(2));
        assert_eq!((a.iterations, a.once), (None, false));
        let Command::Top(a) = parse("top --interval 500ms -n 3 --prefix web").unwrap() else {
            panic!("not top")
        };
        assert_eq!(a.interval, Duration::from_millis(500));
        assert_eq!((a.iterations, a.prefix.as_str()), (Some(3), "web"));
        let Command::Top(a) = parse("top --once -d 1s").unwrap() else {
            panic!("not top")
        };
        assert!(a.once);
        assert!(parse("top --interval 10ms").is_err(), "too short");
        assert!(parse("top --interval soon").is_err());
        assert!(parse("top -n 0").is_err());
        assert!(parse("top --once -n 2").is_err());
        assert!(parse("--instance a/b top --once").is_ok());
    }

    #[test]
    fn cell_figures_need_their_controller_and_executables_do_not() {
        let st = pb::ResourceStats {
            cpu_usage_usec: 5_000,
            memory_current_bytes: 4096,
            pids_current: 3,
            io_read_bytes: 10,
            io_write_bytes: 20,
            ..Default::default()
        };
        let node = || Node::new(NodeKind::Cell, "c".into(), "c".into(), 2);
        // No controllers (this host): a cell's memory, pids and io are unknown, not 0.
        let mut m = Meter::default();
        let mut n = node();
        m.usage(&mut n, "cell c".into(), &st, true);
        assert_eq!(
            (n.memory_bytes, n.pids, n.io_read_bytes),
            (None, None, None)
        );
        assert_eq!((n.cpu_usage_usec, n.cpu_percent), (Some(5_000), None));
        // An executable's figures come from /proc: always there.
        let mut n = node();
        m.usage(&mut n, "executable c/x".into(), &st, false);
        assert_eq!((n.memory_bytes, n.pids), (Some(4096), Some(3)));
        assert_eq!((n.io_read_bytes, n.io_write_bytes), (Some(10), Some(20)));
        // With the controllers, and a second reading: a rate.
        let mut m = Meter {
            controllers: vec!["memory".into(), "pids".into(), "io".into()],
            ..Meter::default()
        };
        m.usage(&mut node(), "cell c".into(), &st, true);
        m.turn();
        let mut n = node();
        m.usage(&mut n, "cell c".into(), &st, true);
        assert_eq!(
            (n.memory_bytes, n.pids, n.io_write_bytes),
            (Some(4096), Some(3), Some(20))
        );
        assert!(
            n.cpu_percent.is_some_and(|p| p == 0.0),
            "{:?}",
            n.cpu_percent
        );
        // What went away is forgotten at the turn.
        m.turn();
        m.turn();
        assert!(m.prev.is_empty());
    }

    #[test]
    fn pods_hold_their_container_and_instance_and_vms_stand_alone() {
        let inst = |name: &str| pb::InstanceStatus {
            name: name.into(),
            phase: pb::Phase::Running as i32,
            isolation: pb::Isolation::Cell as i32,
            endpoint: "10.200.0.2:8443".into(),
            ..Default::default()
        };
        let pod = pb::PodStatus {
            name: "web".into(),
            phase: pb::Phase::Running as i32,
            instance: Some(inst("web")),
            container: "web".into(),
            endpoint: "10.200.0.2:8080".into(),
            host_stats: Some(pb::ResourceStats {
                memory_current_bytes: 96 << 20,
                ..Default::default()
            }),
            host_memory_max_bytes: 384 << 20,
            cell_stats: Some(pb::ResourceStats {
                memory_current_bytes: 5 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let vm = pb::VirtualMachineStatus {
            name: "vm1".into(),
            phase: pb::Phase::Exited as i32,
            exit: Some(pb::ExitStatus {
                how: Some(pb::exit_status::How::Code(0)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = Meter {
            controllers: vec!["memory".into()],
            ..Meter::default()
        };
        let nodes = beside_cells(&mut m, &[vm], &[inst("web"), inst("solo")], &[pod]);
        let top: Vec<(&str, NodeKind)> = nodes.iter().map(|n| (n.name.as_str(), n.kind)).collect();
        assert_eq!(
            top,
            [
                ("vm1", NodeKind::Vm),
                ("solo", NodeKind::Instance),
                ("web", NodeKind::Pod)
            ],
            "the pod's instance is not shown twice"
        );
        assert_eq!(
            (nodes[0].state.as_str(), nodes[0].info.as_str()),
            ("exited", "code 0")
        );
        assert_eq!(nodes[0].cpu_percent, None, "no figures for a VM");
        let p = &nodes[2];
        assert_eq!(
            (p.memory_bytes, p.memory_max_bytes),
            (Some(96 << 20), Some(384 << 20))
        );
        let kids: Vec<(&str, NodeKind)> = p
            .children
            .iter()
            .map(|n| (n.name.as_str(), n.kind))
            .collect();
        assert_eq!(
            kids,
            [
                ("web/web", NodeKind::Container),
                ("web", NodeKind::Instance)
            ]
        );
        assert_eq!(p.children[0].memory_bytes, Some(5 << 20));
        assert!(
            nodes[1].info.starts_with("cell  10.200.0.2:8443"),
            "{}",
            nodes[1].info
        );
    }

    #[test]
    fn uptime_and_interval_read_short() {
        assert_eq!(uptime(42), "42s");
        assert_eq!(uptime(312), "5m12s");
        assert_eq!(uptime(3725), "1h02m");
        assert_eq!(uptime(2 * 86_400 + 4 * 3600), "2d04h");
        assert_eq!(every(500), "500ms");
        assert_eq!(every(2000), "2s");
    }
}
