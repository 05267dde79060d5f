//! Restore benchmark in the guest tier (QEMU TCG `-cpu max`, nested KVM): a Linux microVM
//! (Debian's kernel, 256 MiB, 1 vCPU) whose init prints `AURAE_TICK n` every 50 ms.
//! Snapshotted once after its first ticks, then interleaved round by round:
//!
//! - **V1** `RunVirtualMachine {snapshot}` → the restored guest's next tick on the console,
//!   vs a cold `RunVirtualMachine` (kernel + initramfs) → its first tick (issue 15's
//!   target for Spawn from a template vs a cold Spawn: ≤ 0.05×); the restore inside the
//!   VMM (its report) alone (target ≤ 10 ms);
//! - **V2** what each restored VM costs the machine while it runs, 3 at once: its VMM's
//!   private memory beyond the guest pages it wrote (target ≤ 3 MiB), and L1's
//!   MemAvailable drop per VM (kernel memory included), vs the same for one cold-booted VM.
//!
//! Needs the guest tier (root, qemu, `cargo xtask guest`); prints SKIP otherwise.
//! `AURAE_BENCH_ROUNDS` (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::time::{Duration, Instant};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    guest::{Guest, GuestOptions, microvm_initramfs_with, needs_guest, vm_image_files},
    workload,
};

const MEMORY: u64 = 256 << 20;
const TICKS: &str = "i=0\nwhile true; do i=$((i+1)); echo \"AURAE_TICK $i\"; sleep 0.05; done\n";

fn cold(name: &str) -> pb::VirtualMachine {
    pb::VirtualMachine {
        name: name.into(),
        kernel_path: "/var/lib/aurae/vm-images/vmlinuz".into(),
        initramfs_path: "/var/lib/aurae/vm-images/initrd".into(),
        cmdline: "console=ttyS0 reboot=k panic=-1 quiet".into(),
        vcpus: 1,
        memory_bytes: MEMORY,
        ..Default::default()
    }
}

fn restored(name: &str) -> pb::VirtualMachine {
    pb::VirtualMachine {
        name: name.into(),
        snapshot: "tpl".into(),
        ..Default::default()
    }
}

fn ticks(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("AURAE_TICK "))
        .count()
}

/// Starts `vm` and returns the seconds until its console shows one more tick than
/// `already` (None: it ended first, a nested triple fault, or 300 s passed), and its
/// status as started.
async fn run_to_tick(
    c: &Client,
    vm: pb::VirtualMachine,
    already: usize,
) -> (Option<f64>, pb::VirtualMachineStatus) {
    // A TCG machine that died (its kernel panicked under nested load) answers nothing:
    // bounded, so the bench ends and prints what it has.
    tokio::time::timeout(Duration::from_secs(320), run_to_tick_inner(c, vm, already))
        .await
        .unwrap_or_else(|_| {
            println!("a VM did not tick within 320 s: is the TCG machine still alive?");
            (None, pb::VirtualMachineStatus::default())
        })
}

async fn run_to_tick_inner(
    c: &Client,
    vm: pb::VirtualMachine,
    already: usize,
) -> (Option<f64>, pb::VirtualMachineStatus) {
    let name = vm.name.clone();
    let t = Instant::now();
    let st = c
        .runtime()
        .run_virtual_machine(vm)
        .await
        .unwrap()
        .into_inner();
    while t.elapsed() < Duration::from_secs(300) {
        let text = workload::console(c, &name).await.unwrap_or_default();
        if ticks(&text) > already {
            return (Some(t.elapsed().as_secs_f64()), st);
        }
        let now = c
            .virtual_machines()
            .get(pb::NameRef { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        if now.phase != pb::Phase::Running as i32 {
            return (None, st);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (None, st)
}

async fn free(c: &Client, name: &str) {
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        c.virtual_machines().free(pb::NameRef { name: name.into() }),
    )
    .await;
}

/// `cat` of files of L1's host PID namespace, through a cell that shares it.
async fn read(c: &Client, what: &str, paths: &[String]) -> String {
    let mut argv = vec!["/bin/cat".to_owned()];
    argv.extend(paths.iter().cloned());
    let run = workload::run_to_end(
        c,
        pb::Executable {
            cell: "probe".into(),
            name: what.into(),
            argv,
            ..Default::default()
        },
    );
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok((_, out))) => out,
        _ => String::new(),
    }
}

fn kib(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A VMM's private memory (KiB) and, of it, the guest memory mapping's private pages
/// (the pages its guest wrote: copied from the snapshot, or touched at all when booted).
fn private_kib(smaps: &str) -> (u64, u64) {
    let (mut total, mut guest) = (0, 0);
    let mut in_guest = false;
    for l in smaps.lines() {
        if l.starts_with("Size:") {
            in_guest = kib(l) == MEMORY / 1024;
        } else if l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:") {
            total += kib(l);
            if in_guest {
                guest += kib(l);
            }
        }
    }
    (total, guest)
}

async fn mem_available(c: &Client, round: &str) -> u64 {
    read(c, &format!("meminfo-{round}"), &["/proc/meminfo".into()])
        .await
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .map_or(0, kib)
}

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    if let Some(reason) = needs_guest() {
        println!("SKIP vm restore bench: {reason}");
        return;
    }
    let rounds = aurae_testkit::bench_rounds(3);
    let files = vm_image_files(microvm_initramfs_with(TICKS).unwrap()).unwrap();
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let g = Guest::boot(GuestOptions {
            extra_files: files,
            memory_mib: 2560,
            ..Default::default()
        })
        .await
        .unwrap();
        let c = g.client("admin").await.unwrap();
        c.cells()
            .allocate(pb::Cell {
                name: "probe".into(),
                namespaces: Some(pb::CellNamespaces {
                    share_host_pid: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        // The snapshot, once (booted again if the nested guest faults).
        for attempt in 1..=4 {
            let (t, _) = run_to_tick(&c, cold("src"), 2).await;
            if t.is_some() {
                let info = c
                    .virtual_machines()
                    .snapshot(pb::SnapshotRequest {
                        name: "src".into(),
                        snapshot: "tpl".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let before = ticks(&workload::console(&c, "src").await.unwrap());
                println!("vm restore bench: snapshot after {before} ticks: {info:?}");
                free(&c, "src").await;
                break;
            }
            println!("RETRY the snapshot's source (attempt {attempt}): it did not tick");
            free(&c, "src").await;
        }
        // V1.
        let (mut cold_s, mut warm_s, mut restore_ms) = (Vec::new(), Vec::new(), Vec::new());
        let mut faults = 0;
        for i in 0..rounds {
            match run_to_tick(&c, cold(&format!("c{i}")), 0).await {
                (Some(t), _) => cold_s.push(t),
                (None, _) => faults += 1,
            }
            free(&c, &format!("c{i}")).await;
            // The restored guest's console starts empty: its first line is the tick after
            // the snapshot's last.
            let (t, st) = run_to_tick(&c, restored(&format!("r{i}")), 0).await;
            if let Some(t) = t {
                warm_s.push(t);
            }
            if let Some(d) = st.restore_time {
                restore_ms.push(d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6);
            }
            free(&c, &format!("r{i}")).await;
        }
        let (cm, wm) = (med(cold_s.clone()), med(warm_s.clone()));
        println!(
            "V1 restore -> next tick {:.1} ms (runs {:.1?} ms) vs cold boot -> first tick {cm:.2} s (runs {cold_s:.2?} s; {faults} faulted) -> {:.4}x (target <= 0.05)",
            wm * 1e3,
            warm_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
            wm / cm
        );
        println!(
            "V1 restore inside the VMM: median {:.1} ms (runs {restore_ms:.1?}; target <= 10 ms)",
            med(restore_ms.clone())
        );
        // V2: 3 restored at once, 1 cold; each VMM's private memory after 1 s of ticking.
        for kind in ["restored", "cold"] {
            let avail0 = mem_available(&c, &format!("{kind}-0")).await;
            let mut pids = Vec::new();
            // One cold VM: three booting at once is what twice made the TCG machine's own
            // kernel panic (nested SVM under TCG), and one tells what a booted VMM holds.
            let n = if kind == "restored" { 3 } else { 1 };
            for k in 0..n {
                let name = format!("{}{k}", &kind[..1]);
                let vm = if kind == "restored" {
                    restored(&name)
                } else {
                    cold(&name)
                };
                let (t, st) = run_to_tick(&c, vm, 0).await;
                if t.is_some() {
                    pids.push((name, st.vmm_pid));
                } else {
                    free(&c, &name).await;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let avail1 = mem_available(&c, &format!("{kind}-1")).await;
            let mut beyond = Vec::new();
            let mut written = Vec::new();
            for (name, pid) in &pids {
                let smaps = read(&c, &format!("smaps-{name}"), &[format!("/proc/{pid}/smaps")]).await;
                let (total, guest) = private_kib(&smaps);
                beyond.push((total - guest) as f64 / 1024.0);
                written.push(guest as f64 / 1024.0);
            }
            println!(
                "V2 {kind}: {} VMs; private memory per VMM beyond the guest pages it wrote {:.2?} MiB (median {:.2}; target <= 3); guest pages written/touched {:.1?} MiB; L1 MemAvailable drop {:.1} MiB per VM",
                pids.len(),
                beyond,
                med(beyond.clone()),
                written,
                (avail0.saturating_sub(avail1)) as f64 / 1024.0 / pids.len().max(1) as f64
            );
            for (name, _) in pids {
                free(&c, &name).await;
            }
        }
        drop(g);
    });
}
