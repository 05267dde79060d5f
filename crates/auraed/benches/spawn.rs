//! Spawn benchmark: what a cell-isolated `Runtime/Spawn` costs, interleaved round by round
//! with a `RunCell` (the order alternating) so load drifts hit both alike (see shared
//! performance guide). Prints median / p10 / p90 per contender, then `RATIO` lines:
//!
//! - S1 `Spawn` with `ISOLATION_CELL` (a nested auraed as the init of a new cell: its own
//!   PID/mount/net/UTS/IPC/cgroup namespaces, cgroup `instances/<name>`, a veth on the
//!   bridge `aurae0`, its own SPIFFE identity) until it answers health over mTLS with that
//!   ID, + `Instances/Free`; vs `RunCell` of a cached busybox image running `/bin/sleep 60`
//!   until running, + `Cells/Free`. Beside Spawn's RPC wall time, the `boot_time` and
//!   `ready_time` its status reports.
//! - S2 the child auraed's memory right after it is ready (VmRSS and its split, Pss) vs
//!   the parent auraed's VmRSS.
//! - S3 `Daemon/Info` round trip on the parent (Unix socket) vs on the child (TCP over the
//!   parent's bridge, dialled from inside the parent's network namespace), both mTLS,
//!   clients reused, 50 each, interleaved call by call.
//!
//! The daemon runs in a network namespace of its own (its bridge and the children's veths
//! never touch the host's), so the registry RunCell pulls from is started inside that
//! namespace too. Needs root, cgroup v2, `ip` and `nsenter` (prints SKIP otherwise); the
//! RunCell side also needs docker-registry and busybox-static (SKIP for that side only).
//! `AURAE_BENCH_ROUNDS` sets the rounds (default 8, after one warm-up round).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions, oci, registry, tier};

/// Where the registry listens: inside the daemon's fresh network namespace, so the port is
/// free and the host's loopback is never touched.
const REGISTRY: &str = "127.0.0.1:5000";

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}

fn report(name: &str, v: &[Duration], fails: usize) -> f64 {
    if v.is_empty() {
        println!("{name:<34} no samples  fails {fails}");
        return f64::NAN;
    }
    let (m, p10, p90) = stats(v.to_vec());
    println!(
        "{name:<34} median {m:8.3} ms  p10 {p10:8.3}  p90 {p90:8.3}  fails {fails}  n {}",
        v.len()
    );
    m
}

/// Median of KiB samples, in MiB (NaN when there are none).
fn median_mib(v: &[u64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).map_or(f64::NAN, |k| *k as f64 / 1024.0)
}

/// docker-registry started inside the daemon's network namespace (the daemon can reach
/// nothing outside it); killed by its handle on drop.
struct NsRegistry {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for NsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NsRegistry {
    fn start(d: &Daemon) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("aurae-registry-")
            .tempdir()?;
        let cfg = dir.path().join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {REGISTRY}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        // Spawned from a thread that joined the namespace: the process is born in it.
        let child = d.in_netns(move || {
            Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        })??;
        let mut r = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.in_netns(|| std::net::TcpStream::connect(REGISTRY).is_ok())? {
            if let Some(s) = r.child.try_wait()? {
                anyhow::bail!(
                    "docker-registry exited ({s}): {}",
                    std::fs::read_to_string(r.dir.path().join("registry.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!("docker-registry did not listen on {REGISTRY} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Busybox whose command is `/bin/sleep 60`, pushed from inside the namespace.
        d.in_netns(|| {
            oci::push_busybox(
                REGISTRY,
                "bench/busybox",
                serde_json::json!({"Cmd": ["/bin/sleep", "60"]}),
            )
        })??;
        Ok(r)
    }
}

/// Starts the registry, pushes busybox and has the daemon pull it (so RunCell finds it
/// cached); the registry is kept until the end.
async fn prepare_image(d: &Daemon, c: &Client, image: &str) -> anyhow::Result<NsRegistry> {
    let reg = NsRegistry::start(d)?;
    let mut progress = c
        .images()
        .pull(pb::PullImageRequest {
            image: image.to_owned(),
        })
        .await?
        .into_inner();
    while progress.message().await?.is_some() {}
    Ok(reg)
}

fn instance(name: &str) -> pb::Instance {
    pb::Instance {
        name: name.into(),
        // Explicit: AUTO would choose a microVM where usable KVM exists.
        isolation: pb::Isolation::Cell as i32,
        ready_timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn dur(d: Option<prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(d).ok())
}

/// KiB figures from `/proc/<pid>/status` (or `smaps_rollup`) lines like `VmRSS:  1234 kB`.
fn kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One S2 sample, in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Mem {
    child_rss: u64,
    child_anon: u64,
    child_file: u64,
    child_shmem: u64,
    child_pss: Option<u64>,
    parent_rss: u64,
}

/// The child auraed's memory (the first pid in its cgroup's `_procs/auraed` leaf) and the
/// parent's, read right after the child is ready.
///
/// The child runs from the parent's sealed memfd copy of the auraed binary, not from the
/// file on disk the parent maps, so its text pages (counted as RssShmem) are shared with
/// nothing of the parent's own mappings: only with the other processes executed from that
/// copy (the parent's and the child's `aurae-holder`s), which is why Pss is below VmRSS.
fn child_memory(d: &Daemon, name: &str) -> Result<Mem, String> {
    let cg = d.cgroup.as_ref().ok_or("the daemon has no cgroup")?;
    let procs = cg.join(format!("instances/{name}/_procs/auraed/cgroup.procs"));
    let text = std::fs::read_to_string(&procs).map_err(|e| format!("{}: {e}", procs.display()))?;
    let pid = text
        .lines()
        .next()
        .ok_or("no pid in the child's leaf")?
        .trim();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |k: &str| kib(&status, k).ok_or(format!("no {k} in /proc/{pid}/status"));
    Ok(Mem {
        child_rss: field("VmRSS:")?,
        child_anon: field("RssAnon:")?,
        child_file: field("RssFile:")?,
        child_shmem: field("RssShmem:")?,
        child_pss: std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|t| kib(&t, "Pss:")),
        parent_rss: d.rss_kib().ok_or("no VmRSS for the parent")?,
    })
}

struct SpawnSample {
    rpc: Duration,
    boot: Option<Duration>,
    ready: Option<Duration>,
    free: Duration,
    mem: Result<Mem, String>,
}

/// Spawn → ready, the memory sample (untimed), Instances/Free. Frees even when the spawn
/// failed, so nothing is left between rounds.
async fn spawn_once(d: &Daemon, c: &Client, name: &str) -> Result<SpawnSample, String> {
    let t = Instant::now();
    let r = c.runtime().spawn(instance(name)).await;
    let rpc = t.elapsed();
    let st = match r {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = c.instances().free(pb::NameRef { name: name.into() }).await;
            return Err(format!("Spawn {name}: {e:?}"));
        }
    };
    let mem = child_memory(d, name);
    let t = Instant::now();
    let f = c.instances().free(pb::NameRef { name: name.into() }).await;
    let free = t.elapsed();
    f.map_err(|e| format!("Instances/Free {name}: {e:?}"))?;
    if st.phase != pb::Phase::Running as i32 {
        return Err(format!("Spawn {name} returned a child not running: {st:?}"));
    }
    Ok(SpawnSample {
        rpc,
        boot: dur(st.boot_time),
        ready: dur(st.ready_time),
        free,
        mem,
    })
}

/// RunCell → running, Cells/Free (also after a failed RunCell).
async fn run_cell_once(
    c: &Client,
    image: &str,
    name: &str,
) -> Result<(Duration, Duration), String> {
    let t = Instant::now();
    let r = c
        .runtime()
        .run_cell(pb::Cell {
            name: name.into(),
            container: Some(pb::Container {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let rpc = t.elapsed();
    let t = Instant::now();
    let f = c.cells().free(pb::NameRef { name: name.into() }).await;
    let free = t.elapsed();
    let st = r
        .map_err(|e| format!("RunCell {name}: {e:?}"))?
        .into_inner();
    f.map_err(|e| format!("Cells/Free {name}: {e:?}"))?;
    let running = st
        .executables
        .first()
        .is_some_and(|e| e.phase == pb::Phase::Running as i32);
    if !running {
        return Err(format!(
            "RunCell {name}: the container is not running: {st:?}"
        ));
    }
    Ok((rpc, free))
}

/// Times of one contender: the create RPC, the free, their sum; failures and the first
/// error.
#[derive(Default)]
struct Series {
    rpc: Vec<Duration>,
    free: Vec<Duration>,
    total: Vec<Duration>,
    fails: usize,
    first_error: Option<String>,
}

impl Series {
    fn push(&mut self, rpc: Duration, free: Duration) {
        self.rpc.push(rpc);
        self.free.push(free);
        self.total.push(rpc + free);
    }

    fn fail(&mut self, e: String) {
        self.fails += 1;
        self.first_error.get_or_insert(e);
    }

    fn print_error(&self, what: &str) {
        if let Some(e) = &self.first_error {
            println!("  first {what} failure: {e}");
        }
    }
}

fn main() {
    if let Some(reason) = tier::needs_cells() {
        println!("SKIP spawn bench: {reason}");
        return;
    }
    for (tool, arg) in [("ip", "-V"), ("nsenter", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIP spawn bench: {tool} is missing (apt-get install iproute2 util-linux)");
            return;
        }
    }
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(run());
}

async fn run() {
    let bin = Path::new(env!("CARGO_BIN_EXE_auraed"));
    let d = Daemon::start(
        bin,
        DaemonOptions {
            own_netns: true,
            extra_args: vec!["--insecure-registry".into(), REGISTRY.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    let rounds = aurae_testkit::bench_rounds(8);
    let warm = 1;
    println!(
        "spawn bench: {rounds} interleaved rounds after {warm} warm-up; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    // RunCell's image, pulled before the first round so every RunCell finds it cached.
    let image = format!("{REGISTRY}/bench/busybox:v1");
    let (registry, skip_cell) = match registry::needs_registry().or_else(oci::needs_busybox) {
        Some(reason) => (None, Some(reason)),
        None => match prepare_image(&d, &c, &image).await {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(format!("preparing {image}: {e:#}"))),
        },
    };
    if let Some(reason) = &skip_cell {
        println!("SKIP S1 RunCell side: {reason}");
    }

    // S1 + S2: Spawn+Free and RunCell+Free, the order alternating round by round.
    let mut spawn = Series::default();
    let (mut boot, mut ready) = (Vec::new(), Vec::new());
    let mut mems: Vec<Mem> = Vec::new();
    let mut mem_error = None;
    let mut cell = Series::default();
    let mut slow = Vec::new();
    for i in 0..rounds + warm {
        let record = i >= warm;
        for k in 0..2 {
            if (i + k) % 2 == 0 {
                match spawn_once(&d, &c, &format!("s{i}")).await {
                    Ok(s) if record => {
                        spawn.push(s.rpc, s.free);
                        boot.extend(s.boot);
                        ready.extend(s.ready);
                        match s.mem {
                            Ok(m) => mems.push(m),
                            Err(e) => {
                                mem_error.get_or_insert(e);
                            }
                        }
                        slow.push((i, s.rpc));
                    }
                    Ok(_) => {}
                    Err(e) if record => spawn.fail(e),
                    Err(e) => println!("  warm-up Spawn failed: {e}"),
                }
            } else if skip_cell.is_none() {
                match run_cell_once(&c, &image, &format!("r{i}")).await {
                    Ok((rpc, free)) if record => cell.push(rpc, free),
                    Ok(_) => {}
                    Err(e) if record => cell.fail(e),
                    Err(e) => println!("  warm-up RunCell failed: {e}"),
                }
            }
        }
    }

    // S3: Daemon/Info on the parent vs on a child, clients reused.
    let (mut info_parent, mut info_child) = (Vec::new(), Vec::new());
    let mut info_fails = (0, 0);
    let mut info_error = None;
    match c.runtime().spawn(instance("info")).await {
        Ok(st) => {
            let st = st.into_inner();
            match d
                .instance_client("admin", &st.endpoint, &st.spiffe_id)
                .await
            {
                Ok(child) => {
                    for i in 0..55 {
                        for (client, times, fails) in [
                            (&c, &mut info_parent, &mut info_fails.0),
                            (&child, &mut info_child, &mut info_fails.1),
                        ] {
                            let t = Instant::now();
                            let ok = client.daemon().info(pb::InfoRequest {}).await.is_ok();
                            let dt = t.elapsed();
                            if i >= 5 {
                                times.push(dt);
                                *fails += usize::from(!ok);
                            }
                        }
                    }
                }
                Err(e) => info_error = Some(format!("connecting to the child: {e:#}")),
            }
        }
        Err(e) => info_error = Some(format!("Spawn info: {e:?}")),
    }
    let _ = c
        .instances()
        .free(pb::NameRef {
            name: "info".into(),
        })
        .await;

    println!(
        "S1: Spawn (cell isolation) -> ready + Instances/Free vs RunCell (cached busybox, /bin/sleep 60) -> running + Cells/Free"
    );
    let s_total = report("  aurae Spawn+Free", &spawn.total, spawn.fails);
    let s_rpc = report("    of which Spawn RPC", &spawn.rpc, 0);
    report("    of which Instances/Free", &spawn.free, 0);
    report("    Spawn's reported boot_time", &boot, 0);
    let s_ready = report("    Spawn's reported ready_time", &ready, 0);
    spawn.print_error("Spawn");
    let (c_total, c_rpc) = if let Some(reason) = &skip_cell {
        println!("  SKIP RunCell side: {reason}");
        (f64::NAN, f64::NAN)
    } else {
        let t = report("  aurae RunCell+Free", &cell.total, cell.fails);
        let r = report("    of which RunCell RPC", &cell.rpc, 0);
        report("    of which Cells/Free", &cell.free, 0);
        cell.print_error("RunCell");
        (t, r)
    };
    if let Some(&(i, rpc)) = slow.iter().max_by_key(|(_, rpc)| *rpc) {
        println!(
            "  slowest Spawn RPC: round {i}, {:.3} ms",
            rpc.as_secs_f64() * 1e3
        );
    }

    println!(
        "S2: memory right after ready (median of {} spawns)",
        mems.len()
    );
    let pick = |f: fn(&Mem) -> u64| median_mib(&mems.iter().map(f).collect::<Vec<_>>());
    let pss: Vec<u64> = mems.iter().filter_map(|m| m.child_pss).collect();
    let child_rss = pick(|m| m.child_rss);
    let parent_rss = pick(|m| m.parent_rss);
    println!(
        "  child auraed VmRSS                 {child_rss:8.1} MiB  (anon {:.1}, file {:.1}, shmem {:.1})",
        pick(|m| m.child_anon),
        pick(|m| m.child_file),
        pick(|m| m.child_shmem)
    );
    if pss.is_empty() {
        println!("  child auraed Pss                   unreadable (/proc/<pid>/smaps_rollup)");
    } else {
        println!(
            "  child auraed Pss                   {:8.1} MiB",
            median_mib(&pss)
        );
    }
    println!("  parent auraed VmRSS                {parent_rss:8.1} MiB");
    if let Ok(m) = std::fs::metadata(bin) {
        println!(
            "  (child text: the parent's sealed memfd copy of auraed, {:.1} MiB, not the file the parent maps; shared only with the aurae-holders run from it)",
            m.len() as f64 / (1024.0 * 1024.0)
        );
    }
    if let Some(e) = &mem_error {
        println!("  first memory read failure: {e}");
    }

    println!(
        "S3: Daemon/Info round trip, client reused (parent: Unix socket; child: TCP via aurae0)"
    );
    let p_info = report("  parent Daemon/Info", &info_parent, info_fails.0);
    let c_info = report("  child Daemon/Info", &info_child, info_fails.1);
    if let Some(e) = &info_error {
        println!("  S3 failed: {e}");
    }

    println!(
        "RATIO S1 spawn+free / runcell+free = {:.2}",
        s_total / c_total
    );
    println!("RATIO S1 spawn-rpc / runcell-rpc = {:.2}", s_rpc / c_rpc);
    println!(
        "RATIO S1 reported ready_time / spawn-rpc = {:.2}",
        s_ready / s_rpc
    );
    println!(
        "RATIO S2 child-rss / parent-rss = {:.2}",
        child_rss / parent_rss
    );
    println!("RATIO S3 child-info / parent-info = {:.2}", c_info / p_info);
    drop(c);
    drop(registry);
    drop(d);
}
