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
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_testkit::vm::tiny_elf;
use aurae_vmm::{
    RestoreConfig, Snapshot, SnapshotError, SnapshotTarget, Vm, VmConfig, VmExit, VmmError,
    devices::SERIAL_PORT_BASE, snapshot,
};

fn kvm_or_skip(test: &str) -> bool {
    aurae_testkit::tier::check(
        test,
        aurae_testkit::tier::Tier::Host,
        aurae_testkit::vm::needs_kvm(),
    )
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guests' memory.
const MEM_BYTES: u64 = 32 << 20;

/// Where the guest counts its letters.
const COUNT_ADDR: u32 = 0x30_0000;

/// The guest: `bl` = the next letter; each round it writes it to the serial port's
/// scratch register, reads it back and prints what it read, adds one to the count at
/// [`COUNT_ADDR`], and every 26 letters prints `#` and the count's low byte as two hex
/// digits' worth of letters (`a` + high nibble, `a` + low nibble); then spins a while.
fn letters_guest() -> Vec<u8> {
    let [s0, s1] = SERIAL_PORT_BASE.to_le_bytes();
    let [c0, c1, c2, c3] = COUNT_ADDR.to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0x66, 0xba, s0, s1,                 // mov dx, COM1
        0xb3, b'A',                         // mov bl, 'A'
        // loop: the letter goes out through the scratch register and back in (an `in`
        // whose value KVM must complete before a snapshot reads the registers)
        0x66, 0xba, 0xff, 0x03,             // mov dx, COM1 scratch
        0x88, 0xd8,                         // mov al, bl
        0xee,                               // out dx, al
        0x31, 0xc0,                         // xor eax, eax
        0xec,                               // in al, dx
        0x66, 0xba, s0, s1,                 // mov dx, COM1
        0xee,                               // out dx, al
        0xff, 0x04, 0x25, c0, c1, c2, c3,   // inc dword [COUNT_ADDR]
        0xfe, 0xc3,                         // inc bl
        0x80, 0xfb, b'Z' + 1,               // cmp bl, 'Z'+1
        0x75, 0x1d,                         // jne spin (+29)
        0xb3, b'A',                         // mov bl, 'A'
        0xb0, b'#', 0xee,                   // mov al, '#' ; out dx, al
        0x8b, 0x04, 0x25, c0, c1, c2, c3,   // mov eax, [COUNT_ADDR]
        0x89, 0xc1,                         // mov ecx, eax
        0xc0, 0xe8, 0x04,                   // shr al, 4
        0x24, 0x0f,                         // and al, 0x0f
        0x04, b'a', 0xee,                   // add al, 'a' ; out dx, al
        0x88, 0xc8,                         // mov al, cl
        0x24, 0x0f,                         // and al, 0x0f
        0x04, b'a', 0xee,                   // add al, 'a' ; out dx, al
        // spin:
        0xb9, 0x00, 0x10, 0x00, 0x00,       // mov ecx, 0x1000
        0xe2, 0xfe,                         // loop $
        0xeb, 0xbd,                         // jmp loop (-67)
    ];
    code
}

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
        seccomp: true,
    })
    .map(|(vm, _)| vm)
}

/// The letter after `c` in the guest's round.
fn next_letter(c: u8) -> u8 {
    if c == b'Z' { b'A' } else { c + 1 }
}

/// The last count the guest printed (`#` + two nibble letters), if any.
fn last_count(out: &[u8]) -> Option<u8> {
    let at = out.iter().rposition(|&b| b == b'#')?;
    let hi = *out.get(at + 1)?;
    let lo = *out.get(at + 2)?;
    Some(((hi - b'a') << 4) | (lo - b'a'))
}

/// The last letter the guest printed, skipping a trailing count.
fn last_letter(out: &[u8]) -> u8 {
    *out.iter()
        .rev()
        .find(|b| b.is_ascii_uppercase())
        .expect("a letter")
}

#[test]
fn a_restored_vm_carries_on_where_the_snapshot_stopped() {
    if !kvm_or_skip("a_restored_vm_carries_on_where_the_snapshot_stopped") {
        return;
    }
    // Past two rounds, so the memory count has been printed.
    let (mut state, memory, before) = take_snapshot(2, 70);
    let count_before = last_count(&before).expect("a count before the snapshot");
    let ends_inside_count =
        before.len() >= 2 && (before[before.len() - 1] == b'#' || before[before.len() - 2] == b'#');
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
        if !ends_inside_count {
            assert_eq!(
                first,
                next_letter(last_letter(&before)),
                "before: …{:?}, after: {:?}…",
                String::from_utf8_lossy(&before[before.len().saturating_sub(10)..]),
                String::from_utf8_lossy(&after[..10])
            );
        }
        // Memory: the count goes on from the snapshot's (26 letters a round).
        let first_count = {
            let at = after.iter().position(|&b| b == b'#').expect("a count");
            ((after[at + 1] - b'a') << 4) | (after[at + 2] - b'a')
        };
        assert_eq!(
            first_count,
            count_before.wrapping_add(26),
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
    }];
    let e = try_restore(good.clone(), &memory, drives);
    assert!(e.contains("0 drive(s)") && e.contains("1 drive(s)"), "{e}");
    // A memory file that is not the snapshot's is caught by the explicit check.
    let other_mem = tempfile::tempfile().unwrap();
    other_mem.set_len(MEM_BYTES).unwrap();
    let e = snapshot::verify_memory(&good.header, &other_mem).unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // The good one still restores.
    let mut state = state;
    restore(&mut state, &memory, &Captured::default()).unwrap();
}
