//! KVM smoke tests. Each prints `SKIP kvm_smoke: <reason>` and returns where `/dev/kvm`
//! cannot be opened (or, for the last one, where no host kernel is found).
//!
//! 1. Raw KVM: a real-mode blob does `out` to COM1; the first exit must be that `out`.
//! 2. The whole boot path with a tiny ELF "kernel" (64-bit code written here): long mode,
//!    GDT, page tables, boot timer, serial sink and the i8042 reset exit.
//! 3. Stopping a spinning 2-vCPU guest from another thread.
//! 4. virtio-mmio and ACPI seen from guest code: the RSDP's signature in memory, the
//!    magic and device id of a virtio-blk device's registers through MMIO exits.
//! 5. SMP: the boot vCPU starts vCPU 1 with INIT + SIPI through its local APIC (the
//!    application processor waits in KVM until then) and vCPU 1 runs real-mode code.
//! 6. A real kernel (env `AURAE_VMM_TEST_KERNEL`, `target/guest/vmlinuz`, or
//!    `/boot/vmlinuz-*`) runs until its first port I/O within 10 s (or
//!    `AURAE_VMM_TEST_DEADLINE_SECS`). Only that is asserted: a software hypervisor (PVM)
//!    boots stock kernels far too slowly for more.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::Write,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aurae_testkit::vm::{Captured, tiny_elf};
use aurae_vmm::{
    Vm, VmConfig, VmExit,
    devices::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT, SERIAL_PORT_BASE},
    sys::GuestVm,
};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The host tier's KVM check: a visible SKIP without /dev/kvm, a failure under
/// `AURAE_REQUIRE_TIER=T1` (CI).
fn kvm_or_skip(test: &str) -> Option<Kvm> {
    if !aurae_testkit::tier::check(
        test,
        aurae_testkit::tier::Tier::Host,
        aurae_testkit::vm::needs_kvm(),
    ) {
        return None;
    }
    Kvm::new().ok()
}

#[test]
fn real_mode_blob_exits_on_its_out() {
    let Some(kvm) = kvm_or_skip("real_mode_blob_exits_on_its_out") else {
        return;
    };
    // mov dx, 0x3f8 ; mov al, 'A' ; out dx, al ; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xf4];
    let load = 0x1000u64;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_slice(&code, GuestAddress(load)).unwrap();
    let guest = GuestVm::new(&kvm, Arc::new(mem)).unwrap();
    let mut vcpu = guest.create_vcpu(0).unwrap();
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd().set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: load,
        rflags: 2,
        ..Default::default()
    };
    vcpu.fd().set_regs(&regs).unwrap();

    match vcpu.run().unwrap() {
        VcpuExit::IoOut(port, data) => {
            assert_eq!(port, SERIAL_PORT_BASE);
            assert_eq!(data, b"A");
        }
        other => panic!("first exit should be the out to COM1, got {other:?}"),
    }
    // No in-kernel irqchip here, so HLT comes out to us.
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        other => panic!("second exit should be HLT, got {other:?}"),
    }
}

fn config(kernel: PathBuf, vcpus: u8, sink: &Captured) -> VmConfig {
    VmConfig {
        kernel,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        vcpus,
        mem_bytes: 64 << 20,
        serial_out: Box::new(sink.clone()),
        ..Default::default()
    }
}

#[test]
fn long_mode_guest_reports_boot_writes_serial_and_resets() {
    if kvm_or_skip("long_mode_guest_reports_boot_writes_serial_and_resets").is_none() {
        return;
    }
    let [t0, t1] = BOOT_TIMER_PORT.to_le_bytes();
    let [s0, s1] = SERIAL_PORT_BASE.to_le_bytes();
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, t0, t1,           // mov dx, BOOT_TIMER_PORT
        0xb0, BOOT_TIMER_MAGIC,       // mov al, BOOT_TIMER_MAGIC
        0xee,                         // out dx, al
        0x66, 0xba, s0, s1,           // mov dx, COM1
        0xb0, b'O', 0xee,             // mov al, 'O' ; out dx, al
        0xb0, b'K', 0xee,             // mov al, 'K' ; out dx, al
        0x8a, 0x06,                   // mov al, [rsi]   (the zero page is mapped)
        0xb0, 0xfe, 0xe6, 0x64,       // mov al, 0xfe ; out 0x64, al   (i8042 reset)
        0xf4,                         // hlt
    ];
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&tiny_elf(0x20_0000, &code)).unwrap();
    let sink = Captured::default();
    let vm = Vm::new(config(f.path().to_owned(), 1, &sink)).unwrap();
    let handle = vm.handle();
    let exit = vm.run().unwrap();
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(sink.bytes(), b"OK");
    let boot = handle.boot_time().expect("the boot timer was written");
    assert!(boot < Duration::from_secs(10), "{boot:?}");
    assert!(handle.io_exits() >= 4, "{}", handle.io_exits());
}

/// Runs a tiny ELF guest made of `code` (at 2 MiB) to its end; returns the exit and the
/// serial output.
fn run_tiny(code: &[u8], vcpus: u8, drives: Vec<aurae_vmm::DriveConfig>) -> (VmExit, Vec<u8>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&tiny_elf(0x20_0000, code)).unwrap();
    let sink = Captured::default();
    let mut cfg = config(f.path().to_owned(), vcpus, &sink);
    cfg.drives = drives;
    let vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while !runner.is_finished() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.stop();
    let exit = runner.join().unwrap().unwrap();
    (exit, sink.bytes())
}

#[test]
fn guest_code_sees_acpi_and_virtio_mmio() {
    if kvm_or_skip("guest_code_sees_acpi_and_virtio_mmio").is_none() {
        return;
    }
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&[0u8; 4096]).unwrap();
    let [s0, s1] = SERIAL_PORT_BASE.to_le_bytes();
    let out4: [u8; 12] = [
        0xee, 0xc1, 0xe8, 0x08, // out dx, al ; shr eax, 8
        0xee, 0xc1, 0xe8, 0x08, 0xee, 0xc1, 0xe8, 0x08,
    ];
    let mut code = vec![0x66, 0xba, s0, s1]; // mov dx, COM1
    code.extend([0xbb, 0x00, 0x00, 0x0e, 0x00]); // mov ebx, 0xe0000 (the RSDP)
    code.extend([0x8b, 0x03]); // mov eax, [rbx]
    code.extend(out4);
    code.push(0xee); // 4th byte
    code.extend([0xbb, 0x00, 0x00, 0x00, 0xd0]); // mov ebx, 0xd0000000 (virtio-mmio 0)
    code.extend([0x8b, 0x03]); // mov eax, [rbx]      MagicValue
    code.extend(out4);
    code.push(0xee);
    code.extend([0x8b, 0x43, 0x08]); // mov eax, [rbx+8]  DeviceID
    code.extend([0x04, b'0', 0xee]); // add al, '0' ; out dx, al
    code.extend([0xbb, 0x00, 0x00, 0x00, 0xd1]); // mov ebx, 0xd1000000 (no device)
    code.extend([0x8b, 0x03, 0xee]); // mov eax, [rbx] ; out dx, al (0xff)
    code.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // i8042 reset ; hlt
    // Handed over open (as a jailed VMM's are): its path is only a name, never opened.
    let drives = vec![aurae_vmm::DriveConfig {
        path: "/nonexistent/drive0".into(),
        read_only: true,
        opened: Some(aurae_vmm::OpenedFile(std::sync::Arc::new(
            std::fs::File::open(disk.path()).unwrap(),
        ))),
    }];
    let (exit, out) = run_tiny(&code, 1, drives);
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(out, b"RSD virt2\xff");
}

#[test]
fn the_boot_vcpu_starts_an_application_processor_with_init_sipi() {
    if kvm_or_skip("the_boot_vcpu_starts_an_application_processor_with_init_sipi").is_none() {
        return;
    }
    // Real-mode code for vCPU 1, copied to 0x10000 (SIPI vector 0x10).
    #[rustfmt::skip]
    let ap: [u8; 10] = [
        0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xb0, b'A', 0xee,             // mov al, 'A' ; out dx, al
        0xb0, 0xfe, 0xe6, 0x64,       // mov al, 0xfe ; out 0x64, al  (reset)
    ];
    #[rustfmt::skip]
    let mut code = vec![
        0xbf, 0x00, 0x00, 0x01, 0x00,                   // mov edi, 0x10000
        0x48, 0x8d, 0x35, 0x00, 0x00, 0x00, 0x00,       // lea rsi, [rip + ap] (patched)
        0xb9, ap.len() as u8, 0x00, 0x00, 0x00,         // mov ecx, len
        0xf3, 0xa4,                                     // rep movsb
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'B', 0xee,       // 'B' to COM1
        0xbb, 0x00, 0x00, 0xe0, 0xfe,                   // mov ebx, 0xfee00000 (LAPIC)
        0xc7, 0x83, 0x10, 0x03, 0x00, 0x00,             // ICR high: destination APIC id 1
        0x00, 0x00, 0x00, 0x01,
        0xc7, 0x83, 0x00, 0x03, 0x00, 0x00,             // ICR low: INIT, assert
        0x00, 0x45, 0x00, 0x00,
        0xc7, 0x83, 0x00, 0x03, 0x00, 0x00,             // ICR low: SIPI, vector 0x10
        0x10, 0x46, 0x00, 0x00,
        0xf3, 0x90, 0xeb, 0xfc,                         // pause ; jmp $-4
    ];
    let rel = (code.len() - 12) as u32; // from the end of the lea to the AP code
    code[8..12].copy_from_slice(&rel.to_le_bytes());
    code.extend(ap);
    let (exit, out) = run_tiny(&code, 2, Vec::new());
    assert_eq!(exit, VmExit::Reset, "serial: {out:?}");
    assert_eq!(out, b"BA");
}

#[test]
fn a_spinning_smp_guest_stops_on_request() {
    if kvm_or_skip("a_spinning_smp_guest_stops_on_request").is_none() {
        return;
    }
    // out 0x80, al ; jmp $-2 (spin with port I/O, so a stop request must interrupt it)
    let code = [0xe6, 0x80, 0xeb, 0xfc];
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&tiny_elf(0x20_0000, &code)).unwrap();
    let sink = Captured::default();
    let vm = Vm::new(config(f.path().to_owned(), 2, &sink)).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while handle.io_exits() == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(handle.io_exits() > 0, "the guest never ran");
    let t = Instant::now();
    handle.stop();
    handle.stop(); // idempotent
    let exit = runner.join().unwrap().unwrap();
    assert_eq!(exit, VmExit::Stopped);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
}

#[test]
fn not_a_kernel_is_refused() {
    if kvm_or_skip("not_a_kernel_is_refused").is_none() {
        return;
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"#!/bin/sh\necho not a kernel\n").unwrap();
    let err = Vm::new(config(f.path().to_owned(), 1, &Captured::default())).unwrap_err();
    assert!(err.to_string().contains("is not a Linux kernel"), "{err}");
}

fn find_kernel() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AURAE_VMM_TEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let ours = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest/vmlinuz");
    if ours.is_file() {
        return Some(ours);
    }
    let mut boot: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    boot.sort();
    boot.pop()
}

#[test]
fn a_real_kernel_reaches_guest_code() {
    if kvm_or_skip("a_real_kernel_reaches_guest_code").is_none() {
        return;
    }
    let Some(kernel) = find_kernel() else {
        println!(
            "SKIP kvm_smoke: a_real_kernel_reaches_guest_code: no kernel (AURAE_VMM_TEST_KERNEL, target/guest/vmlinuz, /boot/vmlinuz-*)"
        );
        return;
    };
    let sink = Captured::default();
    let cfg = VmConfig {
        kernel: kernel.clone(),
        initramfs: None,
        cmdline: "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd".into(),
        vcpus: 1,
        mem_bytes: 256 << 20,
        serial_out: Box::new(sink.clone()),
        ..Default::default()
    };
    let vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    // 10 s unless AURAE_VMM_TEST_DEADLINE_SECS says otherwise (an uncompressed vmlinux
    // does no port I/O for its first seconds; under PVM that can exceed 10 s).
    let deadline = std::env::var("AURAE_VMM_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_secs);
    let t = Instant::now();
    while handle.io_exits() == 0 && t.elapsed() < deadline && !runner.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let first_io = t.elapsed();
    // Give the serial console a little longer, for the log only.
    std::thread::sleep(Duration::from_millis(500));
    handle.stop();
    let exit = runner.join().unwrap().unwrap();
    let out = sink.bytes();
    println!(
        "kvm_smoke: {}: first I/O exit after {first_io:?}, {} I/O exits, {} serial bytes, exit {exit:?}; serial head: {:?}",
        kernel.display(),
        handle.io_exits(),
        out.len(),
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    assert!(
        handle.io_exits() > 0,
        "no port I/O within {deadline:?}: the guest never reached its code ({exit:?})"
    );
    assert!(
        matches!(exit, VmExit::Stopped | VmExit::Reset),
        "unexpected exit {exit:?}"
    );
}
