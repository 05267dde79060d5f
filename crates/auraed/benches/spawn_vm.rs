//! microVM `Spawn` benchmark, inside one guest-tier machine L1 (QEMU TCG `-cpu max`, nested
//! KVM): the same software booted to the same readiness two ways, interleaved round by
//! round (the order alternating) after one warm-up `Spawn` (which also waits for L1's KVM
//! probe):
//!
//! - A: `Runtime/Spawn` with `ISOLATION_VIRTUAL_MACHINE` (1 vCPU, 512 MiB): L1's auraed
//!   builds the initramfs in memory (its own static auraed as /init, the instance modules,
//!   the child's SVID and policy) and boots the instance kernel on our VMM; the RPC returns
//!   once the child answers health over mTLS. Two figures: request → `auraed is serving` in
//!   the child's console log (`/var/lib/aurae/logs/instances/<name>.log` in L1, watched by
//!   a busybox loop in a cell of L1 that greps it every 100 ms, whose output the bench
//!   polls every 100 ms) and request → the RPC returning.
//! - B: `qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 512 -smp 1` started as an
//!   executable of a cell of L1, booting the same kernel with an initramfs built here: the
//!   same static auraed as /init, the same modules, a PKI of its own; no network. Time =
//!   request → `auraed is serving` in its serial output (polled through the Executables
//!   logs API every 100 ms). Every cell's device filter denies /dev/kvm, so QEMU's
//!   executable first moves itself into L1's root cgroup (see [`round_b`]). While it boots, the same watcher loop and poller as A's run
//!   against a file that never appears, so both sides carry the same observer load.
//!
//! Prints `report` lines (median / p10 / p90, seconds) and `RATIO` lines. Needs the guest
//! tier (root, qemu, `cargo xtask guest`); prints SKIP otherwise. `AURAE_BENCH_ROUNDS`
//! (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::time::{Duration, Instant};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    TRUST_DOMAIN,
    cpio::{self, Entry},
    guest::{
        Guest, GuestOptions, QEMU, artifacts, instance_files, module_entries, needs_guest,
        qemu_files,
    },
    workload,
};

/// The line auraed logs once it serves (on the console, as PID 1).
const SERVING: &str = "auraed is serving";
/// What the watcher loop prints once the line is in the file it watches.
const SEEN: &str = "WATCHER-SAW-IT";
/// The instance kernel L1 carries (`instance_files`), booted by both sides.
const KERNEL: &str = "/var/lib/aurae/instance/vmlinuz";
const PEER_INITRD: &str = "/var/lib/aurae/bench/peer.cpio";
/// What the instance's cmdline has, minus `ip=` and the `aurae.*` network parameters.
const PEER_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet aurae.hostname=peer";
const MEMORY_MIB: u64 = 512;
const POLL: Duration = Duration::from_millis(100);
const LIMIT: Duration = Duration::from_secs(240);

/// The peer's initramfs, laid out as auraed lays out an instance's (`instance::initramfs`):
/// the same directories and console, the same static auraed as /init, the same modules, and
/// a PKI of its own (no policy file: the default one; no instance.json: a plain PID 1).
fn peer_initramfs() -> anyhow::Result<Vec<u8>> {
    let art = artifacts();
    let tmp = tempfile::tempdir()?;
    let pki = aurae_identity::Pki::init(&tmp.path().join("pki"), TRUST_DOMAIN, &["peer".into()])?;
    let mut e = Vec::new();
    for d in [
        "dev",
        "etc",
        "etc/aurae",
        "etc/aurae/pki",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "var/lib",
    ] {
        e.push(Entry::Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    e.push(Entry::CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    e.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: std::fs::read(art.join("auraed"))?,
    });
    e.extend(module_entries(
        &art.join("instance-modules"),
        "lib/modules",
    )?);
    for (src, name, mode) in [
        (&pki.ca_cert, "ca.pem", 0o644),
        (&pki.server_cert, "auraed.pem", 0o644),
        (&pki.server_key, "auraed.key", 0o600),
        (&pki.signer_cert, "signer.pem", 0o644),
        (&pki.signer_key, "signer.key", 0o600),
    ] {
        e.push(Entry::File {
            path: format!("etc/aurae/pki/{name}"),
            mode,
            data: std::fs::read(src)?,
        });
    }
    let mut out = Vec::new();
    cpio::write(&mut out, &e)?;
    Ok(out)
}

fn secs(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::try_from(s).unwrap(),
        nanos: 0,
    })
}

fn dur(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.map(|d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    })
}

/// Allocates cell `cell`; `host_mount_cgroup` shares L1's mount and cgroup namespaces
/// (so its executables can leave the cell's cgroup, see [`round_b`]).
async fn allocate(c: &Client, cell: &str, host_mount_cgroup: bool) -> Result<(), String> {
    c.cells()
        .allocate(pb::Cell {
            name: cell.into(),
            namespaces: Some(pb::CellNamespaces {
                share_host_mount: host_mount_cgroup,
                share_host_cgroup: host_mount_cgroup,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|e| format!("allocating cell {cell}: {e:?}"))
}

async fn free_cell(c: &Client, cell: &str) {
    if let Err(e) = c.cells().free(pb::NameRef { name: cell.into() }).await {
        println!("  freeing cell {cell}: {e:?}");
    }
}

fn exe(cell: &str, name: &str, argv: &[&str]) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: [("PATH".to_owned(), "/bin".to_owned())].into(),
        ..Default::default()
    }
}

/// A busybox loop in a new cell `cell` of L1 (which sees L1's root filesystem) that greps
/// `file` for [`SERVING`] every 100 ms and prints [`SEEN`] once it is there (or gives up
/// after five minutes).
async fn start_watcher(c: &Client, cell: &str, file: &str) -> Result<(), String> {
    allocate(c, cell, false).await?;
    let script = format!(
        "i=0; while [ $i -lt 3000 ]; do \
         if /bin/grep -q '{SERVING}' {file} 2>/dev/null; then echo {SEEN}; exit 0; fi; \
         /bin/sleep 0.1; i=$((i+1)); done; echo WATCHER-GAVE-UP"
    );
    c.runtime()
        .run_executable(exe(cell, "watch", &["/bin/sh", "-c", &script]))
        .await
        .map(drop)
        .map_err(|e| format!("starting the watcher in {cell}: {e:?}"))
}

/// Polls the output of executable `cell`/`name` every 100 ms (a tick that fires late waits
/// a whole period, never a burst) until it holds `needle`: the time since `t`, or `None`
/// once past [`LIMIT`] or once the executable has ended without it.
fn poll_output(
    c: &Client,
    cell: &str,
    name: &str,
    needle: &'static str,
    t: Instant,
) -> tokio::task::JoinHandle<Option<Duration>> {
    let (c, cell, name) = (c.clone(), cell.to_owned(), name.to_owned());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tick.tick().await;
            if workload::logs(&c, &cell, &name, false)
                .await
                .is_ok_and(|s| s.contains(needle))
            {
                return Some(t.elapsed());
            }
            if t.elapsed() > LIMIT {
                return None;
            }
            // Every two seconds: has it ended without the line?
            if n % 20 == 19
                && let Ok(st) = c.executables().get(workload::exe_ref(&cell, &name)).await
                && matches!(
                    pb::Phase::try_from(st.get_ref().phase),
                    Ok(pb::Phase::Exited | pb::Phase::Failed)
                )
            {
                // Its last output may have come after the poll above.
                return workload::logs(&c, &cell, &name, false)
                    .await
                    .is_ok_and(|s| s.contains(needle))
                    .then(|| t.elapsed());
            }
        }
        None
    })
}

/// The last `n` lines of `text`, indented.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("      | {l}\n"))
        .collect()
}

#[derive(Default)]
struct Samples {
    /// A: request → `auraed is serving` in the console log.
    a_serving: Vec<Duration>,
    /// A: request → the Spawn RPC returning.
    a_rpc: Vec<Duration>,
    a_ready_time: Vec<Duration>,
    a_boot_time: Vec<Duration>,
    a_fails: usize,
    a_not_serving: usize,
    /// B: QEMU started → `auraed is serving` in its output.
    b_serving: Vec<Duration>,
    b_fails: usize,
}

/// One microVM `Spawn` named `name`; its status, or the error (also when the RPC has not
/// returned within 270 s: the child's own ready_timeout is 240 s).
async fn spawn(c: &Client, name: &str) -> Result<pb::InstanceStatus, String> {
    let mut rt = c.runtime();
    let call = rt.spawn(pb::Instance {
        name: name.into(),
        isolation: pb::Isolation::VirtualMachine as i32,
        vcpus: 1,
        memory_bytes: MEMORY_MIB << 20,
        ready_timeout: secs(240),
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(270), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("no answer within 270 s".into()),
    }
}

/// Whether L1's auraed still answers (a crashed L1 ends the rounds).
async fn l1_alive(c: &Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(15), c.daemon().info(pb::InfoRequest {})).await,
        Ok(Ok(_))
    )
}

/// L1's whole serial console, copied out of the guest's temporary directory.
fn save_serial(g: &Guest) -> String {
    let to = std::env::temp_dir().join("aurae-spawn-vm-l1-serial.log");
    match std::fs::copy(&g.serial, &to) {
        Ok(_) => to.display().to_string(),
        Err(e) => format!("(copying {} failed: {e})", g.serial.display()),
    }
}

/// A: one microVM `Spawn` to ready, with the watcher timing `auraed is serving` in its log.
async fn round_a(c: &Client, g: &Guest, i: usize, s: &mut Samples) -> Result<(), String> {
    let name = format!("b{i}");
    let log = format!("/var/lib/aurae/logs/instances/{name}.log");
    let wcell = format!("wa{i}");
    start_watcher(c, &wcell, &log).await?;
    let t = Instant::now();
    let mut watch = poll_output(c, &wcell, "watch", SEEN, t);
    let r = spawn(c, &name).await;
    let rpc = t.elapsed();
    // The line comes before health answers; the watcher may lag a poll or two.
    let serving = match tokio::time::timeout(Duration::from_secs(5), &mut watch).await {
        Ok(j) => j.unwrap(),
        Err(_) => {
            watch.abort();
            None
        }
    };
    // Read before Free, which deletes the log.
    let text = workload::run_to_end(c, exe(&wcell, "cat", &["/bin/cat", log.as_str()]))
        .await
        .map(|(_, out)| out)
        .unwrap_or_else(|e| format!("(cat failed: {e:?})"));
    let in_log = text.contains(SERVING);
    match &r {
        Ok(st) => {
            s.a_rpc.push(rpc);
            s.a_ready_time.extend(dur(st.ready_time.as_ref()));
            s.a_boot_time.extend(dur(st.boot_time.as_ref()));
            println!(
                "  round {i} A Spawn(VM) {name}: to serving {}, RPC {:.2} s (reported boot {:.2?}, ready {:.2?}); \
                 '{SERVING}' in its log: {in_log}",
                serving.map_or("not seen".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                rpc.as_secs_f64(),
                dur(st.boot_time.as_ref()),
                dur(st.ready_time.as_ref()),
            );
        }
        Err(e) => {
            s.a_fails += 1;
            println!(
                "  round {i} A Spawn(VM) {name} FAILED after {:.2} s: {e}\n    serial of L1 (tail; whole: {}):\n{}",
                rpc.as_secs_f64(),
                save_serial(g),
                tail(&g.serial_text(), 40)
            );
        }
    }
    match serving {
        Some(d) if in_log => s.a_serving.push(d),
        _ => {
            s.a_not_serving += 1;
            println!(
                "    round {i} A: '{SERVING}' not timed (watcher saw it: {}, in the log: {in_log}); log tail:\n{}",
                serving.is_some(),
                tail(&text, 30)
            );
        }
    }
    if let Err(e) = c.instances().free(pb::NameRef { name: name.clone() }).await
        && r.is_ok()
    {
        println!("    freeing instance {name}: {e:?}");
    }
    free_cell(c, &wcell).await;
    Ok(())
}

/// B: QEMU microvm booting the same auraed to `auraed is serving`.
///
/// Every cell carries a device filter (cgroup BPF) that denies /dev/kvm, and the API has
/// no grant for it; so QEMU's cell shares L1's mount and cgroup namespaces and its
/// executable moves itself into L1's root cgroup (`echo 0 > cgroup.procs`, a busybox
/// builtin) before it execs QEMU. Its own PID namespace still ends it with the cell; it
/// is killed through its pidfd first anyway.
async fn round_b(c: &Client, i: usize, s: &mut Samples) -> Result<(), String> {
    let cell = format!("q{i}");
    let wcell = format!("wb{i}");
    allocate(c, &cell, true).await?;
    // The same observer load as A's: a watcher on a file that never appears, polled.
    start_watcher(c, &wcell, "/var/lib/aurae/bench/never.log").await?;
    let mem = MEMORY_MIB.to_string();
    let argv = [
        "/bin/sh",
        "-c",
        "echo 0 > /sys/fs/cgroup/cgroup.procs && exec \"$@\"",
        "sh",
        QEMU,
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        mem.as_str(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-bios",
        "/usr/share/seabios/bios-microvm.bin",
        "-kernel",
        KERNEL,
        "-initrd",
        PEER_INITRD,
        "-append",
        PEER_CMDLINE,
    ];
    let t = Instant::now();
    let twin = poll_output(c, &wcell, "watch", SEEN, t);
    let started = c.runtime().run_executable(exe(&cell, "qemu", &argv)).await;
    let serving = match started {
        Ok(_) => poll_output(c, &cell, "qemu", SERVING, t).await.unwrap(),
        Err(e) => {
            println!("  round {i} B: starting QEMU failed: {e:?}");
            None
        }
    };
    twin.abort();
    match serving {
        Some(d) => {
            s.b_serving.push(d);
            println!(
                "  round {i} B qemu -M microvm: to serving {:.2} s",
                d.as_secs_f64()
            );
        }
        None => {
            s.b_fails += 1;
            let out = workload::logs(c, &cell, "qemu", false)
                .await
                .unwrap_or_else(|e| format!("(logs failed: {e:?})"));
            let st = c
                .executables()
                .get(workload::exe_ref(&cell, "qemu"))
                .await
                .map(|r| {
                    let st = r.into_inner();
                    format!(
                        "phase {:?}, exit {:?}",
                        pb::Phase::try_from(st.phase),
                        st.exit
                    )
                })
                .unwrap_or_else(|e| format!("(status: {e:?})"));
            println!(
                "  round {i} B qemu -M microvm: '{SERVING}' NOT seen after {:.2} s ({st}); output tail:\n{}",
                t.elapsed().as_secs_f64(),
                tail(&out, 30)
            );
        }
    }
    let _ = c
        .executables()
        .signal(pb::SignalExecutableRequest {
            executable: Some(workload::exe_ref(&cell, "qemu")),
            signal: 9,
        })
        .await;
    let _ = workload::wait(c, &cell, "qemu").await;
    free_cell(c, &cell).await;
    free_cell(c, &wcell).await;
    Ok(())
}

fn stats(v: &[Duration]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64();
    Some((at(0.5), at(0.1), at(0.9)))
}

fn report(name: &str, v: &[Duration], fails: usize) -> f64 {
    match stats(v) {
        None => {
            println!("report {name:<40} no samples  fails {fails}");
            f64::NAN
        }
        Some((m, p10, p90)) => {
            println!(
                "report {name:<40} median {m:7.2} s  p10 {p10:7.2}  p90 {p90:7.2}  n {}  fails {fails}",
                v.len()
            );
            m
        }
    }
}

fn main() {
    let total = Instant::now();
    if let Some(reason) = needs_guest() {
        println!("SKIP spawn vm bench: {reason}");
        return;
    }
    let Some(qemu) = qemu_files() else {
        println!("SKIP spawn vm bench: ldd {QEMU} failed");
        return;
    };
    let rounds = aurae_testkit::bench_rounds(3);
    let mut files = instance_files().unwrap();
    files.push(Entry::Dir {
        path: "var/lib/aurae/bench".into(),
        mode: 0o755,
    });
    files.push(Entry::File {
        path: PEER_INITRD.trim_start_matches('/').into(),
        mode: 0o644,
        data: peer_initramfs().unwrap(),
    });
    files.extend(qemu);
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let g = Guest::boot(GuestOptions {
            extra_files: files,
            memory_mib: 3072,
            timeout: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .unwrap();
        let c = g.client("admin").await.unwrap();
        println!(
            "spawn vm bench: L1 (TCG, nested KVM) up in {:.1} s; {rounds} interleaved rounds, \
             {MEMORY_MIB} MiB / 1 vCPU each side",
            g.boot_time.as_secs_f64()
        );

        // Warm-up (waits for L1's KVM probe too); excluded.
        let t = Instant::now();
        match spawn(&c, "warm").await {
            Ok(st) => println!(
                "  warm-up Spawn(VM): {:.2} s ({})",
                t.elapsed().as_secs_f64(),
                st.isolation_reason
            ),
            Err(e) => println!(
                "  warm-up Spawn(VM) FAILED after {:.2} s: {e}\n    serial of L1 (tail; whole: {}):\n{}",
                t.elapsed().as_secs_f64(),
                save_serial(&g),
                tail(&g.serial_text(), 40)
            ),
        }
        let _ = c
            .instances()
            .free(pb::NameRef {
                name: "warm".into(),
            })
            .await;

        let mut s = Samples::default();
        for i in 0..rounds {
            // The order alternates, so drift in L1 hits both sides alike.
            let r = if i % 2 == 0 {
                match round_a(&c, &g, i, &mut s).await {
                    Ok(()) => round_b(&c, i, &mut s).await,
                    e => e,
                }
            } else {
                match round_b(&c, i, &mut s).await {
                    Ok(()) => round_a(&c, &g, i, &mut s).await,
                    e => e,
                }
            };
            if let Err(e) = r {
                println!("  round {i}: {e}");
            }
            if !l1_alive(&c).await {
                println!(
                    "  L1 no longer answers: rounds end here. L1 serial (whole: {}), tail:\n{}",
                    save_serial(&g),
                    tail(&g.serial_text(), 60)
                );
                break;
            }
        }

        let a_serving = report(
            "A aurae Spawn(VM) -> auraed is serving",
            &s.a_serving,
            s.a_not_serving,
        );
        let a_ready = report("A aurae Spawn(VM) RPC -> ready", &s.a_rpc, s.a_fails);
        report("A   reported boot_time", &s.a_boot_time, 0);
        report("A   reported ready_time", &s.a_ready_time, 0);
        let b_serving = report(
            "B qemu -M microvm -> auraed is serving",
            &s.b_serving,
            s.b_fails,
        );
        println!(
            "RATIO spawn-vm-to-serving / qemu-to-serving = {:.2}",
            a_serving / b_serving
        );
        println!(
            "RATIO spawn-vm-ready / qemu-to-serving = {:.2}",
            a_ready / b_serving
        );
        drop(g);
    });
    println!(
        "spawn vm bench: total wall time {:.1} s",
        total.elapsed().as_secs_f64()
    );
}
