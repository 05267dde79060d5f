//! Guest tier (QEMU TCG guest with nested KVM): `Spawn` through a microVM. L1 is the TCG
//! guest (auraed as PID 1, carrying the instance kernel and modules); it probes KVM at
//! start, so AUTO picks a microVM: L2 is auraed as PID 1 of a microVM on our own VMM, its
//! initramfs built by L1 in memory; L3 is a cell-isolated instance inside L2. The test
//! reaches L2 and L3 through routes: the harness → L1 (which forwards) → L2 → L3.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    TRUST_DOMAIN,
    guest::{GuestOptions, needs_guest},
    tier::{self, Tier},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_tier_spawns_a_microvm_instance_and_recurses_into_a_cell() {
    if !tier::check(
        "guest_tier_spawns_a_microvm_instance_and_recurses_into_a_cell",
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
    aurae_testkit::guest::with_live_guest("instances_guest_tier", opts, move |g| {
        async move {
            let c = g.client("admin").await.unwrap();
            // The harness reaches the guest's instances through the guest.
            let via = g.addr.ip().to_string();
            aurae_testkit::ip(&["-n", &g.netns, "route", "add", "10.200.0.0/16", "via", &via])
                .unwrap();
            aurae_testkit::ip(&["-n", &g.netns, "route", "add", "10.201.0.0/16", "via", &via])
                .unwrap();

            let t = std::time::Instant::now();
            let vm1 = pb::Instance {
                name: "vm1".into(),
                ready_timeout: Some(prost_types::Duration {
                    seconds: 150,
                    nanos: 0,
                }),
                ..Default::default()
            };
            // Again when the nested guest triple-faulted (QEMU TCG's emulated SVM; see
            // aurae_testkit::guest::nested_guest_faulted); printed.
            let s = aurae_testkit::guest::retry_nested("Spawn vm1", || async {
                c.runtime().spawn(vm1.clone()).await
            })
            .await
            .unwrap_or_else(|e| panic!("Spawn in the guest: {e:?}\n{}", g.serial_text()))
            .into_inner();
            println!(
                "L2 microVM instance ready in {:.1} s (status: boot {:?}, ready {:?}); {}",
                t.elapsed().as_secs_f64(),
                s.boot_time,
                s.ready_time,
                s.isolation_reason
            );
            assert_eq!(s.phase, pb::Phase::Running as i32, "{s:?}");
            assert_eq!(
                s.isolation,
                pb::Isolation::VirtualMachine as i32,
                "AUTO picks a microVM where KVM boots: {s:?}"
            );
            assert!(s.isolation_reason.contains("KVM booted"), "{s:?}");
            assert_eq!(
                s.spiffe_id,
                format!("spiffe://{TRUST_DOMAIN}/instance/node/vm1")
            );

            let l2 = g
                .instance_client("admin", &s.endpoint, &s.spiffe_id)
                .await
                .unwrap();
            let info = l2
                .daemon()
                .info(pb::InfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.mode, "pid1");
            assert_eq!(info.server_id, s.spiffe_id);
            assert_eq!(info.depth, 1);
            assert_eq!(info.parent_id, format!("spiffe://{TRUST_DOMAIN}/auraed"));
            // Expecting another ID (a sibling's) fails: the harness never talks to the wrong child.
            assert!(
                g.instance_client(
                    "admin",
                    &s.endpoint,
                    &format!("spiffe://{TRUST_DOMAIN}/instance/node/vm2")
                )
                .await
                .is_err()
            );

            // L3: a cell-isolated instance inside the microVM.
            let s3 = l2
                .runtime()
                .spawn(pb::Instance {
                    name: "l3".into(),
                    isolation: pb::Isolation::Cell as i32,
                    ready_timeout: Some(prost_types::Duration {
                        seconds: 120,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("Spawn in L2: {e:?}"))
                .into_inner();
            assert_eq!(s3.phase, pb::Phase::Running as i32, "{s3:?}");
            assert_eq!(
                s3.spiffe_id,
                format!("spiffe://{TRUST_DOMAIN}/instance/node/vm1/l3")
            );
            assert_eq!(s3.depth, 2);
            let l3 = g
                .instance_client("admin", &s3.endpoint, &s3.spiffe_id)
                .await
                .unwrap();
            let info3 = l3
                .daemon()
                .info(pb::InfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info3.parent_id, s.spiffe_id);
            assert_eq!(info3.mode, "instance");

            // Stop in order: L2 shuts down (stopping L3) and powers off; free leaves nothing.
            let stopped = c
                .instances()
                .stop(pb::StopRequest {
                    name: "vm1".into(),
                    grace_period: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(stopped.phase, pb::Phase::Exited as i32, "{stopped:?}");
            c.instances()
                .free(pb::NameRef { name: "vm1".into() })
                .await
                .unwrap();
            let list = c
                .instances()
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(list.instances.is_empty());
            // The microVM was never a VM of the API.
            let vms = c
                .virtual_machines()
                .list(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(vms.virtual_machines.is_empty(), "{vms:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
}
