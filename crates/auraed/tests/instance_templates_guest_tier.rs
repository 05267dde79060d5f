//! Guest tier (QEMU TCG guest with nested KVM): `Spawn` from an instance template. L1 is
//! the TCG guest (auraed as PID 1, carrying the instance kernel and modules). The first
//! spawn with TEMPLATE_REQUIRED builds the template (one boot to "waiting for its
//! identity", a snapshot) and restores it; the second restores the stored one. Each copy
//! must be its own machine: its SVID and key, its address, its kernel's random state
//! (seen in its boot ID, made from the CRNG after the reseed) — and both serve.
//!
//! A template whose state file says another format version is refused by the monitor:
//! TEMPLATE_REQUIRED fails naming it, AUTO boots instead and says why.
//!
//! One nested guest runs at a time (two running microVMs under TCG's emulated SVM have
//! panicked L1's kernel on this fleet): the first instance is stopped, not freed, before
//! the second starts, so it keeps its address lease.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::{Duration, Instant};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    guest::{Guest, GuestOptions, needs_guest},
    tier::{self, Tier},
};

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

/// Wait for the end, free what ran, return its output (at most a minute).
fn wait_for_output() -> Option<pb::RunOptions> {
    Some(pb::RunOptions {
        wait: true,
        remove: true,
        output: true,
        timeout: secs(60),
    })
}

fn from_template(name: &str, template: pb::TemplateUse) -> pb::Instance {
    pb::Instance {
        name: name.into(),
        isolation: pb::Isolation::VirtualMachine as i32,
        template: template as i32,
        ready_timeout: secs(240),
        ..Default::default()
    }
}

async fn spawn(g: &Guest, c: &Client, inst: pb::Instance) -> (pb::InstanceStatus, Duration) {
    let t = Instant::now();
    let what = format!("Spawn {}", inst.name);
    let s = aurae_testkit::guest::retry_nested(&what, || async {
        c.runtime().spawn(inst.clone()).await
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", g.serial_text()))
    .into_inner();
    (s, t.elapsed())
}

/// What the instance says of itself, and `auraed --version` run by RunExecutable in it.
async fn inside(g: &Guest, s: &pb::InstanceStatus) -> (pb::DaemonInfo, String) {
    let ic = g
        .instance_client("admin", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap_or_else(|e| panic!("reaching {}: {e:?}", s.name));
    let info = ic
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    ic.cells()
        .allocate(pb::Cell {
            name: "job".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("a cell in {}: {e:?}", s.name));
    let run = ic
        .runtime()
        .run_executable(pb::Executable {
            cell: "job".into(),
            name: "version".into(),
            argv: vec!["/init".into(), "--version".into()],
            run: wait_for_output(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("RunExecutable in {}: {e:?}", s.name))
        .into_inner();
    let out: Vec<u8> = run.output.iter().flat_map(|c| c.data.clone()).collect();
    (info, String::from_utf8_lossy(&out).into_owned())
}

/// The running instance's MAC as L1's neighbour table learns it, after checking that its
/// IPv6 link-local address is the one made from that MAC (EUI-64) and answers: a
/// template's link goes up before its snapshot without one (made from the template's
/// MAC, it would be every copy's).
async fn own_link(c: &Client, s: &pb::InstanceStatus) -> String {
    let v4 = &s.addresses[0];
    let neigh = l1_sh(
        c,
        &format!("/bin/busybox ping -c 1 -w 5 {v4} >/dev/null; /bin/busybox ip neigh show {v4}"),
    )
    .await;
    let mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("{}: no neighbour entry for {v4}: {neigh}", s.name))
        .to_owned();
    let ll = link_local_of(&mac);
    // A new address answers once its duplicate address detection is over (~1 s).
    let ping = l1_sh(
        c,
        &format!(
            "for i in 1 2 3 4 5 6; do /bin/busybox ping6 -c 1 -w 2 -I aurae0 {ll} >/dev/null 2>&1 \
               && echo ANSWERED after $i && break; /bin/busybox sleep 1; done; \
             /bin/busybox ping6 -c 2 -w 3 -I aurae0 ff02::1 2>&1; \
             /bin/busybox ping6 -c 1 -w 3 {} 2>&1; /bin/busybox ip -6 neigh",
            s.addresses
                .get(1)
                .unwrap_or_else(|| panic!("{}: no IPv6 address: {s:?}", s.name))
        ),
    )
    .await;
    assert!(
        ping.contains("ANSWERED"),
        "{}: its link-local address {ll} (from its MAC {mac}) does not answer:\n{ping}",
        s.name
    );
    println!("{}: MAC {mac}, link-local {ll}: {ping}", s.name);
    mac
}

/// The EUI-64 IPv6 link-local address of a MAC (`52:54:00:12:34:56` →
/// `fe80::5054:ff:fe12:3456`), as the kernel makes it.
fn link_local_of(mac: &str) -> std::net::Ipv6Addr {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("MAC {mac}")))
        .collect();
    assert_eq!(b.len(), 6, "MAC {mac}");
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        b[0] ^ 2,
        b[1],
        b[2],
        0xff,
        0xfe,
        b[3],
        b[4],
        b[5],
    ])
}

/// `sh -c script` with L1's busybox (applets called as `/bin/busybox <applet>`), in a
/// one-call cell of L1: it runs as root, sees L1's files and shares L1's network (its
/// bridge to the instances).
async fn l1_sh(c: &Client, script: &str) -> String {
    let run = c
        .runtime()
        .run_cell(pb::Cell {
            name: "l1sh".into(),
            executable: Some(pb::Executable {
                name: "sh".into(),
                argv: vec![
                    "/bin/busybox".into(),
                    "sh".into(),
                    "-c".into(),
                    script.into(),
                ],
                ..Default::default()
            }),
            run: wait_for_output(),
            namespaces: Some(pb::CellNamespaces {
                share_host_net: true,
                share_host_pid: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("RunCell in L1 ({script}): {e:?}"))
        .into_inner();
    let exe = &run.executables[0];
    let out = String::from_utf8_lossy(
        &exe.output
            .iter()
            .flat_map(|c| c.data.clone())
            .collect::<Vec<u8>>(),
    )
    .into_owned();
    let ok = matches!(
        exe.exit.as_ref().and_then(|e| e.how),
        Some(pb::exit_status::How::Code(0))
    );
    assert!(ok, "L1: {script}: {:?}\n{out}", exe.exit);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_tier_instances_restored_from_one_template_are_each_their_own() {
    if !tier::check(
        "guest_tier_instances_restored_from_one_template_are_each_their_own",
        Tier::Guest,
        needs_guest(),
    ) {
        return;
    }
    let opts = GuestOptions {
        extra_files: aurae_testkit::guest::instance_files().unwrap(),
        memory_mib: 2048,
        ..Default::default()
    };
    aurae_testkit::guest::with_live_guest("instance_templates_guest_tier", opts, move |g| {
        async move {
            let c = g.client("admin").await.unwrap();
            let via = g.addr.ip().to_string();
            aurae_testkit::ip(&["-n", &g.netns, "route", "add", "10.200.0.0/16", "via", &via]).unwrap();

            // No template yet: AUTO boots, and says why.
            let none = c
                .instances()
                .list_templates(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(none.templates.is_empty(), "{none:?}");

            // REQUIRED builds the template, then restores it.
            let (s1, took1) = spawn(&g, &c, from_template("t1", pb::TemplateUse::TemplateRequired)).await;
            println!(
                "t1: template built and restored, ready in {:.1} s ({})",
                took1.as_secs_f64(),
                s1.boot_reason
            );
            assert_eq!(s1.phase, pb::Phase::Running as i32, "{s1:?}");
            assert!(s1.template.starts_with("t-1x512m-"), "{s1:?}");
            assert!(s1.boot_reason.starts_with("restored from template"), "{s1:?}");
            let listed = c
                .instances()
                .list_templates(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(listed.templates.len(), 1, "{listed:?}");
            let t = &listed.templates[0];
            assert_eq!(t.name, s1.template);
            assert!(t.current, "{t:?}");
            assert_eq!((t.vcpus, t.memory_bytes), (1, 512 << 20));
            assert!(
                t.memory_disk_bytes < t.memory_bytes,
                "zero pages are holes: {t:?}"
            );
            let (i1, v1) = inside(&g, &s1).await;
            let mac1 = own_link(&c, &s1).await;
            assert_eq!(i1.server_id, s1.spiffe_id);
            assert_eq!(i1.mode, "pid1");
            assert!(v1.contains("auraed"), "RunExecutable in t1: {v1:?}");

            // One nested guest at a time: t1 stops but keeps its address.
            let stopped = c
                .instances()
                .stop(pb::StopRequest {
                    name: "t1".into(),
                    grace_period: secs(10),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(stopped.phase, pb::Phase::Exited as i32, "{stopped:?}");

            // AUTO restores the stored template.
            let (s2, took2) = spawn(&g, &c, from_template("t2", pb::TemplateUse::TemplateAuto)).await;
            println!(
                "t2: restored, ready in {:.2} s ({})",
                took2.as_secs_f64(),
                s2.boot_reason
            );
            assert_eq!(s2.template, s1.template, "{s2:?}");
            let (i2, v2) = inside(&g, &s2).await;
            let mac2 = own_link(&c, &s2).await;
            assert_eq!(i2.server_id, s2.spiffe_id);
            assert!(v2.contains("auraed"), "RunExecutable in t2: {v2:?}");
            // Where the time went: the child's clock was set from L1's at the handover,
            // so its auraed's start compares with L1's spawn start.
            let at = |t: &Option<prost_types::Timestamp>| {
                t.as_ref().map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
            };
            println!(
                "t2: L1 spawn started → the child's auraed started {:.2} s (restore {}); ready at {:.2} s",
                at(&i2.started_at) - at(&s2.started_at),
                s2.boot_reason,
                s2.ready_time.as_ref().map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9),
            );

            if std::env::var_os("AURAE_DEBUG_T2").is_some() {
                let log = l1_sh(&c, "/bin/busybox cat /var/lib/aurae/logs/instances/t2.log").await;
                println!("---- t2.log ----\n{log}\n----");
                let l1 = g.serial_text();
                for line in l1.lines().filter(|l| l.contains("virtual machine restored") || l.contains("instance ready")) {
                    println!("L1: {line}");
                }
                println!("t2 boot_time (L1: request → its VM started): {:?}", s2.boot_time);
                // What the restored guest has touched (its nested page faults so far).
                let vmm = l1_sh(
                    &c,
                    "for c in /proc/[0-9]*/comm; do if [ \"$(/bin/busybox cat $c 2>/dev/null)\" = aurae-vmm ]; then p=${c%/comm}; echo $p; /bin/busybox awk '/^Size: +524288 kB/{s=1} s&&/^(Rss|Anonymous|Private_Dirty|Shared_Clean|Private_Clean):/{print} /^VmFlags/{s=0}' $p/smaps; fi; done",
                )
                .await;
                println!(
                    "the template's memory file: {} MiB of {} MiB; t2's VMM, its guest memory mapping:\n{vmm}",
                    t.memory_disk_bytes >> 20,
                    t.memory_bytes >> 20
                );
            }
            // Each its own: identity, key, address, kernel random state.
            assert_ne!(s1.spiffe_id, s2.spiffe_id);
            assert_ne!(s1.addresses, s2.addresses);
            assert_ne!(s1.endpoint, s2.endpoint);
            for i in [&i1, &i2] {
                assert_eq!(i.boot_id.len(), 36, "{i:?}");
                assert_eq!(i.server_key_sha256.len(), 64, "{i:?}");
            }
            assert_ne!(i1.boot_id, i2.boot_id, "boot IDs (from each copy's CRNG)");
            assert_ne!(mac1, mac2, "MACs");
            assert_ne!(i1.server_key_sha256, i2.server_key_sha256, "SVID keys");
            println!(
                "t1 {} boot {} key {}…; t2 {} boot {} key {}…",
                s1.addresses[0],
                i1.boot_id,
                &i1.server_key_sha256[..12],
                s2.addresses[0],
                i2.boot_id,
                &i2.server_key_sha256[..12]
            );

            c.instances()
                .stop(pb::StopRequest {
                    name: "t2".into(),
                    grace_period: secs(10),
                })
                .await
                .unwrap();

            // A template of another format version (its state file's version field
            // changed on L1's disk, by a cell of L1): the monitor refuses to restore it;
            // REQUIRED fails naming it, AUTO boots instead and says why.
            let state = format!("/var/lib/aurae/instance-templates/{}/state", s1.template);
            l1_sh(
                &c,
                &format!(
                    "/bin/busybox printf c | /bin/busybox dd of={state} bs=1 seek=8 count=1 conv=notrunc"
                ),
            )
            .await;
            let e = c
                .runtime()
                .spawn(from_template("t4", pb::TemplateUse::TemplateRequired))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("format version 99"), "{e:?}");
            let (s3, took3) = spawn(&g, &c, from_template("t3", pb::TemplateUse::TemplateAuto)).await;
            println!(
                "t3: booted in {:.1} s ({})",
                took3.as_secs_f64(),
                s3.boot_reason
            );
            assert!(s3.template.is_empty(), "{s3:?}");
            assert!(
                s3.boot_reason.starts_with("booted: restoring template") && s3.boot_reason.contains("format version 99"),
                "{s3:?}"
            );
            println!(
                "restored t2 ready in {:.2} s vs booted t3 in {:.1} s: {:.3}x",
                took2.as_secs_f64(),
                took3.as_secs_f64(),
                took2.as_secs_f64() / took3.as_secs_f64()
            );

            // Removed: not listed; a second remove NOT_FOUND, a bad name refused.
            c.instances()
                .remove_template(pb::NameRef {
                    name: s1.template.clone(),
                })
                .await
                .unwrap();
            let left = c
                .instances()
                .list_templates(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(left.templates.is_empty(), "{left:?}");
            let e = c
                .instances()
                .remove_template(pb::NameRef {
                    name: s1.template.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
            let e = c
                .instances()
                .remove_template(pb::NameRef {
                    name: "../etc".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

            for name in ["t1", "t2", "t3"] {
                c.instances()
                    .free(pb::NameRef { name: name.into() })
                    .await
                    .unwrap_or_else(|e| panic!("free {name}: {e:?}"));
            }
            let left = c
                .instances()
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(left.instances.is_empty(), "{left:?}");
        }
    })
    .await
    .unwrap();
}
