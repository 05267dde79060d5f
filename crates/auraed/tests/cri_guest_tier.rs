//! Guest tier (QEMU TCG guest with nested KVM): the CRI's `aurae-vm` handler with a real
//! microVM. L1 is the TCG guest, auraed its PID 1 serving the CRI (its
//! `/etc/aurae/auraed.toml` names the socket), its image store seeded with an HTTP server
//! image. The CRI socket is local to L1 (as kubelet's is to its node), so this test runs
//! itself inside L1: the same binary, stripped, with its shared libraries, started by L1's
//! auraed in a cell that shares L1's network and mounts, finds `AURAE_CRI_IN_L1` set and
//! walks the pod's life against the socket there.
//!
//! What must show: a sandbox of the `aurae-vm` handler is a microVM (another kernel: its
//! boot id is not L1's) whose address is the pod's IP; the container runs the image there;
//! its CRI log is written on L1; ExecSync (output, exit code), a streamed exec (input in,
//! output and exit code out) and stats reach into it;
//! port-forward reaches its port over the bridge; stop ends it (137) and frees the
//! microVM, remove leaves no sandbox, container, instance or cgroup behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::{cri::v1 as cri, runtime::v0 as pb};
use aurae_testkit::{
    cpio,
    cri::{container_config, container_status, exec_sync, log_has, sandbox_config, sandbox_status},
    guest::{GuestOptions, needs_guest},
    oci,
    registry::needs_registry,
    tier::{self, Tier},
};
use tonic::Code;

const TEST: &str = "guest_tier_cri_aurae_vm_pods_are_microvms";
/// Set (to the HTTP server image's reference) when this binary runs inside L1.
const INNER: &str = "AURAE_CRI_IN_L1";
const SOCKET: &str = "/run/aurae/cri.sock";
const STREAM: &str = "127.0.0.1:10010";
const PAGE: &str = "<h1>hello from a CRI pod in a microVM</h1>\n";
const WALK: &str = "usr/local/bin/cri-walk";
/// Which walk this is inside L1 (its pods' uids carry it: a second walk makes pods of its
/// own rather than finding the first's).
const TRY: &str = "AURAE_CRI_TRY";
/// What the walk prints when it failed while a microVM's console had been silent for
/// [`SILENT_FOR`].
const SILENT: &str = "NESTED GUEST SILENT";
const SILENT_FOR: Duration = Duration::from_secs(45);

fn policy(registry: &str) -> String {
    let td = aurae_testkit::TRUST_DOMAIN;
    format!(
        "[[grant]]\nid = \"spiffe://{td}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nallow_host_namespaces = true\nregistries = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{td}/cri\"\nmethods = [\"*\"]\nnames = [\"k8s-*\"]\n\
         allow_uid_zero = true\nregistries = [\"{registry}/aurae\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_tier_cri_aurae_vm_pods_are_microvms() {
    if let Ok(web) = std::env::var(INNER) {
        inside_l1(&web).await;
        return;
    }
    if !tier::check(
        TEST,
        Tier::Guest,
        needs_guest()
            .or_else(needs_registry)
            .or_else(oci::needs_busybox),
    ) {
        return;
    }
    let (web, _busybox, store) = common::seeded_store(PAGE).await;
    let registry = web.split('/').next().unwrap().to_owned();
    let mut files = aurae_testkit::guest::instance_files().unwrap();
    files.extend(store);
    files.extend(
        aurae_testkit::guest::program_files(&std::env::current_exe().unwrap(), WALK).unwrap(),
    );
    for d in ["var/log", "var/log/pods"] {
        files.push(cpio::Entry::Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    files.push(cpio::Entry::File {
        path: "etc/aurae/auraed.toml".into(),
        mode: 0o644,
        data: format!("cri_socket = \"{SOCKET}\"\ncri_stream_address = \"{STREAM}\"\n")
            .into_bytes(),
    });
    files.push(cpio::Entry::File {
        path: "etc/aurae/policy.toml".into(),
        mode: 0o644,
        data: policy(&registry).into_bytes(),
    });
    let opts = GuestOptions {
        extra_files: files,
        memory_mib: 2048,
        ..Default::default()
    };
    // A nested guest that goes silent under QEMU TCG's emulated SVM (its console stops
    // mid-line and L1 sits idle: a lost wakeup, not a busy guest; about one full run in
    // four) takes the walk with it: walked again once on a fresh L1, saying so, the silent
    // guest's log printed. (A second microVM in the same L1 after it wedged L1 itself.)
    for attempt in 1..=2 {
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let silent2 = silent.clone();
        let web = web.clone();
        aurae_testkit::guest::with_live_guest(TEST, opts.clone(), move |g| {
        let web = web.clone();
        let silent = silent2.clone();
        async move {
            let c = g.client("admin").await.unwrap();
            let info = c
                .daemon()
                .info(pb::InfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert!(
                !info.warnings.iter().any(|w| w.contains("auraed.toml")),
                "L1 read its config file without a warning: {:?}",
                info.warnings
            );
            // A cell sharing L1's network (the streaming server is on its loopback) and
            // mounts (the CRI socket, the pods' log directory, the cgroup tree).
            c.cells()
                .allocate(pb::Cell {
                    name: "criwalk".into(),
                    namespaces: Some(pb::CellNamespaces {
                        share_host_net: true,
                        share_host_mount: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
            let t = Instant::now();
            let st = c
                .runtime()
                .run_executable(pb::Executable {
                    cell: "criwalk".into(),
                    name: format!("walk{attempt}"),
                    argv: vec![
                        format!("/{WALK}"),
                        TEST.into(),
                        "--exact".into(),
                        "--nocapture".into(),
                        "--test-threads=1".into(),
                    ],
                    env: [
                        (INNER.to_owned(), web.clone()),
                        (TRY.to_owned(), attempt.to_string()),
                        ("RUST_BACKTRACE".to_owned(), "1".to_owned()),
                        ("PATH".to_owned(), "/bin".to_owned()),
                        ("TMPDIR".to_owned(), "/tmp".to_owned()),
                    ]
                    .into(),
                    uid: Some(0),
                    gid: Some(0),
                    run: Some(pb::RunOptions {
                        wait: true,
                        remove: true,
                        output: true,
                        timeout: Some(prost_types::Duration {
                            seconds: 590,
                            nanos: 0,
                        }),
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("the walk in L1: {e:?}\n{}", g.serial_text()))
                .into_inner();
            let out: String = st
                .output
                .iter()
                .map(|c| String::from_utf8_lossy(&c.data).into_owned())
                .collect();
            println!(
                "--- the CRI walk inside L1 ({:.1} s) ---\n{out}--- end of the walk ---",
                t.elapsed().as_secs_f64()
            );
            let code = st.exit.as_ref().and_then(|e| e.how);
            if code != Some(pb::exit_status::How::Code(0)) && attempt == 1 && out.contains(SILENT) {
                println!(
                    "RETRY the walk (try 2 of 2, on a fresh L1): its microVM stopped answering ({SILENT} above)"
                );
                silent.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            assert_eq!(
                code,
                Some(pb::exit_status::How::Code(0)),
                "the walk inside L1 failed ({st:?}):\n{out}\nL1's console:\n{}",
                g.serial_text()
            );
            assert!(out.contains("test result: ok. 1 passed"), "{out}");
            c.cells()
                .free(pb::NameRef {
                    name: "criwalk".into(),
                })
                .await
                .unwrap();
        }
    })
    .await
    .unwrap();
        if !silent.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
    }
}

/// RunPodSandbox of an `aurae-vm` sandbox, again when the nested guest triple-faulted
/// (QEMU TCG's emulated SVM: see `aurae_testkit::guest::nested_guest_faulted`).
async fn run_vm_sandbox(
    rt: &mut aurae_proto::cri::v1::runtime_service_client::RuntimeServiceClient<
        tonic::transport::Channel,
    >,
    config: &cri::PodSandboxConfig,
) -> String {
    aurae_testkit::guest::retry_nested("RunPodSandbox", || {
        let mut rt = rt.clone();
        let config = config.clone();
        async move {
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: "aurae-vm".into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
        }
    })
    .await
    .unwrap()
}

/// Printed when the walk inside L1 fails: what the microVMs' own consoles said (their
/// kernel and their auraed, from L1's instance logs) and L1's load, so that a nested guest
/// that stopped answering shows why.
struct ReportOnFailure;

impl Drop for ReportOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let dir = Path::new("/var/lib/aurae/logs/instances");
        let Ok(entries) = std::fs::read_dir(dir) else {
            println!("no instance logs in {}", dir.display());
            return;
        };
        for e in entries.flatten() {
            let quiet = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .unwrap_or_default();
            if quiet >= SILENT_FOR {
                println!(
                    "{SILENT}: {} written last {:.0} s ago",
                    e.path().display(),
                    quiet.as_secs_f64()
                );
            }
            let text = std::fs::read(e.path()).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(300);
            println!(
                "---- {} (last {} of {} lines) ----\n{}\n----",
                e.path().display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
        for f in ["/proc/loadavg", "/proc/pressure/cpu", "/proc/meminfo"] {
            let t = std::fs::read_to_string(f).unwrap_or_default();
            println!(
                "---- L1 {f} ----\n{}",
                t.lines().take(8).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// What answered on a freed pod's address, and L1's view of it: the answer to a GET,
/// L1's neighbour and route tables and its processes, for a failure to name the culprit.
async fn who_answers(mut stream: tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = format!(
        "connected {:?} -> {:?}",
        stream.local_addr(),
        stream.peer_addr()
    );
    let mut answer = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        stream.read(&mut answer).await
    })
    .await;
    match read {
        Ok(Ok(n)) => out += &format!("; answer: {:?}", String::from_utf8_lossy(&answer[..n])),
        other => out += &format!("; no answer to a GET: {other:?}"),
    }
    for f in ["/proc/net/arp", "/proc/net/route"] {
        out += &format!(
            "\n---- L1 {f} ----\n{}",
            std::fs::read_to_string(f).unwrap_or_default()
        );
    }
    out += "\n---- L1 processes ----";
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_ok()
            && let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
        {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out += &format!("\n{} {cmd}", e.file_name().to_string_lossy());
        }
    }
    out
}

/// The walk, inside L1 (root there, L1's network and mounts).
async fn inside_l1(web: &str) {
    let _report = ReportOnFailure;
    let (mut rt, mut im) = aurae_testkit::cri::clients(Path::new(SOCKET))
        .await
        .unwrap();
    // A walk after one whose microVM went silent: that one's pods go first (kubelet's
    // own answer to a dead sandbox: stop and remove it).
    let earlier = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    for sb in earlier {
        let gone = tokio::time::timeout(Duration::from_secs(150), async {
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: sb.id.clone(),
            })
            .await?;
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: sb.id.clone(),
            })
            .await
        })
        .await;
        println!("an earlier walk's pod {} removed: {gone:?}", sb.id);
    }
    let handlers = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .runtime_handlers;
    assert!(
        handlers.iter().any(|h| h.name == "aurae-vm"),
        "{handlers:?}"
    );
    let image = im
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: web.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image;
    assert!(image.is_some(), "{web} is in L1's store");

    let attempt = std::env::var(TRY).unwrap_or_else(|_| "1".into());
    let web_uid = format!("uid-web-t{attempt}");
    let log_dir = Path::new("/var/log/pods").join(format!("default_web_{web_uid}"));
    let log_dir = log_dir.as_path();
    std::fs::create_dir_all(log_dir.join("web")).unwrap();
    let config = sandbox_config("web", &web_uid, log_dir);
    // The pod: its microVM, the container started in it. A nested guest that dies under
    // QEMU TCG's emulated SVM after its boot (its VM's end says so: a triple fault) takes
    // the pod with it: tried again from the sandbox, saying so.
    let mut tried = 1;
    let (sb, ip, web_c) = loop {
        let t = Instant::now();
        let sb = run_vm_sandbox(&mut rt, &config).await;
        println!(
            "aurae-vm sandbox {sb} ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let s = sandbox_status(&mut rt, &sb).await.unwrap();
        assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32, "{s:?}");
        let ip: std::net::Ipv4Addr = s.network.as_ref().unwrap().ip.parse().unwrap();
        let web_c = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sb.clone(),
                config: Some(cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        resources: Some(kubelets_resources(64 << 20)),
                        ..Default::default()
                    }),
                    ..container_config("web", web, None)
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        let t = Instant::now();
        rt.start_container(cri::StartContainerRequest {
            container_id: web_c.clone(),
        })
        .await
        .unwrap();
        println!(
            "container started in the microVM in {:.2} s (image handed over)",
            t.elapsed().as_secs_f64()
        );
        let st = container_status(&mut rt, &web_c).await.unwrap();
        if st.state == cri::ContainerState::ContainerRunning as i32 {
            break (sb, ip, web_c);
        }
        assert!(
            aurae_testkit::guest::nested_guest_faulted(&st.message)
                && tried < aurae_testkit::guest::NESTED_TRIES,
            "the container runs in the microVM: {st:?}"
        );
        println!(
            "RETRY the pod (try {} of {}): its nested guest faulted: {}",
            tried + 1,
            aurae_testkit::guest::NESTED_TRIES,
            st.message
        );
        tried += 1;
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap();
    };

    // Another kernel: the container's boot id is not L1's.
    let l1_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let out = exec_sync(&mut rt, &web_c, &["cat", "/proc/sys/kernel/random/boot_id"])
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let boot = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(boot.trim().len(), 36, "{boot:?}");
    assert_ne!(boot, l1_boot, "the pod runs on a kernel of its own");
    let out = exec_sync(
        &mut rt,
        &web_c,
        &["sh", "-c", "echo $GREETING from $(hostname); exit 3"],
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from web-0\n");
    assert_eq!(out.exit_code, 3);

    // Its resources, applied to its own cgroup in the microVM, and changed while it runs.
    let limits = |rt: &mut cri::runtime_service_client::RuntimeServiceClient<_>| {
        let id = web_c.clone();
        let rt = rt.clone();
        async move {
            let mut rt = rt;
            let out = exec_sync(
                &mut rt,
                &id,
                &[
                    "cat",
                    "/sys/fs/cgroup/memory.max",
                    "/sys/fs/cgroup/memory.oom.group",
                ],
            )
            .await
            .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert_eq!(limits(&mut rt).await, format!("{}\n1\n", 64u64 << 20));
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: web_c.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(limits(&mut rt).await, format!("{}\n1\n", 96u64 << 20));
    let st = container_status(&mut rt, &web_c).await.unwrap();
    let linux = st.resources.unwrap().linux.unwrap();
    assert_eq!(
        (linux.memory_limit_in_bytes, linux.cpu_shares),
        (96 << 20, 256)
    );
    println!("the microVM container's memory.max: 64 MiB at its start, 96 MiB after an update");

    // A streamed exec (kubectl exec -i) into the microVM: input through, the exit code.
    let url = rt
        .exec(cri::ExecRequest {
            container_id: web_c.clone(),
            cmd: vec!["sh".into(), "-c".into(), "tr a-z A-Z; exit 4".into()],
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = aurae_testkit::cri::exec_stream(&url, Some(b"streamed into a microvm\n"))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "STREAMED INTO A MICROVM\n"
    );
    assert_eq!(out.exit_code(), Some(4), "{}", out.status);

    // Attach with input (kubectl run -i) to a container of the microVM: its own stdin,
    // written through the instance's Executables/Attach and closed at the attach's end.
    let mut talk = container_config(
        "talk",
        web,
        Some("while read l; do echo \"got $l\"; done; echo bye"),
    );
    (talk.stdin, talk.stdin_once) = (true, true);
    std::fs::create_dir_all(log_dir.join("talk")).unwrap();
    let talk = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: Some(talk),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: talk.clone(),
    })
    .await
    .unwrap();
    let url = rt
        .attach(cri::AttachRequest {
            container_id: talk.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let out = aurae_testkit::cri::exec_stream(&url, Some(b"into its own stdin\n"))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got into its own stdin\nbye\n"
    );
    assert!(out.status.contains("Success"), "{}", out.status);

    // Port-forward: the streaming server on L1's loopback dials the microVM's address.
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
        assert!(url.starts_with(&format!("http://{STREAM}/")), "{url}");
        let (data, _) =
            aurae_testkit::cri::port_forward_once(&url, 8080, b"GET / HTTP/1.0\r\n\r\n")
                .await
                .unwrap();
        body = String::from_utf8_lossy(&data).into_owned();
        if body.contains(PAGE) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains(PAGE), "{body}");
    // httpd -vv logs each request on stderr: written on L1, in the CRI's format.
    log_has(&log_dir.join("web/0.log"), "url:/", Duration::from_secs(30))
        .await
        .unwrap();
    let stats = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: web_c.clone(),
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
        "the container's memory, read in the microVM"
    );

    // The pod's cost on L1 is the whole microVM's (its cgroup here: VMM and guest).
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let pod_memory = ps
        .linux
        .as_ref()
        .and_then(|l| l.memory.as_ref())
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    println!("the pod on L1: {} MiB", pod_memory >> 20);
    assert!(
        pod_memory > 64 << 20,
        "a microVM pod costs its guest's memory on L1, not its container's: {pod_memory}"
    );

    // Stop ends the container and frees the microVM; remove leaves nothing.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    let st = container_status(&mut rt, &web_c).await.unwrap();
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerExited as i32,
        "{st:?}"
    );
    assert_eq!(st.exit_code, 137, "{st:?}");
    let err = exec_sync(&mut rt, &web_c, &["true"]).await.unwrap_err();
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
    let err = container_status(&mut rt, &web_c).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let instances = Path::new("/sys/fs/cgroup/cells/instances");
    let cgroups: Vec<String> = std::fs::read_dir(instances)
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir() && d.file_name() != "_procs")
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cgroups.is_empty(),
        "instance cgroups left on L1: {cgroups:?}"
    );
    // No route to the freed microVM's address: nothing answers there any more.
    let gone = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((ip, 8080)),
    )
    .await;
    if let Ok(Ok(stream)) = gone {
        // Seen once in a local CI run (not since): say who answered before failing.
        let who = who_answers(stream).await;
        panic!("{ip}:8080 still answers after the pod's removal: {who}");
    }

    // The default handler on L1 (a cell of L1's): a container over its own memory limit
    // is OOM-killed in its own group and reported `OOMKilled`; its sibling runs on.
    let hog_uid = format!(
        "uid-hog-t{}",
        std::env::var(TRY).unwrap_or_else(|_| "1".into())
    );
    let log_dir = Path::new("/var/log/pods").join(format!("default_hog_{hog_uid}"));
    let log_dir = log_dir.as_path();
    for c in ["hog", "calm"] {
        std::fs::create_dir_all(log_dir.join(c)).unwrap();
    }
    // The pod's own limit (as kubelet sends it: its containers' sum) bounds them together.
    let config = cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 96 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..sandbox_config("hog", &hog_uid, log_dir)
    };
    let sb = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let mut ids = Vec::new();
    for (name, script) in [
        ("calm", "exec sleep 300"),
        ("hog", "head -c 200000000 /dev/zero | tail"),
    ] {
        let id = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sb.clone(),
                config: Some(cri::ContainerConfig {
                    linux: Some(cri::LinuxContainerConfig {
                        resources: Some(kubelets_resources(32 << 20)),
                        ..Default::default()
                    }),
                    ..container_config(name, web, Some(script))
                }),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        ids.push(id);
    }
    let t = Instant::now();
    let hog = loop {
        let st = container_status(&mut rt, &ids[1]).await.unwrap();
        if st.state == cri::ContainerState::ContainerExited as i32 {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hog.reason, "OOMKilled", "{hog:?}");
    assert_eq!(hog.exit_code, 137, "{hog:?}");
    let calm = container_status(&mut rt, &ids[0]).await.unwrap();
    assert_eq!(
        calm.state,
        cri::ContainerState::ContainerRunning as i32,
        "{calm:?}"
    );
    println!("a container over its own 32 MiB: OOMKilled, its sibling running");
    // A resize within the pod's limit is applied; past it, refused naming both figures.
    let resize = |memory: i64| cri::UpdateContainerResourcesRequest {
        container_id: ids[0].clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: memory,
            ..Default::default()
        }),
        ..Default::default()
    };
    rt.update_container_resources(resize(80 << 20))
        .await
        .unwrap();
    let err = rt
        .update_container_resources(resize(200 << 20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("linux.memory_limit_in_bytes")
            && err.message().contains(&(96u64 << 20).to_string()),
        "{err:?}"
    );
    let calm = container_status(&mut rt, &ids[0]).await.unwrap();
    assert_eq!(
        calm.resources.unwrap().linux.unwrap().memory_limit_in_bytes,
        80 << 20
    );
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: sb.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb })
        .await
        .unwrap();
}

/// A container's resources as kubelet sends them on a cgroup v2 node (Burstable: a
/// memory limit, CPU shares, a group OOM kill).
fn kubelets_resources(memory: i64) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        memory_limit_in_bytes: memory,
        cpu_shares: 256,
        cpu_period: 100_000,
        unified: [("memory.oom.group".to_owned(), "1".to_owned())].into(),
        ..Default::default()
    }
}
