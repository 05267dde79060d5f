//! Per-thread seccomp with KVM: every VMM thread (`vcpuN`, `vmm`, `net-rx`) shows
//! `Seccomp: 2` in `/proc/self/task/<tid>/status` while the guest runs, the caller's
//! thread does not, and the VM still stops cleanly (the stop path's syscalls are allowed;
//! a missing one would kill this test process). The network case makes its own network
//! namespace, so the TAP it creates is gone with it.
//!
//! A test binary of its own: the checks scan every thread of the process by name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use aurae_testkit::vm::{Captured, tiny_elf};
use aurae_vmm::{NetConfig, Vm, VmConfig, VmExit};

/// `(name, seccomp mode)` of every thread of this process.
fn threads() -> Vec<(String, u8)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(p.join("status")) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(255);
        out.push((comm.trim().to_owned(), mode));
    }
    out
}

fn own_mode() -> u8 {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Whether `seen` has every VMM thread expected (`vcpu0..vcpus`, `vmm`, and `net-rx` if
/// `net`), each once and filtered.
fn all_filtered(seen: &[(String, u8)], vcpus: u8, net: bool) -> bool {
    let mut want: Vec<String> = (0..vcpus).map(|i| format!("vcpu{i}")).collect();
    want.push("vmm".into());
    if net {
        want.push("net-rx".into());
    }
    want.iter()
        .all(|w| seen.iter().filter(|(n, m)| n == w && *m == 2).count() == 1)
}

/// Runs a guest that writes '.' to COM1 forever on `vcpus` vCPUs (only the boot vCPU
/// runs; the others wait for SIPI inside KVM_RUN), with seccomp on; returns the threads
/// seen once every VMM thread was up (or after 10 s) and how the VM ended.
fn run_filtered(vcpus: u8, net: Option<NetConfig>) -> (Vec<(String, u8)>, VmExit, usize) {
    let with_net = net.is_some();
    // mov dx, 0x3f8 ; mov al, '.' ; out dx, al ; jmp $-3
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'.', 0xee, 0xeb, 0xfd];
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&tiny_elf(0x20_0000, &code)).unwrap();
    let sink = Captured::default();
    let vm = Vm::new(VmConfig {
        kernel: PathBuf::from(f.path()),
        cmdline: "console=ttyS0".into(),
        vcpus,
        mem_bytes: 64 << 20,
        serial_out: Box::new(sink.clone()),
        net,
        seccomp: true,
        ..Default::default()
    })
    .unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while handle.io_exits() < 100 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(handle.io_exits() >= 100, "the guest never ran");
    // Threads name themselves and install their filter as they start: wait for all.
    let mut seen = threads();
    while !all_filtered(&seen, vcpus, with_net) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
        seen = threads();
    }
    handle.stop();
    let exit = runner.join().unwrap().unwrap();
    let bytes = sink.bytes().len();
    (seen, exit, bytes)
}

#[test]
fn every_vmm_thread_is_filtered() {
    if !aurae_testkit::tier::check(
        "every_vmm_thread_is_filtered",
        aurae_testkit::tier::Tier::Host,
        aurae_testkit::vm::needs_kvm(),
    ) {
        return;
    }
    let (seen, exit, bytes) = run_filtered(2, None);
    assert!(all_filtered(&seen, 2, false), "{seen:?}");
    assert_eq!(own_mode(), 0, "the caller's thread is not filtered");
    assert_eq!(exit, VmExit::Stopped);
    assert!(bytes >= 100);

    // The network RX thread too, on a TAP in a network namespace of this test's own.
    let (seen, exit) = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let net = NetConfig {
            tap: "aurae-t0".into(),
            mac: [0x02, 0, 0, 0, 0, 1],
        };
        let (seen, exit, _) = run_filtered(1, Some(net));
        (seen, exit)
    })
    .join()
    .unwrap();
    assert!(all_filtered(&seen, 1, true), "{seen:?}");
    assert_eq!(exit, VmExit::Stopped);
}
