//! The CRI's `aurae-vm` runtime handler in the host tier (T1: root, cgroup v2, network
//! namespaces): a pod sandbox is an instance of auraed spawned for it (here an isolated
//! cell: this machine boots no microVM; the guest tier's L1 boots one), the containers
//! run in a cell inside it. auraed and the registry run in a network namespace of their
//! own (the instances' bridge and veths are made there).
//!
//! What must show: the sandbox's status carries the instance's address; the container
//! runs in the instance (no cell of the sandbox's on this auraed), its log is written on
//! this machine, ExecSync and stats reach it, port-forward reaches its port at the
//! instance's address; a retried RunPodSandbox finds the same sandbox; what an instance
//! cannot do is refused naming the field (host ports, NODE namespaces, host mounts); a
//! streamed exec (pipes or a terminal) runs there through the instance's interactive
//! exec, and a client that leaves takes its command; a kill -9 of auraed costs the pod
//! nothing; stop frees the instance and remove leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    net::SocketAddr,
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
    cri::{
        container_config, container_status, create_container, exec_sync, log_has, sandbox_config,
        sandbox_status,
    },
    oci,
    registry::{LocalRegistry, needs_registry},
    tier::{self, Tier},
};
use tonic::{Code, transport::Channel};

const VM: &str = "aurae-vm";

struct Env {
    _registry: LocalRegistry,
    d: Daemon,
    image: String,
    tmp: tempfile::TempDir,
}

fn policy(host: &str) -> String {
    format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nregistries = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/cri\"\nmethods = [\"*\"]\nnames = [\"k8s-*\"]\n\
         allow_uid_zero = true\nuids = [\"1-65535\"]\ngids = [\"1-65535\"]\nregistries = [\"{host}/aurae\"]\nvolumes = [\"pods\"]\n"
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
    let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let host = addr.to_string();
    let tmp = tempfile::tempdir().unwrap();
    // kubelet's own files (a pod's /etc/hosts, a service account's token) live here.
    std::fs::create_dir_all(tmp.path().join("kubelet/pods")).unwrap();
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            own_netns: true,
            policy: Some(policy(&host)),
            extra_args: vec![
                "--insecure-registry".to_owned(),
                host.clone(),
                "--cri-socket".to_owned(),
                tmp.path().join("run/cri.sock").display().to_string(),
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
    let registry = LocalRegistry::start_in(d.netns.as_deref(), addr).unwrap();
    let h = host.clone();
    d.in_netns(move || oci::push_busybox(&h, "aurae/busybox", serde_json::json!({})))
        .unwrap()
        .unwrap();
    Some(Env {
        _registry: registry,
        d,
        image: format!("{host}/aurae/busybox:v1"),
        tmp,
    })
}

impl Env {
    /// Runs `f` to its end on a thread in auraed's network namespace (where the streaming
    /// server listens).
    fn in_ns<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.d
            .in_netns(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f)
            })
            .unwrap()
    }

    async fn cri(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        aurae_testkit::cri::clients(&self.tmp.path().join("run/cri.sock"))
            .await
            .unwrap()
    }

    fn log_dir(&self, pod: &str) -> PathBuf {
        let d = self.tmp.path().join("pods").join(pod);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn instances(&self) -> Vec<String> {
        let c = self.d.client("admin").await.unwrap();
        c.instances()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.name)
            .collect()
    }

    async fn cells(&self) -> Vec<String> {
        let c = self.d.client("admin").await.unwrap();
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
}

async fn run_vm_sandbox(
    rt: &mut RuntimeServiceClient<Channel>,
    config: &cri::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: VM.to_owned(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

/// The whole life of an `aurae-vm` pod, with the refusals and a crash of auraed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_aurae_vm_sandboxes_are_spawned_instances() {
    let Some(mut e) = env("cri_aurae_vm_sandboxes_are_spawned_instances").await else {
        return;
    };
    let (mut rt, mut im) = e.cri().await;
    let handlers = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .runtime_handlers;
    assert!(handlers.iter().any(|h| h.name == VM), "{handlers:?}");
    im.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: e.image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();

    // What an instance cannot be is refused before anything is made.
    let log_dir = e.log_dir("default_web_uid-web");
    let good = sandbox_config("web", "uid-web", &log_dir);
    let mut bad = good.clone();
    bad.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 18080,
        host_ip: String::new(),
    }];
    let err = run_vm_sandbox(&mut rt, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("config.port_mappings[0].host_port"),
        "{err:?}"
    );
    let mut bad = good.clone();
    bad.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = run_vm_sandbox(&mut rt, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("security_context.namespace_options.network"),
        "{err:?}"
    );
    assert!(e.instances().await.is_empty(), "{:?}", e.instances().await);

    // The sandbox: an instance of its own, its address the pod's IP.
    let t0 = Instant::now();
    let sb = run_vm_sandbox(&mut rt, &good).await.unwrap();
    let spawn_ms = t0.elapsed().as_millis();
    let name = format!("k8s-{}", &sb[..16]);
    assert_eq!(
        run_vm_sandbox(&mut rt, &good).await.unwrap(),
        sb,
        "a retried RunPodSandbox finds the same sandbox"
    );
    assert_eq!(e.instances().await, vec![name.clone()]);
    assert!(
        !e.cells().await.contains(&name),
        "the sandbox's cell is in its instance, not here: {:?}",
        e.cells().await
    );
    let s = sandbox_status(&mut rt, &sb).await.unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32, "{s:?}");
    assert_eq!(s.runtime_handler, VM);
    let ip: std::net::Ipv4Addr = s.network.as_ref().unwrap().ip.parse().unwrap();
    eprintln!("aurae-vm sandbox {sb} ready in {spawn_ms} ms at {ip}");

    // A container of it: runs in the instance, logs here.
    let mut mounted = container_config("app", &e.image, Some("true"));
    mounted.mounts = vec![cri::Mount {
        host_path: log_dir.display().to_string(),
        container_path: "/data".to_owned(),
        ..Default::default()
    }];
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: Some(mounted),
            sandbox_config: Some(good.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("config.mounts[0].readonly"),
        "a writable directory is refused: {err:?}"
    );
    // The pod's emptyDir (kubelet's path for it, below the pod's own uid) is shared in the
    // instance as a directory of the pod's cell; another pod's is a host directory: refused.
    let pods = e.tmp.path().join("kubelet/pods");
    let empty_dir = |uid: &str| {
        let d = pods.join(format!("{uid}/volumes/kubernetes.io~empty-dir/cache"));
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (cache, others) = (empty_dir("uid-web"), empty_dir("uid-other"));
    let mut mounted = container_config("app", &e.image, Some("true"));
    mounted.mounts = vec![cri::Mount {
        host_path: others.display().to_string(),
        container_path: "/cache".to_owned(),
        ..Default::default()
    }];
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: Some(mounted),
            sandbox_config: Some(good.clone()),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("config.mounts[0].readonly"),
        "another pod's emptyDir is refused: {err:?}"
    );
    // kubelet's mounts, copied into the instance when it starts: the pod's /etc/hosts, a
    // termination log, a service account's token as kubelet writes it (names that are
    // links into `..data`, a link to a timestamped directory).
    let kubelet = e.tmp.path().join("kubelet/pods/u1");
    std::fs::create_dir_all(kubelet.join("containers/app")).unwrap();
    std::fs::write(
        kubelet.join("etc-hosts"),
        "127.0.0.1 localhost\n10.0.0.1 web-0\n",
    )
    .unwrap();
    std::fs::write(kubelet.join("containers/app/1a2b"), "").unwrap();
    let sa = kubelet.join("volumes/kubernetes.io~projected/kube-api-access-x");
    let ts = sa.join("..2026_12_03_00_00_00.1");
    std::fs::create_dir_all(&ts).unwrap();
    std::fs::write(ts.join("token"), "eyJ.test-token").unwrap();
    std::fs::write(ts.join("namespace"), "default").unwrap();
    std::os::unix::fs::symlink("..2026_12_03_00_00_00.1", sa.join("..data")).unwrap();
    for n in ["token", "namespace"] {
        std::os::unix::fs::symlink(format!("..data/{n}"), sa.join(n)).unwrap();
    }
    let mut appc = container_config(
        "app",
        &e.image,
        Some(
            "cat /etc/hosts; cat /var/run/secrets/kubernetes.io/serviceaccount/token; echo; \
             ls -a /var/run/secrets/kubernetes.io/serviceaccount | tr '\\n' ' '; echo; \
             echo bye > /dev/termination-log && echo wrote-termination-log; \
             echo \"$GREETING from $(hostname)\"; mkdir -p /tmp/www && \
             echo 'served by the instance' > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www",
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
        cri::Mount {
            container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            host_path: sa.display().to_string(),
            readonly: true,
            ..Default::default()
        },
        // The pod's emptyDir at a parent of the token's directory: mounted first, the
        // token's below it (else the token would be hidden under it).
        cri::Mount {
            container_path: "/var/run".into(),
            host_path: cache.display().to_string(),
            ..Default::default()
        },
    ];
    let app = create_container(&mut rt, &sb, appc, &good, &log_dir)
        .await
        .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: app.clone(),
    })
    .await
    .unwrap();
    let log = log_dir.join("app/0.log");
    let lines = log_has(&log, "stdout F hello from web-0", Duration::from_secs(30))
        .await
        .unwrap();
    let said = |want: &str| lines.iter().any(|l| l.ends_with(want));
    assert!(
        said("stdout F 10.0.0.1 web-0"),
        "/etc/hosts copied: {lines:?}"
    );
    assert!(
        said("stdout F eyJ.test-token"),
        "the token copied: {lines:?}"
    );
    assert!(
        said("stdout F . .. ..data ..v1 namespace token "),
        "kubelet's atomic layout, written by the instance: {lines:?}"
    );
    assert!(said("stdout F wrote-termination-log"), "{lines:?}");
    assert_eq!(
        std::fs::read_to_string(kubelet.join("containers/app/1a2b")).unwrap(),
        "",
        "a copy: the instance's writes stay there"
    );
    assert_eq!(
        container_status(&mut rt, &app).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    let out = exec_sync(
        &mut rt,
        &app,
        &["sh", "-c", "echo $GREETING; hostname; exit 3"],
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nweb-0\n");
    assert_eq!(out.exit_code, 3);
    // The emptyDir: what the app writes there, a second container of the pod (read-only
    // there) reads; it cannot write; none of it is on this machine's copy.
    let out = exec_sync(
        &mut rt,
        &app,
        &[
            "sh",
            "-c",
            "stat -c %a /var/run; echo from-app > /var/run/a",
        ],
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "777\n", "{out:?}");
    let mut readerc = container_config(
        "reader",
        &e.image,
        Some("cat /shared/a; touch /shared/b 2>/dev/null || echo read-only; exec sleep 300"),
    );
    readerc.mounts = vec![cri::Mount {
        container_path: "/shared".into(),
        host_path: cache.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let reader = create_container(&mut rt, &sb, readerc, &good, &log_dir)
        .await
        .unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: reader.clone(),
    })
    .await
    .unwrap();
    let lines = log_has(
        &log_dir.join("reader/0.log"),
        "stdout F read-only",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(
        lines.iter().any(|l| l.ends_with("stdout F from-app")),
        "the pod's containers share its emptyDir in the instance: {lines:?}"
    );
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "the node's emptyDir stays empty: the pod's is in its instance"
    );
    // A subPath of it (kubelet's bind below volume-subpaths) would be a copy of the
    // node's, always empty: refused naming the mount.
    let subpath = pods.join("uid-web/volume-subpaths/cache/reader/0");
    std::fs::create_dir_all(&subpath).unwrap();
    let mut mounted = container_config("sub", &e.image, Some("true"));
    mounted.mounts = vec![cri::Mount {
        host_path: subpath.display().to_string(),
        container_path: "/out".to_owned(),
        readonly: true,
        ..Default::default()
    }];
    let err = create_container(&mut rt, &sb, mounted, &good, &log_dir)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("config.mounts[0].host_path")
            && err.message().contains("subPath"),
        "{err:?}"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: reader.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: reader.clone(),
    })
    .await
    .unwrap();
    // kubelet rotates the token (its atomic writer: a new timestamped directory, `..data`
    // swapped onto it, the old one removed): the copy in the instance follows, the whole
    // directory at once; a key that goes, goes.
    kubelet_writes(
        &sa,
        "..2026_12_03_00_50_00.2",
        &[("token", "eyJ.rotated-token")],
    );
    let (seen, took) = token_in(&mut rt, &app, "rotated").await;
    println!(
        "the rotated token reached the instance in {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(
        seen,
        "eyJ.rotated-token\ntoken\n",
        "{}",
        e.d.log_text()
            .lines()
            .filter(|l| l.contains("mounts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: app.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(
        stats
            .memory
            .and_then(|m| m.working_set_bytes)
            .is_some_and(|b| b.value > 0),
        "the container's memory, from the instance"
    );
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let linux = ps.linux.unwrap();
    // (Its cell's cgroup figures are the instance's: without controllers on this host
    // they read 0; the container's own come from its processes.)
    assert!(linux.memory.is_some() && linux.cpu.is_some());
    assert_eq!(linux.containers.len(), 1);

    // A streamed exec runs in the instance (its interactive exec): input in, output out
    // as it comes, the exit code; a terminal; a client that leaves takes its command.
    let exec = |cmd: &[&str], stdin: bool, tty: bool| cri::ExecRequest {
        container_id: app.clone(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
    };
    let url = rt
        .exec(exec(&["cat"], true, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sent = input.clone();
    let out = e
        .in_ns(async move { aurae_testkit::cri::exec_stream(&url, Some(&sent)).await })
        .unwrap();
    assert_eq!(out.stdout.len(), input.len());
    assert!(
        out.stdout == input,
        "200 000 bytes through cat in the instance, unchanged"
    );
    assert_eq!(out.exit_code(), Some(0), "{}", out.status);
    let url = rt
        .exec(exec(
            &["sh", "-c", "echo out; echo err >&2; hostname; exit 3"],
            false,
            false,
        ))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = e
        .in_ns(async move { aurae_testkit::cri::exec_stream(&url, None).await })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\nweb-0\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.exit_code(), Some(3), "{}", out.status);
    let url = rt
        .exec(exec(&["sh"], true, true))
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = e
        .in_ns(async move {
            aurae_testkit::cri::exec_stream_with(
                &url,
                Some(b"stty size; test -t 0 && echo on-a-terminal; exit 5\n"),
                Some((100, 30)),
            )
            .await
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 100"), "{text}");
    assert!(text.contains("on-a-terminal"), "{text}");
    assert_eq!(out.exit_code(), Some(5), "{}", out.status);
    let url = rt
        .exec(exec(&["sleep", "987"], true, false))
        .await
        .unwrap()
        .into_inner()
        .url;
    let sleeping =
        |out: &cri::ExecSyncResponse| String::from_utf8_lossy(&out.stdout).contains("sleep 987");
    let socket = e.tmp.path().join("run/cri.sock");
    let id = app.clone();
    // The client opens its streams, sees its command run, and goes away.
    e.in_ns(async move {
        let (r, mut w) = aurae_testkit::cri::upgrade(&url, "v4.channel.k8s.io")
            .await
            .unwrap();
        for (kind, stream) in [("error", 1u32), ("stdin", 3), ("stdout", 5), ("stderr", 7)] {
            w.send(&aurae_client::spdy::Frame::SynStream {
                stream,
                associated: 0,
                flags: 0,
                headers: vec![("streamtype".into(), kind.into())],
            })
            .await
            .unwrap();
        }
        let (mut rt, _) = aurae_testkit::cri::clients(&socket).await.unwrap();
        let t = Instant::now();
        while !sleeping(
            &exec_sync(&mut rt, &id, &["ps", "-o", "args"])
                .await
                .unwrap(),
        ) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the streamed sleep never ran"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop((r, w));
    });
    let t = Instant::now();
    while sleeping(
        &exec_sync(&mut rt, &app, &["ps", "-o", "args"])
            .await
            .unwrap(),
    ) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the command of a client that left still runs in the instance"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Attach follows a container's output in the instance, from now until it exits.
    let talker = create_container(
        &mut rt,
        &sb,
        container_config(
            "talker",
            &e.image,
            Some("echo early; sleep 1.5; echo attached-out; echo attached-err >&2"),
        ),
        &good,
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
        Duration::from_secs(30),
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
    let out = e
        .in_ns(async move { aurae_testkit::cri::exec_stream(&url, None).await })
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "attached-out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "attached-err\n");
    assert!(out.status.contains("Success"), "{}", out.status);

    // Attach with input, through the instance's Executables/Attach: a stdin_once reader
    // (the attach's end closes its stdin), and a shell on a terminal of its own, sized by
    // the attach.
    let mut started = Vec::new();
    for (name, script, tty) in [
        (
            "reader",
            "while read l; do echo \"got $l\"; done; echo bye; exit 4",
            false,
        ),
        ("term", "exec sh", true),
    ] {
        let mut c = container_config(name, &e.image, Some(script));
        c.stdin = true;
        c.stdin_once = !tty;
        c.tty = tty;
        let id = create_container(&mut rt, &sb, c, &good, &log_dir)
            .await
            .unwrap();
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        started.push(id);
    }
    let [reader, term] = <[String; 2]>::try_from(started).unwrap();
    let url = rt
        .attach(cri::AttachRequest {
            container_id: reader.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = e
        .in_ns(async move { aurae_testkit::cri::exec_stream(&url, Some(b"one\ntwo\n")).await })
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got one\ngot two\nbye\n"
    );
    assert!(out.status.contains("Success"), "{}", out.status);
    let url = rt
        .attach(cri::AttachRequest {
            container_id: term.clone(),
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = e
        .in_ns(async move {
            aurae_testkit::cri::exec_stream_with(
                &url,
                Some(b"stty size; exit 7\n"),
                Some((100, 30)),
            )
            .await
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("30 100"), "{text:?}");

    // Port-forward reaches the instance.
    let mut body = String::new();
    for _ in 0..100 {
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: sb.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        // The streaming server listens in auraed's namespace.
        let (data, _) =
            e.d.in_netns(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(aurae_testkit::cri::port_forward_once(
                        &url,
                        8080,
                        b"GET /index.html HTTP/1.0\r\n\r\n",
                    ))
                    .unwrap()
            })
            .unwrap();
        body = String::from_utf8_lossy(&data).into_owned();
        if body.contains("served by the instance") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("served by the instance"), "{body}");

    // A kill -9 of auraed: the pod runs on, and the restarted auraed serves it again.
    drop(rt);
    drop(im);
    e.d.crash_and_restart_after(Duration::from_millis(300))
        .await
        .unwrap();
    let (mut rt, _im) = e.cri().await;
    let s = sandbox_status(&mut rt, &sb).await.unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32, "{s:?}");
    assert_eq!(s.network.unwrap().ip, ip.to_string());
    assert_eq!(
        container_status(&mut rt, &app).await.unwrap().state,
        cri::ContainerState::ContainerRunning as i32
    );
    let out = exec_sync(&mut rt, &app, &["cat", "/tmp/www/index.html"])
        .await
        .unwrap();
    assert_eq!(out.stdout, b"served by the instance\n");
    // The restarted auraed keeps the mounts fresh too.
    kubelet_writes(
        &sa,
        "..2026_12_03_01_40_00.3",
        &[("token", "eyJ.after-restart")],
    );
    let (seen, took) = token_in(&mut rt, &app, "after-restart").await;
    println!(
        "after the restart, a rotated token reached the instance in {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(seen, "eyJ.after-restart\ntoken\n");

    // Stop: the container ends (its end recorded), the instance is freed.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let st = container_status(&mut rt, &app).await.unwrap();
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    assert_eq!(st.exit_code, 137, "{st:?}");
    let s = sandbox_status(&mut rt, &sb).await.unwrap();
    assert_eq!(s.state, cri::PodSandboxState::SandboxNotready as i32);
    assert!(e.instances().await.is_empty(), "{:?}", e.instances().await);
    let err = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: app.clone(),
            cmd: vec!["true".into()],
            timeout: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let left = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(left.is_empty(), "{left:?}");
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: app.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Nothing of the instance is left on this machine.
    let cg = e.d.cgroup.clone().unwrap().join("instances");
    let cgroups: Vec<String> = std::fs::read_dir(&cg)
        .map(|r| {
            r.flatten()
                .filter(|d| d.path().is_dir() && d.file_name() != "_procs")
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(cgroups.is_empty(), "instance cgroups left: {cgroups:?}");
}

/// What kubelet's atomic writer does to a volume directory: `files` in a new timestamped
/// directory `stamp`, `..data` swapped onto it, the names linked into it; the previous
/// directory and the names no longer given removed.
fn kubelet_writes(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    let old = std::fs::read_link(dir.join("..data")).unwrap();
    std::fs::create_dir_all(dir.join(stamp)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(stamp).join(name), content).unwrap();
    }
    std::os::unix::fs::symlink(stamp, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !files.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
        }
    }
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

/// The service account directory as the container `app` reads it (its token, then its
/// names), once the token holds `want` (at most 30 s); and how long that took.
async fn token_in(
    rt: &mut RuntimeServiceClient<Channel>,
    app: &str,
    want: &str,
) -> (String, Duration) {
    let t = std::time::Instant::now();
    loop {
        let out = exec_sync(
            rt,
            app,
            &[
                "sh",
                "-c",
                "cd /var/run/secrets/kubernetes.io/serviceaccount; cat token; echo; ls",
            ],
        )
        .await
        .unwrap();
        let seen = String::from_utf8_lossy(&out.stdout).into_owned();
        if seen.contains(want) || t.elapsed() > Duration::from_secs(30) {
            return (seen, t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
