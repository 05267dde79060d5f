//! Cell benchmarks, interleaved round by round so load drifts hit every contender alike
//! (see shared performance guide). Prints median / p10 / p90 per contender and the ratios
//! the issues set targets for:
//!
//! - B1 `RunExecutable(/bin/true)` + `Wait` in an existing cell, client reused, vs a plain
//!   fork+exec+wait of `/bin/true` (target ≤ 2×); and in one call (`run {wait, remove}`,
//!   target ≤ 1.5×).
//! - B2 new cell + `/bin/true` + exit + free vs `crun run` and `runc run` of a busybox
//!   bundle running `/bin/true` (target ≤ 0.3× crun).
//! - B3 `RunCell` of a cached busybox image running `/bin/true` + exit + free (a container:
//!   overlay root, pivot_root, /proc, /dev, /sys, masks, caps, seccomp) vs the same crun
//!   and runc runs (target ≤ 0.7× crun). Needs docker-registry for the image.
//! - B4 throughput: cells made, run and freed per second (one call each) by 2 and 8
//!   clients at once vs as many parallel `crun run` loops (target ≥ 3×;
//!   `AURAE_BENCH_SPAN_MS`, default 3000, per contender).
//! - B2 and B3 also in one call (RunCell with `run {wait, remove}`, a plain process or the
//!   image): the `--rm` path, the same single user action as `crun run` (targets 0.3× /
//!   0.7× crun). B3's one call is also run with a read-only root, as the peers' bundle
//!   has (the container's upper layer then lives in memory, in its mount namespace).
//!
//! `AURAE_BENCH_POOL=N` sets auraed's `--cell-pool` (default: auraed's own). Each of
//! auraed's B2/B3 arms is followed by a short pause ([`SETTLE`]) so the pool's refill runs
//! there, not inside the next arm or a peer's time.
//!
//! Needs root and cgroup v2 (prints SKIP otherwise). crun/runc run in a private mount
//! namespace where /sys/fs/cgroup is the cgroup2 hierarchy, as on a pure v2 host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions, tier};

/// `n` clients (a connection each) running one-call cells (`/bin/true`) for `span`: cells
/// per second that exited 0.
async fn cells_per_second(d: &Daemon, n: usize, span: Duration) -> f64 {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for k in 0..n {
        let c = d.client("admin").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            let mut i = 0u32;
            while start.elapsed() < span {
                i += 1;
                let ok = c
                    .runtime()
                    .run_cell(one_call_true(format!("tp{n}-{k}-{i}")))
                    .await
                    .is_ok_and(|r| exited_zero(r.get_ref()));
                done += u32::from(ok);
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    f64::from(done) / start.elapsed().as_secs_f64()
}

/// `n` threads each running `crun run` of the bundle in a loop for `span`: runs per second
/// that succeeded.
fn crun_per_second(bundle: &Path, state: &Path, n: usize, span: Duration) -> f64 {
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|k| {
            let (bundle, state) = (bundle.to_owned(), state.join("state-crun"));
            std::thread::spawn(move || {
                let mut done = 0u32;
                let mut i = 0u32;
                while start.elapsed() < span {
                    i += 1;
                    let id = format!("aurae-tp{n}-{k}-{}-{i}", std::process::id());
                    let (_, ok) = time_cmd(
                        Command::new("crun")
                            .arg("--root")
                            .arg(&state)
                            .args(["run", "-b"])
                            .arg(&bundle)
                            .arg(&id),
                    );
                    done += u32::from(ok);
                }
                done
            })
        })
        .collect();
    let done: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    f64::from(done) / start.elapsed().as_secs_f64()
}

/// The one-call run: wait for the end, free the cell.
fn one_call() -> pb::RunOptions {
    pb::RunOptions {
        wait: true,
        remove: true,
        ..Default::default()
    }
}

/// A new cell `name` running `image` (its own command) in one call, its root read-only
/// or not.
fn one_call_image(name: String, image: &str, read_only_root: bool) -> pb::Cell {
    pb::Cell {
        name,
        container: Some(pb::Container {
            image: image.to_owned(),
            read_only_root,
            ..Default::default()
        }),
        run: Some(one_call()),
        ..Default::default()
    }
}

/// A new cell `name` running `/bin/true` in one call.
fn one_call_true(name: String) -> pb::Cell {
    pb::Cell {
        name,
        executable: Some(pb::Executable {
            name: "t".into(),
            argv: vec!["/bin/true".into()],
            ..Default::default()
        }),
        run: Some(one_call()),
        ..Default::default()
    }
}

/// Whether a one-call RunCell's process exited 0.
fn exited_zero(s: &pb::CellStatus) -> bool {
    s.executables.first().is_some_and(|e| {
        matches!(
            e.exit.as_ref().and_then(|x| x.how),
            Some(pb::exit_status::How::Code(0))
        )
    })
}

/// The pause after each of auraed's rounds in B2 and B3, before the peers run.
const SETTLE: Duration = Duration::from_millis(60);

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}
/// With `AURAE_TEST_DAEMON_LOG=auraed=debug`: the medians of the daemon's own phase
/// timings in `log` (the part written during one bench), over the last `rounds` lines of
/// each kind (the bench's measured rounds: the earlier ones are its warm-up, or a
/// four-call arm's lines of the same kind).
fn print_phases(bench: &str, log: &str, rounds: usize) {
    for what in [
        "RunCell timings",
        "spawn timings",
        "run timings",
        "Free timings",
        "Free remove timings",
        "Stop timings",
        "allocate timings",
        "pool timings",
        "run end timings",
        "run call timings",
        "start timings",
    ] {
        let mut fields: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for l in log.lines().filter(|l| l.contains(what)) {
            for w in l.split_whitespace() {
                if let Some((k, v)) = w.split_once('=')
                    && k.ends_with("_us")
                    && let Ok(n) = v.parse::<u64>()
                {
                    fields.entry(k.to_owned()).or_default().push(n);
                }
            }
        }
        let med: Vec<String> = fields
            .iter_mut()
            .map(|(k, v)| {
                let n = v.len().saturating_sub(rounds);
                v.drain(..n);
                v.sort_unstable();
                let at = |q: usize| v[(v.len() - 1) * q / 100];
                format!("{k} {} ({}–{})", at(50), at(10), at(90))
            })
            .collect();
        if !med.is_empty() {
            println!("  {bench} {what}: {}", med.join(", "));
        }
    }
}

fn report(name: &str, v: &[Duration], fails: usize) -> f64 {
    let (m, p10, p90) = stats(v.to_vec());
    println!(
        "{name:<34} median {m:8.3} ms  p10 {p10:8.3}  p90 {p90:8.3}  fails {fails}  n {}",
        v.len()
    );
    m
}

/// Private mount namespace with cgroup2 at /sys/fs/cgroup (before any thread exists).
fn enter_cgroup2_view() -> Result<(), String> {
    use nix::{
        mount::{MsFlags, mount},
        sched::{CloneFlags, unshare},
    };
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| e.to_string())?;
    let is_v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type().0 == 0x6367_7270);
    if !is_v2 {
        mount(
            Some("cgroup2"),
            "/sys/fs/cgroup",
            Some("cgroup2"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A busybox bundle running /bin/true with a read-only root, for crun and runc.
fn bundle(dir: &Path) -> Option<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())?;
    let rootfs = dir.join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).ok()?;
    std::fs::copy(busybox, rootfs.join("busybox")).ok()?;
    std::os::unix::fs::symlink("busybox", rootfs.join("true")).ok()?;
    let ok = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    cfg["process"]["args"] = serde_json::json!(["/bin/true"]);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["root"]["readonly"] = serde_json::json!(true);
    if let Some(l) = cfg["linux"].as_object_mut() {
        l.remove("resources");
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).ok()?,
    )
    .ok()?;
    Some(dir.to_owned())
}

fn time_cmd(cmd: &mut Command) -> (Duration, bool) {
    let t = Instant::now();
    let ok = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (t.elapsed(), ok)
}

/// crun and runc running the same bundle, timed round by round beside aurae.
struct Peers<'a> {
    tools: Vec<&'a str>,
    state: &'a Path,
    bundle: Option<PathBuf>,
    times: Vec<Vec<Duration>>,
    fails: Vec<usize>,
}

impl<'a> Peers<'a> {
    fn new(tools: &[&'a str], state: &'a Path, bundle: Option<PathBuf>) -> Self {
        Self {
            tools: tools.to_vec(),
            state,
            bundle,
            times: vec![Vec::new(); tools.len()],
            fails: vec![0; tools.len()],
        }
    }

    /// One `run` of each peer; recorded unless it is a warm-up round.
    fn round(&mut self, tag: &str, i: usize, record: bool) {
        let Some(bundle) = &self.bundle else { return };
        for (k, tool) in self.tools.iter().enumerate() {
            let id = format!("aurae-{tag}-{}-{i}", std::process::id());
            let (dt, ok) = time_cmd(
                Command::new(tool)
                    .arg("--root")
                    .arg(self.state.join(format!("state-{tool}")))
                    .args(["run", "-b"])
                    .arg(bundle)
                    .arg(&id),
            );
            if record {
                self.times[k].push(dt);
                self.fails[k] += usize::from(!ok);
            }
        }
    }

    /// Prints each peer's figures and aurae's ratio to it; returns the peers' medians.
    fn report(&self, ours: f64, crun_target: f64) -> Vec<f64> {
        self.tools
            .iter()
            .enumerate()
            .map(|(k, tool)| {
                let p = report(&format!("  {tool} run"), &self.times[k], self.fails[k]);
                let target = if *tool == "crun" {
                    format!(" (target <= {crun_target})")
                } else {
                    String::new()
                };
                println!("  ratio aurae/{tool} = {:.2}{target}", ours / p);
                p
            })
            .collect()
    }
}

fn main() {
    if let Some(reason) = tier::needs_cells() {
        println!("SKIP cells bench: {reason}");
        return;
    }
    if let Err(e) = enter_cgroup2_view() {
        println!("SKIP cells bench: cannot make a cgroup2-only mount namespace: {e}");
        return;
    }
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(run());
}

async fn run() {
    let bin = Path::new(env!("CARGO_BIN_EXE_auraed"));
    let registry = match aurae_testkit::registry::needs_registry()
        .or_else(aurae_testkit::oci::needs_busybox)
    {
        None => Some(aurae_testkit::registry::LocalRegistry::start().unwrap()),
        Some(reason) => {
            println!("SKIP B3: {reason}");
            None
        }
    };
    let opts = DaemonOptions {
        extra_args: registry
            .iter()
            .flat_map(|r| ["--insecure-registry".to_owned(), r.host()])
            // AURAE_BENCH_POOL=N: auraed's --cell-pool (default: auraed's own).
            .chain(
                std::env::var("AURAE_BENCH_POOL")
                    .ok()
                    .into_iter()
                    .flat_map(|n| ["--cell-pool".to_owned(), n]),
            )
            .collect(),
        ..Default::default()
    };
    let d = Daemon::start(bin, opts).await.unwrap();
    let c = d.client("admin").await.unwrap();
    let rounds = aurae_testkit::bench_rounds(200);
    let warm = rounds / 10;
    println!(
        "cells bench: {rounds} interleaved rounds after {warm} warm-up; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    // B1: RunExecutable in an existing cell vs fork+exec+wait.
    c.cells()
        .allocate(pb::Cell {
            name: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut aurae, mut fork) = (Vec::new(), Vec::new());
    let (mut one1, mut fails1) = (Vec::new(), 0);
    let mut split1: [Vec<Duration>; 2] = Default::default();
    let mut fails = (0, 0);
    let timings = std::env::var_os("AURAE_BENCH_TIMINGS").is_some();
    let b1_log = d.log_text().len();
    for i in 0..rounds + warm {
        let name = format!("t{i}");
        let t = Instant::now();
        let mut started = Duration::ZERO;
        let ok = async {
            c.runtime()
                .run_executable(pb::Executable {
                    cell: "bench".into(),
                    name: name.clone(),
                    argv: vec!["/bin/true".into()],
                    ..Default::default()
                })
                .await?;
            started = t.elapsed();
            c.executables()
                .wait(pb::WaitExecutableRequest {
                    executable: Some(pb::ExecutableRef {
                        cell: "bench".into(),
                        name: name.clone(),
                    }),
                    timeout: None,
                })
                .await
        }
        .await
        .is_ok();
        let dt = t.elapsed();
        // The same in one call: RunExecutable with run {wait, remove}.
        let t1 = Instant::now();
        let ok1 = c
            .runtime()
            .run_executable(pb::Executable {
                cell: "bench".into(),
                name: format!("o{i}"),
                argv: vec!["/bin/true".into()],
                run: Some(one_call()),
                ..Default::default()
            })
            .await
            .is_ok_and(|r| {
                matches!(
                    r.get_ref().exit.as_ref().and_then(|x| x.how),
                    Some(pb::exit_status::How::Code(0))
                )
            });
        let dt1 = t1.elapsed();
        let (df, okf) = time_cmd(&mut Command::new("/bin/true"));
        let _ = c
            .executables()
            .free(pb::ExecutableRef {
                cell: "bench".into(),
                name,
            })
            .await;
        if i >= warm {
            aurae.push(dt);
            if ok {
                split1[0].push(started);
                split1[1].push(dt.saturating_sub(started));
            }
            one1.push(dt1);
            fails1 += usize::from(!ok1);
            fork.push(df);
            fails.0 += usize::from(!ok);
            fails.1 += usize::from(!okf);
        }
    }
    println!("B1: run /bin/true in an existing cell");
    let a = report("  aurae RunExecutable+Wait", &aurae, fails.0);
    for (p, what) in split1.iter().zip(["RunExecutable", "Wait"]) {
        report(&format!("    of which {what}"), p, 0);
    }
    let f = report("  fork+exec+wait (harness floor)", &fork, fails.1);
    println!("  ratio aurae/fork = {:.2} (target <= 2)", a / f);
    let o = report("  aurae one call (run wait+remove)", &one1, fails1);
    println!("  ratio one call/fork = {:.2} (target <= 1.5)", o / f);
    if timings {
        // Both of B1's arms start a process: twice as many lines.
        print_phases("B1", &d.log_text()[b1_log..], 2 * rounds);
    }

    // B2: new cell + /bin/true + exit (+ free) vs crun/runc run.
    let tmp = tempfile::tempdir().unwrap();
    let bundle = bundle(tmp.path());
    let have = |t: &str| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let tools: Vec<&str> = ["crun", "runc"]
        .into_iter()
        .filter(|t| bundle.is_some() && have(t))
        .collect();
    if tools.len() < 2 {
        println!(
            "SKIP B2 peers: crun/runc or busybox-static missing (apt-get install crun runc busybox-static)"
        );
    }
    let rounds2 = rounds / 4;
    let warm2 = warm / 4 + 1;
    let mut cell_t = Vec::new();
    let (mut one_t, mut one_fails) = (Vec::new(), 0);
    let mut b2_peers = Peers::new(&tools, tmp.path(), bundle.clone());
    let mut cell_fails = 0;
    let b2_log = d.log_text().len();
    for i in 0..rounds2 + warm2 {
        let name = format!("c{i}");
        let t = Instant::now();
        let ok = async {
            c.cells()
                .allocate(pb::Cell {
                    name: name.clone(),
                    ..Default::default()
                })
                .await?;
            c.runtime()
                .run_executable(pb::Executable {
                    cell: name.clone(),
                    name: "t".into(),
                    argv: vec!["/bin/true".into()],
                    ..Default::default()
                })
                .await?;
            c.executables()
                .wait(pb::WaitExecutableRequest {
                    executable: Some(pb::ExecutableRef {
                        cell: name.clone(),
                        name: "t".into(),
                    }),
                    timeout: None,
                })
                .await?;
            c.cells().free(pb::NameRef { name: name.clone() }).await
        }
        .await
        .is_ok();
        let dt = t.elapsed();
        if i >= warm2 {
            cell_t.push(dt);
            cell_fails += usize::from(!ok);
        }
        tokio::time::sleep(SETTLE).await;
        // The same in one call: RunCell of a plain process with run {wait, remove}.
        let t = Instant::now();
        let ok = c
            .runtime()
            .run_cell(one_call_true(format!("o{i}")))
            .await
            .is_ok_and(|r| exited_zero(r.get_ref()));
        let dt = t.elapsed();
        if i >= warm2 {
            one_t.push(dt);
            one_fails += usize::from(!ok);
        }
        // auraed's background work after a round (refilling its pool of spare cell
        // inits) happens in this pause, not in a peer's time.
        tokio::time::sleep(SETTLE).await;
        b2_peers.round("b2", i, i >= warm2);
    }
    println!("B2: new cell + /bin/true + exit (+ free)");
    let m = report("  aurae allocate+run+wait+free", &cell_t, cell_fails);
    let m1 = report("  aurae one call (RunCell run)", &one_t, one_fails);
    let peer_medians = b2_peers.report(m, 0.3);
    if let Some(crun) = peer_medians.first() {
        println!("  ratio one call/crun = {:.2} (target <= 0.3)", m1 / crun);
    }
    if timings {
        print_phases("B2", &d.log_text()[b2_log..], rounds2);
    }

    // B4: throughput, cells created+run+freed per second (one call each) by 2 and 8
    // clients at once, vs as many parallel `crun run` loops.
    let span = Duration::from_millis(
        std::env::var("AURAE_BENCH_SPAN_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    );
    println!(
        "B4: cells per second, one call each ({} s per contender)",
        span.as_secs_f64()
    );
    for n in [2usize, 8] {
        let ours = cells_per_second(&d, n, span).await;
        let peer = match (&bundle, tools.contains(&"crun")) {
            (Some(b), true) => Some(crun_per_second(b, tmp.path(), n, span)),
            _ => None,
        };
        match peer {
            Some(p) => println!(
                "  {n} clients: aurae {ours:.1} cells/s, crun {p:.1} runs/s, ratio {:.2} (target >= 3)",
                ours / p
            ),
            None => println!("  {n} clients: aurae {ours:.1} cells/s (no crun peer)"),
        }
        tokio::time::sleep(SETTLE).await;
    }

    // B3: RunCell of a cached image vs the same peers (interleaved with a fresh peer run
    // per round, so drift hits both).
    let Some(reg) = registry else {
        drop(d);
        return;
    };
    let layer = aurae_testkit::oci::busybox_rootfs()
        .unwrap()
        .finish()
        .unwrap();
    aurae_testkit::oci::push_image(
        &reg.host(),
        "bench/busybox",
        "v1",
        &[layer],
        serde_json::json!({"Cmd": ["/bin/true"]}),
    )
    .unwrap();
    let image = format!("{}/bench/busybox:v1", reg.host());
    c.images()
        .pull(pb::PullImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .ok();
    let mut run_cell_t = Vec::new();
    let (mut one3_t, mut one3_fails) = (Vec::new(), 0);
    let (mut one3_ro_t, mut one3_ro_fails) = (Vec::new(), 0);
    let mut phases: [Vec<Duration>; 3] = Default::default();
    let mut b3_peers = Peers::new(&tools, tmp.path(), bundle.clone());
    let mut fails3 = 0;
    let b3_log = d.log_text().len();
    for i in 0..rounds2 + warm2 {
        let name = format!("r{i}");
        let t = Instant::now();
        let mut marks = [Duration::ZERO; 3];
        let ok = async {
            let st = c
                .runtime()
                .run_cell(pb::Cell {
                    name: name.clone(),
                    container: Some(pb::Container {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            marks[0] = t.elapsed();
            let exe = st
                .executables
                .first()
                .map(|e| e.name.clone())
                .unwrap_or_default();
            let w = c
                .executables()
                .wait(pb::WaitExecutableRequest {
                    executable: Some(pb::ExecutableRef {
                        cell: name.clone(),
                        name: exe,
                    }),
                    timeout: None,
                })
                .await?
                .into_inner();
            marks[1] = t.elapsed();
            c.cells().free(pb::NameRef { name: name.clone() }).await?;
            marks[2] = t.elapsed();
            let code0 = matches!(
                w.exit.and_then(|e| e.how),
                Some(pb::exit_status::How::Code(0))
            );
            Ok::<bool, tonic::Status>(code0)
        }
        .await
        .unwrap_or(false);
        let dt = t.elapsed();
        tokio::time::sleep(SETTLE).await;
        let t1 = Instant::now();
        let ok1 = c
            .runtime()
            .run_cell(one_call_image(format!("q{i}"), &image, false))
            .await
            .is_ok_and(|r| exited_zero(r.get_ref()));
        let dt1 = t1.elapsed();
        tokio::time::sleep(SETTLE).await;
        // The same with a read-only root, as crun's bundle is (its upper layer in memory).
        let t2 = Instant::now();
        let ok2 = c
            .runtime()
            .run_cell(one_call_image(format!("p{i}"), &image, true))
            .await
            .is_ok_and(|r| exited_zero(r.get_ref()));
        let dt2 = t2.elapsed();
        if i >= warm2 {
            one3_t.push(dt1);
            one3_fails += usize::from(!ok1);
            one3_ro_t.push(dt2);
            one3_ro_fails += usize::from(!ok2);
        }
        if i >= warm2 {
            run_cell_t.push(dt);
            fails3 += usize::from(!ok);
            phases[0].push(marks[0]);
            phases[1].push(marks[1].saturating_sub(marks[0]));
            phases[2].push(marks[2].saturating_sub(marks[1]));
        }
        // auraed's background work after a round (refilling its pool of spare cell
        // inits) happens in this pause, not in a peer's time.
        tokio::time::sleep(SETTLE).await;
        b3_peers.round("b3", i, i >= warm2);
    }
    println!("B3: RunCell (cached busybox image, /bin/true) + wait + free");
    let m3 = report("  aurae RunCell+wait+free", &run_cell_t, fails3);
    let m31 = report("  aurae one call (RunCell run)", &one3_t, one3_fails);
    let m32 = report(
        "  aurae one call, read-only root",
        &one3_ro_t,
        one3_ro_fails,
    );
    for (p, what) in phases.iter().zip(["RunCell", "Wait", "Free"]) {
        report(&format!("    of which {what}"), p, 0);
    }
    let b3_medians = b3_peers.report(m3, 0.7);
    if let Some(crun) = b3_medians.first() {
        println!("  ratio one call/crun = {:.2} (target <= 0.7)", m31 / crun);
        println!(
            "  ratio one call, read-only root/crun = {:.2} (target <= 0.7; crun's root is read-only too)",
            m32 / crun
        );
    }
    for (p, (tool, b2)) in b3_medians.iter().zip(tools.iter().zip(&peer_medians)) {
        println!("  (B3 {tool} median {p:.3} ms; in B2 it was {b2:.3} ms)");
    }
    if timings {
        print_phases("B3", &d.log_text()[b3_log..], rounds2);
    }
    drop(d);
    drop(reg);
}
