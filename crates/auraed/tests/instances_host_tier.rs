//! Host tier (T1: root, cgroup v2, network namespaces): `Spawn` with cell isolation. The
//! parent auraed runs in a network namespace of its own (its bridge and the children's
//! veths never touch the host's); the test reaches the children from inside it.
//!
//! What must show: the child is healthy and presents exactly the SPIFFE ID minted for it;
//! RunExecutable works in it; it refuses an operator it was not told about; a child's
//! signer cannot vouch outside its subtree; the parent signs renewals only for its own
//! running children; recursion to the depth limit; free leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_client::Client;
use aurae_identity::{Ca, IssueSpec, SpiffeId};
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN,
    tier::{self, Tier},
    workload,
};
use tonic::Code;

async fn daemon(test: &str) -> Option<(Daemon, Client)> {
    if !tier::check(test, Tier::Host, tier::needs_cells()) {
        return None;
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            own_netns: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some((d, c))
}

fn instance(name: &str) -> pb::Instance {
    pb::Instance {
        name: name.into(),
        ready_timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn spawn(c: &Client, name: &str) -> pb::InstanceStatus {
    c.runtime()
        .spawn(instance(name))
        .await
        .unwrap_or_else(|e| panic!("spawn {name}: {e:?}"))
        .into_inner()
}

fn id(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}{path}")
}

fn exe(cell: &str, name: &str, argv: &[&str]) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: [(
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )]
        .into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_child_serves_with_its_own_identity_and_free_leaves_nothing() {
    let Some((d, c)) = daemon("instances: spawn, use, free").await else {
        return;
    };
    let s = spawn(&c, "i1").await;
    assert_eq!(s.phase, pb::Phase::Running as i32, "{s:?}");
    assert_eq!(s.spiffe_id, id("/instance/node/i1"));
    assert_eq!(s.isolation, pb::Isolation::Cell as i32);
    assert!(s.isolation_reason.starts_with("auto"), "{s:?}");
    assert_eq!(s.depth, 1);
    assert!(s.endpoint.ends_with(":8443"), "{s:?}");
    assert!(s.ready_time.is_some() && s.boot_time.is_some(), "{s:?}");
    assert!(s.svid_expires_at.is_some());
    assert_eq!(s.addresses.len(), 2, "IPv4 and IPv6: {s:?}");

    // The child: exactly that SPIFFE ID, its parent and policy in Daemon/Info.
    let child = d
        .instance_client("admin", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap();
    let info = child
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.server_id, s.spiffe_id);
    assert_eq!(info.mode, "instance");
    assert_eq!(info.parent_id, id("/auraed"));
    assert_eq!(info.depth, 1);
    assert!(
        info.policy.contains(&id("/operator/admin")),
        "{}",
        info.policy
    );
    assert!(info.policy.contains(&id("/auraed")), "{}", info.policy);

    // Expecting another ID fails the handshake: a client never talks to the wrong child.
    let wrong = d
        .instance_client("admin", &s.endpoint, &id("/instance/node/other"))
        .await;
    assert!(wrong.is_err(), "a client expecting another ID must refuse");

    // RunExecutable in the child.
    child
        .cells()
        .allocate(pb::Cell {
            name: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    child
        .runtime()
        .run_executable(exe("c1", "hello", &["/bin/echo", "hello from the child"]))
        .await
        .unwrap();
    let done = workload::wait(&child, "c1", "hello").await.unwrap();
    assert_eq!(
        done.exit.and_then(|e| e.how),
        Some(pb::exit_status::How::Code(0))
    );

    // An operator the parent never named to the child is refused by it.
    let alice = d
        .instance_client("alice", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap();
    let e = alice.daemon().info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The child is isolated: its own network namespace and cgroup subtree.
    let cg = d.cgroup.clone().unwrap().join("instances/i1");
    assert!(cg.is_dir(), "{}", cg.display());
    let child_pid = std::fs::read_to_string(cg.join("_procs/auraed/cgroup.procs"))
        .unwrap()
        .trim()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    let parent_pid = d.pid().unwrap().to_string();
    for kind in ["net", "mnt", "pid", "uts", "ipc", "cgroup"] {
        assert_ne!(
            ns(&child_pid, kind),
            ns(&parent_pid, kind),
            "{kind} namespace"
        );
    }

    // Stop: in order, through the child's Daemon/Shutdown.
    let stopped = c
        .instances()
        .stop(pb::StopRequest {
            name: "i1".into(),
            grace_period: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.phase, pb::Phase::Exited as i32, "{stopped:?}");
    c.instances()
        .free(pb::NameRef { name: "i1".into() })
        .await
        .unwrap();
    let e = c
        .instances()
        .get(pb::NameRef { name: "i1".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(!cg.exists(), "the instance's cgroup is removed");
    let veths = d.in_netns(links).unwrap();
    assert!(
        !veths.iter().any(|l| l.starts_with("aurae-i")),
        "no veth is left: {veths:?}"
    );
    let routes = d
        .in_netns(|| std::fs::read_to_string("/proc/thread-self/net/route").unwrap())
        .unwrap();
    assert_eq!(
        routes.lines().count(),
        2,
        "only the bridge's own route is left: {routes}"
    );
    // The name can be used again.
    let again = spawn(&c, "i1").await;
    assert_eq!(again.phase, pb::Phase::Running as i32);
}

/// The links of the calling thread's network namespace.
fn links() -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spawns_are_refused_and_leave_nothing() {
    let Some((d, c)) = daemon("instances: bad input").await else {
        return;
    };
    let code = |r: Result<tonic::Response<pb::InstanceStatus>, tonic::Status>| {
        let e = r.unwrap_err();
        (e.code(), e.message().to_owned())
    };
    let (k, m) = code(c.runtime().spawn(instance("Bad_Name")).await);
    assert_eq!(k, Code::InvalidArgument, "{m}");
    assert!(m.starts_with("name"), "{m}");
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                isolation: pb::Isolation::VirtualMachine as i32,
                ..instance("v1")
            })
            .await,
    );
    assert_eq!(k, Code::FailedPrecondition, "{m}");
    assert!(m.contains("ISOLATION_VIRTUAL_MACHINE"), "{m}");
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                svid_ttl: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..instance("t1")
            })
            .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{m}");
    assert!(m.starts_with("svid_ttl"), "{m}");
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                kernel_path: "/boot/vmlinuz".into(),
                ..instance("k1")
            })
            .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{m}");

    // Templates: an unknown use, and REQUIRED where there is no microVM to restore.
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                template: 7,
                ..instance("t2")
            })
            .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{m}");
    assert!(m.starts_with("template"), "{m}");
    let required = pb::TemplateUse::TemplateRequired as i32;
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                template: required,
                isolation: pb::Isolation::Cell as i32,
                ..instance("t3")
            })
            .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{m}");
    assert!(m.starts_with("template"), "{m}");
    // AUTO isolation without usable KVM picks a cell: REQUIRED cannot be met.
    let (k, m) = code(
        c.runtime()
            .spawn(pb::Instance {
                template: required,
                ..instance("t4")
            })
            .await,
    );
    assert_eq!(k, Code::FailedPrecondition, "{m}");
    assert!(m.contains("TEMPLATE_REQUIRED"), "{m}");
    // No templates here; removing one that is not stored, or a bad name, says so.
    let t = c
        .instances()
        .list_templates(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(t.templates.is_empty(), "{t:?}");
    for (name, want) in [
        ("t-1x512m-0000000000000000", Code::NotFound),
        ("../vm-snapshots", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let e = c
            .instances()
            .remove_template(pb::NameRef { name: name.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), want, "{name:?}: {e:?}");
    }

    // Name taken.
    spawn(&c, "dup").await;
    let (k, m) = code(c.runtime().spawn(instance("dup")).await);
    assert_eq!(k, Code::AlreadyExists, "{m}");

    // Nothing of the refused ones exists.
    let list = c
        .instances()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["dup"]);
    let cg = d.cgroup.clone().unwrap().join("instances");
    let dirs: Vec<String> = std::fs::read_dir(&cg)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut dirs = dirs;
    dirs.sort();
    assert_eq!(dirs, ["_procs", "dup"], "only dup's cgroup: {dirs:?}");
}

/// A compromised child holds a signer for its own ID: whatever it mints outside its
/// subtree (a sibling, an operator, its parent) is refused by every verifier; and the
/// parent renews only its running children, for exactly their own IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_cannot_reach_outside_its_subtree_and_renewals_are_its_own() {
    let Some((d, c)) = daemon("instances: subtree").await else {
        return;
    };
    let s = spawn(&c, "i1").await;
    // What the parent handed i1: a signer for /instance/node/i1 (made here the same way,
    // from the node's signer in the PKI directory).
    let node = Ca::load_signer(&d.pki.signer_cert, &d.pki.signer_key).unwrap();
    let i1: SpiffeId = s.spiffe_id.parse().unwrap();
    let i1_signer = node
        .issue_intermediate_for(Some(&i1), Duration::from_secs(600))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let connect_as = |path: &str| {
        let (cert, key) = i1_signer
            .issue(&IssueSpec::client(
                SpiffeId::new(TRUST_DOMAIN, path).unwrap(),
                1,
            ))
            .unwrap();
        let name = path.replace('/', "_");
        let (cp, kp) = (
            tmp.path().join(format!("{name}.pem")),
            tmp.path().join(format!("{name}.key")),
        );
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        let tls = aurae_identity::tls::client_config(&d.pki.ca_cert, &cp, &kp).unwrap();
        let socket = d.socket.clone();
        async move {
            let c = Client::connect_with(&aurae_client::Endpoint::Unix(socket), "localhost", tls)
                .await?;
            c.daemon()
                .info(pb::InfoRequest {})
                .await
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        }
    };
    for outside in [
        "/instance/node/i2",
        "/instance/node",
        "/operator/admin",
        "/auraed",
        "/instance/node/i1",
    ] {
        let r = connect_as(outside).await;
        assert!(
            r.is_err(),
            "{outside} minted by i1's signer must be refused"
        );
    }
    // Below its own ID it may mint (its own children), and the parent authenticates it —
    // but grants it nothing.
    let below = connect_as("/instance/node/i1/x").await.unwrap_err();
    assert!(
        format!("{below:?}").contains("PermissionDenied"),
        "{below:?}"
    );

    // Renewals: only for a running child, only its own ID, whatever the request asks.
    let as_id = |path: &str| {
        let (cert, key) = node
            .issue(&IssueSpec::client(
                SpiffeId::new(TRUST_DOMAIN, path).unwrap(),
                1,
            ))
            .unwrap();
        let name = path.replace('/', "_");
        let (cp, kp) = (
            tmp.path().join(format!("r{name}.pem")),
            tmp.path().join(format!("r{name}.key")),
        );
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        aurae_identity::tls::client_config(&d.pki.ca_cert, &cp, &kp).unwrap()
    };
    let renew = |tls: rustls::ClientConfig| {
        let socket = d.socket.clone();
        async move {
            let c = Client::connect_with(&aurae_client::Endpoint::Unix(socket), "localhost", tls)
                .await
                .unwrap();
            let (_, csr) = aurae_identity::pki::key_and_request().unwrap();
            let (_, scsr) = aurae_identity::pki::key_and_request().unwrap();
            c.instances()
                .renew(pb::RenewRequest {
                    csr_pem: csr,
                    signer_csr_pem: scsr,
                })
                .await
        }
    };
    let ok = renew(as_id("/instance/node/i1"))
        .await
        .unwrap()
        .into_inner();
    let leaf = aurae_identity::tls::certs_from_pem(&ok.cert_chain_pem).unwrap();
    assert_eq!(
        aurae_identity::peer_spiffe_id(&leaf[0])
            .unwrap()
            .to_string(),
        s.spiffe_id
    );
    assert!(ok.expires_at.is_some());
    let ghost = renew(as_id("/instance/node/ghost")).await.unwrap_err();
    assert_eq!(ghost.code(), Code::NotFound, "{ghost:?}");
    // Only Renew: the child's identity is granted nothing else on its parent.
    let tls = as_id("/instance/node/i1");
    let cc = Client::connect_with(
        &aurae_client::Endpoint::Unix(d.socket.clone()),
        "localhost",
        tls,
    )
    .await
    .unwrap();
    let e = cc
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A bad request names its field.
    let e = cc
        .instances()
        .renew(pb::RenewRequest {
            csr_pem: "not a csr".into(),
            signer_csr_pem: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("csr_pem"), "{e:?}");
}

/// L1 spawns L2 (depth 2, the default limit); L2 may not spawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_spawns_its_own_child_to_the_depth_limit() {
    let Some((d, c)) = daemon("instances: recursion").await else {
        return;
    };
    let s = spawn(&c, "l1").await;
    let l1 = d
        .instance_client("admin", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap();
    let s2 = spawn(&l1, "l2").await;
    assert_eq!(s2.spiffe_id, id("/instance/node/l1/l2"));
    assert_eq!(s2.depth, 2);
    // Reached from the top through the route the parent added via l1.
    let l2 = d
        .instance_client("admin", &s2.endpoint, &s2.spiffe_id)
        .await
        .unwrap();
    let info = l2
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.parent_id, s.spiffe_id);
    let e = l2.runtime().spawn(instance("l3")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("depth"), "{e:?}");
    // Freeing l1 takes l2 with it.
    c.instances()
        .free(pb::NameRef { name: "l1".into() })
        .await
        .unwrap();
    assert!(!d.cgroup.clone().unwrap().join("instances/l1").exists());
}

/// `kill -9` of the parent: the children keep serving and are re-adopted by the
/// restarted parent (the same processes); one that died while the parent was down is
/// reported, its record removed and its cgroup swept; free still leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_parent_costs_its_children_nothing() {
    let Some((mut d, c)) = daemon("instances: crash of the parent").await else {
        return;
    };
    let s = spawn(&c, "keep").await;
    let lost = spawn(&c, "lost").await;
    let (keep_pid, lost_pid) = (
        d.instance_pid("keep").unwrap(),
        d.instance_pid("lost").unwrap(),
    );
    drop(c);
    d.crash().unwrap();
    // While the parent is down, one child dies (killed by its pid, which is still its).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lost_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.start_again().await.unwrap_or_else(|e| panic!("{e}"));
    let c = d.client("admin").await.unwrap();
    let got = c
        .instances()
        .get(pb::NameRef {
            name: "keep".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.phase, pb::Phase::Running as i32, "{got:?}");
    assert_eq!(got.spiffe_id, s.spiffe_id);
    assert_eq!(
        d.instance_pid("keep").unwrap(),
        keep_pid,
        "the same process serves on"
    );
    let child = d
        .instance_client("admin", &got.endpoint, &got.spiffe_id)
        .await
        .unwrap();
    child.daemon().info(pb::InfoRequest {}).await.unwrap();
    // The lost one: reported, gone, its cgroup swept.
    let e = c
        .instances()
        .get(pb::NameRef {
            name: "lost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.warnings.iter().any(|w| w.contains("\"lost\"")),
        "{:?}",
        info.warnings
    );
    let cg = d.cgroup.clone().unwrap().join("instances");
    assert!(!cg.join("lost").exists(), "the lost one's cgroup is swept");
    // A new spawn after the restart gets a fresh veth; the lost one's address is free.
    let fresh = spawn(&c, "fresh").await;
    assert_ne!(fresh.endpoint, s.endpoint);
    assert_eq!(
        fresh.endpoint, lost.endpoint,
        "the lost one's address is reused"
    );
    for name in ["keep", "fresh"] {
        c.instances()
            .free(pb::NameRef { name: name.into() })
            .await
            .unwrap_or_else(|e| panic!("free {name}: {e:?}"));
    }
    let left: Vec<String> = std::fs::read_dir(&cg)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["_procs"], "no instance cgroup is left: {left:?}");
    let veths = d.in_netns(links).unwrap();
    assert!(
        !veths.iter().any(|l| l.starts_with("aurae-i")),
        "no veth is left: {veths:?}"
    );
}

/// The child renews its SVID through its parent at two thirds of its lifetime (here 2 min,
/// the shortest allowed): the parent's status shows the new expiry, and the child still
/// answers new handshakes with the same SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_renews_its_svid_before_it_expires() {
    let Some((d, c)) = daemon("instances: renewal").await else {
        return;
    };
    let s = c
        .runtime()
        .spawn(pb::Instance {
            svid_ttl: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
            ..instance("short")
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.svid_expires_at.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(110);
    let renewed = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = c
            .instances()
            .get(pb::NameRef {
                name: "short".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let at = now.svid_expires_at.unwrap();
        if at.seconds > first.seconds {
            break at;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal within 110 s of a 120 s SVID"
        );
    };
    assert!(
        renewed.seconds >= first.seconds + 60,
        "{first:?} -> {renewed:?}"
    );
    // A new connection: the child presents its renewed certificate, same SPIFFE ID.
    let child = d
        .instance_client("admin", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap();
    let info = child
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.server_id, s.spiffe_id);
    let log = std::fs::read_to_string(d.dir.path().join("state/logs/instances/short.log"))
        .unwrap_or_default();
    assert!(log.contains("renewed this instance's SVID"), "{log}");
}

/// A tenant may spawn only under its names and within its quota; the child serves it with
/// its own grant (not the parent's), so what it could not do on the parent it cannot do in
/// the child either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_spawns_within_its_names_and_quota() {
    if !tier::check("instances: tenant quota", Tier::Host, tier::needs_cells()) {
        return;
    }
    let policy = format!(
        r#"
[[grant]]
id = "{admin}"
methods = ["*"]
names = ["*"]

[[grant]]
id = "{bob}"
methods = ["aurae.runtime.v0.Runtime/Spawn", "aurae.runtime.v0.Instances/*",
           "aurae.runtime.v0.Daemon/Info", "aurae.runtime.v0.Cells/*"]
names = ["bob-*"]
[grant.quota]
instances = 1
memory_bytes = 1073741824
"#,
        admin = id("/operator/admin"),
        bob = id("/operator/bob"),
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            own_netns: true,
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let bob = d.client("bob").await.unwrap();
    // Templates belong to the daemon: outside bob's names.
    let e = bob
        .instances()
        .remove_template(pb::NameRef {
            name: "t-1x512m-0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = bob.runtime().spawn(instance("alice-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let big = bob
        .runtime()
        .spawn(pb::Instance {
            memory_bytes: 2 << 30,
            ..instance("bob-big")
        })
        .await
        .unwrap_err();
    assert_eq!(big.code(), Code::ResourceExhausted, "{big:?}");
    assert!(big.message().contains("quota.memory_bytes"), "{big:?}");
    let s = spawn(&bob, "bob-1").await;
    let e = bob.runtime().spawn(instance("bob-2")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("quota.instances"), "{e:?}");
    // In the child, bob has bob's grant: its names, its methods.
    let child = d
        .instance_client("bob", &s.endpoint, &s.spiffe_id)
        .await
        .unwrap();
    let info = child
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.granted_prefixes, ["bob-*"]);
    let e = child
        .cells()
        .allocate(pb::Cell {
            name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = child
        .runtime()
        .run_executable(exe("bob-c", "x", &["/bin/true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Freed, the quota is free again.
    bob.instances()
        .free(pb::NameRef {
            name: "bob-1".into(),
        })
        .await
        .unwrap();
    spawn(&bob, "bob-2").await;
}

/// A child that presents another instance's certificate (a compromised or impostor
/// child) is refused at once: Spawn fails naming the identity it presented, and
/// everything made for it is removed. The impostor: a TLS server on the address the
/// child will get, bound inside the parent's network namespace (so the parent reaches it
/// instead of the child), presenting a sibling's SVID minted with the node's signer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_presenting_a_foreign_svid_is_refused() {
    let Some((d, c)) = daemon("instances: foreign SVID").await else {
        return;
    };
    // The first spawn makes the bridge; the next address handed out is the one freed.
    spawn(&c, "first").await;
    c.instances()
        .free(pb::NameRef {
            name: "first".into(),
        })
        .await
        .unwrap();
    let node = Ca::load_signer(&d.pki.signer_cert, &d.pki.signer_key).unwrap();
    let (cert, key) = node
        .issue(&IssueSpec::instance(
            SpiffeId::new(TRUST_DOMAIN, "/instance/node/sibling").unwrap(),
            vec!["10.200.0.2".parse().unwrap()],
            Duration::from_secs(600),
        ))
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("c.pem"), cert).unwrap();
    std::fs::write(tmp.path().join("k.pem"), key).unwrap();
    let (server, _, _) = aurae_identity::tls::server_config(
        &d.pki.ca_cert,
        &tmp.path().join("c.pem"),
        &tmp.path().join("k.pem"),
    )
    .unwrap();
    // The impostor's address on lo in the parent's namespace, and its listener there.
    let ns = d.netns.clone().unwrap();
    let ip = |args: &[&str]| aurae_testkit::ip(args).unwrap();
    ip(&["-n", &ns, "addr", "add", "10.200.0.2/32", "dev", "lo"]);
    let listener = d
        .in_netns(|| std::net::TcpListener::bind("10.200.0.2:8443"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let impostor = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let _ = acceptor.accept(s).await;
        }
    });
    let e = c.runtime().spawn(instance("victim")).await.unwrap_err();
    impostor.abort();
    ip(&["-n", &ns, "addr", "del", "10.200.0.2/32", "dev", "lo"]);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("presented the wrong identity")
            && e.message().contains("/instance/node/sibling"),
        "{e:?}"
    );
    let list = c
        .instances()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.instances.is_empty(), "{list:?}");
    assert!(
        !d.cgroup.clone().unwrap().join("instances/victim").exists(),
        "its cgroup is removed"
    );
    let veths = d.in_netns(links).unwrap();
    assert!(!veths.iter().any(|l| l.starts_with("aurae-i")), "{veths:?}");
}
