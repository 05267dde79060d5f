//! Volumes are resolved once (host tier: root, cgroup v2, a loopback registry,
//! busybox-static). A host path is placed under a `--volume-root` by its name alone, checked
//! against the caller's grant, then opened once below its root without following any
//! symlink; the child clones the mount from that fd. So:
//! - a racer swapping a directory for a symlink to `/` never gets the host root mounted
//!   (each request either mounts the real directory or is refused), and the volume's fd
//!   does not reach the container;
//! - a tenant mounts only what its grant's `volumes` list, not another tenant's directory,
//!   not even through a symlink in its own;
//! - errors name only the path the caller sent (`/proc/self/fd/2` never reveals where
//!   auraed's stderr goes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use aurae_client::Client;
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions, oci,
    registry::{LocalRegistry, for_containers},
    workload,
};
use tonic::Code;

struct Env {
    _registry: LocalRegistry,
    d: Daemon,
    image: String,
    /// The volume root (canonical).
    root: PathBuf,
    _root_dir: tempfile::TempDir,
}

async fn env(test: &str, policy: Option<String>) -> Option<Env> {
    let registry = for_containers(test).unwrap()?;
    let host = registry.host();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let root_dir = tempfile::Builder::new()
        .prefix("aurae-volumes-")
        .tempdir()
        .unwrap();
    let root = std::fs::canonicalize(root_dir.path()).unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            extra_args: vec![
                "--insecure-registry".into(),
                host.clone(),
                "--volume-root".into(),
                root.to_string_lossy().into_owned(),
            ],
            policy,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Some(Env {
        image: format!("{host}/aurae/busybox:v1"),
        _registry: registry,
        d,
        root,
        _root_dir: root_dir,
    })
}

impl Env {
    fn container(&self, script: &str, host: &str, target: &str) -> pb::Container {
        pb::Container {
            image: self.image.clone(),
            entrypoint: vec!["sh".into(), "-c".into(), script.into()],
            volumes: vec![pb::Volume {
                host_path: host.into(),
                container_path: target.into(),
                read_only: false,
            }],
            ..Default::default()
        }
    }

    fn containers_left(&self) -> usize {
        std::fs::read_dir(self.d.dir.path().join("state/containers"))
            .map(|r| r.count())
            .unwrap_or(0)
    }
}

async fn allocate(c: &Client, cell: &str) {
    c.cells()
        .allocate(pb::Cell {
            name: cell.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn run(
    c: &Client,
    cell: &str,
    name: &str,
    container: pb::Container,
) -> Result<(pb::ExecutableStatus, String), tonic::Status> {
    let r = workload::run_to_end(
        c,
        pb::Executable {
            cell: cell.into(),
            name: name.into(),
            container: Some(container),
            ..Default::default()
        },
    )
    .await;
    if r.is_ok() {
        c.executables()
            .free(workload::exe_ref(cell, name))
            .await
            .unwrap();
    }
    r
}

/// A file at the host's `/`, seen only by a container that got the host root.
struct HostMarker(PathBuf);

impl HostMarker {
    fn new() -> Self {
        let p = PathBuf::from(format!("/aurae-test-marker-{}", std::process::id()));
        std::fs::write(&p, "host root").unwrap();
        Self(p)
    }

    fn name(&self) -> String {
        self.0.file_name().unwrap().to_string_lossy().into_owned()
    }
}

impl Drop for HostMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The path a message may name besides `sent` and flags: none (no '/' left).
fn names_only(msg: &str, sent: &str) -> bool {
    !msg.replace(sent, "").contains('/')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_swapped_for_a_symlink_never_mounts_the_host_root() {
    let Some(e) = env(
        "a_volume_swapped_for_a_symlink_never_mounts_the_host_root",
        None,
    )
    .await
    else {
        return;
    };
    let c = e.d.client("admin").await.unwrap();
    let marker = HostMarker::new();
    // `flip` is, at any instant, either the real directory or a symlink to `/`: the racer
    // exchanges it with `other` (renameat2 RENAME_EXCHANGE) as fast as it can.
    let flip = e.root.join("flip");
    let other = e.root.join("other");
    std::fs::create_dir(&flip).unwrap();
    std::fs::write(flip.join("real-marker"), "real").unwrap();
    std::os::unix::fs::symlink("/", &other).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let racer = {
        let (stop, flips, flip, other) = (stop.clone(), flips.clone(), flip.clone(), other.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed)
                && nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &flip,
                    nix::fcntl::AT_FDCWD,
                    &other,
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .is_ok()
            {
                flips.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    allocate(&c, "race").await;
    let script = format!(
        "exec 2>/dev/null; \
         if [ -e /vol/{m} ]; then echo vol: host-root; \
         elif [ -e /vol/real-marker ]; then echo vol: real; else echo vol: other; fi; \
         echo fds-begin; ls /proc/$$/fd; echo fds-end",
        m = marker.name()
    );
    let sent = flip.to_string_lossy().into_owned();
    let tries = 30;
    let (mut refused, mut succeeded, mut escaped) = (0, 0, 0);
    // Judged after the race (escapes first): what a successful or refused try got wrong.
    let mut wrong = Vec::new();
    for i in 0..tries {
        let r = run(
            &c,
            "race",
            &format!("try-{i}"),
            e.container(&script, &sent, "/vol"),
        )
        .await;
        match r {
            Ok((_, out)) if out.contains("vol: host-root") => {
                escaped += 1;
                println!("try {i}: ESCAPED: {out}");
            }
            Ok((_, out)) => {
                // The real directory, and only stdio crosses the exec (no volume fd).
                if !out.contains("vol: real") || !out.contains("fds-begin\n0\n1\n2\nfds-end\n") {
                    wrong.push(format!("try {i}: {out}"));
                }
                succeeded += 1;
            }
            Err(s) => {
                // Refused at the open (the name was a symlink then): a clear error that
                // names the field and only the path sent.
                if s.code() != Code::FailedPrecondition
                    || !s.message().contains("container.volumes[0].host_path")
                    || !names_only(s.message(), &sent)
                {
                    wrong.push(format!("try {i}: {s:?}"));
                }
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    println!(
        "race: tried {tries}, refused {refused}, succeeded {succeeded}, escaped {escaped} \
         ({} flips)",
        flips.load(Ordering::Relaxed)
    );
    assert_eq!(escaped, 0, "the host root was mounted");
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(refused + succeeded, tries);
    assert!(
        succeeded > 0,
        "the real directory is mounted when it is there"
    );
    assert!(refused > 0, "the racer did race");
    c.cells()
        .free(pb::NameRef {
            name: "race".into(),
        })
        .await
        .unwrap();
    assert_eq!(e.containers_left(), 0);
    drop(marker);
}

fn tenants_policy() -> String {
    let td = aurae_testkit::TRUST_DOMAIN;
    let mut p = format!(
        "[[grant]]\nid = \"spiffe://{td}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nregistries = [\"*\"]\nvolumes = [\"*\"]\n\n"
    );
    for t in ["a", "b"] {
        p.push_str(&format!(
            "[[grant]]\nid = \"spiffe://{td}/operator/{t}\"\nmethods = [\"*\"]\n\
             names = [\"team-{t}\"]\nallow_uid_zero = true\nuids = [\"1000\"]\ngids = [\"1000\"]\n\
             registries = [\"*\"]\nvolumes = [\"team-{t}\"]\n\n"
        ));
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_mounts_only_the_volumes_its_grant_lists() {
    let Some(e) = env(
        "a_tenant_mounts_only_the_volumes_its_grant_lists",
        Some(tenants_policy()),
    )
    .await
    else {
        return;
    };
    let root = &e.root;
    for d in ["team-a/data", "team-b/secret", "team-ab"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("team-b/secret/key"), "b's").unwrap();
    // A symlink in a's own area into b's.
    std::os::unix::fs::symlink("../team-b/secret", root.join("team-a/to-b")).unwrap();
    let a = e.d.client("a").await.unwrap();
    let b = e.d.client("b").await.unwrap();
    allocate(&a, "team-a").await;
    allocate(&b, "team-b").await;
    let p = |rel: &str| format!("{}/{rel}", root.display());
    // Its own: mounted.
    let (st, out) = run(
        &a,
        "team-a",
        "own",
        e.container("echo mine > /v/a; cat /v/a", &p("team-a/data"), "/v"),
    )
    .await
    .unwrap();
    assert_eq!(
        st.exit.and_then(|x| x.how),
        Some(pb::exit_status::How::Code(0)),
        "{out}"
    );
    assert_eq!(out, "mine\n");
    // Another tenant's, the root itself, a look-alike prefix, the other's through '.' and
    // '//' spellings: PERMISSION_DENIED naming the field, before anything is opened.
    for sent in [
        p("team-b/secret"),
        p("team-b"),
        root.display().to_string(),
        p("team-ab"),
        p("./team-b/secret"),
        format!("{}//team-b/secret", root.display()),
        p("team-b/does-not-exist"),
    ] {
        let err = run(
            &a,
            "team-a",
            "theirs",
            e.container("cat /v/key", &sent, "/v"),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{sent}: {err:?}");
        assert!(
            err.message().contains("container.volumes[0].host_path"),
            "{sent}: {}",
            err.message()
        );
        assert!(err.message().contains(&sent), "{sent}: {}", err.message());
    }
    // Through a symlink in its own area: the grant allows the name, the open refuses it.
    let sent = p("team-a/to-b");
    let err = run(
        &a,
        "team-a",
        "via-link",
        e.container("cat /v/key", &sent, "/v"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(names_only(err.message(), &sent), "{}", err.message());
    // b mounts its own; RunCell checks the same way.
    let (_, out) = run(
        &b,
        "team-b",
        "own",
        e.container("cat /v/key", &p("team-b/secret"), "/v"),
    )
    .await
    .unwrap();
    assert_eq!(out, "b's");
    let err = a
        .runtime()
        .run_cell(pb::Cell {
            name: "team-a/cell".into(),
            container: Some(e.container("cat /v/key", &p("team-b/secret"), "/v")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(e.containers_left(), 0);
    // The admin's grant says volumes = ["*"].
    allocate(&e.d.client("admin").await.unwrap(), "ops").await;
    let (_, out) = run(
        &e.d.client("admin").await.unwrap(),
        "ops",
        "any",
        e.container("cat /v/secret/key", &p("team-b"), "/v"),
    )
    .await
    .unwrap();
    assert_eq!(out, "b's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_errors_name_only_the_path_sent() {
    let Some(e) = env("volume_errors_name_only_the_path_sent", None).await else {
        return;
    };
    let c = e.d.client("admin").await.unwrap();
    allocate(&c, "names").await;
    let root = &e.root;
    std::os::unix::fs::symlink("/proc/self/fd/2", root.join("fd2")).unwrap();
    std::os::unix::fs::symlink("/proc/self/cwd", root.join("cwd")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
    // A file is a volume now (mounted onto a file); a FIFO is neither kind.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // What the old canonicalising check would have revealed: auraed's stderr (its log in
    // the daemon's directory) and working directory.
    let secrets = [
        e.d.dir.path().display().to_string(),
        e.d.log.display().to_string(),
        std::env::current_dir().unwrap().display().to_string(),
    ];
    let under = |n: &str| root.join(n).display().to_string();
    let cases = [
        ("/proc/self/fd/2".to_owned(), Code::FailedPrecondition),
        ("/proc/self/cwd".to_owned(), Code::FailedPrecondition),
        ("/etc".to_owned(), Code::FailedPrecondition),
        (under("fd2"), Code::FailedPrecondition),
        (under("cwd"), Code::FailedPrecondition),
        (under("etc"), Code::FailedPrecondition),
        (under("fifo"), Code::InvalidArgument),
        (under("missing"), Code::InvalidArgument),
    ];
    for (i, (sent, want)) in cases.into_iter().enumerate() {
        let err = run(
            &c,
            "names",
            &format!("n{i}"),
            e.container("true", &sent, "/v"),
        )
        .await
        .unwrap_err();
        let m = err.message();
        println!("{sent}: {:?}: {m}", err.code());
        assert_eq!(err.code(), want, "{sent}: {m}");
        assert!(m.contains("container.volumes[0].host_path"), "{sent}: {m}");
        assert!(m.contains(&sent), "{sent}: {m}");
        assert!(names_only(m, &sent), "{sent}: names another path: {m}");
        for s in &secrets {
            assert!(!m.contains(s.as_str()), "{sent}: reveals {s}: {m}");
        }
        if !sent.starts_with(&root.display().to_string()) {
            assert!(m.contains("--volume-root"), "{sent}: names the flag: {m}");
        }
    }
    assert_eq!(e.containers_left(), 0);
}
