//! A hostile image and a hostile tenant against containers (host tier: root, cgroup v2, a
//! loopback registry, busybox-static). Each test reproduces an attack of the security
//! review and passes only if it is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN, oci,
    registry::{LocalRegistry, for_containers},
    workload,
};
use tonic::Code;

struct Env {
    _registry: LocalRegistry,
    d: Daemon,
    host: String,
}

/// A daemon whose tenant `alice` may use `team-a`, uids/gids 1000-1999 and the loopback
/// registry; the admin may do everything.
async fn env(test: &str) -> Option<Env> {
    let registry = for_containers(test).unwrap()?;
    let host = registry.host();
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nallow_host_namespaces = true\nallow_new_privileges = true\n\
         uids = [\"1-2147483647\"]\ngids = [\"1-2147483647\"]\nregistries = [\"*\"]\nvolumes = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/alice\"\nmethods = [\"*\"]\nnames = [\"team-a\"]\n\
         uids = [\"1000-1999\"]\ngids = [\"1000-1999\"]\nregistries = [\"{host}/aurae\"]\n"
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy),
            extra_args: vec!["--insecure-registry".to_owned(), host.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Some(Env {
        _registry: registry,
        d,
        host,
    })
}

impl Env {
    /// Pushes busybox with image config `config` as `aurae/<repo>:v1`; its reference.
    fn push(&self, repo: &str, config: serde_json::Value) -> String {
        oci::push_busybox(&self.host, &format!("aurae/{repo}"), config).unwrap();
        format!("{}/aurae/{repo}:v1", self.host)
    }

    async fn client(&self, who: &str) -> Client {
        self.d.client(who).await.unwrap()
    }

    fn containers_left(&self) -> usize {
        std::fs::read_dir(self.d.dir.path().join("state/containers"))
            .map(|r| r.count())
            .unwrap_or(0)
    }
}

fn sh(cell: &str, name: &str, script: &str, uid: Option<u32>) -> pb::Executable {
    pb::Executable {
        cell: cell.into(),
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        uid,
        ..Default::default()
    }
}

/// Item 1, from the image: `User: "4294967295"` (or a passwd entry with that uid, or a
/// broken id field) must never become uid 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_user_of_minus_one_is_refused() {
    let Some(e) = env("an_image_user_of_minus_one_is_refused").await else {
        return;
    };
    let admin = e.client("admin").await;
    let alice = e.client("alice").await;
    let mut tried = 0;
    for (i, user) in [
        "4294967295",
        "4294967295:1000",
        "1000:4294967295",
        "2147483648",
    ]
    .iter()
    .enumerate()
    {
        let image = e.push(
            &format!("evil-user-{i}"),
            serde_json::json!({"Cmd": ["id"], "User": user}),
        );
        for (who, c) in [("admin", &admin), ("alice", &alice)] {
            tried += 1;
            let err = c
                .runtime()
                .run_cell(pb::Cell {
                    name: if who == "alice" {
                        "team-a".to_owned()
                    } else {
                        format!("admin-{i}")
                    },
                    container: Some(pb::Container {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{who} {user}: {err:?}");
            assert!(
                err.message().contains("image config User")
                    && err.message().contains("not a valid id"),
                "{who} {user}: {}",
                err.message()
            );
        }
    }
    // The image's own user is authorized like a requested one: root, or a uid outside
    // alice's range, is PERMISSION_DENIED for her.
    for (i, user) in ["0", "root", "4242", ""].iter().enumerate() {
        let image = e.push(
            &format!("user-{i}"),
            serde_json::json!({"Cmd": ["id"], "User": user}),
        );
        tried += 1;
        let err = alice
            .runtime()
            .run_cell(pb::Cell {
                name: "team-a".into(),
                container: Some(pb::Container {
                    image,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{user:?}: {err:?}");
    }
    let cells = admin
        .cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cells.cells.is_empty(), "nothing left behind: {cells:?}");
    assert_eq!(e.containers_left(), 0);
    println!("image users: {tried} tried, {tried} refused");
}

/// Item 7: a container reached the host's files through `/proc/<pid>/root` of a plain
/// executable of its cell running under the same uid. A cell tree now runs one kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_never_share_a_pid_namespace_with_plain_executables() {
    let Some(e) = env("containers_never_share_a_pid_namespace_with_plain_executables").await else {
        return;
    };
    let alice = e.client("alice").await;
    let admin = e.client("admin").await;
    let image = e.push(
        "busybox",
        serde_json::json!({"Cmd": ["sh"], "User": "1000"}),
    );
    let container = |script: &str| pb::Container {
        image: image.clone(),
        entrypoint: vec!["sh".into(), "-c".into(), script.into()],
        uid: Some(1000),
        ..Default::default()
    };
    // The attack's set-up: a container, then a plain executable of the same uid beside it.
    alice
        .runtime()
        .run_cell(pb::Cell {
            name: "team-a".into(),
            container: Some(container("sleep 30")),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = alice
        .runtime()
        .run_executable(sh("team-a", "plain", "sleep 30", Some(1000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("/proc/<pid>/root"),
        "{}",
        err.message()
    );
    // A nested cell shares its parent's PID namespace: refused there too.
    alice
        .cells()
        .allocate(pb::Cell {
            name: "team-a/side".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = alice
        .runtime()
        .run_executable(sh("team-a/side", "plain", "sleep 30", Some(1000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Another container (a sidecar) is fine.
    alice
        .runtime()
        .run_executable(pb::Executable {
            cell: "team-a".into(),
            name: "sidecar".into(),
            container: Some(container("echo sidecar")),
            ..Default::default()
        })
        .await
        .unwrap();
    workload::wait(&alice, "team-a", "sidecar").await.unwrap();
    // The other order: plain first, then a container.
    alice
        .cells()
        .allocate(pb::Cell {
            name: "team-a-plain".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(); // outside alice's names
    admin
        .cells()
        .allocate(pb::Cell {
            name: "mixed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    alice
        .cells()
        .free(pb::NameRef {
            name: "team-a".into(),
        })
        .await
        .unwrap();
    alice
        .cells()
        .allocate(pb::Cell {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    alice
        .runtime()
        .run_executable(sh("team-a", "plain", "sleep 30", Some(1000)))
        .await
        .unwrap();
    let err = alice
        .runtime()
        .run_executable(pb::Executable {
            cell: "team-a".into(),
            name: "c".into(),
            container: Some(container(
                "ls /proc/*/root/etc/hostname 2>/dev/null; cat /proc/*/root/etc/hostname",
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The admin's grant allows host namespaces and so mixing (documented consequence).
    admin
        .runtime()
        .run_executable(sh("mixed", "plain", "true", None))
        .await
        .unwrap();
    admin
        .runtime()
        .run_executable(pb::Executable {
            cell: "mixed".into(),
            name: "c".into(),
            container: Some(container("true")),
            ..Default::default()
        })
        .await
        .unwrap();
    for cell in ["team-a", "mixed"] {
        admin
            .cells()
            .stop(pb::StopRequest {
                name: cell.into(),
                grace_period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
            })
            .await
            .ok();
        admin
            .cells()
            .free(pb::NameRef { name: cell.into() })
            .await
            .unwrap();
    }
    assert_eq!(e.containers_left(), 0);
}
