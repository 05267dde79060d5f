//! Restore benchmark (host tier, `/dev/kvm`): a tiny 64-bit guest (it prints letters on
//! COM1 in a loop) with 256 MiB of memory, snapshotted once, then, interleaved round by
//! round in one run:
//!
//! - **R1** restore → the restored guest's first byte on the console, vs a cold build of the
//!   same guest (`Vm::new`: memory, kernel load, boot structures, vCPUs) → its first byte;
//!   and the restore alone (state file read and decoded, `Vm::restore`) with its parts;
//! - **R2** what each additional restored VM costs this process while it runs: its Pss
//!   (`/proc/self/smaps_rollup`) against the pages its guest wrote, for 8 VMs restored from
//!   one snapshot and running at once, vs the same for 8 cold-built VMs.
//!
//! The guest is not Linux: the state (vCPU, irqchip, devices) is the same size for any
//! guest, and memory is mapped, not read, so the restore's time does not grow with what
//! the guest holds; a Linux guest's first touches after restore are page-cache faults.
//! Prints SKIP without `/dev/kvm`. `AURAE_BENCH_ROUNDS` (default 30).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aurae_testkit::vm::tiny_elf;
use aurae_vmm::{
    RestoreConfig, Snapshot, SnapshotTarget, Vm, VmConfig, VmExit, VmHandle,
    devices::SERIAL_PORT_BASE,
};

const MEM: u64 = 256 << 20;

/// Counts the bytes a guest prints.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::SeqCst);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn guest() -> Vec<u8> {
    let [s0, s1] = SERIAL_PORT_BASE.to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0x66, 0xba, s0, s1,                 // mov dx, COM1
        0xb3, b'A',                         // mov bl, 'A'
        // loop:
        0x88, 0xd8, 0xee,                   // mov al, bl ; out dx, al
        0xfe, 0xc3,                         // inc bl
        0xb9, 0x01, 0x00, 0x00, 0x00,       // mov ecx, 1 (no spin: the next byte at once)
        0xe2, 0xfe,                         // loop $
        0xeb, 0xf2,                         // jmp loop (-14)
    ];
    code
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Starts `vm` on a thread; returns its handle, its join handle and when it started.
fn start(vm: Vm) -> (VmHandle, std::thread::JoinHandle<VmExit>) {
    let h = vm.handle();
    (h, std::thread::spawn(move || vm.run().unwrap()))
}

fn wait_bytes(c: &Counter, from: usize) {
    let t = Instant::now();
    while c.0.load(Ordering::SeqCst) <= from {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest printed nothing"
        );
        std::hint::spin_loop();
    }
}

fn pss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    if let Some(why) = aurae_testkit::vm::needs_kvm() {
        println!("SKIP restore bench: {why}");
        return;
    }
    let rounds = aurae_testkit::bench_rounds(30);
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, tiny_elf(0x20_0000, &guest())).unwrap();
    let cfg = |out: Counter| VmConfig {
        kernel: kernel.clone(),
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        mem_bytes: MEM,
        serial_out: Box::new(out),
        seccomp: true,
        ..Default::default()
    };

    // The snapshot, once.
    let state_path = dir.path().join("state");
    let memory_path = dir.path().join("memory");
    let c = Counter::default();
    let (h, t) = start(Vm::new(cfg(c.clone())).unwrap());
    wait_bytes(&c, 10);
    let taken = Instant::now();
    h.snapshot(SnapshotTarget {
        state: std::fs::File::create(&state_path).unwrap(),
        memory: std::fs::File::create(&memory_path).unwrap(),
    });
    let VmExit::Snapshotted(info) = t.join().unwrap() else {
        panic!("no snapshot");
    };
    println!(
        "snapshot of a {} MiB guest: state {} bytes, memory file {} MiB (sparse: {} KiB on disk), written in {:.1} ms",
        MEM >> 20,
        info.state_bytes,
        info.memory_bytes >> 20,
        std::fs::metadata(&memory_path)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2)
            .unwrap_or(0),
        taken.elapsed().as_secs_f64() * 1e3
    );
    let memory = std::fs::File::open(&memory_path).unwrap();

    let restore = |out: Counter| {
        let t = Instant::now();
        let mut f = std::fs::File::open(&state_path).unwrap();
        let snapshot = Snapshot::read(&mut f).unwrap();
        let read = t.elapsed();
        let (vm, info) = Vm::restore(RestoreConfig {
            snapshot,
            memory: memory.try_clone().unwrap(),
            serial_out: Box::new(out),
            drives: Vec::new(),
            net: None,
            console_out: None,
            seccomp: true,
        })
        .unwrap();
        (vm, read, info, t.elapsed())
    };

    // R1, interleaved.
    let (mut cold, mut warm, mut alone, mut reads, mut machines, mut vcpus) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut cold_run, mut warm_run) = (vec![], vec![]);
    let mut steps: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for round in 0..=rounds {
        let c = Counter::default();
        let t = Instant::now();
        let vm = Vm::new(cfg(c.clone())).unwrap();
        let built = t.elapsed();
        let (h, j) = start(vm);
        wait_bytes(&c, 0);
        let cold_s = t.elapsed().as_secs_f64();
        cold_run.push((cold_s - built.as_secs_f64()) * 1e3);
        h.stop();
        j.join().unwrap();

        let c = Counter::default();
        let t = Instant::now();
        let (vm, read, info, took) = restore(c.clone());
        let (h, j) = start(vm);
        wait_bytes(&c, 0);
        let warm_s = t.elapsed().as_secs_f64();
        warm_run.push((warm_s - took.as_secs_f64()) * 1e3);
        h.stop();
        j.join().unwrap();
        if round == 0 {
            continue; // warm-up
        }
        cold.push(cold_s * 1e3);
        warm.push(warm_s * 1e3);
        alone.push(took.as_secs_f64() * 1e3);
        reads.push(read.as_secs_f64() * 1e3);
        machines.push(info.machine.as_secs_f64() * 1e3);
        vcpus.push(info.vcpus.as_secs_f64() * 1e3);
        for (i, (step, took)) in info.steps.iter().enumerate() {
            if steps.len() <= i {
                steps.push((step, Vec::new()));
            }
            steps[i].1.push(took.as_secs_f64() * 1e3);
        }
    }
    let (cm, wm) = (median(&mut cold), median(&mut warm));
    println!(
        "R1 from run() to the first byte: restored {:.3} ms, cold {:.3} ms",
        median(&mut warm_run),
        median(&mut cold_run)
    );
    println!(
        "R1 restore -> first console byte: {wm:.3} ms (p10 {:.3}, p90 {:.3}) vs cold build -> first byte {cm:.3} ms (p10 {:.3}, p90 {:.3}) -> {:.2}x ({rounds} rounds)",
        pct(&mut warm, 0.1),
        pct(&mut warm, 0.9),
        pct(&mut cold, 0.1),
        pct(&mut cold, 0.9),
        wm / cm
    );
    println!(
        "R1 restore alone: {:.3} ms (p90 {:.3}; target <= 10 ms): read+decode {:.3}, VM+memory map+devices {:.3}, vCPU state {:.3}",
        median(&mut alone),
        pct(&mut alone, 0.9),
        median(&mut reads),
        median(&mut machines),
        median(&mut vcpus)
    );
    let steps: Vec<String> = steps
        .iter_mut()
        .map(|(step, ms)| format!("{step} {:.3}", median(ms)))
        .collect();
    println!("R1 restore's steps (medians, ms): {}", steps.join(", "));

    // R2: 8 at once, each kind.
    const N: usize = 8;
    for kind in ["restored", "cold"] {
        let base = pss_kib();
        let mut running = Vec::new();
        let mut steps = Vec::new();
        for _ in 0..N {
            let before = pss_kib();
            let c = Counter::default();
            let vm = if kind == "restored" {
                restore(c.clone()).0
            } else {
                Vm::new(cfg(c.clone())).unwrap()
            };
            let (h, j) = start(vm);
            wait_bytes(&c, 100);
            steps.push((pss_kib() - before) as f64 / 1024.0);
            running.push((h, j));
        }
        let total = (pss_kib() - base) as f64 / 1024.0;
        for (h, j) in running {
            h.stop();
            j.join().unwrap();
        }
        println!(
            "R2 {kind}: {N} running VMs add {total:.2} MiB of Pss to this process, {:.2} MiB each (median step {:.2}; target <= 3 MiB beyond the pages the guest writes: this guest writes none but its stack)",
            total / N as f64,
            median(&mut steps)
        );
    }
}
