//! Virtual machines through the API on the host tier (root, cgroup v2, /dev/kvm): tiny
//! hand-assembled 64-bit guests (this host's KVM boots no stock kernel in usable time; the
//! real boot is in the guest tier). One VMM process per VM, jailed: its own cgroup, mount
//! namespace with only its files, no capabilities, and a seccomp filter on every thread.
//! The console streams through the API, the boot timer is reported, stop and free clean
//! up, a triple fault and a killed VMM are reported as such, and bad input fails precisely.
//! Kernels and drives are opened once by auraed, below the image root without following
//! symlinks, and the VMM attaches those very files (a racer swapping them for symlinks to
//! host files never gets one booted or attached); drives are read-only unless writable is
//! asked for and granted; errors name only the paths sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
    vm::{
        bzimage, letter_counts, letters_guest, needs_kvm, next_letter_after, tiny_elf,
        xz_like_a_kernel,
    },
    workload,
};
use sha2::Digest;
use tonic::Code;

/// Writes the boot-timer port, prints "OK\n" on COM1, then spins on port 0x80.
#[rustfmt::skip]
const HELLO_THEN_SPIN: [u8; 27] = [
    0x66, 0xba, 0x40, 0x04,       // mov dx, 0x440 (boot timer)
    0xb0, 123,                    // mov al, 123
    0xee,                         // out dx, al
    0x66, 0xba, 0xf8, 0x03,       // mov dx, 0x3f8 (COM1)
    0xb0, b'O', 0xee,             // mov al, 'O' ; out dx, al
    0xb0, b'K', 0xee,             // mov al, 'K' ; out dx, al
    0xb0, b'\n', 0xee,            // mov al, '\n' ; out dx, al
    0xe6, 0x80,                   // spin: out 0x80, al
    0xeb, 0xfc,                   //       jmp spin
    0x90, 0x90, 0x90,
];

/// Prints "bye" and resets through the i8042 (a guest that ends by itself).
#[rustfmt::skip]
const BYE_THEN_RESET: [u8; 18] = [
    0x66, 0xba, 0xf8, 0x03,       // mov dx, 0x3f8
    0xb0, b'b', 0xee,
    0xb0, b'y', 0xee,
    0xb0, b'e', 0xee,
    0xb0, 0xfe, 0xe6, 0x64,       // i8042 reset
    0xf4,                         // hlt
];

/// `ud2` with no IDT: #UD, double fault, triple fault.
const TRIPLE_FAULT: [u8; 2] = [0x0f, 0x0b];

struct Env {
    d: Daemon,
    c: Client,
    images: tempfile::TempDir,
}

async fn env(test: &str) -> Option<Env> {
    env_with(test, None).await
}

async fn env_with(test: &str, policy: Option<String>) -> Option<Env> {
    env_args(test, policy, &[]).await
}

/// [`env_with`], auraed started with `args` too.
async fn env_args(test: &str, policy: Option<String>, args: &[&str]) -> Option<Env> {
    if !tier::check(test, Tier::Host, tier::needs_cells().or_else(needs_kvm)) {
        return None;
    }
    let images = tempfile::tempdir().unwrap();
    for (name, code) in [
        ("hello", &HELLO_THEN_SPIN[..]),
        ("bye", &BYE_THEN_RESET[..]),
        ("fault", &TRIPLE_FAULT[..]),
        ("letters", &letters_guest()[..]),
    ] {
        std::fs::write(images.path().join(name), tiny_elf(0x20_0000, code)).unwrap();
    }
    std::fs::write(images.path().join("garbage"), vec![0x5a; 8192]).unwrap();
    std::fs::write(images.path().join("disk"), vec![0; 1 << 20]).unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: [
                "--vm-image-root".into(),
                images.path().to_string_lossy().into_owned(),
            ]
            .into_iter()
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect(),
            policy,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some(Env { d, c, images })
}

impl Env {
    fn image(&self, name: &str) -> String {
        self.images.path().join(name).to_string_lossy().into_owned()
    }

    fn vm(&self, name: &str, kernel: &str) -> pb::VirtualMachine {
        pb::VirtualMachine {
            name: name.into(),
            kernel_path: self.image(kernel),
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            ..Default::default()
        }
    }

    async fn console(&self, name: &str) -> String {
        workload::console(&self.c, name).await.unwrap()
    }

    async fn get(&self, name: &str) -> pb::VirtualMachineStatus {
        self.c
            .virtual_machines()
            .get(pb::NameRef { name: name.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait(&self, name: &str) -> pb::VirtualMachineStatus {
        self.c
            .virtual_machines()
            .wait(pb::WaitRequest {
                name: name.into(),
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn free(&self, name: &str) {
        self.c
            .virtual_machines()
            .free(pb::NameRef { name: name.into() })
            .await
            .unwrap();
    }
}

fn threads(pid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let get = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        out.push((get("Name:"), get("Seccomp:")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_jailed_reports_and_stops() {
    let Some(e) = env("a_vm_runs_jailed_reports_and_stops").await else {
        return;
    };
    let mut vm = e.vm("hello", "hello");
    vm.vcpus = 2;
    let st =
        e.c.runtime()
            .run_virtual_machine(vm)
            .await
            .unwrap()
            .into_inner();
    assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
    let pid = st.vmm_pid;
    assert!(pid > 0);
    // Console and boot timer through the API.
    let t = Instant::now();
    let mut console = String::new();
    while !console.contains("OK") && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        console = e.console("hello").await;
    }
    assert_eq!(console, "OK\n");
    let st = e.get("hello").await;
    let boot = st.boot_time.expect("boot time reported");
    assert!(boot.seconds < 20, "{boot:?}");
    // The jail, seen from the host: its own cgroup under vms/, its own mount namespace
    // whose root holds only its files, no capabilities, and every thread filtered.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.trim_end().ends_with("/vms/hello/_procs"), "{cgroup}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for cap in ["CapPrm", "CapEff", "CapBnd", "CapInh", "CapAmb"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{cap}:")))
            .unwrap()
            .trim();
        assert_eq!(v, "0000000000000000", "{cap}");
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(
        root,
        ["kernel"],
        "the jail holds only the VM's files: no device (/dev/kvm was opened before)"
    );
    let mine = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        mine
    );
    let ts = threads(pid);
    println!("VMM threads: {ts:?}");
    // The VMM's memory (a figure, printed): its binary's pages (a sealed copy of auraed:
    // shmem), the shared libraries (file) and its own (anon).
    let mem: Vec<&str> = status
        .lines()
        .filter(|l| {
            ["VmRSS:", "RssAnon:", "RssFile:", "RssShmem:", "VmPTE:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    println!("VMM memory: {}", mem.join(", ").replace('\t', " "));
    // The set-up's code pages were given back before the guest ran: its binary's resident
    // pages are the run loop's (a debug build: 13.1 MiB before, 4.8 after; release 1.7).
    let shmem_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(shmem_kib < 8 << 10, "the VMM's binary pages: {mem:?}");
    assert!(
        ts.iter().filter(|(n, _)| n.starts_with("vcpu")).count() == 2,
        "{ts:?}"
    );
    assert!(
        ts.iter().all(|(_, s)| s == "2"),
        "every VMM thread is filtered: {ts:?}"
    );
    // Stop: the guest halts, the VMM exits cleanly, the status says so.
    let st =
        e.c.virtual_machines()
            .stop(pb::StopRequest {
                name: "hello".into(),
                grace_period: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(st.phase, pb::Phase::Exited as i32, "{st:?}");
    assert!(st.message.contains("stopped"), "{st:?}");
    assert_eq!(st.vmm_pid, 0);
    e.free("hello").await;
    let cg = e.d.cgroup.clone().unwrap();
    assert!(!cg.join("vms/hello").exists(), "the VM's cgroup is removed");
    let err =
        e.c.virtual_machines()
            .get(pb::NameRef {
                name: "hello".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// Boots `kernel` as `name`, reads its console until one of the two guests spoke,
// then stops and frees it.
async fn boot(e: &Env, name: &str, kernel: &str) -> String {
    e.c.runtime()
        .run_virtual_machine(e.vm(name, kernel))
        .await
        .unwrap();
    let t = Instant::now();
    let mut console = String::new();
    while !(console.contains("OK") || console.contains("bye"))
        && t.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        console = e.console(name).await;
    }
    e.c.virtual_machines()
        .stop(pb::StopRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .ok();
    e.wait(name).await;
    e.free(name).await;
    console
}
/// Writes `zimage` into the image root: a bzImage whose own code prints "bye" and
/// resets, around an xz-compressed ELF that prints "OK"; returns the ELF and the image.
fn zimage(e: &Env) -> (Vec<u8>, Vec<u8>) {
    let elf = tiny_elf(0x20_0000, &HELLO_THEN_SPIN);
    let image = bzimage(
        &BYE_THEN_RESET,
        &xz_like_a_kernel(&elf, 1 << 20).unwrap(),
        elf.len() as u32,
    );
    std::fs::write(e.images.path().join("zimage"), &image).unwrap();
    (elf, image)
}

/// A bzImage whose own code prints "bye" and resets, around an xz-compressed ELF that
/// prints "OK": its first boot goes as given (the bzImage's code runs), auraed keeps the
/// ELF inside it meanwhile, and the next boots run that ELF; the same bytes under another
/// name too. A file changed in place is not mistaken for the one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bzimage_boots_from_the_elf_kept_for_it_after_its_first_boot() {
    let Some(e) = env("a_bzimage_boots_from_the_elf_kept_for_it_after_its_first_boot").await else {
        return;
    };
    let (elf, image) = zimage(&e);
    let kept_dir = e.d.dir.path().join("state/vm-kernels");
    let kept = kept_dir.join(format!("{:x}.elf", sha2::Sha256::digest(&image)));
    assert_eq!(boot(&e, "first", "zimage").await, "bye", "booted as given");
    let t = Instant::now();
    while !kept.exists() && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read(&kept).unwrap(), elf, "the ELF kept");
    assert_eq!(
        boot(&e, "second", "zimage").await,
        "OK\n",
        "booted from the kept ELF"
    );
    std::fs::write(e.images.path().join("copy"), &image).unwrap();
    assert_eq!(boot(&e, "copy", "copy").await, "OK\n", "found by content");
    // Rewritten in place with another kernel inside: not the old ELF; and an ELF that is
    // not x86-64 (e_machine 3) is never kept: booted as given each time.
    let mut other = elf.clone();
    other[18] = 3;
    let changed = bzimage(
        &BYE_THEN_RESET,
        &xz_like_a_kernel(&other, 1 << 20).unwrap(),
        other.len() as u32,
    );
    std::fs::write(e.images.path().join("zimage"), &changed).unwrap();
    assert_eq!(boot(&e, "third", "zimage").await, "bye");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(boot(&e, "fourth", "zimage").await, "bye");
    let names: Vec<_> = std::fs::read_dir(&kept_dir)
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let log = std::fs::read_to_string(&e.d.log).unwrap();
    assert!(
        log.contains("its ELF could not be kept") && log.contains("not an x86-64 ELF"),
        "the refusal is reported"
    );
}

/// `kill -9` of auraed while it writes the ELF it keeps for a bzImage: the restarted auraed
/// removes the half-written file and says so; the kernel boots as given again, its ELF is
/// kept anew and booted after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_kernel_elf_is_written_leaves_no_half_file() {
    let Some(mut e) = env("a_crash_while_a_kernel_elf_is_written_leaves_no_half_file").await else {
        return;
    };
    // An ELF long enough (zeros after its code) that writing it takes a while.
    let mut elf = tiny_elf(0x20_0000, &HELLO_THEN_SPIN);
    elf.resize(ELF_BYTES, 0);
    let t = Instant::now();
    let image = bzimage(
        &BYE_THEN_RESET,
        &xz_like_a_kernel(&elf, 1 << 20).unwrap(),
        elf.len() as u32,
    );
    println!("compressed {} MiB in {:?}", ELF_BYTES >> 20, t.elapsed());
    std::fs::write(e.images.path().join("zimage"), &image).unwrap();
    let dir = e.d.dir.path().join("state/vm-kernels");
    let digest = format!("{:x}", sha2::Sha256::digest(&image));
    let partial = dir.join(format!(".partial-{digest}"));
    let kept = dir.join(format!("{digest}.elf"));
    e.c.runtime()
        .run_virtual_machine(e.vm("first", "zimage"))
        .await
        .unwrap();
    let t = Instant::now();
    while !partial.exists() && !kept.exists() && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        partial.exists(),
        "being written (kept already: {})",
        kept.exists()
    );
    e.d.crash_and_restart().await.unwrap();
    println!("crashed {:?} after the partial file appeared", t.elapsed());
    assert!(
        !partial.exists(),
        "the half-written ELF is removed at the start"
    );
    assert!(!kept.exists(), "and nothing is kept under the digest");
    assert!(
        e.d.log_text()
            .contains("removed a kernel ELF a previous auraed left half written"),
        "reported"
    );
    e.c = e.d.client("admin").await.unwrap();
    // (The first VM, reset by its kernel meanwhile, may be gone already.)
    let _ =
        e.c.virtual_machines()
            .free(pb::NameRef {
                name: "first".into(),
            })
            .await;
    assert_eq!(boot(&e, "second", "zimage").await, "bye", "as given again");
    let t = Instant::now();
    while !kept.exists() && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("kept {:?} after the second boot ended", t.elapsed());
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), ELF_BYTES as u64);
    assert_eq!(
        boot(&e, "third", "zimage").await,
        "OK\n",
        "from the ELF kept anew"
    );
}

/// How long the crash test's kernel ELF is.
const ELF_BYTES: usize = 64 << 20;

/// With `--vm-kernel-as-given` a bzImage always boots as given: its own code runs each
/// time and no ELF is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_vm_kernel_as_given_a_bzimage_always_boots_as_given() {
    let Some(e) = env_args(
        "with_vm_kernel_as_given_a_bzimage_always_boots_as_given",
        None,
        &["--vm-kernel-as-given"],
    )
    .await
    else {
        return;
    };
    let _ = zimage(&e);
    assert_eq!(boot(&e, "first", "zimage").await, "bye");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(boot(&e, "second", "zimage").await, "bye");
    assert!(!e.d.dir.path().join("state/vm-kernels").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_that_end_crash_or_lose_their_vmm_are_reported() {
    let Some(e) = env("guests_that_end_crash_or_lose_their_vmm_are_reported").await else {
        return;
    };
    // A guest that resets by itself: EXITED, its console kept for replay.
    e.c.runtime()
        .run_virtual_machine(e.vm("bye", "bye"))
        .await
        .unwrap();
    let st = e.wait("bye").await;
    assert_eq!(st.phase, pb::Phase::Exited as i32, "{st:?}");
    assert!(st.message.contains("reset"), "{st:?}");
    assert_eq!(e.console("bye").await, "bye");
    // A triple fault: FAILED with the cause.
    e.c.runtime()
        .run_virtual_machine(e.vm("fault", "fault"))
        .await
        .unwrap();
    let st = e.wait("fault").await;
    assert_eq!(st.phase, pb::Phase::Failed as i32, "{st:?}");
    assert!(st.message.contains("triple fault"), "{st:?}");
    // The VMM killed behind auraed's back: FAILED, and auraed knows.
    let st =
        e.c.runtime()
            .run_virtual_machine(e.vm("victim", "hello"))
            .await
            .unwrap()
            .into_inner();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.vmm_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = e.wait("victim").await;
    assert_eq!(st.phase, pb::Phase::Failed as i32, "{st:?}");
    assert!(st.message.contains("without a report"), "{st:?}");
    for n in ["bye", "fault", "victim"] {
        e.free(n).await;
    }
    // The daemon is unaffected.
    assert!(
        e.c.health()
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_vm_requests_fail_precisely_and_leave_nothing() {
    let Some(e) = env("bad_vm_requests_fail_precisely_and_leave_nothing").await else {
        return;
    };
    let outside = tempfile::NamedTempFile::new().unwrap();
    let huge = 1u64 << 40;
    let cases: Vec<(&str, pb::VirtualMachine, Code, &str)> = vec![
        (
            "not a kernel",
            e.vm("a", "garbage"),
            Code::FailedPrecondition,
            "kernel",
        ),
        (
            "missing kernel",
            e.vm("a", "nope"),
            Code::InvalidArgument,
            "kernel_path",
        ),
        (
            "kernel outside the image roots",
            pb::VirtualMachine {
                kernel_path: outside.path().to_string_lossy().into(),
                ..e.vm("a", "hello")
            },
            Code::FailedPrecondition,
            "--vm-image-root",
        ),
        (
            "drive outside the image roots",
            pb::VirtualMachine {
                drives: vec![pb::Drive {
                    path: "/etc/passwd".into(),
                    read_only: true,
                    writable: false,
                }],
                ..e.vm("a", "hello")
            },
            Code::FailedPrecondition,
            "drives[0].path",
        ),
        (
            "zero vcpus",
            pb::VirtualMachine {
                vcpus: 0,
                ..e.vm("a", "hello")
            },
            Code::InvalidArgument,
            "vcpus",
        ),
        (
            "33 vcpus",
            pb::VirtualMachine {
                vcpus: 33,
                ..e.vm("a", "hello")
            },
            Code::InvalidArgument,
            "vcpus",
        ),
        (
            "1 MiB of memory",
            pb::VirtualMachine {
                memory_bytes: 1 << 20,
                ..e.vm("a", "hello")
            },
            Code::InvalidArgument,
            "memory_bytes",
        ),
        (
            "more memory than the host",
            pb::VirtualMachine {
                memory_bytes: huge,
                ..e.vm("a", "hello")
            },
            Code::InvalidArgument,
            "memory_bytes",
        ),
        (
            "two interfaces",
            pb::VirtualMachine {
                interfaces: vec![pb::NetworkInterface::default(); 2],
                ..e.vm("a", "hello")
            },
            Code::InvalidArgument,
            "interfaces",
        ),
    ];
    for (what, vm, want, mention) in cases {
        let err = e.c.runtime().run_virtual_machine(vm).await.unwrap_err();
        assert_eq!(err.code(), want, "{what}: {err:?}");
        assert!(err.message().contains(mention), "{what}: {}", err.message());
        let left =
            e.c.virtual_machines()
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
        assert!(left.virtual_machines.is_empty(), "{what}: {left:?}");
        let cg = e.d.cgroup.clone().unwrap();
        assert!(!cg.join("vms/a").exists(), "{what}: no cgroup left");
    }
    // A name in use.
    e.c.runtime()
        .run_virtual_machine(e.vm("dup", "hello"))
        .await
        .unwrap();
    let err =
        e.c.runtime()
            .run_virtual_machine(e.vm("dup", "hello"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    e.free("dup").await;
    // Cells cannot take the VMs' cgroup group.
    let err =
        e.c.cells()
            .allocate(pb::Cell {
                name: "vms".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let _ = PathBuf::new();
}

fn tenants_policy() -> String {
    let td = aurae_testkit::TRUST_DOMAIN;
    format!(
        "[[grant]]\nid = \"spiffe://{td}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nallow_writable_drives = true\nvolumes = [\"*\"]\nregistries = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{td}/operator/a\"\nmethods = [\"*\"]\nnames = [\"a-*\"]\n\
         allow_writable_drives = true\nvolumes = [\"tenant-a\", \"hello\"]\n\n\
         [[grant]]\nid = \"spiffe://{td}/operator/n\"\nmethods = [\"*\"]\nnames = [\"n-*\"]\n\
         volumes = [\"tenant-a\", \"hello\"]\n"
    )
}

fn drive(path: String, read_only: bool, writable: bool) -> pb::Drive {
    pb::Drive {
        path,
        read_only,
        writable,
    }
}

/// The access mode (`O_RDONLY` 0, `O_RDWR` 2) of the VMM's open file of its jail's
/// `/drive0`.
fn vmm_drive_access(pid: i32, image: &Path) -> Option<u32> {
    let fd = vmm_fd_of(pid, image)?;
    let info = std::fs::read_to_string(format!(
        "/proc/{pid}/fdinfo/{}",
        fd.file_name().unwrap().to_string_lossy()
    ))
    .unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    Some(u32::from_str_radix(flags, 8).unwrap() & 3)
}

/// `/proc/<pid>/fd/<n>` of the VMM's open file that is `image` (same device and inode).
fn vmm_fd_of(pid: i32, image: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(image).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|fd| fd.path())
        .find(|fd| {
            std::fs::metadata(fd).is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
        })
}

/// The contents of the VMM's open regular files of at most 1 MiB (its drives, and any
/// other small file it holds).
fn vmm_small_files(pid: i32) -> Vec<Vec<u8>> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|fd| fd.path())
        .filter(|fd| std::fs::metadata(fd).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20))
        .filter_map(|fd| std::fs::read(fd).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_are_read_only_unless_writable_is_granted_for_the_path() {
    let Some(e) = env_with(
        "drives_are_read_only_unless_writable_is_granted_for_the_path",
        Some(tenants_policy()),
    )
    .await
    else {
        return;
    };
    for t in ["tenant-a", "tenant-b"] {
        std::fs::create_dir(e.images.path().join(t)).unwrap();
        std::fs::write(e.images.path().join(t).join("disk"), vec![0; 1 << 20]).unwrap();
    }
    let a = e.d.client("a").await.unwrap();
    let n = e.d.client("n").await.unwrap();
    let with = |name: &str, d: pb::Drive| pb::VirtualMachine {
        drives: vec![d],
        ..e.vm(name, "hello")
    };
    // Writable without allow_writable_drives, or outside the grant's volumes (a shared
    // image others boot): PERMISSION_DENIED naming the field, nothing started.
    for (who, c, d) in [
        ("n", &n, drive(e.image("tenant-a/disk"), false, true)),
        ("a", &a, drive(e.image("disk"), false, true)),
        ("a", &a, drive(e.image("tenant-a/../disk"), false, true)),
        (
            "a",
            &a,
            drive(format!("{}/./disk", e.images.path().display()), false, true),
        ),
    ] {
        let err = c
            .runtime()
            .run_virtual_machine(with(&format!("{who}-w"), d.clone()))
            .await
            .unwrap_err();
        let want = if d.path.contains("..") {
            Code::InvalidArgument
        } else {
            Code::PermissionDenied
        };
        assert_eq!(err.code(), want, "{who} {}: {err:?}", d.path);
        assert!(err.message().contains("drives[0]"), "{}", err.message());
    }
    assert!(
        e.c.virtual_machines()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .virtual_machines
            .is_empty()
    );
    // Both flags: a contradiction.
    let err = a
        .runtime()
        .run_virtual_machine(with("a-both", drive(e.image("tenant-a/disk"), true, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Read-only is no way around the grant: another tenant's disk, or a kernel outside
    // the grant's volumes, is PERMISSION_DENIED too (it could be read from the guest).
    for (who, c, vm) in [
        (
            "n",
            &n,
            with("n-peek", drive(e.image("tenant-b/disk"), false, false)),
        ),
        (
            "a",
            &a,
            with("a-peek", drive(e.image("tenant-b/disk"), true, false)),
        ),
        ("a", &a, e.vm("a-kernel", "bye")),
    ] {
        let err = c.runtime().run_virtual_machine(vm).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
    }
    // The default (and read_only, as old clients send it): read-only. The VMM's file is
    // O_RDONLY, on a read-only mount (opening it again for writing is refused) and not in
    // its jail at all.
    let disk = e.images.path().join("tenant-a/disk");
    for (name, c, d) in [
        ("n-ro", &n, drive(e.image("tenant-a/disk"), false, false)),
        ("a-ro", &a, drive(e.image("tenant-a/disk"), true, false)),
    ] {
        let st = c
            .runtime()
            .run_virtual_machine(with(name, d))
            .await
            .unwrap()
            .into_inner();
        let pid = st.vmm_pid;
        let fd = vmm_fd_of(pid, &disk).expect("the VMM holds its drive");
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(&fd)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{name}: {err}");
        assert_eq!(vmm_drive_access(pid, &disk), Some(0), "{name}: O_RDONLY");
        assert!(
            std::fs::read_dir(format!("/proc/{pid}/root"))
                .unwrap()
                .flatten()
                .all(|f| f.file_name() == "kernel"),
            "{name}: the jail holds only the kernel"
        );
        e.c.virtual_machines()
            .stop(pb::StopRequest {
                name: name.into(),
                grace_period: None,
            })
            .await
            .unwrap();
        e.free(name).await;
    }
    // Granted, and the path is the caller's: writable, the very file under the root.
    let st = a
        .runtime()
        .run_virtual_machine(with("a-rw", drive(e.image("tenant-a/disk"), false, true)))
        .await
        .unwrap()
        .into_inner();
    let pid = st.vmm_pid;
    assert_eq!(vmm_drive_access(pid, &disk), Some(2), "O_RDWR");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(vmm_fd_of(pid, &disk).unwrap())
            .unwrap();
        f.write_all(b"written").unwrap();
    }
    assert!(
        std::fs::read(e.images.path().join("tenant-a/disk"))
            .unwrap()
            .starts_with(b"written")
    );
    assert_eq!(
        std::fs::read(e.images.path().join("tenant-b/disk")).unwrap(),
        vec![0; 1 << 20]
    );
    e.c.virtual_machines()
        .stop(pb::StopRequest {
            name: "a-rw".into(),
            grace_period: None,
        })
        .await
        .unwrap();
    e.free("a-rw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_or_drive_swapped_for_a_symlink_is_never_booted_or_attached() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let Some(e) = env("a_kernel_or_drive_swapped_for_a_symlink_is_never_booted_or_attached").await
    else {
        return;
    };
    // Host files outside the image root: a kernel that prints "bye" and a "drive" whose
    // contents no VM may see.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("bye"),
        tiny_elf(0x20_0000, &BYE_THEN_RESET),
    )
    .unwrap();
    std::fs::write(outside.path().join("secret"), b"host-secret").unwrap();
    let root = e.images.path();
    std::fs::copy(root.join("hello"), root.join("kflip")).unwrap();
    std::fs::write(root.join("dflip"), b"real-disk").unwrap();
    std::os::unix::fs::symlink(outside.path().join("bye"), root.join("kother")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("dother")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let racer = {
        let (stop, flips, root) = (stop.clone(), flips.clone(), root.to_path_buf());
        std::thread::spawn(move || {
            let swap = |a: &str, b: &str| {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &root.join(a),
                    nix::fcntl::AT_FDCWD,
                    &root.join(b),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .is_ok()
            };
            while !stop.load(Ordering::Relaxed)
                && swap("kflip", "kother")
                && swap("dflip", "dother")
            {
                flips.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let tries = 30;
    let (mut refused, mut succeeded, mut escaped) = (0, 0, 0);
    // Judged after the race (escapes first): what a successful or refused try got wrong.
    let mut wrong = Vec::new();
    for i in 0..tries {
        let name = format!("race{i}");
        let vm = pb::VirtualMachine {
            drives: vec![drive(e.image("dflip"), false, false)],
            ..e.vm(&name, "kflip")
        };
        match e.c.runtime().run_virtual_machine(vm).await {
            Err(s) => {
                let m = s.message();
                let sent = [e.image("kflip"), e.image("dflip")];
                let rest = sent
                    .iter()
                    .fold(m.to_owned(), |m, s| m.replace(s.as_str(), ""));
                // A clear error naming the field and only the path sent.
                if s.code() != Code::FailedPrecondition
                    || !(m.contains("kernel_path") || m.contains("drives[0].path"))
                    || rest.contains('/')
                {
                    wrong.push(format!("try {i}: {s:?}"));
                }
                refused += 1;
            }
            Ok(st) => {
                let pid = st.into_inner().vmm_pid;
                let files = vmm_small_files(pid);
                let drive = files
                    .iter()
                    .find(|f| f.as_slice() == b"real-disk" || f.as_slice() == b"host-secret")
                    .cloned()
                    .unwrap_or_default();
                let t = Instant::now();
                let mut console = String::new();
                while console.is_empty() && t.elapsed() < Duration::from_secs(20) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    console = e.console(&name).await;
                }
                if drive != b"real-disk" || console.contains("bye") {
                    println!("try {i}: ESCAPED: drive {drive:?}, console {console:?}");
                    escaped += 1;
                } else {
                    if !console.starts_with("OK") {
                        wrong.push(format!("try {i}: console {console:?}"));
                    }
                    succeeded += 1;
                }
                let _ =
                    e.c.virtual_machines()
                        .stop(pb::StopRequest {
                            name: name.clone(),
                            grace_period: None,
                        })
                        .await;
                e.wait(&name).await;
                e.free(&name).await;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    println!(
        "vm race: tried {tries}, refused {refused}, succeeded {succeeded}, escaped {escaped} \
         ({} flips)",
        flips.load(Ordering::Relaxed)
    );
    assert_eq!(
        escaped, 0,
        "a host file outside the image root was booted or attached"
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(refused + succeeded, tries);
    assert!(refused > 0, "the racer did race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_path_errors_name_only_the_path_sent() {
    let Some(e) = env("vm_path_errors_name_only_the_path_sent").await else {
        return;
    };
    let root = e.images.path();
    std::os::unix::fs::symlink("/proc/self/fd/2", root.join("fd2")).unwrap();
    std::os::unix::fs::symlink("/proc/self/cwd", root.join("cwd")).unwrap();
    std::os::unix::fs::symlink(root.join("hello"), root.join("alias")).unwrap();
    let secrets = [
        e.d.dir.path().display().to_string(),
        e.d.log.display().to_string(),
        std::env::current_dir().unwrap().display().to_string(),
    ];
    for sent in [
        "/proc/self/fd/2".to_owned(),
        "/proc/self/cwd".to_owned(),
        e.image("fd2"),
        e.image("cwd"),
        e.image("alias"),
    ] {
        for as_drive in [false, true] {
            let vm = if as_drive {
                pb::VirtualMachine {
                    drives: vec![drive(sent.clone(), false, false)],
                    ..e.vm("x", "hello")
                }
            } else {
                pb::VirtualMachine {
                    kernel_path: sent.clone(),
                    ..e.vm("x", "hello")
                }
            };
            let err = e.c.runtime().run_virtual_machine(vm).await.unwrap_err();
            let m = err.message();
            println!("{sent} (drive: {as_drive}): {:?}: {m}", err.code());
            assert_eq!(err.code(), Code::FailedPrecondition, "{sent}: {m}");
            assert!(
                m.contains(if as_drive {
                    "drives[0].path"
                } else {
                    "kernel_path"
                }),
                "{m}"
            );
            assert!(m.contains(&sent), "{m}");
            assert!(
                !m.replace(&sent, "").contains('/'),
                "{sent}: names another path: {m}"
            );
            for s in &secrets {
                assert!(!m.contains(s.as_str()), "{sent}: reveals {s}: {m}");
            }
        }
    }
}

/// `kill -9` of auraed with a VM running: the guest keeps running (the holder keeps the
/// VMM's control socket, so the VMM never sees it close); the next auraed serves it
/// again: status, console (what it printed before included), stop through the
/// re-attached control socket, free; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_readopted_after_a_crash() {
    let Some(mut e) = env("a_vm_is_readopted_after_a_crash").await else {
        return;
    };
    let st =
        e.c.runtime()
            .run_virtual_machine(e.vm("survivor", "hello"))
            .await
            .unwrap()
            .into_inner();
    let vmm = st.vmm_pid;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !e.console("survivor").await.contains("OK") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    e.d.crash_and_restart_after(std::time::Duration::from_millis(500))
        .await
        .unwrap();
    e.c = e.d.client("admin").await.unwrap();
    let st = e.get("survivor").await;
    println!("re-adopted VM: {st:?}");
    assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
    assert_eq!(st.vmm_pid, vmm, "the same VMM");
    assert!(
        std::path::Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM lived through the crash"
    );
    assert!(e.console("survivor").await.contains("OK"));
    // Stop goes through the re-attached control socket: the VMM stops the guest.
    let stopped =
        e.c.virtual_machines()
            .stop(pb::StopRequest {
                name: "survivor".into(),
                grace_period: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner();
    println!("stopped: {stopped:?}");
    assert!(stopped.exit.is_some(), "{stopped:?}");
    e.free("survivor").await;
    let cg = e.d.cgroup.clone().unwrap();
    assert!(!cg.join("vms/survivor").exists());
    let listed =
        e.c.virtual_machines()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(listed.virtual_machines.is_empty(), "{listed:?}");
}

/// The console of `name` once it holds at least `n` bytes.
async fn console_of_at_least(e: &Env, name: &str, n: usize) -> String {
    let t = Instant::now();
    loop {
        let c = e.console(name).await;
        if c.len() >= n || t.elapsed() > Duration::from_secs(20) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A console that has stopped growing (read twice, 200 ms apart, alike).
async fn settled_console(e: &Env, name: &str) -> String {
    let mut last = e.console(name).await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = e.console(name).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

async fn snapshot(
    e: &Env,
    vm: &str,
    snap: &str,
) -> Result<pb::VirtualMachineSnapshot, tonic::Status> {
    e.c.virtual_machines()
        .snapshot(pb::SnapshotRequest {
            name: vm.into(),
            snapshot: snap.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The stored snapshots the operator sees, by name.
async fn snapshot_names(e: &Env) -> Vec<String> {
    e.c.virtual_machines()
        .list_snapshots(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect()
}

fn restore_of(name: &str, snap: &str) -> pb::VirtualMachine {
    pb::VirtualMachine {
        name: name.into(),
        snapshot: snap.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_stored_and_restored_vms_carry_on_from_it() {
    let Some(e) = env("a_snapshot_is_stored_and_restored_vms_carry_on_from_it").await else {
        return;
    };
    e.c.runtime()
        .run_virtual_machine(e.vm("src", "letters"))
        .await
        .unwrap();
    console_of_at_least(&e, "src", 80).await;
    let info = snapshot(&e, "src", "snap1").await.unwrap();
    assert_eq!(
        (
            info.name.as_str(),
            info.vm.as_str(),
            info.vcpus,
            info.memory_bytes
        ),
        ("snap1", "src", 1, 64 << 20),
        "{info:?}"
    );
    assert!(info.state_bytes > 4096, "{info:?}");
    let st = e.get("src").await;
    assert_eq!(st.phase, pb::Phase::Exited as i32, "{st:?}");
    assert!(st.message.contains("snapshotted"), "{st:?}");
    // Everything the source printed up to the snapshot: its VMM has ended and its
    // console's pipe is drained (two reads alike).
    e.wait("src").await;
    let before = settled_console(&e, "src").await;
    let (_, count_before) = letter_counts(before.as_bytes());
    let count_before = count_before.expect("a count before the snapshot");
    // A snapshot taken inside a count (`#` and at most one letter of it printed): the
    // restored copies finish that one, and the first they print whole is the one after.
    let cut_in_a_count = next_letter_after(before.as_bytes()).is_none();
    let first_after = count_before.wrapping_add(if cut_in_a_count { 52 } else { 26 });
    let listed =
        e.c.virtual_machines()
            .list_snapshots(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .snapshots;
    assert_eq!(listed, vec![info.clone()]);

    // Two VMs restored from it at once, each in its own jailed VMM.
    for name in ["r1", "r2"] {
        let st =
            e.c.runtime()
                .run_virtual_machine(restore_of(name, "snap1"))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
        assert_eq!(st.snapshot, "snap1");
        let took = st.restore_time.expect("the restore time is reported");
        assert!(took.seconds < 5, "{took:?}");
        let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{}/root", st.vmm_pid))
            .unwrap()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        root.sort();
        assert!(
            root.is_empty(),
            "a restore's jail holds no kernel and no device: {root:?}"
        );
    }
    for name in ["r1", "r2"] {
        let after = console_of_at_least(&e, name, 80).await;
        let (first, _) = letter_counts(after.as_bytes());
        assert_eq!(
            first,
            Some(first_after),
            "{name} carries on counting from the snapshot's memory: before …{:?}, after {:?}…",
            &before[before.len().saturating_sub(12)..],
            &after[..after.len().min(40)]
        );
        let letter = after.bytes().find(u8::is_ascii_uppercase).unwrap();
        if let Some(next) = next_letter_after(before.as_bytes()) {
            assert_eq!(letter, next, "{name} carries on with the next letter");
        }
    }
    for name in ["r1", "r2", "src"] {
        e.free(name).await;
    }
    // Removed: listed no more, restored no more.
    e.c.virtual_machines()
        .remove_snapshot(pb::NameRef {
            name: "snap1".into(),
        })
        .await
        .unwrap();
    let listed =
        e.c.virtual_machines()
            .list_snapshots(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .snapshots;
    assert!(listed.is_empty(), "{listed:?}");
    let err =
        e.c.runtime()
            .run_virtual_machine(restore_of("r3", "snap1"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let cg = e.d.cgroup.clone().unwrap();
    for name in ["src", "r1", "r2", "r3"] {
        assert!(!cg.join("vms").join(name).exists(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_requests_are_refused_and_leave_nothing() {
    let Some(e) = env_with(
        "bad_snapshot_requests_are_refused_and_leave_nothing",
        Some(tenants_policy()),
    )
    .await
    else {
        return;
    };
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).unwrap_err();
    // Nothing to snapshot.
    let err = code(snapshot(&e, "nope", "s1").await);
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    e.c.runtime()
        .run_virtual_machine(e.vm("bye", "bye"))
        .await
        .unwrap();
    e.wait("bye").await;
    let err = code(snapshot(&e, "bye", "s1").await);
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not running"), "{err:?}");
    // A running VM: a bad or taken snapshot name leaves it running.
    e.c.runtime()
        .run_virtual_machine(e.vm("src", "letters"))
        .await
        .unwrap();
    let err = code(snapshot(&e, "src", "Not_A_Label").await);
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("snapshot"), "{err:?}");
    snapshot(&e, "src", "s1").await.unwrap();
    e.c.runtime()
        .run_virtual_machine(e.vm("src2", "letters"))
        .await
        .unwrap();
    let err = code(snapshot(&e, "src2", "s1").await);
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(e.get("src2").await.phase, pb::Phase::Running as i32);
    // Restores that contradict the snapshot or name what it decides.
    for (field, vm) in [
        (
            "kernel_path",
            pb::VirtualMachine {
                kernel_path: e.image("hello"),
                ..restore_of("r", "s1")
            },
        ),
        (
            "vcpus",
            pb::VirtualMachine {
                vcpus: 2,
                ..restore_of("r", "s1")
            },
        ),
        (
            "memory_bytes",
            pb::VirtualMachine {
                memory_bytes: 64 << 20,
                ..restore_of("r", "s1")
            },
        ),
        (
            "drives",
            pb::VirtualMachine {
                drives: vec![drive(e.image("disk"), false, false)],
                ..restore_of("r", "s1")
            },
        ),
        ("snapshot", restore_of("r", "../s1")),
    ] {
        let err = e.c.runtime().run_virtual_machine(vm).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    let err =
        e.c.runtime()
            .run_virtual_machine(restore_of("r", "missing"))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A tenant (names a-*) sees, restores and removes none of the operator's snapshots,
    // and names its own within its grant.
    let a = e.d.client("a").await.unwrap();
    let listed = a
        .virtual_machines()
        .list_snapshots(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(listed.is_empty(), "{listed:?}");
    let err = a
        .runtime()
        .run_virtual_machine(restore_of("a-r", "s1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = a
        .virtual_machines()
        .remove_snapshot(pb::NameRef { name: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    a.runtime()
        .run_virtual_machine(e.vm("a-vm", "hello"))
        .await
        .unwrap();
    let err = a
        .virtual_machines()
        .snapshot(pb::SnapshotRequest {
            name: "a-vm".into(),
            snapshot: "theirs".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    a.virtual_machines()
        .snapshot(pb::SnapshotRequest {
            name: "a-vm".into(),
            snapshot: "a-snap".into(),
        })
        .await
        .unwrap();
    let st = a
        .runtime()
        .run_virtual_machine(restore_of("a-r", "a-snap"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
    // Nothing half made: the failed requests left no VM and no snapshot directory.
    for name in ["bye", "src", "src2", "a-vm", "a-r"] {
        e.free(name).await;
    }
    let cg = e.d.cgroup.clone().unwrap();
    let left: Vec<_> = std::fs::read_dir(cg.join("vms"))
        .map(|d| {
            d.flatten()
                .filter(|x| x.path().is_dir() && x.file_name() != "_procs")
                .map(|x| x.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(snapshot_names(&e).await, ["a-snap", "s1"]);
}

/// auraed killed (-9) while VMs restored from a snapshot run and a snapshot is half
/// written: after the restart the restored VM is re-adopted (the same VMM, still saying
/// which snapshot it came from, still counting), the half-written snapshot is gone, the
/// stored one is listed and restores again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_keeps_restored_vms_and_drops_half_written_snapshots() {
    let Some(mut e) = env("a_crash_keeps_restored_vms_and_drops_half_written_snapshots").await
    else {
        return;
    };
    e.c.runtime()
        .run_virtual_machine(e.vm("src", "letters"))
        .await
        .unwrap();
    console_of_at_least(&e, "src", 80).await;
    snapshot(&e, "src", "s1").await.unwrap();
    let st =
        e.c.runtime()
            .run_virtual_machine(restore_of("r1", "s1"))
            .await
            .unwrap()
            .into_inner();
    let vmm = st.vmm_pid;
    console_of_at_least(&e, "r1", 40).await;
    // As if a snapshot were being written when auraed died.
    let partial = e.d.dir.path().join("state/vm-snapshots/.s2.partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("memory"), b"half").unwrap();
    e.d.crash_and_restart_after(Duration::from_millis(300))
        .await
        .unwrap();
    e.c = e.d.client("admin").await.unwrap();
    let st = e.get("r1").await;
    assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
    assert_eq!((st.vmm_pid, st.snapshot.as_str()), (vmm, "s1"), "{st:?}");
    let n = e.console("r1").await.len();
    let grown = console_of_at_least(&e, "r1", n + 20).await;
    assert!(grown.len() >= n + 20, "the restored guest goes on");
    assert!(
        !partial.exists(),
        "the half-written snapshot was removed at start"
    );
    assert_eq!(snapshot_names(&e).await, ["s1"]);
    let st =
        e.c.runtime()
            .run_virtual_machine(restore_of("r2", "s1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(st.phase, pb::Phase::Running as i32, "{st:?}");
    for name in ["r1", "r2"] {
        e.free(name).await;
    }
    // The source had ended (snapshotted) before the crash: a VM with no VMM left is not
    // re-adopted, and its cgroup was swept.
    let cg = e.d.cgroup.clone().unwrap();
    for name in ["src", "r1", "r2"] {
        assert!(!cg.join("vms").join(name).exists(), "{name}");
    }
}

/// The VM's shell, made on a thread of its own while the VMM builds its jail: it runs its
/// `first` step before anything (the VMM drops the thread's rights there) and opens only a
/// TAP that exists, with the rights it is left (`TUNSETIFF` of a missing name would create
/// one with CAP_NET_ADMIN). Every VM of the tests above is built or restored in one.
#[test]
fn the_vm_shell_is_made_ahead_with_the_rights_it_is_left() {
    if !tier::check(
        "the_vm_shell_is_made_ahead_with_the_rights_it_is_left",
        Tier::Host,
        needs_kvm(),
    ) {
        return;
    }
    let shell = aurae_vmm::VmShell::create_on_thread(None, || Ok(()))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let steps: Vec<&str> = shell.steps().iter().map(|(s, _)| *s).collect();
    for want in [
        "ahead: KVM_CREATE_VM",
        "ahead: PIT",
        "ahead: KVM_CREATE_VCPU 0",
    ] {
        assert!(steps.contains(&want), "{steps:?}");
    }
    // A step that fails first: nothing else is made.
    let e = aurae_vmm::VmShell::create_on_thread(None, || {
        Err(std::io::Error::other("no rights to drop"))
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("set-up thread") && e.contains("no rights to drop"),
        "{e}"
    );
    // A TAP that does not exist, opened by a thread that dropped its capabilities (as the
    // VMM's does; capabilities are per thread): refused, and no interface made.
    let name = format!("aurae-nx{}", std::process::id() % 100_000);
    let e = aurae_vmm::VmShell::create_on_thread(
        Some(name.clone()),
        aurae_sys::process::drop_all_capabilities,
    )
    .unwrap()
    .join()
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(e.contains(&name), "{e}");
    assert!(
        !Path::new("/sys/class/net").join(&name).exists(),
        "{name} was created"
    );
    // And this thread kept its own: the drop stayed on the shell's thread.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert_ne!(
        eff.split_whitespace().nth(1),
        Some("0000000000000000"),
        "{eff}"
    );
}
