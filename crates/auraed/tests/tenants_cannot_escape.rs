//! A hostile tenant against a policy of several identities (one admin; tenants granted one
//! cell-name prefix, a uid/gid range, no uid 0, no host namespaces), tried as an attacker
//! would. Each test reproduces one attack of the security review and passes only if it is
//! refused. Host tier (T1: root and a cgroup v2 hierarchy); each test runs its own auraed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN,
    tier::{self, Tier},
    workload,
};
use tonic::Code;

/// admin: everything. alice: cells under `team-a`, uids/gids 1000-1999, a quota.
/// bob: `team-a/api` only (a nested cell of alice's prefix), no quota.
fn policy(alice_quota: &str) -> String {
    format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nallow_host_namespaces = true\nallow_new_privileges = true\nuids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/alice\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\n\
         uids = [\"1000-1999\"]\ngids = [\"1000-1999\"]\n{alice_quota}\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/bob\"\nmethods = [\"*\"]\nnames = [\"team-a/api\"]\n\
         uids = [\"2000\"]\ngids = [\"2000\"]\n"
    )
}

async fn daemon(test: &str, alice_quota: &str) -> Option<Daemon> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    Some(
        Daemon::start(
            Path::new(env!("CARGO_BIN_EXE_auraed")),
            DaemonOptions {
                policy: Some(policy(alice_quota)),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    )
}

fn sh(cell: &str, name: &str, script: &str, uid: Option<u32>, gid: Option<u32>) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: [(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )]
        .into(),
        uid,
        gid,
        ..Default::default()
    }
}

async fn allocate(c: &Client, name: &str) -> Result<pb::CellStatus, tonic::Status> {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn allocate_with_memory(
    c: &Client,
    name: &str,
    memory_max: Option<u64>,
) -> Result<pb::CellStatus, tonic::Status> {
    c.cells()
        .allocate(pb::Cell {
            name: name.into(),
            limits: memory_max.map(|m| pb::CellLimits {
                memory_max_bytes: Some(m),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn exit_code(s: &pb::ExecutableStatus) -> Option<i32> {
    match s.exit.as_ref()?.how? {
        pb::exit_status::How::Code(c) => Some(c),
        pb::exit_status::How::Signal(_) => None,
    }
}

/// Item 1: uid/gid 4294967295 is "-1" to setresuid and kept auraed's uid 0 (full
/// capabilities, the CA key readable). Now refused as an id before anything runs; ids
/// from 2³¹ on too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_minus_one_is_not_root() {
    let Some(d) = daemon("uid_minus_one_is_not_root", "").await else {
        return;
    };
    let admin = d.client("admin").await.unwrap();
    let alice = d.client("alice").await.unwrap();
    allocate(&admin, "team-a").await.unwrap();
    let (mut tried, mut refused) = (0, 0);
    for (who, c) in [("admin", &admin), ("alice", &alice)] {
        for (uid, gid) in [
            (Some(u32::MAX), None),
            (Some(u32::MAX), Some(1000)),
            (Some(1000), Some(u32::MAX)),
            (Some(1 << 31), Some(1000)),
            (Some(1000), Some(u32::MAX - 1)),
        ] {
            tried += 1;
            let e = c
                .runtime()
                .run_executable(sh("team-a", "", "id -u > /dev/null", uid, gid))
                .await
                .expect_err("an id that is not an id must be refused");
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{who} {uid:?}/{gid:?}: {e:?}"
            );
            assert!(
                e.message().contains("not a valid id"),
                "{who} {uid:?}/{gid:?}: {}",
                e.message()
            );
            refused += 1;
        }
    }
    // Nothing ran: the cell has no executables.
    let list = admin
        .executables()
        .list(pb::ListExecutablesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.executables.is_empty(), "{list:?}");
    println!("uid/gid -1 and >= 2^31: {tried} tried, {refused} refused");
}

/// Item 3: tenants picked any host uid and gid (gid 42 read /etc/shadow, gid 6 reads
/// disks) and setuid binaries worked (no_new_privs 0). Now: only the granted range, no
/// supplementary groups, no_new_privs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_run_only_as_their_ids_without_new_privileges() {
    let Some(d) = daemon("tenants_run_only_as_their_ids_without_new_privileges", "").await else {
        return;
    };
    let admin = d.client("admin").await.unwrap();
    let alice = d.client("alice").await.unwrap();
    allocate(&alice, "team-a").await.unwrap();
    let mut refused = 0;
    let attempts: [(Option<u32>, Option<u32>); 7] = [
        (None, None),             // no uid: root
        (Some(0), None),          // root
        (Some(1000), Some(0)),    // gid root
        (Some(1000), Some(42)),   // shadow
        (Some(1000), Some(6)),    // disk
        (Some(999), Some(1000)),  // outside the range
        (Some(2000), Some(2000)), // bob's ids
    ];
    for (uid, gid) in attempts {
        let e = alice
            .runtime()
            .run_executable(sh("team-a", "", "true", uid, gid))
            .await
            .expect_err("outside the grant");
        assert_eq!(e.code(), Code::PermissionDenied, "{uid:?}/{gid:?}: {e:?}");
        refused += 1;
    }
    // Inside the grant: runs, as exactly those ids, with no groups and no_new_privs.
    let probe = "id -u; id -g; grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff):' /proc/self/status; \
                 cat /etc/shadow >/dev/null 2>&1 && echo shadow=readable || echo shadow=denied; \
                 echo nofile=$(ulimit -n)";
    alice
        .runtime()
        .run_executable(sh("team-a", "probe", probe, Some(1500), Some(1501)))
        .await
        .unwrap();
    let st = workload::wait(&alice, "team-a", "probe").await.unwrap();
    let out = workload::output(&alice, "team-a", "probe").await.unwrap();
    println!("tenant probe:\n{out}");
    assert_eq!(exit_code(&st), Some(0), "{out}");
    assert!(out.starts_with("1500\n1501\n"), "{out}");
    assert!(out.contains("Uid:\t1500\t1500\t1500\t1500"), "{out}");
    assert!(out.contains("Gid:\t1501\t1501\t1501\t1501"), "{out}");
    assert!(
        out.lines().any(|l| l.trim_end() == "Groups:"),
        "no supplementary groups: {out}"
    );
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("shadow=denied"), "{out}");
    // auraed raised its own open-file limit; workloads get the one it was given.
    let ours = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .unwrap();
    assert!(
        out.contains(&format!("nofile={ours}\n")),
        "ours {ours}: {out}"
    );
    // The admin's grant allows new privileges (its executables run as before).
    admin
        .runtime()
        .run_executable(sh(
            "team-a",
            "admin-probe",
            "grep '^NoNewPrivs:' /proc/self/status",
            None,
            None,
        ))
        .await
        .unwrap();
    workload::wait(&admin, "team-a", "admin-probe")
        .await
        .unwrap();
    let out = workload::output(&admin, "team-a", "admin-probe")
        .await
        .unwrap();
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
    println!(
        "tenant ids: {} tried outside the grant, {refused} refused",
        attempts.len()
    );
}

/// Item 9: one tenant made 150 cells in 3 s. Quotas per grant, RESOURCE_EXHAUSTED naming
/// the quota, exact under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_bound_a_tenant() {
    let Some(d) = daemon(
        "quotas_bound_a_tenant",
        "[grant.quota]\ncells = 4\nexecutables = 3\nmemory_bytes = 268435456",
    )
    .await
    else {
        return;
    };
    let alice = d.client("alice").await.unwrap();
    let admin = d.client("admin").await.unwrap();
    // Memory: every outermost cell needs a memory.max under a memory quota, and the sum
    // stays under it (checked before the cgroup is made, so this runs without the memory
    // controller too; the guest tier has it).
    let e = allocate_with_memory(&alice, "team-a", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("memory_max"), "{}", e.message());
    let e = allocate_with_memory(&alice, "team-a", Some(512 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("quota.memory_bytes"),
        "{}",
        e.message()
    );
    drop((alice, admin, d));
    // Cells and executables.
    let d = daemon(
        "quotas_bound_a_tenant",
        "[grant.quota]\ncells = 4\nexecutables = 3",
    )
    .await
    .unwrap();
    let alice = d.client("alice").await.unwrap();
    let admin = d.client("admin").await.unwrap();
    allocate(&alice, "team-a").await.unwrap();
    // Nested cells are bounded by their parent: no memory of their own needed. Ten at
    // once, with room for three more: exactly three get through.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = alice.clone();
        tasks.push(tokio::spawn(async move {
            allocate(&c, &format!("team-a/n{i}")).await
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("quota.cells"), "{}", e.message());
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (3, 7), "cells quota 4 (one exists)");
    // Executables: three (running or exited, until freed), concurrently.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = alice.clone();
        tasks.push(tokio::spawn(async move {
            c.runtime()
                .run_executable(sh("team-a", &format!("e{i}"), "sleep 30", Some(1000), None))
                .await
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("quota.executables"), "{}", e.message());
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (3, 3), "executables quota 3");
    // The admin is not bound by alice's quota (it has none).
    allocate(&admin, "team-a/by-admin").await.unwrap();
    // Freeing gives the room back.
    alice
        .cells()
        .free(pb::NameRef {
            name: "team-a/n0".into(),
        })
        .await
        .ok();
    println!("quotas: cells 3/10 concurrent admitted, executables 3/6 admitted");
    admin
        .cells()
        .stop(pb::StopRequest {
            name: "team-a".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
        })
        .await
        .ok();
}

/// A quota's admission is held while the resource is made, never while it runs: a run
/// call that waits for its process (up to 10 minutes) held the one lock every quota'd
/// request takes, so one tenant's `run.wait` of a `sleep` froze every other quota'd
/// tenant's Allocate, RunExecutable, RunCell and Spawn until the sleep ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_run_call_holds_no_quota_lock() {
    let Some(d) = daemon(
        "a_waiting_run_call_holds_no_quota_lock",
        "[grant.quota]
cells = 8
executables = 8",
    )
    .await
    else {
        return;
    };
    let alice = d.client("alice").await.unwrap();
    let admin = d.client("admin").await.unwrap();
    allocate(&alice, "team-a").await.unwrap();
    let waiting = {
        let c = alice.clone();
        tokio::spawn(async move {
            let mut e = sh("team-a", "long", "sleep 20", Some(1000), None);
            e.run = Some(pb::RunOptions {
                wait: true,
                remove: true,
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                output: false,
            });
            c.runtime().run_executable(e).await
        })
    };
    // The run has started (and counts) once its executable is listed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = alice
            .executables()
            .list(pb::ListExecutablesRequest::default())
            .await
            .map(|r| r.into_inner().executables.len())
            .unwrap_or(0);
        if listed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another quota'd request goes through while the run waits, and is counted with it.
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(8), allocate(&alice, "team-a/beside")).await;
    assert!(
        matches!(r, Ok(Ok(_))),
        "an Allocate waited {:?} behind a waiting run call: {r:?}",
        t.elapsed()
    );
    let r = tokio::time::timeout(
        Duration::from_secs(8),
        alice
            .runtime()
            .run_executable(sh("team-a", "short", "true", Some(1000), None)),
    )
    .await;
    assert!(matches!(r, Ok(Ok(_))), "{r:?}");
    println!(
        "quota'd Allocate beside a waiting run call: {:?}",
        t.elapsed()
    );
    assert!(!waiting.is_finished(), "the long run still waits");
    admin
        .cells()
        .stop(pb::StopRequest {
            name: "team-a".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
        })
        .await
        .ok();
    let _ = tokio::time::timeout(Duration::from_secs(10), waiting).await;
}

/// Item 11: executable events of cell `team-a` reached a grant for `team-a/api` (the
/// event's name `team-a/api` read as a cell name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_resource_not_the_name() {
    let Some(d) = daemon("events_follow_the_resource_not_the_name", "").await else {
        return;
    };
    let alice = d.client("alice").await.unwrap();
    let bob = d.client("bob").await.unwrap();
    let mut watch = bob
        .events()
        .watch(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    allocate(&alice, "team-a").await.unwrap();
    // An executable named "api" in cell team-a: its events are named "team-a/api".
    alice
        .runtime()
        .run_executable(sh("team-a", "api", "true", Some(1000), None))
        .await
        .unwrap();
    workload::wait(&alice, "team-a", "api").await.unwrap();
    // Bob's own cell: its events must arrive (the stream works).
    allocate(&alice, "team-a/api").await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(Some(e))) = tokio::time::timeout_at(deadline, watch.message()).await {
        let done = e.kind == pb::Kind::Cell as i32 && e.name == "team-a/api";
        seen.push((e.kind, e.name));
        if done {
            break;
        }
    }
    println!("bob saw: {seen:?}");
    assert!(
        seen.iter()
            .any(|(k, n)| *k == pb::Kind::Cell as i32 && n == "team-a/api"),
        "bob's own cell event: {seen:?}"
    );
    assert!(
        !seen.iter().any(|(k, _)| *k == pb::Kind::Executable as i32),
        "bob saw an executable of cell team-a: {seen:?}"
    );
}

/// Item 12: RunCell pulled before authorizing the pull, so a tenant made auraed connect
/// to any host:port. Now the registry is authorized before any network I/O.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pull_without_a_registry_grant() {
    let Some(d) = daemon("no_pull_without_a_registry_grant", "").await else {
        return;
    };
    let alice = d.client("alice").await.unwrap();
    // A listener that counts connections: the "internal service" the tenant scans.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut refused = 0;
    let images = [
        format!("127.0.0.1:{port}/team-a/app"),
        format!("localhost:{port}/x"),
        format!("127.0.0.1:{port}/x@sha256:{}", "0".repeat(64)),
    ];
    for image in &images {
        let e = alice
            .runtime()
            .run_cell(pb::Cell {
                name: "team-a".into(),
                container: Some(pb::Container {
                    image: image.clone(),
                    uid: Some(1000),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{image}: {e:?}");
        let e = alice
            .runtime()
            .run_executable(pb::Executable {
                cell: "team-a".into(),
                container: Some(pb::Container {
                    image: image.clone(),
                    uid: Some(1000),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        // No cell team-a: NOT_FOUND before the pull; either way no connection.
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::NotFound),
            "{image}: {e:?}"
        );
        let e = alice
            .images()
            .pull(pb::PullImageRequest {
                image: image.clone(),
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{image}: {e:?}");
        // Removing (another tenant's) image of a registry outside the grant: refused too.
        let e = alice
            .images()
            .remove(pb::RemoveImageRequest {
                image: image.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{image}: {e:?}");
        refused += 4;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let connections = std::iter::from_fn(|| listener.accept().ok()).count();
    assert_eq!(
        connections, 0,
        "auraed connected for a tenant without a registry grant"
    );
    // Nothing was left behind by the refused RunCells.
    let cells = alice
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cells.cells.is_empty(), "{cells:?}");
    println!(
        "pulls without a registry grant: {refused} tried, {refused} refused, {connections} connections"
    );
}
