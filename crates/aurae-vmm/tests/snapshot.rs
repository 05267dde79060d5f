//! Snapshot and restore with a tiny 64-bit guest (host tier: `/dev/kvm`; a visible SKIP
//! without it, a failure under `AURAE_REQUIRE_TIER=T1`).
//!
//! The guest prints `A`..`Z` round and round on COM1 (the letter lives in a register, a
//! count of letters in memory), so the first letter a restored VM prints proves its
//! registers, and the count it then prints proves its memory: both must carry on from the
//! snapshot, not start again. Two VMs restored from one snapshot each carry on alike; what
//! they write never reaches the memory file; a snapshot from another monitor version, CPU
//! template, or with a flipped byte, a wrong memory file or other devices is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    fs::File,
    io::{self, Write},
    time::{Duration, Instant},
};

use aurae_testkit::vm::{Captured, letter_counts, letters_guest, next_letter_after, tiny_elf};
use aurae_vmm::{
    RestoreConfig, Snapshot, SnapshotError, SnapshotTarget, Vm, VmConfig, VmExit, VmmError,
    snapshot,
};

fn kvm_or_skip(test: &str) -> bool {
    aurae_testkit::tier::check(
        test,
        aurae_testkit::tier::Tier::Host,
        aurae_testkit::vm::needs_kvm(),
    )
}

/// The guests' memory.
const MEM_BYTES: u64 = 32 << 20;

/// A guest built from [`letters_guest`] with `vcpus`, printing into `sink`.
fn letters_vm(vcpus: u8, sink: &Captured, kernel: &tempfile::NamedTempFile) -> Vm {
    Vm::new(VmConfig {
        kernel: kernel.path().to_owned(),
        cmdline: "console=ttyS0".into(),
        vcpus,
        mem_bytes: MEM_BYTES,
        serial_out: Box::new(sink.clone()),
        seccomp: true,
        ..Default::default()
    })
    .unwrap()
}

fn kernel_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&tiny_elf(0x20_0000, &letters_guest())).unwrap();
    f
}

/// Runs `vm` until `sink` holds at least `bytes` bytes (or 20 s), then applies `end`.
fn run_until(
    vm: Vm,
    sink: &Captured,
    bytes: usize,
    end: impl FnOnce(&aurae_vmm::VmHandle),
) -> VmExit {
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while sink.bytes().len() < bytes && t.elapsed() < Duration::from_secs(20) {
        if runner.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    end(&handle);
    runner.join().unwrap().unwrap()
}

/// A snapshot of the letters guest after it printed at least `bytes` bytes: the state
/// file, the memory file, and what it printed.
fn take_snapshot(vcpus: u8, bytes: usize) -> (File, File, Vec<u8>) {
    let kernel = kernel_file();
    let sink = Captured::default();
    let vm = letters_vm(vcpus, &sink, &kernel);
    let state = tempfile::tempfile().unwrap();
    let memory = tempfile::tempfile().unwrap();
    let target = SnapshotTarget {
        state: state.try_clone().unwrap(),
        memory: memory.try_clone().unwrap(),
    };
    let exit = run_until(vm, &sink, bytes, move |h| h.snapshot(target));
    let VmExit::Snapshotted(info) = exit else {
        panic!("expected a snapshot, got {exit:?}");
    };
    assert_eq!(info.memory_bytes, MEM_BYTES);
    assert!(info.state_bytes > 4096, "{info:?}");
    (state, memory, sink.bytes())
}

fn restore(state: &mut File, memory: &File, sink: &Captured) -> Result<Vm, VmmError> {
    let snapshot = Snapshot::read(state)?;
    Vm::restore(RestoreConfig {
        snapshot,
        memory: memory.try_clone().unwrap(),
        serial_out: Box::new(sink.clone()),
        drives: Vec::new(),
        net: None,
        console_out: None,
        seccomp: true,
    })
    .map(|(vm, _)| vm)
}

#[test]
fn a_restored_vm_carries_on_where_the_snapshot_stopped() {
    if !kvm_or_skip("a_restored_vm_carries_on_where_the_snapshot_stopped") {
        return;
    }
    // Past two rounds, so the memory count has been printed.
    let (mut state, memory, before) = take_snapshot(2, 70);
    let count_before = letter_counts(&before)
        .1
        .expect("a count before the snapshot");
    let next = next_letter_after(&before);
    let memory_sum = Snapshot::read(&mut state).unwrap().header.memory_sha256;

    let mut firsts = Vec::new();
    for _ in 0..2 {
        let sink = Captured::default();
        let vm = restore(&mut state, &memory, &sink).unwrap();
        let exit = run_until(vm, &sink, 80, |h| h.stop());
        assert_eq!(exit, VmExit::Stopped);
        let after = sink.bytes();
        assert!(after.len() >= 80, "the restored guest runs: {after:?}");
        // Registers: the next letter, not 'A' again.
        let first = *after
            .iter()
            .find(|b| b.is_ascii_uppercase())
            .expect("a letter");
        if let Some(next) = next {
            assert_eq!(
                first,
                next,
                "before: …{:?}, after: {:?}…",
                String::from_utf8_lossy(&before[before.len().saturating_sub(10)..]),
                String::from_utf8_lossy(&after[..10])
            );
        }
        // Memory: the count goes on from the snapshot's (26 letters a round).
        let first_count = letter_counts(&after).0.expect("a count");
        // A snapshot inside a count: the copy finishes that one first (see vms_host_tier).
        let step = if next.is_none() { 52 } else { 26 };
        assert_eq!(
            first_count,
            count_before.wrapping_add(step),
            "the count carries on from the snapshot's memory"
        );
        firsts.push(after[..40].to_vec());
    }
    assert_eq!(firsts[0], firsts[1], "two restores carry on alike");
    // What the restored guests wrote stayed in their private copies.
    let header = Snapshot::read(&mut state).unwrap().header;
    assert_eq!(header.memory_sha256, memory_sum);
    snapshot::verify_memory(&header, &memory).unwrap();
}

#[test]
fn bad_snapshots_are_refused_with_the_reason() {
    if !kvm_or_skip("bad_snapshots_are_refused_with_the_reason") {
        return;
    }
    let (mut state, memory, _) = take_snapshot(1, 30);
    let bytes = {
        use std::io::{Read, Seek, SeekFrom};
        state.seek(SeekFrom::Start(0)).unwrap();
        let mut b = Vec::new();
        state.read_to_end(&mut b).unwrap();
        b
    };
    let good = Snapshot::decode(&bytes).unwrap();

    // A flipped byte in the payload.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    assert!(matches!(
        Snapshot::decode(&flipped),
        Err(SnapshotError::Checksum)
    ));
    // Another format version.
    let mut v2 = bytes.clone();
    v2[8] = 2;
    let e = Snapshot::decode(&v2).unwrap_err();
    assert!(e.to_string().contains("format version 2"), "{e}");
    // Truncated.
    assert!(matches!(
        Snapshot::decode(&bytes[..bytes.len() - 40]),
        Err(SnapshotError::Malformed(_))
    ));
    // Not a snapshot.
    assert!(matches!(
        Snapshot::decode(b"hello"),
        Err(SnapshotError::Magic)
    ));
    // Another monitor version (a well-formed file otherwise).
    let mut other = good.clone();
    other.header.vmm_version = "0.0.1".into();
    let e = Snapshot::decode(&other.encode()).unwrap_err();
    assert!(e.to_string().contains("aurae-vmm 0.0.1"), "{e}");

    let try_restore = |snap: Snapshot, memory: &File, drives| {
        Vm::restore(RestoreConfig {
            snapshot: snap,
            memory: memory.try_clone().unwrap(),
            serial_out: Box::new(io::sink()),
            drives,
            net: None,
            console_out: None,
            seccomp: false,
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    // Another CPU template: its CPUID here is not the snapshot's.
    let mut host = good.clone();
    host.header.cpu_template = "host".into();
    let e = try_restore(host, &memory, Vec::new());
    assert!(e.contains("CPU fingerprint"), "{e}");
    let mut unknown = good.clone();
    unknown.header.cpu_template = "t2".into();
    let e = try_restore(unknown, &memory, Vec::new());
    assert!(e.contains("CPU template") && e.contains("t2"), "{e}");
    // A memory file of another size.
    let short = tempfile::tempfile().unwrap();
    short.set_len(MEM_BYTES / 2).unwrap();
    let e = try_restore(good.clone(), &short, Vec::new());
    assert!(
        e.contains("memory file") && e.contains(&(MEM_BYTES / 2).to_string()),
        "{e}"
    );
    // Devices the snapshot's VM did not have.
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&[0u8; 4096]).unwrap();
    let drives = vec![aurae_vmm::DriveConfig {
        path: disk.path().to_owned(),
        read_only: true,
        opened: None,
    }];
    let e = try_restore(good.clone(), &memory, drives);
    assert!(e.contains("0 drive(s)") && e.contains("1 drive(s)"), "{e}");
    // A console the snapshot's VM did not have.
    let e = Vm::restore(RestoreConfig {
        snapshot: good.clone(),
        memory: memory.try_clone().unwrap(),
        serial_out: Box::new(io::sink()),
        drives: Vec::new(),
        net: None,
        console_out: Some(Box::new(io::sink())),
        seccomp: false,
    })
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("0 console(s)") && e.contains("1 console(s)"),
        "{e}"
    );
    // A memory file that is not the snapshot's is caught by the explicit check.
    let other_mem = tempfile::tempfile().unwrap();
    other_mem.set_len(MEM_BYTES).unwrap();
    let e = snapshot::verify_memory(&good.header, &other_mem).unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // The good one still restores.
    let mut state = state;
    restore(&mut state, &memory, &Captured::default()).unwrap();
}
