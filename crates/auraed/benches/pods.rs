//! Pod benchmark (host tier, cell isolation), interleaved round by round (the order
//! alternating) so load drifts hit both contenders alike. Prints median / p10 / p90 per
//! contender, then `RATIO` lines:
//!
//! - P1 `Runtime/RunPod` of an HTTP server image (busybox httpd, port 8080) until the
//!   first byte of its page arrives at the pod's endpoint, + `Pods/Free`; vs the same
//!   steps issued by hand: `Spawn`, `Images/Load` into the child (the blobs read from the
//!   parent's store, as RunPod does; called with the parent's own certificate, the only
//!   identity a child lets load), `RunCell` in the child (sharing its network), polling
//!   the port, the first byte, + `Instances/Free`. Target ≤ 1.1×.
//! - P2 what a running pod costs this machine: the Pss of every process in its cgroup
//!   (the child auraed, its output holder, the container) plus the child's tmpfs (its
//!   state: the image's blobs and unpacked layers); vs the same container run alone by
//!   `RunCell` on the parent (the Pss of its cell's processes). Kata Containers publishes
//!   ~120 MiB per pod for comparison (its VM, agent and shim).
//!
//! The daemon and a registry run in a network namespace of their own. Needs root, cgroup
//! v2, `ip`, docker-registry and busybox-static (prints SKIP otherwise).
//! `AURAE_BENCH_ROUNDS` sets the rounds (default 6, after one warm-up round).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, oci,
    registry::{LocalRegistry, needs_registry},
    tier,
};

const REGISTRY: &str = "127.0.0.1:5000";
const PAGE: &str = "<h1>bench</h1>\n";

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}

fn report(name: &str, v: &[Duration], fails: usize) -> f64 {
    if v.is_empty() {
        println!("{name:<40} no samples  fails {fails}");
        return f64::NAN;
    }
    let (m, p10, p90) = stats(v.to_vec());
    println!(
        "{name:<40} median {m:8.1} ms  p10 {p10:8.1}  p90 {p90:8.1}  fails {fails}  n {}",
        v.len()
    );
    m
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// The first byte of GET / at `addr`, dialled inside the daemon's namespace, retried
/// until `deadline` (the hand-made path has no port wait of its own).
fn first_byte(ns: Option<String>, addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    loop {
        let got = (|| -> std::io::Result<bool> {
            let mut s = aurae_testkit::dial_in(ns.as_deref(), addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut b = [0u8; 1];
            Ok(s.read(&mut b)? == 1)
        })();
        match got {
            Ok(true) => return Ok(()),
            _ if Instant::now() > deadline => return Err(format!("{addr}: no byte: {got:?}")),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn pod(name: &str, image: &str) -> pb::Pod {
    pb::Pod {
        name: name.into(),
        container: Some(pb::Container {
            image: image.into(),
            ..Default::default()
        }),
        listen_port: 8080,
        instance: Some(pb::Instance {
            isolation: pb::Isolation::Cell as i32,
            ready_timeout: secs(30),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// RunPod → first byte; the memory sample (untimed); Pods/Free.
async fn run_pod_once(
    d: &Daemon,
    c: &Client,
    image: &str,
    name: &str,
) -> Result<(Duration, Option<Cost>), String> {
    let t = Instant::now();
    let r = c.runtime().run_pod(pod(name, image)).await;
    let res = match r {
        Ok(s) => {
            let addr: SocketAddr = s
                .into_inner()
                .endpoint
                .parse()
                .map_err(|e| format!("{e}"))?;
            let ns = d.netns.clone();
            tokio::task::spawn_blocking(move || {
                first_byte(ns, addr, Instant::now() + Duration::from_secs(10))
            })
            .await
            .map_err(|e| e.to_string())?
            .map(|()| t.elapsed())
        }
        Err(e) => Err(format!("RunPod {name}: {e:?}")),
    };
    let cost = res.is_ok().then(|| pod_cost(d, name)).flatten();
    let _ = c.pods().free(pb::NameRef { name: name.into() }).await;
    res.map(|t| (t, cost))
}

/// The same steps by hand: Spawn, Images/Load, RunCell in the child, first byte.
async fn by_hand_once(
    d: &Daemon,
    c: &Client,
    store: &Arc<auraed::image::store::ImageStore>,
    image: &str,
    name: &str,
) -> Result<Duration, String> {
    let t = Instant::now();
    let res = async {
        let mut spec = pod(name, image).instance.unwrap();
        spec.name = name.into();
        let s = c
            .runtime()
            .spawn(spec)
            .await
            .map_err(|e| format!("Spawn: {e:?}"))?
            .into_inner();
        // As the parent: only it may load images into its instance (as RunPod does).
        let child = aurae_testkit::instance_client(
            &d.pki,
            (d.pki.server_cert.clone(), d.pki.server_key.clone()),
            d.netns.as_deref(),
            &s.endpoint,
            &s.spiffe_id,
        )
        .await
        .map_err(|e| format!("connect: {e}"))?;
        let r = auraed::image::reference::ImageRef::parse(image).map_err(|e| e.to_string())?;
        let manifest = store
            .get_ref(&r.to_string())
            .and_then(|v| v["digest"].as_str().map(str::to_owned))
            .ok_or("the image is not in the parent's store")?;
        let (by_digest, blobs) =
            auraed::image::load::blobs_of(store, &r, &manifest).map_err(|e| e.to_string())?;
        let mut msgs = Vec::new();
        for (i, b) in blobs.iter().enumerate() {
            let data = std::fs::read(&b.path).map_err(|e| e.to_string())?;
            let mut chunks: Vec<Vec<u8>> = data
                .chunks(auraed::image::load::CHUNK)
                .map(<[u8]>::to_vec)
                .collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            for (k, data) in chunks.into_iter().enumerate() {
                msgs.push(pb::ImageBlob {
                    image: if i == 0 && k == 0 {
                        by_digest.to_string()
                    } else {
                        String::new()
                    },
                    digest: b.digest.clone(),
                    size: b.size,
                    data,
                });
            }
        }
        child
            .images()
            .load(tokio_stream::iter(msgs))
            .await
            .map_err(|e| format!("Load: {e:?}"))?;
        child
            .runtime()
            .run_cell(pb::Cell {
                name: name.into(),
                namespaces: Some(pb::CellNamespaces {
                    share_host_net: true,
                    ..Default::default()
                }),
                container: Some(pb::Container {
                    image: by_digest.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("RunCell in the child: {e:?}"))?;
        let addr = SocketAddr::from((s.addresses[0].parse::<std::net::Ipv4Addr>().unwrap(), 8080));
        let ns = d.netns.clone();
        tokio::task::spawn_blocking(move || {
            first_byte(ns, addr, Instant::now() + Duration::from_secs(10))
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok::<_, String>(t.elapsed())
    }
    .await;
    let _ = c.instances().free(pb::NameRef { name: name.into() }).await;
    res
}

/// KiB from `smaps_rollup`-style lines.
fn kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Every pid in the cgroup directory `dir` and below.
fn pids_below(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(pids_below(&e.path()));
        }
    }
    out
}

fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|t| kib(&t, "Pss:"))
        .sum()
}

/// A pod's cost here, in KiB: (Pss of its processes, its child's tmpfs in use).
#[derive(Debug, Clone, Copy)]
struct Cost {
    pss: u64,
    tmpfs: u64,
}

fn pod_cost(d: &Daemon, name: &str) -> Option<Cost> {
    let cg = d.cgroup.as_ref()?.join("instances").join(name);
    let pids = pids_below(&cg);
    let child = std::fs::read_to_string(cg.join("_procs/auraed/cgroup.procs")).ok()?;
    let child = child.lines().next()?.trim().to_owned();
    let st = nix::sys::statvfs::statvfs(Path::new(&format!("/proc/{child}/root/run"))).ok()?;
    let used = (st.blocks() - st.blocks_free()) * st.fragment_size() / 1024;
    Some(Cost {
        pss: pss_kib(&pids),
        tmpfs: used,
    })
}

fn main() {
    if let Some(reason) = tier::needs_cells()
        .or_else(needs_registry)
        .or_else(oci::needs_busybox)
    {
        println!("SKIP pods bench: {reason}");
        return;
    }
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(run());
}

async fn run() {
    aurae_testkit::init_crypto();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            own_netns: true,
            extra_args: vec!["--insecure-registry".into(), REGISTRY.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let _registry = LocalRegistry::start_in(d.netns.as_deref(), REGISTRY.parse().unwrap()).unwrap();
    d.in_netns(|| oci::push_http_server(REGISTRY, "bench/web", 8080, PAGE))
        .unwrap()
        .unwrap();
    let image = format!("{REGISTRY}/bench/web:v1");
    let c = d.client("admin").await.unwrap();
    let mut progress = c
        .images()
        .pull(pb::PullImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while progress.message().await.unwrap().is_some() {}
    // The parent's store, read-only, for the hand-made Load (the daemon keeps writing
    // its own; this handle only reads blobs that exist).
    let store =
        Arc::new(auraed::image::store::ImageStore::open(&d.dir.path().join("state")).unwrap());

    let rounds = aurae_testkit::bench_rounds(6);
    let warm = 1;
    println!(
        "pods bench: {rounds} interleaved rounds after {warm} warm-up; load {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let (mut pods, mut hand) = (Vec::new(), Vec::new());
    let (mut pod_fails, mut hand_fails) = (0, 0);
    let mut costs = Vec::new();
    let mut first_error = None;
    for i in 0..rounds + warm {
        let record = i >= warm;
        for k in 0..2 {
            if (i + k) % 2 == 0 {
                match run_pod_once(&d, &c, &image, &format!("p{i}")).await {
                    Ok((t, cost)) if record => {
                        pods.push(t);
                        costs.extend(cost);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        pod_fails += 1;
                        first_error.get_or_insert(e);
                    }
                }
            } else {
                match by_hand_once(&d, &c, &store, &image, &format!("h{i}")).await {
                    Ok(t) if record => hand.push(t),
                    Ok(_) => {}
                    Err(e) => {
                        hand_fails += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    // Where RunPod's time goes (its own log lines: spawn and total, in the instance).
    for l in std::fs::read_to_string(&d.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("pod running") || l.contains("RunPod timings"))
        .take(4)
    {
        println!("  {}", l.split_once("auraed::").map_or(l, |(_, r)| r));
    }
    let a = report("P1 RunPod -> first byte", &pods, pod_fails);
    let b = report("P1 by hand (Spawn+Load+RunCell+poll)", &hand, hand_fails);
    if let Some(e) = first_error {
        println!("  first failure: {e}");
    }
    println!("RATIO P1 RunPod / by hand = {:.2} (target <= 1.1)", a / b);

    // P2: the same container alone, run by RunCell on the parent.
    c.runtime()
        .run_cell(pb::Cell {
            name: "alone".into(),
            container: Some(pb::Container {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let ns = d.netns.clone();
    // Served once, like the pods were, before it is measured.
    let cell = d.cgroup.clone().unwrap().join("alone");
    let pid = pids_below(&cell);
    let addr_probe = tokio::task::spawn_blocking(move || {
        // The cell has its own network namespace: reach it from inside (its loopback).
        let pid = pid.first().copied();
        pid.map(|p| {
            let f = std::fs::File::open(format!("/proc/{p}/ns/net")).unwrap();
            std::thread::spawn(move || {
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                first_byte(
                    None,
                    "127.0.0.1:8080".parse().unwrap(),
                    Instant::now() + Duration::from_secs(10),
                )
            })
            .join()
            .unwrap()
        })
    })
    .await
    .unwrap();
    drop(ns);
    let alone = pss_kib(&pids_below(&cell));
    c.cells()
        .free(pb::NameRef {
            name: "alone".into(),
        })
        .await
        .unwrap();
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let pss = median(costs.iter().map(|c| c.pss).collect());
    let tmpfs = median(costs.iter().map(|c| c.tmpfs).collect());
    let total = pss + tmpfs;
    println!(
        "P2 pod on this machine: Pss {:.1} MiB + tmpfs {:.1} MiB = {:.1} MiB (n {}); container alone: Pss {:.1} MiB (served: {:?})",
        pss as f64 / 1024.0,
        tmpfs as f64 / 1024.0,
        total as f64 / 1024.0,
        costs.len(),
        alone as f64 / 1024.0,
        addr_probe.map(|r| r.is_ok())
    );
    println!(
        "RATIO P2 pod / container alone = {:.1}; pod / Kata's published ~120 MiB = {:.2}",
        total as f64 / alone.max(1) as f64,
        total as f64 / 1024.0 / 120.0
    );
}
