//! Nested microVM stability, inside one guest-tier machine (QEMU TCG `-cpu max`, nested
//! KVM): boots the Debian kernel with an initramfs that prints its CPU as the guest sees it
//! (cpuinfo and the kernel log, first round), keeps a shell busy until `STRESS_SECS` of
//! uptime, prints the marker and powers off — `ROUNDS` times in a row — and counts clean
//! ends, triple faults and hangs. A diagnostic, not a timing: it is how the guest tier's
//! triple-fault rate and the CPU template's effect were measured (SPECIFICATION.md,
//! "MicroVMs").
//!
//! `ROUNDS` (default 2), `STRESS_SECS` (20), `TEMPLATE` (the VM's cpu_template, default
//! empty = normalized), `VCPUS` (1), `L1_CMDLINE` (appended to the machine's command line,
//! e.g. `kvm_amd.vgif=0`), `QEMU_PEER` (set: boot with `qemu -M microvm` as an executable
//! of a cell with `devices.kvm` instead).
//! Needs the guest tier; prints SKIP otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    guest::{
        Guest, GuestOptions, microvm_initramfs_with, needs_guest, qemu_files, qemu_microvm_argv,
        vm_image_files,
    },
    workload,
};
use std::time::{Duration, Instant};

/// The last `n` bytes of `s` or a little more (whole characters).
fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[at..]
}

fn main() {
    if let Some(r) = needs_guest() {
        println!("SKIP {r}");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let secs: u32 = std::env::var("STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmpl = std::env::var("TEMPLATE").unwrap_or_default();
    let vcpus: u32 = std::env::var("VCPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let body = format!(
        r#"echo PROBE-BEGIN
uname -a
sed -n 1,28p /proc/cpuinfo
dmesg
echo PROBE-END
while :; do
  i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done
  cat /proc/uptime > /tmp/u
  u=$(sed 's/\..*//' /tmp/u)
  [ "$u" -ge {secs} ] && break
done
echo STRESS-DONE
echo AURAE_MICROVM_MARKER
"#
    );
    let mut files = vm_image_files(microvm_initramfs_with(&body).unwrap()).unwrap();
    let use_qemu = std::env::var("QEMU_PEER").is_ok();
    if use_qemu {
        files.extend(qemu_files().unwrap());
    }
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(async {
        let g = Guest::boot(GuestOptions {
            extra_files: files,
            memory_mib: 2048,
            extra_cmdline: std::env::var("L1_CMDLINE").unwrap_or_default(),
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
        let (_, out) = workload::run_to_end(
            &c,
            pb::Executable {
                cell: "probe".into(),
                name: "l1cpu".into(),
                argv: vec!["/bin/cat".into(), "/proc/cpuinfo".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let (_, km) = workload::run_to_end(
            &c,
            pb::Executable {
                cell: "probe".into(),
                name: "l1kvm".into(),
                argv: vec![
                    "/bin/cat".into(),
                    "/sys/module/kvm_amd/parameters/vgif".into(),
                    "/sys/module/kvm_amd/parameters/nested".into(),
                    "/proc/cmdline".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        println!("L1 kvm_amd vgif/nested/cmdline: {km}");
        println!(
            "L1 cpuinfo:\n{}",
            out.lines().take(28).collect::<Vec<_>>().join("\n")
        );
        let (mut ok, mut tf, mut hang, mut other) = (0, 0, 0, 0);
        if use_qemu {
            c.cells()
                .allocate(pb::Cell {
                    name: "qemu".into(),
                    devices: Some(pb::CellDevices { kvm: true }),
                    ..Default::default()
                })
                .await
                .unwrap();
            for i in 0..rounds {
                let qn = format!("q{i}");
                let t = Instant::now();
                c.runtime()
                    .run_executable(pb::Executable {
                        cell: "qemu".into(),
                        name: qn.clone(),
                        argv: qemu_microvm_argv(
                            "/var/lib/aurae/vm-images/vmlinuz",
                            "/var/lib/aurae/vm-images/initrd",
                            "console=ttyS0 reboot=k panic=-1",
                        ),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let st = tokio::time::timeout(
                    Duration::from_secs(u64::from(secs) + 150),
                    workload::wait(&c, "qemu", &qn),
                )
                .await;
                let out = workload::logs(&c, "qemu", &qn, false)
                    .await
                    .unwrap_or_default();
                let marker = out.contains("AURAE_MICROVM_MARKER");
                if marker {
                    ok += 1
                } else if st.is_err() {
                    hang += 1
                } else {
                    other += 1
                }
                println!(
                    "qemu round {i}: {:.1}s marker={marker} {:?}",
                    t.elapsed().as_secs_f64(),
                    st.as_ref().map(|r| r.as_ref().map(|s| s.exit))
                );
                if i == 0 {
                    let a = out.find("PROBE-BEGIN").unwrap_or(0);
                    println!("{}", out[a..].chars().take(20000).collect::<String>());
                }
                if !marker {
                    println!("TAIL:\n{}", tail(&out, 3000));
                }
            }
            println!("RESULT qemu rounds={rounds} ok={ok} hang={hang} other={other}");
            drop(g);
            return;
        }
        for i in 0..rounds {
            let name = format!("p{i}");
            let t = Instant::now();
            c.runtime()
                .run_virtual_machine(pb::VirtualMachine {
                    name: name.clone(),
                    kernel_path: "/var/lib/aurae/vm-images/vmlinuz".into(),
                    initramfs_path: "/var/lib/aurae/vm-images/initrd".into(),
                    cmdline: "console=ttyS0 reboot=k panic=-1".into(),
                    vcpus,
                    memory_bytes: 256 << 20,
                    cpu_template: tmpl.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let done = tokio::time::timeout(
                Duration::from_secs(u64::from(secs) + 120),
                c.virtual_machines().wait(pb::WaitRequest {
                    name: name.clone(),
                    timeout: Some(prost_types::Duration {
                        seconds: i64::from(secs) + 110,
                        nanos: 0,
                    }),
                }),
            )
            .await;
            let con = tokio::time::timeout(Duration::from_secs(30), workload::console(&c, &name))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let st = done.ok().and_then(|r| r.ok()).map(|r| r.into_inner());
            let msg = st
                .as_ref()
                .map(|s| format!("{:?} {}", s.exit, s.message))
                .unwrap_or_else(|| "no answer".into());
            let marker = con.contains("AURAE_MICROVM_MARKER");
            if marker {
                ok += 1
            } else if msg.contains("triple") {
                tf += 1
            } else if st.as_ref().is_some_and(|s| s.exit.is_none()) || st.is_none() {
                hang += 1
            } else {
                other += 1
            }
            println!(
                "round {i}: {:.1}s marker={marker} {msg}",
                t.elapsed().as_secs_f64()
            );
            if i == 0 || !marker {
                let a = con.find("PROBE-BEGIN").unwrap_or(0);
                let b = con.find("PROBE-END").map(|x| x + 9).unwrap_or(con.len());
                if i == 0 {
                    println!("{}", &con[a..b]);
                }
                if !marker {
                    println!("TAIL:\n{}", tail(&con, 3000));
                }
                if i == 0 {
                    println!(
                        "last kernel line: {:?}",
                        con.lines().rev().find(|l| l.starts_with('['))
                    );
                }
            }
            let _ = c
                .virtual_machines()
                .stop(pb::StopRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await;
            let _ = c.virtual_machines().free(pb::NameRef { name }).await;
        }
        println!(
            "RESULT template={tmpl:?} rounds={rounds} ok={ok} triple={tf} hang={hang} other={other}"
        );
        drop(g);
    });
}
