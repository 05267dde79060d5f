//! microVM boot benchmark, inside one guest-tier machine (QEMU TCG `-cpu max`, nested KVM):
//! the same Debian kernel and initramfs (an init that prints a marker and powers off) booted
//! through `RunVirtualMachine` (our VMM) and by `qemu-system-x86_64 -M microvm -enable-kvm`
//! started as an executable of a cell, interleaved round by round. Time = request sent →
//! marker in the console (for both: read through the API). Also the VMM's memory overhead:
//! its RSS minus the guest memory it has touched (Firecracker promises ≤ 5 MiB). More arms
//! of ours: the same kernel uncompressed (the ELF `vmlinux` inside the bzImage, `cargo xtask
//! guest`), which skips the guest's decompressor, and (on request) the `host` CPU template.
//! auraed boots a bzImage from the ELF inside it once it has kept that ELF (`vm::kernels`):
//! the bench boots the bzImage once first (as given: the figure printed apart), waits for
//! the kept ELF, and its rounds' bzImage arm then boots from it — QEMU gets the same bzImage.
//!
//! Needs the guest tier (root, qemu, `cargo xtask guest`); prints SKIP otherwise.
//! `AURAE_BENCH_ROUNDS` (default 3); `AURAE_BENCH_HOST_TEMPLATE=1` adds the `host` CPU
//! template's arm. Each round prints its figures as it ends; a round that loses the
//! machine ends the rounds, and the summary covers those before it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::time::{Duration, Instant};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    guest::{
        Guest, GuestOptions, MICROVM_MARKER, QEMU, microvm_initramfs, needs_guest, qemu_files,
        qemu_microvm_argv, vm_image_files, vmlinux_file,
    },
    workload,
};

async fn console_has_marker(c: &Client, vm: &str) -> bool {
    workload::console(c, vm)
        .await
        .is_ok_and(|t| t.contains(MICROVM_MARKER))
}

async fn exe_has_marker(c: &Client, cell: &str, name: &str) -> bool {
    workload::logs(c, cell, name, false)
        .await
        .is_ok_and(|t| t.contains(MICROVM_MARKER))
}

/// What one boot of ours measured.
struct Boot {
    /// Request sent → the marker on the console; `None` when the guest ended without it
    /// (a nested triple fault) or took over 300 s (then it is stopped).
    secs: Option<f64>,
    /// The VMM's boot timer.
    boot_timer: Option<f64>,
    /// The VMM's VmRSS and its guest memory touched (KiB), when asked for.
    memory: Option<(u64, u64)>,
}

/// Boots the bench's VM from `kernel` (in the VM image root) with `template`, waits for
/// its end and frees it; reads the VMM's memory 2 s in when given the round's number
/// (`probe`). An error when the machine did not answer.
async fn boot_to_marker(
    c: &Client,
    name: &str,
    kernel: &str,
    template: &str,
    probe: Option<usize>,
) -> Result<Boot, String> {
    let t = Instant::now();
    let st = c
        .runtime()
        .run_virtual_machine(pb::VirtualMachine {
            name: name.into(),
            kernel_path: format!("/var/lib/aurae/vm-images/{kernel}"),
            initramfs_path: "/var/lib/aurae/vm-images/initrd".into(),
            cmdline: CMDLINE.into(),
            vcpus: 1,
            memory_bytes: MEMORY,
            cpu_template: template.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("RunVirtualMachine {name}: {e}"))?
        .into_inner();
    let (mut secs, mut memory) = (None, None);
    while t.elapsed() < Duration::from_secs(300) {
        if console_has_marker(c, name).await {
            secs = Some(t.elapsed().as_secs_f64());
            break;
        }
        if let Some(round) = probe
            && memory.is_none()
            && t.elapsed() > Duration::from_secs(2)
        {
            memory = vmm_memory(c, st.vmm_pid, round).await;
        }
        let st = c
            .virtual_machines()
            .get(pb::NameRef { name: name.into() })
            .await
            .map(tonic::Response::into_inner);
        if st.is_ok_and(|s| s.exit.is_some()) && !console_has_marker(c, name).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if secs.is_none() {
        let _ = c
            .virtual_machines()
            .stop(pb::StopRequest {
                name: name.into(),
                grace_period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
            })
            .await;
    }
    let done = c
        .virtual_machines()
        .wait(pb::WaitRequest {
            name: name.into(),
            timeout: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
        })
        .await
        .map_err(|e| format!("waiting for {name}: {e}"))?
        .into_inner();
    if secs.is_none() {
        // Why: the nested guest's own fault (a triple fault, a kernel panic on the console)
        // or the monitor's (a VMM error).
        println!(
            "  {name} did not reach the marker: phase {}, {:?}",
            done.phase, done.message
        );
    }
    c.virtual_machines()
        .free(pb::NameRef { name: name.into() })
        .await
        .map_err(|e| format!("freeing {name}: {e}"))?;
    Ok(Boot {
        secs,
        boot_timer: done
            .boot_time
            .map(|b| b.seconds as f64 + f64::from(b.nanos) / 1e9),
        memory,
    })
}

/// How long one round may take before the machine counts as lost.
const ROUND_LIMIT: Duration = Duration::from_secs(600);

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
const MEMORY: u64 = 256 << 20;

/// The VMM's VmRSS and the RSS of its guest-memory mapping, in KiB, read by an
/// executable of a cell that shares the machine's PID namespace.
async fn vmm_memory(c: &Client, pid: i32, round: usize) -> Option<(u64, u64)> {
    let (_, out) = workload::run_to_end(
        c,
        pb::Executable {
            cell: "probe".into(),
            name: format!("smaps-{round}"),
            argv: vec![
                "/bin/cat".into(),
                format!("/proc/{pid}/status"),
                format!("/proc/{pid}/smaps"),
            ],
            ..Default::default()
        },
    )
    .await
    .ok()?;
    let rss = out
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // The mapping of the guest's memory: its Rss is guest memory touched. It is the one
    // mapping of exactly the guest's size, or (when the kernel merged an adjacent
    // anonymous mapping of the VMM's into it) of at most 4 MiB more — then that
    // neighbour's touched pages count as the guest's, and the figure is a lower bound.
    let lines: Vec<&str> = out.lines().collect();
    let kib = |l: &str| {
        l.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut guest = 0;
    let mut sizes = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(size) = l.strip_prefix("Size:").and_then(|_| kib(l)) else {
            continue;
        };
        if size >= MEMORY / 1024 / 2 {
            sizes.push(size);
        }
        if (MEMORY / 1024..=MEMORY / 1024 + 4096).contains(&size) {
            guest += lines[i..]
                .iter()
                .find(|l| l.starts_with("Rss:"))
                .and_then(|l| kib(l))
                .unwrap_or(0);
        }
    }
    if guest == 0 {
        println!(
            "  (round {round}: no mapping of the guest's size in the VMM's smaps; large ones: {sizes:?} KiB; {} lines read)",
            lines.len()
        );
    }
    Some((rss, guest))
}

fn main() {
    if let Some(reason) = needs_guest() {
        println!("SKIP vm boot bench: {reason}");
        return;
    }
    let Some(qemu) = qemu_files() else {
        println!("SKIP vm boot bench: ldd {QEMU} failed");
        return;
    };
    let rounds = aurae_testkit::bench_rounds(3);
    let mut files = vm_image_files(microvm_initramfs(false).unwrap()).unwrap();
    files.push(vmlinux_file().unwrap());
    files.extend(qemu);
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let g = Guest::boot(GuestOptions {
            extra_files: files,
            memory_mib: 2048,
            ..Default::default()
        })
        .await
        .unwrap();
        let c = g.client("admin").await.unwrap();
        // QEMU's cell may open /dev/kvm (devices.kvm; the machine's admin grant allows it).
        for (cell, share_pid) in [("qemu", false), ("probe", true)] {
            c.cells()
                .allocate(pb::Cell {
                    name: cell.into(),
                    namespaces: Some(pb::CellNamespaces {
                        share_host_pid: share_pid,
                        ..Default::default()
                    }),
                    devices: Some(pb::CellDevices { kvm: cell == "qemu" }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        println!("vm boot bench: {rounds} interleaved rounds in one TCG guest with nested KVM");
        // A bzImage's first boot goes as given (the guest decompresses itself) while auraed
        // keeps the ELF inside it; the rounds' bzImage arm boots from that kept ELF.
        let first = boot_to_marker(&c, "b-first", "vmlinuz", "", None)
            .await
            .unwrap()
            .secs;
        let t = Instant::now();
        let kept = workload::run_to_end(
            &c,
            pb::Executable {
                cell: "probe".into(),
                name: "kept-elf".into(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "for i in $(seq 1200); do ls /var/lib/aurae/vm-kernels/*.elf 2>/dev/null && exit 0; sleep 0.1; done; exit 1".into(),
                ],
                ..Default::default()
            },
        )
        .await;
        println!(
            "  bzImage first boot (as given; its ELF kept meanwhile) {first:.2?} s; the kept ELF there {:.1} s after it: {:?}",
            t.elapsed().as_secs_f64(),
            kept.as_ref().map(|(st, out)| (st.exit, out.trim().to_owned()))
        );
        let (mut ours, mut theirs, mut boot_timer, mut overhead) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut host_template = Vec::new();
        let (mut faults, mut elf, mut elf_faults) = (0, Vec::new(), 0);
        let (mut bz_faults, mut peer_faults) = (0, 0);
        let mut peer_failed: Option<String> = None;
        // The `host` template's arm (the CPU template's effect, in SPECIFICATION.md) only
        // when asked: every nested boot is a chance for the TCG machine to wedge.
        let host_arm = std::env::var_os("AURAE_BENCH_HOST_TEMPLATE").is_some();
        for i in 0..rounds {
            // A round that loses the machine (it stops answering: "No route to host") ends
            // the rounds; what the rounds before measured is still reported below.
            // A machine that freezes (no answer, no error) is lost too: a round takes
            // ~1 min, so one of over 10 ends the rounds.
            let round = tokio::time::timeout(ROUND_LIMIT, async {
                // The host CPU template (KVM's set as it is), for the template's effect.
                if host_arm {
                    let h = boot_to_marker(&c, &format!("h{i}"), "vmlinuz", "host", None).await?;
                    match h.secs {
                        Some(secs) => host_template.push(secs),
                        None => faults += 1,
                    }
                }
                // The same kernel uncompressed: the guest skips its decompressor.
                let v = boot_to_marker(&c, &format!("v{i}"), "vmlinux", "", None)
                    .await?
                    .secs;
                match v {
                    Some(secs) => elf.push(secs),
                    None => elf_faults += 1,
                }
                // A boot without the marker (a nested triple fault, or over 300 s) is a
                // failure, not a time.
                let bz = boot_to_marker(&c, &format!("b{i}"), "vmlinuz", "", Some(i)).await?;
                let b = bz.secs;
                match b {
                    Some(b) => ours.push(b),
                    None => bz_faults += 1,
                }
                boot_timer.extend(bz.boot_timer);
                overhead.extend(bz.memory);

                let qn = format!("q{i}");
                let t = Instant::now();
                c.runtime()
                    .run_executable(pb::Executable {
                        cell: "qemu".into(),
                        name: qn.clone(),
                        argv: qemu_microvm_argv(
                            "/var/lib/aurae/vm-images/vmlinuz",
                            "/var/lib/aurae/vm-images/initrd",
                            CMDLINE,
                        ),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("starting qemu {qn}: {e}"))?;
                let mut ended = None;
                let mut q = None;
                while t.elapsed() < Duration::from_secs(300) {
                    if exe_has_marker(&c, "qemu", &qn).await {
                        q = Some(t.elapsed().as_secs_f64());
                        break;
                    }
                    // A peer that ended without the marker (e.g. no /dev/kvm in its cell).
                    if let Ok(st) = c
                        .executables()
                        .get(workload::exe_ref("qemu", &qn))
                        .await
                        .map(tonic::Response::into_inner)
                        && st.exit.is_some()
                        && !exe_has_marker(&c, "qemu", &qn).await
                    {
                        ended = Some(
                            workload::logs(&c, "qemu", &qn, false)
                                .await
                                .unwrap_or_default(),
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(out) = ended {
                    peer_failed = Some(out.lines().take(3).collect::<Vec<_>>().join(" | "));
                } else if let Some(q) = q {
                    theirs.push(q);
                } else {
                    // No marker within 300 s: a failure of the peer's, not a time; stopped.
                    peer_faults += 1;
                    let _ = c
                        .executables()
                        .stop(pb::StopExecutableRequest {
                            executable: Some(workload::exe_ref("qemu", &qn)),
                            grace_period: Some(prost_types::Duration {
                                seconds: 1,
                                nanos: 0,
                            }),
                        })
                        .await;
                }
                let st = workload::wait(&c, "qemu", &qn)
                    .await
                    .map_err(|e| format!("waiting for qemu {qn}: {e}"))?;
                if st.exit.is_none() {
                    println!("qemu did not exit: {st:?}");
                }
                println!("  round {i}: vmlinux {v:.2?} s, bzImage (its kept ELF) {b:.2?} s, qemu {q:.2?} s");
                Ok::<(), String>(())
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ROUND_LIMIT:?}")));
            if let Err(e) = round {
                println!("  round {i}: the machine was lost ({e}); reporting the rounds before it");
                break;
            }
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        println!("  aurae RunVirtualMachine(bzImage, booted from its kept ELF) → marker  {ours:.2?} s, median {:.2} s ({bz_faults} did not reach the marker)", med(ours.clone()));
        if host_arm {
            println!(
                "  same, cpu_template host            {host_template:.2?} s, median {:.2} s → normalized/host = {:.2} ({faults} boots of the host arm did not reach the marker)",
                med(host_template.clone()),
                med(ours.clone()) / med(host_template.clone())
            );
        }
        println!(
            "  same, vmlinux (ELF, no decompression) {elf:.2?} s, median {:.2} s → vmlinux/bzImage = {:.2} ({elf_faults} did not reach the marker)",
            med(elf.clone()),
            med(elf.clone()) / med(ours.clone())
        );
        if let Some(why) = &peer_failed {
            println!("  qemu -M microvm: did not boot: {why}");
        }
        println!("  qemu -M microvm → marker          {theirs:.2?} s, median {:.2} s ({peer_faults} did not reach the marker within 300 s)", med(theirs.clone()));
        println!(
            "  ratio aurae/qemu-microvm = {:.2} (target <= 0.5; the same bzImage given to both); boot timer medians {:.2} s",
            med(ours) / med(theirs.clone()),
            med(boot_timer)
        );
        if let Some(first) = first {
            println!(
                "  ratio aurae bzImage first boot (as given)/qemu-microvm = {:.2}",
                first / med(theirs.clone())
            );
        }
        println!(
            "  ratio aurae vmlinux/qemu-microvm = {:.2} (target <= 0.5; QEMU boots the bzImage as before)",
            med(elf) / med(theirs)
        );
        for (rss, guest) in &overhead {
            println!(
                "  VMM memory: VmRSS {:.1} MiB, guest memory touched {:.1} MiB, overhead {:.1} MiB (target <= 5)",
                *rss as f64 / 1024.0,
                *guest as f64 / 1024.0,
                (*rss as f64 - *guest as f64) / 1024.0
            );
        }
        drop(g);
    });
}
