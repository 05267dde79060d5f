//! Host tier (T1: root, cgroup v2, network namespaces): `RunPod` with cell isolation.
//! The parent auraed and a registry run in a network namespace of their own; the test
//! builds an HTTP server image (busybox httpd and a page, two layers), pushes it, and
//! reaches the pod from inside that namespace.
//!
//! What must show: the page is served from the pod's endpoint; logs stream; the image
//! reaches the instance by digest only; events of the container become the pod's; bad
//! input and faults (taken name, missing image, a port that never opens, a container
//! that exits at once, the instance dying) leave nothing behind; a `kill -9` of the
//! parent costs the pod nothing; free leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{net::SocketAddr, path::Path, time::Duration};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN, oci,
    registry::{LocalRegistry, needs_registry},
    tier::{self, Tier},
};
use tokio_stream::StreamExt;
use tonic::Code;

const PAGE: &str = "<h1>hello from a pod</h1>\n";

struct Env {
    _registry: LocalRegistry,
    d: Daemon,
    c: Client,
    /// `127.0.0.1:<port>` inside the daemon's namespace.
    host: String,
    /// The HTTP server image (listens on 8080).
    image: String,
}

/// A tenant `alice` may use names `team-a…`, uids/gids 1000-1999 (no uid 0, no new
/// privileges) and the registry's `aurae/` repositories; the admin may do everything.
fn policy(host: &str) -> String {
    format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nallow_host_namespaces = true\nallow_new_privileges = true\n\
         uids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\nregistries = [\"*\"]\nvolumes = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/alice\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\n\
         uids = [\"1000-1999\"]\ngids = [\"1000-1999\"]\nregistries = [\"{host}/aurae\"]\n"
    )
}

async fn env(test: &str) -> Option<Env> {
    if !tier::check(
        test,
        Tier::Host,
        tier::needs_cells()
            .or_else(needs_registry)
            .or_else(oci::needs_busybox),
    ) {
        return None;
    }
    aurae_testkit::init_crypto();
    // Any port is free in the daemon's fresh namespace.
    let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let host = addr.to_string();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            own_netns: true,
            policy: Some(policy(&host)),
            extra_args: vec!["--insecure-registry".to_owned(), host.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let registry = LocalRegistry::start_in(d.netns.as_deref(), addr).unwrap();
    let h = host.clone();
    d.in_netns(move || oci::push_http_server(&h, "aurae/web", 8080, PAGE))
        .unwrap()
        .unwrap();
    // Plain busybox too (for pods that run a shell).
    let h = host.clone();
    d.in_netns(move || {
        oci::push_busybox(
            &h,
            "aurae/busybox",
            serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
        )
    })
    .unwrap()
    .unwrap();
    let c = d.client("admin").await.unwrap();
    Some(Env {
        _registry: registry,
        image: format!("{host}/aurae/web:v1"),
        host,
        d,
        c,
    })
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

impl Env {
    fn busybox(&self) -> String {
        format!("{}/aurae/busybox:v1", self.host)
    }

    fn pod(&self, name: &str, image: &str, port: u32) -> pb::Pod {
        pb::Pod {
            name: name.into(),
            container: Some(pb::Container {
                image: image.into(),
                ..Default::default()
            }),
            listen_port: port,
            instance: Some(pb::Instance {
                isolation: pb::Isolation::Cell as i32,
                ready_timeout: secs(30),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A busybox pod running `script` under `sh -c`.
    fn shell_pod(&self, name: &str, script: &str, port: u32) -> pb::Pod {
        let mut p = self.pod(name, &self.busybox(), port);
        if let Some(c) = p.container.as_mut() {
            c.entrypoint = vec!["sh".into(), "-c".into(), script.into()];
        }
        p
    }

    /// GET / from `endpoint`, inside the daemon's namespace: the body.
    fn fetch(&self, endpoint: &str) -> std::io::Result<String> {
        aurae_testkit::http_get(self.d.netns.as_deref(), endpoint, Duration::from_secs(5))
    }

    async fn instances(&self) -> Vec<String> {
        self.c
            .instances()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    async fn pods(&self) -> Vec<String> {
        self.c
            .pods()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .pods
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    /// Nothing of any pod is left: no pod, no instance, no instance cgroup, no veth.
    async fn nothing_left(&self) {
        assert!(self.pods().await.is_empty(), "{:?}", self.pods().await);
        assert!(
            self.instances().await.is_empty(),
            "{:?}",
            self.instances().await
        );
        let cg = self.d.cgroup.clone().unwrap().join("instances");
        let left: Vec<String> = std::fs::read_dir(&cg)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().is_dir() && e.file_name() != "_procs")
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "instance cgroups left: {left:?}");
        let links = self.d.in_netns(links).unwrap();
        assert!(
            !links.iter().any(|l| l.starts_with("aurae-i")),
            "veths left: {links:?}"
        );
    }

    async fn logs(&self, name: &str) -> String {
        aurae_testkit::workload::pod_output(&self.c, name)
            .await
            .unwrap()
    }
}

/// Link names in the current network namespace.
fn links() -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_serves_its_page_streams_logs_and_free_leaves_nothing() {
    let Some(e) = env("pods: run, fetch, logs, free").await else {
        return;
    };
    let mut events =
        e.c.events()
            .watch(pb::WatchEventsRequest {
                kinds: vec![pb::Kind::Pod as i32],
                name_prefix: "web".into(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
    let s =
        e.c.runtime()
            .run_pod(e.pod("web", &e.image, 8080))
            .await
            .unwrap_or_else(|err| panic!("run_pod: {err:?}"))
            .into_inner();
    assert_eq!(s.phase, pb::Phase::Running as i32, "{s:?}");
    let inst = s.instance.clone().unwrap();
    assert_eq!(inst.isolation, pb::Isolation::Cell as i32);
    assert_eq!(
        inst.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/instance/node/web")
    );
    assert_eq!(
        s.endpoint,
        format!("{}:8080", inst.addresses[0]),
        "the endpoint is the instance's bridged address: {s:?}"
    );
    assert!(
        s.image
            .starts_with(&format!("{}/aurae/web@sha256:", e.host)),
        "run by digest: {}",
        s.image
    );
    assert_eq!(s.container, "web");
    // The page, from this machine (the parent's namespace), at once: RunPod returned
    // only once the port accepted connections.
    assert_eq!(e.fetch(&s.endpoint).unwrap(), PAGE);

    // Get: both levels of usage; the cell as the instance sees it.
    let got =
        e.c.pods()
            .get(pb::NameRef { name: "web".into() })
            .await
            .unwrap()
            .into_inner();
    assert!(got.host_stats.is_some(), "{got:?}");
    assert!(got.cell_stats.is_some(), "{got:?}");
    let cell = got.cell.clone().unwrap();
    assert_eq!(cell.name, "web");
    assert_eq!(cell.executables.len(), 1, "{cell:?}");
    assert!(
        cell.namespaces.is_some_and(|n| n.share_host_net),
        "the pod's cell shares the instance's network"
    );

    // Logs: httpd logged the request on stderr, in the instance; streamed through here.
    let log = e.logs("web").await;
    assert!(log.contains("url:/"), "{log}");
    // Follow: a second request shows up on an open stream.
    let mut follow =
        e.c.pods()
            .logs(pb::LogsRequest {
                name: "web".into(),
                follow: true,
                from_offset: log.len() as u64,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(e.fetch(&s.endpoint).unwrap(), PAGE);
    let chunk = tokio::time::timeout(Duration::from_secs(10), follow.next())
        .await
        .expect("a followed log gets the new request")
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&chunk.data).contains("url:/"),
        "{chunk:?}"
    );
    drop(follow);

    // The instance holds the image by digest only: nothing there answers for a tag.
    let child =
        e.d.instance_client("admin", &inst.endpoint, &inst.spiffe_id)
            .await
            .unwrap();
    let images = child
        .images()
        .list(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0].reference, s.image);

    // Stop: the container's end arrives as the pod's event; the pod has EXITED.
    let stopped =
        e.c.pods()
            .stop(pb::StopRequest {
                name: "web".into(),
                grace_period: secs(5),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(stopped.phase, pb::Phase::Exited as i32, "{stopped:?}");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen
        .iter()
        .any(|(t, m): &(i32, String)| *t == pb::EventType::Stopped as i32 && m.is_empty())
    {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("pod events so far: {seen:?}"))
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, pb::Kind::Pod as i32);
        assert_eq!(ev.name, "web");
        seen.push((ev.r#type, ev.message));
    }
    assert!(
        seen.iter()
            .any(|(t, _)| *t == pb::EventType::Started as i32),
        "{seen:?}"
    );

    e.c.pods()
        .free(pb::NameRef { name: "web".into() })
        .await
        .unwrap();
    e.nothing_left().await;
    assert!(e.fetch(&s.endpoint).is_err(), "nothing serves any more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pods_are_refused_and_leave_nothing_behind() {
    let Some(e) = env("pods: bad input and faults").await else {
        return;
    };
    let run = |p: pb::Pod| {
        let c = e.c.clone();
        async move { c.runtime().run_pod(p).await }
    };
    // Refused before anything is made: a bad reference, host volumes, a memory limit
    // that leaves the instance nothing of its own.
    let mut p = e.pod("p1", "Not A Reference", 0);
    let err = run(p.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("container.image"), "{err:?}");
    p.container = Some(pb::Container {
        image: e.busybox(),
        volumes: vec![pb::Volume {
            host_path: "/tmp".into(),
            container_path: "/data".into(),
            read_only: true,
        }],
        ..Default::default()
    });
    let err = run(p).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("container.volumes"), "{err:?}");
    let mut p = e.shell_pod("p1", "sleep 1000", 0);
    p.limits = Some(pb::CellLimits {
        memory_max_bytes: Some(600 << 20),
        ..Default::default()
    });
    if let Some(i) = p.instance.as_mut() {
        i.memory_bytes = 512 << 20;
    }
    let err = run(p).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("limits.memory_max_bytes"),
        "{err:?}"
    );

    // An image the registry does not have: NOT_FOUND, and no instance was made.
    let err = run(e.pod("p1", &format!("{}/aurae/nope:v1", e.host), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(e.instances().await.is_empty());

    // A tenant: only its names and registries, and what it runs gets no new privileges.
    let alice = e.d.client("alice").await.unwrap();
    let err = alice
        .runtime()
        .run_pod(e.shell_pod("team-b", "sleep 1000", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut root = e.shell_pod("team-a", "sleep 1000", 0);
    if let Some(c) = root.container.as_mut() {
        c.uid = Some(0);
    }
    let err = alice.runtime().run_pod(root).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The image's user is root: refused for alice (no allow_uid_zero) before any spawn.
    let err = alice
        .runtime()
        .run_pod(e.shell_pod("team-a", "sleep 1000", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut as_app = e.shell_pod("team-a", "grep NoNewPrivs /proc/self/status; sleep 1000", 0);
    if let Some(c) = as_app.container.as_mut() {
        c.uid = Some(1000);
        c.gid = Some(1000);
    }
    alice.runtime().run_pod(as_app).await.unwrap();
    let mut log = String::new();
    for _ in 0..100 {
        log = e.logs("team-a").await;
        if log.contains("NoNewPrivs") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    // The name is taken: by the pod, and by its instance.
    let err = run(e.shell_pod("team-a", "sleep 1000", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err =
        e.c.runtime()
            .spawn(pb::Instance {
                name: "team-a".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    e.c.pods()
        .free(pb::NameRef {
            name: "team-a".into(),
        })
        .await
        .unwrap();

    // A port that never opens: the deadline, the step named, everything removed.
    let mut never = e.shell_pod("p2", "echo waiting-for-nothing; sleep 1000", 9999);
    if let Some(i) = never.instance.as_mut() {
        i.ready_timeout = secs(3);
    }
    let err = run(never).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("waiting for port 9999"), "{err:?}");
    assert!(err.message().contains("waiting-for-nothing"), "{err:?}");
    e.nothing_left().await;

    // A container that exits at once: its exit code and last lines, everything removed.
    let err = run(e.shell_pod("p3", "echo boom-line >&2; exit 3", 8080))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("exit code 3"), "{err:?}");
    assert!(err.message().contains("boom-line"), "{err:?}");
    e.nothing_left().await;

    // Images/Load is for a parent handing a pod's image to its instance: on a daemon no
    // one spawned, nobody may load (content no registry vouched for), not even the admin.
    let blob = pb::ImageBlob {
        image: format!("{}/aurae/x@sha256:{}", e.host, "0".repeat(64)),
        digest: format!("sha256:{}", "0".repeat(64)),
        size: 1,
        data: vec![0],
    };
    let err =
        e.c.images()
            .load(tokio_stream::iter(vec![blob]))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("only that parent"), "{err:?}");

    // Unknown pods: NOT_FOUND on every verb.
    let err =
        e.c.pods()
            .get(pb::NameRef {
                name: "nope".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// A container that ends by itself: the pod EXITED (or FAILED) with its exit; an instance
/// that dies under a pod: the pod FAILED with the cause; Wait returns for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_ends_with_its_container_or_fails_with_its_instance() {
    let Some(e) = env("pods: container exit, instance death").await else {
        return;
    };
    e.c.runtime()
        .run_pod(e.shell_pod("short", "sleep 1; exit 7", 0))
        .await
        .unwrap();
    let done =
        e.c.pods()
            .wait(pb::WaitRequest {
                name: "short".into(),
                timeout: secs(30),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(done.phase, pb::Phase::Failed as i32, "{done:?}");
    assert_eq!(
        done.exit.and_then(|x| x.how),
        Some(pb::exit_status::How::Code(7)),
        "{:?}",
        done.message
    );

    e.c.runtime()
        .run_pod(e.shell_pod("doomed", "sleep 1000", 0))
        .await
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(e.d.instance_pid("doomed").unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed =
        e.c.pods()
            .wait(pb::WaitRequest {
                name: "doomed".into(),
                timeout: secs(30),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(failed.phase, pb::Phase::Failed as i32, "{failed:?}");
    assert!(
        failed.message.contains("instance ended"),
        "{}",
        failed.message
    );
    let err =
        e.c.pods()
            .logs(pb::LogsRequest {
                name: "doomed".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for name in ["short", "doomed"] {
        e.c.pods()
            .free(pb::NameRef { name: name.into() })
            .await
            .unwrap_or_else(|err| panic!("free {name}: {err:?}"));
    }
    e.nothing_left().await;
}

/// `kill -9` of the parent: the pod keeps serving, and the restarted parent serves it
/// again (Get, logs, stop, free); a pod whose instance died meanwhile is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_parent_costs_a_pod_nothing() {
    let Some(mut e) = env("pods: crash of the parent").await else {
        return;
    };
    let s =
        e.c.runtime()
            .run_pod(e.pod("web", &e.image, 8080))
            .await
            .unwrap()
            .into_inner();
    e.c.runtime()
        .run_pod(e.shell_pod("lost", "sleep 1000", 0))
        .await
        .unwrap();
    let lost_pid = e.d.instance_pid("lost").unwrap();
    e.d.crash().unwrap();
    assert_eq!(
        e.fetch(&s.endpoint).unwrap(),
        PAGE,
        "served while the parent is down"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lost_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    e.d.start_again()
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    e.c = e.d.client("admin").await.unwrap();
    let got =
        e.c.pods()
            .get(pb::NameRef { name: "web".into() })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(got.phase, pb::Phase::Running as i32, "{got:?}");
    assert_eq!(got.endpoint, s.endpoint);
    assert!(got.cell_stats.is_some(), "the instance answers: {got:?}");
    assert_eq!(e.fetch(&s.endpoint).unwrap(), PAGE);
    assert!(e.logs("web").await.contains("url:/"));
    let err =
        e.c.pods()
            .get(pb::NameRef {
                name: "lost".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let info =
        e.c.daemon()
            .info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(
        info.warnings.iter().any(|w| w.contains("pod \"lost\"")),
        "{:?}",
        info.warnings
    );
    e.c.pods()
        .free(pb::NameRef { name: "web".into() })
        .await
        .unwrap();
    e.nothing_left().await;
}
