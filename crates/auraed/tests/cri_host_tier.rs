//! The Kubernetes CRI (runtime.v1) against a running auraed, as kubelet drives it (host
//! tier: root, cgroup v2, a loopback registry, busybox-static). A tonic client of the
//! published CRI proto on `--cri-socket` walks the areas of the CRI validation suite we
//! serve: runtime info and status, images, sandboxes, containers, logs, stats; then bad
//! input, the CRI identity's grant, and a kill -9 of auraed with a pod running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aurae_proto::{
    cri::v1::{
        self as cri, image_service_client::ImageServiceClient,
        runtime_service_client::RuntimeServiceClient,
    },
    runtime::v0 as pb,
};
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN,
    cri::{container_config, container_status, create_container, log_has, sandbox_config},
    oci,
    registry::{LocalRegistry, for_containers},
};
use tonic::{Code, transport::Channel};

struct Env {
    _registry: LocalRegistry,
    d: Daemon,
    host: String,
    /// Holds the CRI socket (a 0700 directory) and the pods' log directories.
    tmp: tempfile::TempDir,
}

impl Env {
    fn socket(&self) -> PathBuf {
        self.tmp.path().join("run/cri.sock")
    }

    async fn cri(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        cri_at(&self.socket()).await
    }

    /// Pushes busybox as `aurae/<repo>:v1`; its reference.
    fn push(&self, repo: &str) -> String {
        oci::push_busybox(&self.host, &format!("aurae/{repo}"), serde_json::json!({})).unwrap();
        format!("{}/aurae/{repo}:v1", self.host)
    }

    /// Pushes busybox and pulls it through the CRI (as kubelet does before a container).
    async fn pulled(&self, im: &mut ImageServiceClient<Channel>, repo: &str) -> String {
        let image = self.push(repo);
        im.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        image
    }

    fn log_dir(&self, pod: &str) -> PathBuf {
        let d = self.tmp.path().join("pods").join(pod);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// CRI clients on the socket at `path` (plain gRPC over the Unix socket, as kubelet).
async fn cri_at(path: &Path) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    aurae_testkit::cri::clients(path).await.unwrap()
}

/// The CRI identity's grant: sandboxes and containers under `k8s-*`, the loopback
/// registry, no root; the admin may do everything (to look at what the CRI made).
fn policy(host: &str, cri_methods: &str) -> String {
    format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nregistries = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/cri\"\nmethods = {cri_methods}\nnames = [\"k8s-*\"]\n\
         allow_uid_zero = true\nuids = [\"1-65535\"]\ngids = [\"1-65535\"]\nregistries = [\"{host}/aurae\"]\nvolumes = [\"pods\"]\n"
    )
}

async fn env_with(test: &str, cri_methods: &str) -> Option<Env> {
    let registry = for_containers(test).unwrap()?;
    let host = registry.host();
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run/cri.sock");
    // kubelet's own files (a pod's /etc/hosts, a container's termination log) live here.
    std::fs::create_dir_all(tmp.path().join("kubelet")).unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy(&host, cri_methods)),
            extra_args: vec![
                "--insecure-registry".to_owned(),
                host.clone(),
                "--cri-socket".to_owned(),
                socket.display().to_string(),
                "--cri-log-root".to_owned(),
                tmp.path().join("pods").display().to_string(),
                "--volume-root".to_owned(),
                tmp.path().join("kubelet").display().to_string(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Some(Env {
        _registry: registry,
        d,
        host,
        tmp,
    })
}

async fn env(test: &str) -> Option<Env> {
    env_with(test, "[\"*\"]").await
}

async fn run_sandbox(
    rt: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
) -> String {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .pod_sandbox_id
}

/// Waits (bounded) until `id` has exited; its status.
async fn exited(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> cri::ContainerStatus {
    let t = Instant::now();
    loop {
        let s = container_status(rt, id).await.unwrap();
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{id} still runs: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cells auraed has (seen by the admin).
async fn cells(d: &Daemon) -> Vec<String> {
    let c = d.client("admin").await.unwrap();
    c.cells()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cells
        .into_iter()
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_walks_runtime_images_sandboxes_containers_logs_and_stats() {
    let Some(e) = env("cri_walks_runtime_images_sandboxes_containers_logs_and_stats").await else {
        return;
    };
    let image = e.push("busybox");
    let (mut rt, mut im) = e.cri().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(e.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the CRI socket is for root only");

    // Runtime info.
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("auraed", "v1")
    );
    let st = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conds = st.status.unwrap().conditions;
    let cond = |t: &str| conds.iter().find(|c| c.r#type == t).unwrap().clone();
    assert!(cond("RuntimeReady").status);
    let net = cond("NetworkReady");
    assert!(!net.status && net.message.contains("CNI"), "{net:?}");
    assert!(
        st.info["config"].contains("spiffe://aurae.test/cri"),
        "{:?}",
        st.info
    );
    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rc.linux.unwrap().cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    // Images: pull, status by tag / image_ref / id, list, filesystem.
    let spec = |i: &str| {
        Some(cri::ImageSpec {
            image: i.to_owned(),
            ..Default::default()
        })
    };
    let pulled = im
        .pull_image(cri::PullImageRequest {
            image: spec(&image),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    assert!(
        pulled.starts_with("sha256:"),
        "image_ref is the image's id: {pulled}"
    );
    let by_tag = im
        .image_status(cri::ImageStatusRequest {
            image: spec(&image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(by_tag.repo_tags, vec![image.clone()]);
    assert_eq!(
        by_tag.repo_digests,
        vec![format!("{}/aurae/busybox@{pulled}", e.host)]
    );
    assert!(by_tag.size > 0 && by_tag.id == pulled);
    for other in [pulled.clone(), by_tag.repo_digests[0].clone()] {
        let s = im
            .image_status(cri::ImageStatusRequest {
                image: spec(&other),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.image.map(|i| i.id), Some(by_tag.id.clone()), "{other}");
    }
    let none = im
        .image_status(cri::ImageStatusRequest {
            image: spec(&format!("{}/aurae/never:v1", e.host)),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        none.image.is_none(),
        "an image not stored is an empty answer"
    );
    let listed = im
        .list_images(cri::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.images.iter().any(|i| i.id == by_tag.id));
    let fs = im
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value >= by_tag.size);

    // A sandbox: a cell with the pod's hostname; the same metadata again is the same one.
    let log_dir = e.log_dir("default_web_u1");
    let mut sbc = sandbox_config("web", "u1", &log_dir);
    // As kubelet sends ClusterFirst: the cluster's DNS service, the pod's search path.
    sbc.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec![
            "default.svc.cluster.local".into(),
            "svc.cluster.local".into(),
        ],
        options: vec!["ndots:5".into()],
    });
    let sb = run_sandbox(&mut rt, &sbc).await;
    assert_eq!(sb.len(), 64);
    assert_eq!(
        run_sandbox(&mut rt, &sbc).await,
        sb,
        "kubelet's retry gets the same id"
    );
    let cell = format!("k8s-{}", &sb[..16]);
    assert!(cells(&e.d).await.contains(&cell));
    let s = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sb[..12].to_owned(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let sbs = s.status.unwrap();
    assert_eq!(sbs.id, sb, "a unique prefix finds the sandbox");
    assert_eq!(sbs.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(sbs.metadata.unwrap().name, "web");
    assert_eq!(sbs.labels["app"], "web");
    assert!(s.info["info"].contains(&cell));
    let listed = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: [("app".to_owned(), "web".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    let other = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: [("app".to_owned(), "db".to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(other.is_empty());

    // A container: created, started once, its output in the CRI log format; with the
    // files kubelet mounts into every container (the pod's /etc/hosts, a termination log
    // in /dev).
    let kubelet = e.tmp.path().join("kubelet/pods/u1");
    std::fs::create_dir_all(kubelet.join("containers/app")).unwrap();
    std::fs::write(
        kubelet.join("etc-hosts"),
        "127.0.0.1 localhost\n10.0.0.1 web-0\n",
    )
    .unwrap();
    std::fs::write(kubelet.join("containers/app/1a2b"), "").unwrap();
    let mut appc = container_config(
        "app",
        &pulled,
        Some(
            "echo inside > /marker; echo $GREETING; echo oops >&2; hostname; printf 'no newline'; sleep 1; echo; exec sleep 60",
        ),
    );
    appc.mounts = vec![
        cri::Mount {
            container_path: "/etc/hosts".into(),
            host_path: kubelet.join("etc-hosts").display().to_string(),
            ..Default::default()
        },
        cri::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: kubelet.join("containers/app/1a2b").display().to_string(),
            ..Default::default()
        },
    ];
    let app = create_container(&mut rt, &sb, appc, &sbc, &log_dir)
        .await
        .unwrap();
    let s = container_status(&mut rt, &app).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert_eq!(s.log_path, log_dir.join("app/0.log").display().to_string());
    let dup = create_container(
        &mut rt,
        &sb,
        container_config("app", &pulled, Some("true")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    rt.start_container(cri::StartContainerRequest {
        container_id: app.clone(),
    })
    .await
    .unwrap();
    let again = rt
        .start_container(cri::StartContainerRequest {
            container_id: app.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let s = container_status(&mut rt, &app).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    assert!(s.started_at >= s.created_at && s.created_at > 0);
    let lines = log_has(
        &log_dir.join("app/0.log"),
        "stdout F no newline",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    for want in [" stdout F hello", " stderr F oops", " stdout F web-0"] {
        assert!(lines.iter().any(|l| l.ends_with(want)), "{want}: {lines:?}");
    }
    // Every line: an RFC 3339 time, the stream, the tag, the text.
    for l in &lines {
        let parts: Vec<&str> = l.splitn(4, ' ').collect();
        assert!(parts[0].len() >= 20 && parts[0].ends_with('Z'), "{l}");
        assert!(
            ["stdout", "stderr"].contains(&parts[1]) && ["F", "P"].contains(&parts[2]),
            "{l}"
        );
    }
    let running = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                pod_sandbox_id: sb.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, app);
    assert_eq!(running[0].image_ref, pulled);
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: app.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(stats.attributes.unwrap().id, app);
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    let pod_stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(pod_stats.attributes.unwrap().id, sb);
    assert_eq!(pod_stats.linux.unwrap().containers.len(), 1);
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: app.clone(),
    })
    .await
    .unwrap();

    // ExecSync: inside the container (its root, hostname, environment), with its
    // capability bounding set, no_new_privs and seccomp filter; its exit and both outputs.
    let ex = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: app.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat /marker; echo err >&2; id -u; hostname; echo $GREETING; \
                 grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; exit 4"
                    .into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let out = String::from_utf8_lossy(&ex.stdout);
    assert_eq!(ex.exit_code, 4, "{out}");
    assert_eq!(String::from_utf8_lossy(&ex.stderr), "err\n");
    assert!(out.starts_with("inside\n0\nweb-0\nhello\n"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a00425fb"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(
        !Path::new("/marker").exists(),
        "the marker is in the container, not here"
    );
    // The pod's DNS settings and kubelet's files, each a file mounted onto a file.
    let ex = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: app.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat /etc/resolv.conf /etc/hosts; echo 'bye' > /dev/termination-log; \
                 if echo x >> /etc/resolv.conf; then echo resolv-writable; fi 2>/dev/null; true"
                    .into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let out = String::from_utf8_lossy(&ex.stdout);
    assert_eq!(ex.exit_code, 0, "{out}");
    assert!(
        out.contains(
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        ),
        "{out}"
    );
    assert!(out.contains("10.0.0.1 web-0"), "{out}");
    assert!(!out.contains("resolv-writable"), "{out}");
    assert_eq!(
        std::fs::read_to_string(kubelet.join("containers/app/1a2b")).unwrap(),
        "bye\n",
        "the termination message reached kubelet's file"
    );
    let slow = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: app.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(slow.code(), Code::DeadlineExceeded, "{slow:?}");
    let missing = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: app.clone(),
            cmd: vec!["no-such-program".into()],
            timeout: 5,
        })
        .await
        .unwrap_err();
    assert!(
        missing.message().contains("no-such-program") || missing.message().contains("exec"),
        "{missing:?}"
    );
    let ex = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: "f".repeat(64),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(ex.code(), Code::NotFound);
    // Attach's input and terminal are the container's own: one created without them has
    // neither.
    for (req, field) in [
        (
            cri::AttachRequest {
                container_id: app.clone(),
                stdin: true,
                stdout: true,
                ..Default::default()
            },
            "stdin",
        ),
        (
            cri::AttachRequest {
                container_id: app.clone(),
                tty: true,
                stdout: true,
                ..Default::default()
            },
            "tty",
        ),
        (
            cri::AttachRequest {
                container_id: app.clone(),
                ..Default::default()
            },
            "stdout",
        ),
    ] {
        let at = rt.attach(req).await.unwrap_err();
        assert_eq!(at.code(), Code::InvalidArgument, "{at:?}");
        assert!(at.message().starts_with(field), "{field}: {at:?}");
    }
    let at = rt
        .attach(cri::AttachRequest {
            container_id: "f".repeat(64),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(at.code(), Code::NotFound);

    // Exits: a code, a kill, a clean end, each with its CRI reason.
    let job = create_container(
        &mut rt,
        &sb,
        container_config("job", &pulled, Some("echo done; exit 3")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    let ok = create_container(
        &mut rt,
        &sb,
        container_config("ok", &pulled, Some("true")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    for id in [&job, &ok] {
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    }
    let s = exited(&mut rt, &job).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
    let gone = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: job.clone(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::FailedPrecondition, "{gone:?}");
    assert!(s.finished_at >= s.started_at);
    log_has(
        &log_dir.join("job/0.log"),
        "stdout F done",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let s = exited(&mut rt, &ok).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    rt.stop_container(cri::StopContainerRequest {
        container_id: app.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    let s = exited(&mut rt, &app).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "Error"), "{s:?}");
    rt.stop_container(cri::StopContainerRequest {
        container_id: app.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: ok.clone(),
    })
    .await
    .unwrap();
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: ok.clone(),
    })
    .await
    .expect("removing a removed container succeeds");
    let left = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(left.len(), 2, "{left:?}");

    // Stopped: NOTREADY, no new containers; removed: nothing left, the cell gone.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let s = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sb.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    let late = create_container(
        &mut rt,
        &sb,
        container_config("late", &pulled, Some("true")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .expect("removing a removed sandbox succeeds");
    assert!(
        rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty()
    );
    assert!(
        rt.list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty()
    );
    assert!(!cells(&e.d).await.contains(&cell));
    let gone = rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Removing the image by its image_ref.
    im.remove_image(cri::RemoveImageRequest {
        image: spec(&pulled),
    })
    .await
    .unwrap();
    let s = im
        .image_status(cri::ImageStatusRequest {
            image: spec(&image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.image.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_bad_input_is_refused_naming_the_field_and_loses_nothing() {
    let Some(e) = env("cri_bad_input_is_refused_naming_the_field_and_loses_nothing").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let log_dir = e.log_dir("bad");
    let good = sandbox_config("bad", "u2", &log_dir);
    let expect = |r: Result<tonic::Response<cri::RunPodSandboxResponse>, tonic::Status>,
                  code: Code,
                  field: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    };
    let run = |c: Option<cri::PodSandboxConfig>, handler: &str| cri::RunPodSandboxRequest {
        config: c,
        runtime_handler: handler.to_owned(),
    };
    expect(
        rt.run_pod_sandbox(run(None, "")).await,
        Code::InvalidArgument,
        "config",
    );
    let mut c = good.clone();
    c.metadata.as_mut().unwrap().uid.clear();
    expect(
        rt.run_pod_sandbox(run(Some(c), "")).await,
        Code::InvalidArgument,
        "config.metadata.uid",
    );
    let mut c = good.clone();
    c.metadata.as_mut().unwrap().name = "a;IP=10.0.0.9".into();
    expect(
        rt.run_pod_sandbox(run(Some(c), "")).await,
        Code::InvalidArgument,
        "config.metadata.name",
    );
    for dir in ["/etc", "relative", "/tmp/../etc"] {
        let mut c = good.clone();
        c.log_directory = dir.into();
        expect(
            rt.run_pod_sandbox(run(Some(c), "")).await,
            Code::InvalidArgument,
            "config.log_directory",
        );
    }
    let mut c = good.clone();
    c.hostname = "Bad_Host".into();
    expect(
        rt.run_pod_sandbox(run(Some(c), "")).await,
        Code::InvalidArgument,
        "config.hostname",
    );
    // DNS settings become resolv.conf lines: nothing that could start another line.
    for (dns, field) in [
        (
            cri::DnsConfig {
                servers: vec!["10.0.0.1\nnameserver 6.6.6.6".into()],
                ..Default::default()
            },
            "config.dns_config.servers[0]",
        ),
        (
            cri::DnsConfig {
                searches: vec!["svc.cluster.local evil.example".into()],
                ..Default::default()
            },
            "config.dns_config.searches[0]",
        ),
        (
            cri::DnsConfig {
                options: vec!["ndots:5\nnameserver".into()],
                ..Default::default()
            },
            "config.dns_config.options[0]",
        ),
        (
            cri::DnsConfig {
                servers: vec!["1.1.1.1".into(); 4],
                ..Default::default()
            },
            "config.dns_config.servers",
        ),
    ] {
        let mut c = good.clone();
        c.dns_config = Some(dns);
        expect(
            rt.run_pod_sandbox(run(Some(c), "")).await,
            Code::InvalidArgument,
            field,
        );
    }
    let mut c = good.clone();
    c.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    expect(
        rt.run_pod_sandbox(run(Some(c), "")).await,
        Code::InvalidArgument,
        "privileged",
    );
    // An aurae-vm sandbox is an instance of its own: it shares nothing of the node
    // (refused before anything is spawned; the handler's own walk is in
    // cri_instances_host_tier.rs).
    let mut c = good.clone();
    c.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    expect(
        rt.run_pod_sandbox(run(Some(c), "aurae-vm")).await,
        Code::InvalidArgument,
        "namespace_options.pid",
    );
    expect(
        rt.run_pod_sandbox(run(Some(good.clone()), "runc")).await,
        Code::InvalidArgument,
        "runtime_handler",
    );
    // Nothing was made by any of those.
    assert!(
        rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty()
    );
    assert!(!cells(&e.d).await.iter().any(|c| c.starts_with("k8s-")));

    // Unknown ids.
    let unknown = "0".repeat(64);
    let nf = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);
    for r in [
        rt.start_container(cri::StartContainerRequest {
            container_id: unknown.clone(),
        })
        .await
        .map(|_| ()),
        rt.stop_container(cri::StopContainerRequest {
            container_id: unknown.clone(),
            timeout: 1,
        })
        .await
        .map(|_| ()),
        rt.container_status(cri::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await
        .map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
    }
    let nf = create_container(
        &mut rt,
        &unknown,
        container_config("x", &image, Some("true")),
        &good,
        &log_dir,
    )
    .await
    .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);

    // Containers: an image not pulled, a uid the kernel reads as "unchanged", a log path
    // out of the pod's directory; each refused naming the field, nothing recorded.
    let sb = run_sandbox(&mut rt, &good).await;
    let cases: Vec<(cri::ContainerConfig, Code, &str)> = vec![
        (
            container_config("a", &format!("{}/aurae/never:v1", e.host), Some("true")),
            Code::NotFound,
            "config.image.image",
        ),
        (
            {
                let mut c = container_config("b", &image, Some("true"));
                c.linux = Some(cri::LinuxContainerConfig {
                    security_context: Some(cri::LinuxContainerSecurityContext {
                        run_as_user: Some(cri::Int64Value {
                            value: 4_294_967_295,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                c
            },
            Code::InvalidArgument,
            "run_as_user",
        ),
        (
            {
                let mut c = container_config("c", &image, Some("true"));
                c.log_path = "../../escape.log".into();
                c
            },
            Code::InvalidArgument,
            "config.log_path",
        ),
        (
            {
                let mut c = container_config("d", &image, Some("true"));
                c.metadata = None;
                c
            },
            Code::InvalidArgument,
            "config.metadata",
        ),
    ];
    for (c, code, field) in cases {
        let err = create_container(&mut rt, &sb, c, &good, &log_dir)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(
        rt.list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty()
    );
    // A uid outside the CRI identity's grant: created (the grant is checked at the
    // start, as RunExecutable checks it), refused at the start, recorded as a StartError.
    let mut c = container_config("e", &image, Some("true"));
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 70_000 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = create_container(&mut rt, &sb, c, &good, &log_dir)
        .await
        .unwrap();
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let s = container_status(&mut rt, &id).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.reason, "StartError");
    assert!(s.message.contains("uid 70000"), "{}", s.message);
    // A log path through a symlink (to a directory outside the log root) is refused at the
    // start and nothing is written there.
    let outside = e.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, log_dir.join("link")).unwrap();
    let mut c = container_config("f", &image, Some("echo leaked"));
    c.log_path = "link/0.log".into();
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: Some(c),
            sandbox_config: None,
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(!outside.join("0.log").exists());
    assert_eq!(
        container_status(&mut rt, &id).await.unwrap().state,
        cri::ContainerState::ContainerCreated as i32,
        "a start refused before anything ran leaves it CREATED"
    );
    // Per-pull credentials are refused, not ignored.
    let err = im
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            auth: Some(cri::AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("auth:"), "{err:?}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb })
        .await
        .unwrap();
    assert!(!cells(&e.d).await.iter().any(|c| c.starts_with("k8s-")));
}

/// The next event of `kind` for `id` (others on the way are skipped), within 20 s.
async fn event_for(
    events: &mut tonic::Streaming<cri::ContainerEventResponse>,
    id: &str,
    kind: cri::ContainerEventType,
) -> cri::ContainerEventResponse {
    let t = Instant::now();
    loop {
        let left = Duration::from_secs(20).saturating_sub(t.elapsed());
        let e = tokio::time::timeout(left, events.message())
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} event for {id} within 20 s"))
            .unwrap()
            .unwrap();
        if e.container_id == id && e.container_event_type == kind as i32 {
            return e;
        }
    }
}

/// GetContainerEvents, as kubelet's evented PLEG reads it: every change of a pod's life,
/// each with the sandbox's and the containers' statuses as they are then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_container_events_follow_a_pods_life() {
    use cri::ContainerEventType as E;
    let Some(e) = env("cri_container_events_follow_a_pods_life").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let log_dir = e.log_dir("ev");
    let sbc = sandbox_config("ev", "u7", &log_dir);
    let sb = run_sandbox(&mut rt, &sbc).await;
    let ev = event_for(&mut events, &sb, E::ContainerCreatedEvent).await;
    assert_eq!(ev.pod_sandbox_status.unwrap().id, sb);
    let ev = event_for(&mut events, &sb, E::ContainerStartedEvent).await;
    assert_eq!(
        ev.pod_sandbox_status.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    let c = create_container(
        &mut rt,
        &sb,
        container_config("job", &image, Some("sleep 0.3; exit 7")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    let ev = event_for(&mut events, &c, E::ContainerCreatedEvent).await;
    assert_eq!(ev.containers_statuses.len(), 1);
    assert_eq!(
        ev.containers_statuses[0].state,
        cri::ContainerState::ContainerCreated as i32
    );
    // A second subscriber, from now on.
    let mut later = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    rt.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    event_for(&mut events, &c, E::ContainerStartedEvent).await;
    // Its end is reported without anyone asking for its status.
    let ev = event_for(&mut events, &c, E::ContainerStoppedEvent).await;
    let st = ev.containers_statuses.iter().find(|s| s.id == c).unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 7);
    assert_eq!(st.reason, "Error");
    let first = tokio::time::timeout(Duration::from_secs(5), later.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.container_id.as_str(), first.container_event_type),
        (c.as_str(), E::ContainerStartedEvent as i32),
        "the later subscriber sees only what came after it"
    );
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let ev = event_for(&mut events, &c, E::ContainerDeletedEvent).await;
    assert!(ev.containers_statuses.is_empty());
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let ev = event_for(&mut events, &sb, E::ContainerStoppedEvent).await;
    assert_eq!(
        ev.pod_sandbox_status.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    event_for(&mut events, &sb, E::ContainerDeletedEvent).await;
}

/// Whether a process whose command line is `cmdline` (NUL-separated) runs on this host.
fn running(cmdline: &[u8]) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|d| std::fs::read(d.path().join("cmdline")).is_ok_and(|c| c.starts_with(cmdline)))
}

/// Exec and PortForward through the streaming server, as kubelet proxies `kubectl exec`
/// and `kubectl port-forward` to it: SPDY/3.1, `v4.channel.k8s.io` and
/// `portforward.k8s.io`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_exec_and_port_forward_stream_over_spdy() {
    use aurae_testkit::cri::{exec_stream, port_forward_once};
    let Some(e) = env("cri_exec_and_port_forward_stream_over_spdy").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let log_dir = e.log_dir("streams");
    let sbc = sandbox_config("streams", "u9", &log_dir);
    let sb = run_sandbox(&mut rt, &sbc).await;
    let app = create_container(
        &mut rt,
        &sb,
        container_config(
            "web",
            &image, Some("mkdir -p /www && echo 'hello over port-forward' > /www/index.html && exec httpd -f -p 8080 -h /www")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: app.clone(),
    })
    .await
    .unwrap();
    let exec = |cmd: &[&str], stdin: bool| cri::ExecRequest {
        container_id: app.clone(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        stdin,
        stdout: true,
        stderr: true,
        tty: false,
    };
    // stdin through the container and back: 200 KiB, more than one frame each way.
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let url = rt
        .exec(exec(&["cat"], true))
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let out = exec_stream(&url, Some(&input)).await.unwrap();
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "the bytes came back as sent");
    assert_eq!(out.exit_code(), Some(0), "{}", out.status);
    // Both outputs apart, the exit code as kubectl reads it, inside the container.
    let url = rt
        .exec(exec(
            &["sh", "-c", "echo out; hostname; echo err >&2; exit 3"],
            false,
        ))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = exec_stream(&url, None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nstreams-0\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.exit_code(), Some(3), "{}", out.status);
    assert!(out.status.contains("NonZeroExitCode"), "{}", out.status);
    // A URL is good once.
    let again = exec_stream(&url, None).await.unwrap_err();
    assert!(again.to_string().contains("404"), "{again}");
    let forged = exec_stream(
        &format!(
            "{}/exec/{}",
            &url[..url.rfind("/exec/").unwrap()],
            "0".repeat(64)
        ),
        None,
    )
    .await
    .unwrap_err();
    assert!(forged.to_string().contains("404"), "{forged}");
    // Only SPDY/3.1 with the protocol the session speaks.
    let url = rt
        .exec(exec(&["true"], false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let wrong = aurae_testkit::cri::upgrade(&url, "v1.channel.k8s.io")
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("403"), "{wrong}");
    // A missing program: the error stream says so, the connection ends cleanly.
    let url = rt
        .exec(exec(&["/no/such/program"], false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = exec_stream(&url, None).await.unwrap();
    assert!(out.status.contains("Failure"), "{}", out.status);
    assert!(out.status.contains("/no/such/program"), "{}", out.status);
    // A client that leaves takes its command with it.
    let url = rt
        .exec(exec(&["sleep", "987"], true))
        .await
        .unwrap()
        .into_inner()
        .url;
    let (r, w) = aurae_testkit::cri::upgrade(&url, "v4.channel.k8s.io")
        .await
        .unwrap();
    let mut w = w;
    for (kind, id) in [("error", 1), ("stdin", 3), ("stdout", 5), ("stderr", 7)] {
        w.send(&aurae_client::spdy::Frame::SynStream {
            stream: id,
            associated: 0,
            flags: 0,
            headers: vec![("streamtype".into(), kind.into())],
        })
        .await
        .unwrap();
    }
    let t = Instant::now();
    while !running(b"sleep\x00987") {
        assert!(t.elapsed() < Duration::from_secs(10), "the exec never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((r, w));
    let t = Instant::now();
    while running(b"sleep\x00987") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the exec outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Attacks on the server itself: each connection ends, the server serves the next.
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    for junk in [
        vec![b'a'; 20 << 10],
        b"BREW /pot HTCPCP/1.0\r\n\r\n".to_vec(),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(&host).await.unwrap();
        let _ = c.write_all(&junk).await;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("the server closes a connection it cannot serve")
            .ok();
    }
    // A header block that inflates past its bound: the session ends, nothing runs.
    let url = rt
        .exec(exec(&["sleep", "988"], false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let (mut r, mut w) = aurae_testkit::cri::upgrade(&url, "v4.channel.k8s.io")
        .await
        .unwrap();
    w.send(&aurae_client::spdy::Frame::SynStream {
        stream: 1,
        associated: 0,
        flags: 0,
        headers: vec![
            ("streamtype".into(), "error".into()),
            ("x".into(), "a".repeat(1 << 20)),
        ],
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = r.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the session ended");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!running(b"sleep\x00988"), "nothing ran for it");

    // A terminal, as kubectl exec -it: the container's own pseudo-terminal (tty names it,
    // its size is what the client sent), the shell's input echoed, its exit code.
    let mut tty = exec(&["sh"], true);
    tty.tty = true;
    let url = rt.exec(tty).await.unwrap().into_inner().url;
    let out = aurae_testkit::cri::exec_stream_with(
        &url,
        Some(b"stty size; tty; test -t 0 && echo on-a-terminal; exit 5\n"),
        Some((100, 30)),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 100"), "{text}");
    assert!(
        text.contains("/dev/pts/0"),
        "the container's devpts: {text}"
    );
    assert!(text.contains("on-a-terminal"), "{text}");
    assert!(out.stderr.is_empty(), "with a terminal everything is on it");
    assert_eq!(out.exit_code(), Some(5), "{}", out.status);
    // Refused before any URL: nothing to stream, no command, unknown ids.
    let mut none = exec(&["true"], false);
    none.stdout = false;
    none.stderr = false;
    assert_eq!(
        rt.exec(none).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        rt.exec(exec(&[], false)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut unknown = exec(&["true"], false);
    unknown.container_id = "f".repeat(64);
    assert_eq!(rt.exec(unknown).await.unwrap_err().code(), Code::NotFound);

    // Attach (kubectl attach): the container's output from now on, stdout and stderr
    // apart, until it exits (Success); what it wrote before is not replayed.
    let talker = create_container(
        &mut rt,
        &sb,
        container_config(
            "talker",
            &image,
            Some("echo early; sleep 1.5; echo attached-out; echo attached-err >&2; sleep 0.3; echo last"),
        ),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: talker.clone(),
    })
    .await
    .unwrap();
    log_has(
        &log_dir.join("talker/0.log"),
        "stdout F early",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let url = rt
        .attach(cri::AttachRequest {
            container_id: talker.clone(),
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.contains("/attach/"), "{url}");
    let out = exec_stream(&url, None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "attached-out\nlast\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "attached-err\n");
    assert!(out.status.contains("Success"), "{}", out.status);
    exited(&mut rt, &talker).await;
    // A client that leaves an attach leaves the container running.
    let url = rt
        .attach(cri::AttachRequest {
            container_id: app.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    {
        let (_r, mut w) = aurae_testkit::cri::upgrade(&url, "v4.channel.k8s.io")
            .await
            .unwrap();
        for (kind, stream) in [("error", 1u32), ("stdout", 5)] {
            w.send(&aurae_client::spdy::Frame::SynStream {
                stream,
                associated: 0,
                flags: 0,
                headers: vec![("streamtype".into(), kind.into())],
            })
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        container_status(&mut rt, &app).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    let at = rt
        .attach(cri::AttachRequest {
            container_id: talker.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(at.code(), Code::FailedPrecondition, "exited: {at:?}");

    // Port-forward into the pod's own loopback (the sandbox has no other network here).
    let pf = |ports: Vec<i32>| cri::PortForwardRequest {
        pod_sandbox_id: sb.clone(),
        port: ports,
    };
    let mut body = String::new();
    for _ in 0..100 {
        let url = rt
            .port_forward(pf(vec![8080]))
            .await
            .unwrap()
            .into_inner()
            .url;
        let (data, error) = port_forward_once(&url, 8080, b"GET /index.html HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        body = String::from_utf8_lossy(&data).into_owned();
        if body.contains("hello over port-forward") {
            assert!(error.is_empty(), "{error}");
            break;
        }
        // httpd may not listen yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.contains("hello over port-forward"), "{body}");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let url = rt.port_forward(pf(vec![9])).await.unwrap().into_inner().url;
    let (data, error) = port_forward_once(&url, 9, b"x").await.unwrap();
    assert!(data.is_empty());
    assert!(
        error.contains("port 9") && error.contains("refused"),
        "{error}"
    );
    // The pod's port is the pod's: the host's loopback does not serve its page.
    if let Ok(mut c) = std::net::TcpStream::connect("127.0.0.1:8080") {
        use std::io::{Read, Write};
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
        let mut got = String::new();
        let _ = c.read_to_string(&mut got);
        assert!(!got.contains("hello over port-forward"), "{got}");
    }
    assert_eq!(
        rt.port_forward(pf(vec![70000])).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut unknown = pf(vec![8080]);
    unknown.pod_sandbox_id = "f".repeat(64);
    assert_eq!(
        rt.port_forward(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        rt.port_forward(pf(vec![8080])).await.unwrap_err().code(),
        Code::FailedPrecondition,
        "a stopped sandbox has nothing to forward to"
    );
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_calls_are_only_what_the_cri_identity_is_granted() {
    let Some(e) = env_with(
        "cri_calls_are_only_what_the_cri_identity_is_granted",
        "[\"aurae.runtime.v0.Images/*\"]",
    )
    .await
    else {
        return;
    };
    let (mut rt, _) = e.cri().await;
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config("p", "u3", &e.log_dir("p"))),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("aurae.runtime.v0.Cells/Allocate"),
        "{err:?}"
    );
    assert!(cells(&e.d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pods_survive_a_kill_of_auraed_and_their_logs_go_on() {
    let Some(mut e) = env("cri_pods_survive_a_kill_of_auraed_and_their_logs_go_on").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let log_dir = e.log_dir("default_tick_u4");
    let sbc = sandbox_config("tick", "u4", &log_dir);
    let sb = run_sandbox(&mut rt, &sbc).await;
    let c = create_container(
        &mut rt,
        &sb,
        container_config(
            "tick",
            &image,
            Some("i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"),
        ),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    let created = create_container(
        &mut rt,
        &sb,
        container_config("later", &image, Some("echo later")),
        &sbc,
        &log_dir,
    )
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let log = log_dir.join("tick/0.log");
    log_has(&log, "stdout F tick 3", Duration::from_secs(20))
        .await
        .unwrap();
    drop(rt);
    // A sandbox's cell whose RunPodSandbox never finished (no record): freed at the start.
    let admin = e.d.client("admin").await.unwrap();
    admin
        .cells()
        .allocate(pb::Cell {
            name: "k8s-00000000deadbeef".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(admin);

    e.d.crash_and_restart_after(Duration::from_millis(500))
        .await
        .unwrap();
    let (mut rt, _) = e.cri().await;
    let s = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sb.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
    assert_eq!(s.labels["app"], "tick");
    let left = cells(&e.d).await;
    assert!(
        !left.contains(&"k8s-00000000deadbeef".to_owned()),
        "{left:?}"
    );
    assert!(left.contains(&format!("k8s-{}", &sb[..16])), "{left:?}");
    assert_eq!(
        container_status(&mut rt, &c).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    assert_eq!(
        container_status(&mut rt, &created).await.unwrap().state,
        cri::ContainerState::ContainerCreated as i32
    );
    // The log goes on after the restart, and nothing written while auraed was down is
    // missing: every tick from 0 to the last is there.
    let before = std::fs::read_to_string(&log).unwrap().lines().count();
    let t = Instant::now();
    let lines = loop {
        let lines = log_has(&log, "stdout F tick 1", Duration::from_secs(20))
            .await
            .unwrap();
        if lines.len() > before + 10 {
            break lines;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the log stopped: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ticks: std::collections::BTreeSet<u64> = lines
        .iter()
        .filter_map(|l| {
            l.rsplit_once(" stdout F tick ")
                .and_then(|(_, n)| n.parse().ok())
        })
        .collect();
    let last = *ticks.iter().next_back().unwrap();
    let missing: Vec<u64> = (0..=last).filter(|n| !ticks.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "ticks missing from the CRI log: {missing:?}"
    );
    // The created container starts after the restart; events go on (the running
    // container's end is watched again after the restart).
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    rt.start_container(cri::StartContainerRequest {
        container_id: created.clone(),
    })
    .await
    .unwrap();
    assert_eq!(exited(&mut rt, &created).await.exit_code, 0);
    event_for(
        &mut events,
        &created,
        cri::ContainerEventType::ContainerStartedEvent,
    )
    .await;
    log_has(
        &log_dir.join("later/0.log"),
        "stdout F later",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let ev = event_for(
        &mut events,
        &c,
        cri::ContainerEventType::ContainerStoppedEvent,
    )
    .await;
    let st = ev.containers_statuses.iter().find(|s| s.id == c).unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb })
        .await
        .unwrap();
    assert!(cells(&e.d).await.is_empty());
}

/// Attach with input (`kubectl attach -i`, `kubectl run -it`): a container created with
/// `stdin` reads what an attach writes; `stdin_once` closes it when that attach ends; a
/// container with `tty` has a terminal of its own, sized by the attach; its stdin
/// survives a `kill -9` of auraed (held by the holder) and is written again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_attach_writes_a_containers_own_stdin_and_terminal() {
    use aurae_testkit::cri::{attach_until, exec_stream, exec_stream_with};
    let Some(mut e) = env("cri_attach_writes_a_containers_own_stdin_and_terminal").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let log_dir = e.log_dir("default_talk_u9");
    let sbc = sandbox_config("talk", "u9", &log_dir);
    let sb = run_sandbox(&mut rt, &sbc).await;
    let interactive = |name: &str, script: &str, stdin_once: bool, tty: bool| {
        let mut c = container_config(name, &image, Some(script));
        c.stdin = true;
        c.stdin_once = stdin_once;
        c.tty = tty;
        c
    };
    let attach = |id: &str, tty: bool| cri::AttachRequest {
        container_id: id.to_owned(),
        stdin: true,
        stdout: true,
        stderr: !tty,
        tty,
    };
    let mut started = Vec::new();
    for (name, script, once, tty) in [
        (
            "once",
            "while read l; do echo \"got $l\"; done; echo bye; exit 4",
            true,
            false,
        ),
        (
            "keeper",
            "while read l; do echo \"kept $l\"; done",
            false,
            false,
        ),
        ("term", "exec sh", false, true),
        (
            "once2",
            "while read l; do echo \"got $l\"; done; echo eof; exec sleep 60",
            true,
            false,
        ),
        ("term2", "exec sh", false, true),
    ] {
        let id = create_container(
            &mut rt,
            &sb,
            interactive(name, script, once, tty),
            &sbc,
            &log_dir,
        )
        .await
        .unwrap();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        started.push(id);
    }
    let [once, keeper, term, once2, term2] = <[String; 5]>::try_from(started).unwrap();

    // stdin_once: what the attach writes is read; its end closes the container's stdin,
    // so the loop ends and the container exits; the attach ends with it.
    let url = rt
        .attach(attach(&once, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = exec_stream(&url, Some(b"one\ntwo\n")).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got one\ngot two\nbye\n"
    );
    assert!(out.status.contains("Success"), "{}", out.status);
    assert_eq!(exited(&mut rt, &once).await.exit_code, 4);
    log_has(
        &log_dir.join("once/0.log"),
        "stdout F got two",
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // A terminal of its own, sized by the attach: `stty size` reads it; the shell's exit
    // ends the attach and the container.
    let url = rt
        .attach(attach(&term, true))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = exec_stream_with(
        &url,
        Some(b"stty size; test -t 0 && echo on-a-tty; tty; ls /dev/pts; exit 7\n"),
        Some((100, 30)),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 100"), "{text:?}");
    assert!(text.contains("on-a-tty"), "{text:?}");
    // The container's own devpts: its terminal has a name there, and it is the only one.
    assert!(text.contains("/dev/pts/0"), "{text:?}");
    assert!(!text.contains("not a tty"), "{text:?}");
    assert_eq!(exited(&mut rt, &term).await.exit_code, 7);

    // Without stdin_once the stdin stays open when an attach leaves, and across a kill
    // of auraed.
    let url = rt
        .attach(attach(&keeper, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    attach_until(&url, b"a\n", None, "kept a", Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        container_status(&mut rt, &keeper).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32,
        "an attach leaving does not close the stdin"
    );
    // A stdin_once container attached to, with the attach still connected when auraed
    // is killed: that attach ends with auraed, and so must the stdin after the restart.
    let url = rt
        .attach(attach(&once2, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let connected =
        aurae_testkit::cri::attach_open(&url, b"x\n", None, "got x", Duration::from_secs(20))
            .await
            .unwrap();
    drop(rt);
    e.d.crash_and_restart_after(Duration::from_millis(300))
        .await
        .unwrap();
    drop(connected);
    let (mut rt, _) = e.cri().await;
    assert_eq!(
        container_status(&mut rt, &keeper).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32,
        "the stdin was not closed by auraed's end"
    );
    log_has(
        &log_dir.join("once2/0.log"),
        "stdout F eof",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    // A terminal taken back after the restart: written and sized again.
    let url = rt
        .attach(attach(&term2, true))
        .await
        .unwrap()
        .into_inner()
        .url;
    let text = attach_until(
        &url,
        b"echo again-$((40+2)); stty size\n",
        Some((90, 20)),
        "20 90",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert!(text.contains("again-42"), "{text:?}");
    let url = rt
        .attach(attach(&keeper, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let text = attach_until(&url, b"b\n", None, "kept b", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        !text.contains("kept a"),
        "only output from the attach on: {text:?}"
    );
    log_has(
        &log_dir.join("keeper/0.log"),
        "stdout F kept b",
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // Refused: input to an exited container, stdin_once without stdin.
    let at = rt.attach(attach(&once, false)).await.unwrap_err();
    assert_eq!(at.code(), Code::FailedPrecondition, "{at:?}");
    let mut bad = interactive("bad", "true", true, false);
    bad.stdin = false;
    let err = create_container(&mut rt, &sb, bad, &sbc, &log_dir)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("config.stdin_once"), "{err:?}");

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb })
        .await
        .unwrap();
    assert!(cells(&e.d).await.is_empty());
}

/// `Some(reason)` unless Debian's CNI plugins are installed.
fn needs_cni_plugins() -> Option<String> {
    ["bridge", "host-local", "loopback"]
        .iter()
        .find(|p| !Path::new("/usr/lib/cni").join(p).exists())
        .map(|p| format!("CNI plugin {p} is missing (apt-get install containernetworking-plugins)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_networks_come_from_cni_plugins_and_are_released() {
    let test = "cri_pod_networks_come_from_cni_plugins_and_are_released";
    use aurae_testkit::tier::{self, Tier};
    if !tier::check(test, Tier::Host, needs_cni_plugins()) {
        return;
    }
    let Some(registry) = for_containers(test).unwrap() else {
        return;
    };
    let host = registry.host();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let socket = tmp.path().join("run/cri.sock");
    let args = |extra: &[String]| {
        let mut a = vec![
            "--insecure-registry".to_owned(),
            host.clone(),
            "--cri-socket".to_owned(),
            socket.display().to_string(),
            "--cri-log-root".to_owned(),
            tmp.path().join("pods").display().to_string(),
        ];
        a.extend_from_slice(extra);
        a
    };
    // The image is pulled by an auraed on the host's network (the registry is on its
    // loopback) into the state directory the pod-network auraed then uses.
    let image = {
        let _first = Daemon::start(
            Path::new(env!("CARGO_BIN_EXE_auraed")),
            DaemonOptions {
                policy: Some(policy(&host, "[\"*\"]")),
                extra_args: args(&[]),
                state_dir: Some(state.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        oci::push_busybox(&host, "aurae/busybox", serde_json::json!({})).unwrap();
        let image = format!("{host}/aurae/busybox:v1");
        let (_, mut im) = cri_at(&socket).await;
        im.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        image
    };
    drop(registry);
    // auraed in a network namespace of its own: the CNI bridge is made there.
    let net_d = tmp.path().join("net.d");
    std::fs::create_dir_all(&net_d).unwrap();
    let ipam = tmp.path().join("ipam");
    std::fs::write(
        net_d.join("10-aurae-test.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "aurae-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni-aurae0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.88.9.0/24"}]],
                        "dataDir": ipam.display().to_string()
                    }
                }
            ]
        })
        .to_string(),
    )
    .unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy(&host, "[\"*\"]")),
            extra_args: args(&[
                "--cni-conf-dir".to_owned(),
                net_d.display().to_string(),
                "--cni-bin-dir".to_owned(),
                "/usr/lib/cni".to_owned(),
            ]),
            state_dir: Some(state.clone()),
            own_netns: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (mut rt, _) = cri_at(&socket).await;
    let st = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let net = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(net.status, "{net:?}");

    let logs = tmp.path().join("pods");
    let mut pods = Vec::new();
    for name in ["server", "client"] {
        let dir = logs.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let sbc = sandbox_config(name, &format!("uid-{name}"), &dir);
        let id = run_sandbox(&mut rt, &sbc).await;
        let s = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        let ip = s.network.unwrap().ip;
        assert!(ip.starts_with("10.88.9."), "{name}: {ip:?}");
        assert!(
            ipam.join("aurae-test").join(&ip).exists(),
            "host-local holds {ip}"
        );
        pods.push((id, sbc, dir, ip));
    }
    assert_ne!(pods[0].3, pods[1].3, "two pods, two addresses");
    // The server's pod answers on its address; the client's pod reaches it there.
    let (sid, sbc, dir, sip) = &pods[0];
    let srv = create_container(
        &mut rt,
        sid,
        container_config(
            "web",
            &image, Some("mkdir -p /tmp/www && echo pong > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www")),
        sbc,
        dir,
    )
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: srv })
        .await
        .unwrap();
    let (cid, cbc, cdir, _) = &pods[1];
    let cli = create_container(
        &mut rt,
        cid,
        container_config(
            "get",
            &image, Some(&*format!(
                "for i in $(seq 50); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {sip} 8080 && exit 0; sleep 0.2; done; exit 1"
            ))),
        cbc,
        cdir,
    )
    .await
    .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: cli.clone(),
    })
    .await
    .unwrap();
    let s = exited(&mut rt, &cli).await;
    assert_eq!(
        s.exit_code,
        0,
        "{s:?}\nclient: {}\nserver: {}",
        std::fs::read_to_string(cdir.join("get/0.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("web/0.log")).unwrap_or_default()
    );
    log_has(
        &cdir.join("get/0.log"),
        "stdout F pong",
        Duration::from_secs(20),
    )
    .await
    .unwrap();

    // Stopping a sandbox gives its address back; removing both leaves nothing.
    for (id, _, _, ip) in &pods {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        assert!(
            !ipam.join("aurae-test").join(ip).exists(),
            "{ip} is released"
        );
        let s = rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert!(s.network.unwrap().ip.is_empty());
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
    }
    assert!(cells(&d).await.is_empty());
}

/// Each container has a cgroup of its own (host tier: no controllers here, so no limits
/// can be applied; the limits themselves are tested in the guest tier): ExecSync's
/// command is born in it and sees it as its cgroup namespace's root; a second container
/// of the pod has another; UpdateContainerResources records resources of a container not
/// started yet (its status reports them, its start applies them: refused here naming the
/// missing controller, the container EXITED `StartError`), refuses what this host cannot
/// apply to a running one (FAILED_PRECONDITION, the container runs on), and bad input
/// names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_containers_have_cgroups_of_their_own_and_update_their_resources() {
    let test = "cri_containers_have_cgroups_of_their_own_and_update_their_resources";
    let Some(e) = env(test).await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let image = e.pulled(&mut im, "busybox").await;
    let logs = e.log_dir("res");
    let sb = sandbox_config("res", "uid-res", &logs);
    let pod = run_sandbox(&mut rt, &sb).await;
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let id = create_container(
            &mut rt,
            &pod,
            container_config(name, &image, Some("exec sleep 300")),
            &sb,
            &logs,
        )
        .await
        .unwrap();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        ids.push(id);
    }
    let cgroup = |out: &cri::ExecSyncResponse| String::from_utf8_lossy(&out.stdout).into_owned();
    // The cgroup v2 line (this host also has v1 hierarchies).
    let v2 = |text: String| {
        text.lines()
            .find(|l| l.starts_with("0::"))
            .map(str::to_owned)
    };
    let one = aurae_testkit::cri::exec_sync(&mut rt, &ids[0], &["cat", "/proc/self/cgroup"])
        .await
        .unwrap();
    assert_eq!(v2(cgroup(&one)).as_deref(), Some("0::/"), "{one:?}");
    // Its /sys/fs/cgroup is its own group: the container's process and the exec's own.
    let procs = aurae_testkit::cri::exec_sync(
        &mut rt,
        &ids[0],
        &["sh", "-c", "wc -l < /sys/fs/cgroup/cgroup.procs"],
    )
    .await
    .unwrap();
    let n: usize = cgroup(&procs).trim().parse().unwrap();
    assert!(
        (2..=3).contains(&n),
        "{n} processes in its group: {procs:?}"
    );
    // On the host: two groups below the sandbox's cell, one per container.
    let root = e.d.cgroup.clone().unwrap();
    let cell = cells(&e.d)
        .await
        .into_iter()
        .find(|c| c.starts_with("k8s-"))
        .unwrap();
    let groups: Vec<String> = std::fs::read_dir(root.join(&cell))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("_exe."))
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let update =
        |id: &str, linux: cri::LinuxContainerResources| cri::UpdateContainerResourcesRequest {
            container_id: id.to_owned(),
            linux: Some(linux),
            ..Default::default()
        };
    // Nothing to apply: fine. A memory limit on a host without the memory controller:
    // FAILED_PRECONDITION naming it, the container runs on.
    rt.update_container_resources(update(&ids[0], Default::default()))
        .await
        .unwrap();
    let err = rt
        .update_container_resources(update(
            &ids[0],
            cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("memory controller"), "{err:?}");
    let s = container_status(&mut rt, &ids[0]).await.unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    let linux = s.resources.unwrap().linux.unwrap();
    assert_eq!(linux.memory_limit_in_bytes, 0, "not applied, not recorded");
    // Bad input names the field; an unknown id is NOT_FOUND.
    for (bad, field) in [
        (
            cri::LinuxContainerResources {
                memory_limit_in_bytes: -1,
                ..Default::default()
            },
            "linux",
        ),
        (
            cri::LinuxContainerResources {
                unified: [("memory.oom.group".to_owned(), "2".to_owned())].into(),
                ..Default::default()
            },
            "linux.unified[\"memory.oom.group\"]",
        ),
        (
            cri::LinuxContainerResources {
                cpuset_cpus: "0-x".to_owned(),
                ..Default::default()
            },
            "linux.cpuset_cpus",
        ),
    ] {
        let err = rt
            .update_container_resources(update(&ids[0], bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {err:?}");
    }
    let err = rt
        .update_container_resources(update("nope", Default::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Not started yet: recorded and reported; its start applies them (refused here).
    let later = create_container(
        &mut rt,
        &pod,
        container_config("later", &image, Some("exec sleep 300")),
        &sb,
        &logs,
    )
    .await
    .unwrap();
    rt.update_container_resources(update(
        &later,
        cri::LinuxContainerResources {
            memory_limit_in_bytes: 128 << 20,
            cpu_shares: 512,
            unified: [("memory.oom.group".to_owned(), "1".to_owned())].into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let s = container_status(&mut rt, &later).await.unwrap();
    let linux = s.resources.unwrap().linux.unwrap();
    assert_eq!(
        (linux.memory_limit_in_bytes, linux.cpu_shares),
        (128 << 20, 512)
    );
    assert_eq!(linux.unified["memory.oom.group"], "1");
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: later.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("controller"), "{err:?}");
    let s = container_status(&mut rt, &later).await.unwrap();
    assert_eq!(s.reason, "StartError", "{s:?}");
    // Records are bounded: a sandbox holds at most 256 containers (exited ones until
    // removed); the next is RESOURCE_EXHAUSTED and nothing is recorded.
    let t = Instant::now();
    for i in 3..256 {
        create_container(
            &mut rt,
            &pod,
            container_config(&format!("c{i}"), &image, Some("true")),
            &sb,
            &logs,
        )
        .await
        .unwrap();
    }
    println!(
        "253 container records in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let err = create_container(
        &mut rt,
        &pod,
        container_config("one-too-many", &image, Some("true")),
        &sb,
        &logs,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("256"), "{err:?}");
    let listed = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 256);
    // Stopped: its group goes with its executable at removal.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(!root.join(&cell).exists(), "the sandbox's cgroups are gone");
}
