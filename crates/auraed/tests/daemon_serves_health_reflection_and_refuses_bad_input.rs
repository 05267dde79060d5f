//! The daemon's edge: socket modes, health and reflection for generic gRPC tools, precise
//! errors for bad input (the daemon stays up), startup errors for bad configuration, and
//! the ordered shutdown on SIGTERM and on the Shutdown RPC.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    process::Command,
    time::Duration,
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions};
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_auraed"))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_in_a_0700_directory() {
    let d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let meta = std::fs::symlink_metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&d.socket), 0o600, "socket mode");
    assert_eq!(
        mode(d.socket.parent().unwrap()),
        0o700,
        "socket directory mode"
    );
    assert_eq!(
        mode(&d.dir.path().join("state/store")),
        0o700,
        "state store mode"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_and_reflection_lists_the_runtime_with_five_rpcs() {
    let d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    for service in ["", "aurae.runtime.v0.Runtime", "aurae.runtime.v0.Cells"] {
        let r = c
            .health()
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} is SERVING");
    }
    let unknown = c
        .health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut refl = ServerReflectionClient::new(c.channel());
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut s = refl
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "aurae.runtime.v0.Runtime".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        s.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "aurae.runtime.v0.Runtime",
        "aurae.runtime.v0.Cells",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        s.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a file descriptor");
    };
    use prost::Message;
    let runtime = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .flat_map(|f| f.service)
        .find(|s| s.name() == "Runtime")
        .expect("Runtime service in the descriptor");
    let rpcs: Vec<&str> = runtime.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        rpcs,
        [
            "RunExecutable",
            "RunCell",
            "RunVirtualMachine",
            "Spawn",
            "RunPod"
        ]
    );

    // v1alpha answers too (older grpcurl versions use it).
    use tonic_reflection::pb::v1alpha as a;
    let mut old = a::server_reflection_client::ServerReflectionClient::new(c.channel());
    let mut s = old
        .server_reflection_info(tokio_stream::iter(vec![a::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(a::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors_and_the_daemon_stays_up() {
    let mut d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    let exe = |cell: &str, argv: &[&str]| pb::Executable {
        cell: cell.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let cases: Vec<(pb::Executable, &str)> = vec![
        (exe("", &["/bin/true"]), "cell: is empty"),
        (exe("web/../etc", &["/bin/true"]), "cell: \"web/../etc\""),
        (exe("Web", &["/bin/true"]), "lowercase"),
        (exe("web", &[]), "argv: is empty"),
        (exe("web", &["true"]), "argv[0]"),
    ];
    for (e, want) in cases {
        let s = c.runtime().run_executable(e).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(
            s.message().contains(want),
            "{want:?} not in {:?}",
            s.message()
        );
    }
    // An interactive exec: what its first message must be, the terminal's size, whose
    // executable: each refused naming the field, before anything runs.
    let start = |tty: bool, size: Option<(u32, u32)>, cell: &str| pb::ExecInput {
        what: Some(pb::exec_input::What::Start(pb::ExecStart {
            request: Some(pb::ExecRequest {
                executable: Some(pb::ExecutableRef {
                    cell: cell.into(),
                    name: "app".into(),
                }),
                argv: vec!["sh".into()],
                timeout: None,
            }),
            stdin: true,
            tty,
            size: size.map(|(width, height)| pb::TerminalSize { width, height }),
        })),
    };
    let stdin_first = pb::ExecInput {
        what: Some(pb::exec_input::What::Stdin(b"echo hi\n".to_vec())),
    };
    let cases: Vec<(Vec<pb::ExecInput>, Code, &str)> = vec![
        (vec![], Code::InvalidArgument, "start: "),
        (vec![stdin_first], Code::InvalidArgument, "start: "),
        (
            vec![start(false, Some((80, 24)), "web")],
            Code::InvalidArgument,
            "start.size: ",
        ),
        (
            vec![start(true, Some((0, 24)), "web")],
            Code::InvalidArgument,
            "start.size.width",
        ),
        (
            vec![start(true, Some((80, 70000)), "web")],
            Code::InvalidArgument,
            "start.size.height",
        ),
        (
            vec![start(true, None, "Web")],
            Code::InvalidArgument,
            "executable",
        ),
        (
            vec![start(false, None, "nosuchcell")],
            Code::NotFound,
            "nosuchcell",
        ),
    ];
    for (input, code, want) in cases {
        let s = c
            .executables()
            .exec_stream(tokio_stream::iter(input))
            .await
            .unwrap_err();
        assert_eq!(s.code(), code, "{want}: {s:?}");
        assert!(
            s.message().contains(want),
            "{want:?} not in {:?}",
            s.message()
        );
    }
    // Attach: the same first-message and name checks.
    let attach_start = |cell: &str, name: &str| pb::AttachInput {
        what: Some(pb::attach_input::What::Start(pb::AttachStart {
            executable: Some(pb::ExecutableRef {
                cell: cell.into(),
                name: name.into(),
            }),
            stdin: true,
            ..Default::default()
        })),
    };
    let cases: Vec<(Vec<pb::AttachInput>, Code, &str)> = vec![
        (vec![], Code::InvalidArgument, "start: "),
        (
            vec![pb::AttachInput {
                what: Some(pb::attach_input::What::Stdin(b"x".to_vec())),
            }],
            Code::InvalidArgument,
            "start: ",
        ),
        (
            vec![attach_start("web", "Bad")],
            Code::InvalidArgument,
            "executable.name",
        ),
        (
            vec![attach_start("nosuchcell", "x")],
            Code::NotFound,
            "nosuchcell",
        ),
    ];
    for (input, code, want) in cases {
        let s = c
            .executables()
            .attach(tokio_stream::iter(input))
            .await
            .unwrap_err();
        assert_eq!(s.code(), code, "{want}: {s:?}");
        assert!(
            s.message().contains(want),
            "{want:?} not in {:?}",
            s.message()
        );
    }
    // UpdateFiles: entries named as the directory's own layout, an unknown executable,
    // Update without limits.
    let dir = |name: &str| pb::ContainerFile {
        path: "/etc/conf".into(),
        read_only: true,
        entries: vec![pb::DirectoryEntry {
            name: name.into(),
            content: b"x".to_vec(),
            mode: 0,
        }],
        ..Default::default()
    };
    for (files, code, want) in [
        (
            vec![dir("..data")],
            Code::InvalidArgument,
            "files[0].entries[0].name",
        ),
        (
            vec![dir("../x")],
            Code::InvalidArgument,
            "files[0].entries[0].name",
        ),
        (vec![dir("ok")], Code::NotFound, "does not exist"),
    ] {
        let s = c
            .executables()
            .update_files(pb::UpdateFilesRequest {
                executable: Some(pb::ExecutableRef {
                    cell: "nope".into(),
                    name: "x".into(),
                }),
                files,
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), code, "{want}: {s:?}");
        assert!(
            s.message().contains(want),
            "{want:?} not in {:?}",
            s.message()
        );
    }
    let s = c
        .executables()
        .update(pb::UpdateExecutableRequest {
            executable: Some(pb::ExecutableRef {
                cell: "nope".into(),
                name: "x".into(),
            }),
            limits: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // An unknown enum value.
    let s = c
        .runtime()
        .spawn(pb::Instance {
            name: "i1".into(),
            isolation: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("isolation: unknown value 42"),
        "{}",
        s.message()
    );
    // Out-of-range limits and sizes name the field.
    let s = c
        .cells()
        .allocate(pb::Cell {
            name: "web".into(),
            limits: Some(pb::CellLimits {
                cpu_weight: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        s.message().starts_with("limits.cpu_weight"),
        "{}",
        s.message()
    );
    // An oversized message (2 MiB > the 1 MiB limit) is refused before it is decoded.
    let big = pb::Executable {
        cell: "web".into(),
        argv: vec!["/bin/true".into()],
        stdin: vec![0; 2 << 20],
        ..Default::default()
    };
    let s = c.runtime().run_executable(big).await.unwrap_err();
    // tonic answers OUT_OF_RANGE from the length prefix, before allocating the body.
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("limit is: 1048576"), "{}", s.message());
    // A pod with a bad port is refused naming the field; one whose image cannot be
    // pulled fails at the pull, before any instance exists. (This daemon shares the
    // host's network namespace: nothing here may spawn an instance, whose bridge would
    // land on the host.)
    let pod = |port: u32| pb::Pod {
        name: "p1".into(),
        container: Some(pb::Container {
            image: "127.0.0.1:9/aurae/busybox:latest".into(),
            ..Default::default()
        }),
        listen_port: port,
        ..Default::default()
    };
    let s = c.runtime().run_pod(pod(70_000)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("listen_port"), "{}", s.message());
    let s = c.runtime().run_pod(pod(8080)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().contains("127.0.0.1:9"), "{}", s.message());
    let none = c
        .instances()
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.instances.is_empty(), "{none:?}");
    // A VM from a kernel this auraed does not allow: FAILED_PRECONDITION with the flag to
    // use (no --vm-image-root here), or no KVM at all.
    let s = c
        .runtime()
        .run_virtual_machine(pb::VirtualMachine {
            name: "vm1".into(),
            kernel_path: "/boot/vmlinuz".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains("--vm-image-root") || s.message().contains("/dev/kvm"),
        "{}",
        s.message()
    );
    // An executable in a cell that does not exist: NOT_FOUND saying what to do.
    let s = c
        .runtime()
        .run_executable(exe("web", &["/bin/true"]))
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::NotFound | Code::FailedPrecondition),
        "{s:?}"
    );
    // Still serving, on a fresh connection too.
    assert!(d.alive());
    let c2 = d.client("admin").await.unwrap();
    assert_eq!(
        c2.daemon()
            .info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .peer_id,
        "spiffe://aurae.test/operator/admin"
    );
}

fn start_err(args: &[&str], dir: &Path) -> String {
    let out = Command::new(bin())
        .args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "auraed must refuse to start with {args:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_at_startup_with_the_reason() {
    let d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/a.sock");
    let sock = sock.to_str().unwrap();
    let pki = d.pki.dir.to_str().unwrap();

    let e = start_err(
        &["--pki-dir", "/nonexistent/pki", "--socket", sock],
        dir.path(),
    );
    assert!(e.contains("aer pki init --dir /nonexistent/pki"), "{e}");

    let bad_policy = [
        ("not = [toml", "does not parse"),
        (
            "[[grant]]\nid = \"spiffe://aurae.test/\"\nmethods = [\"*\"]\nnames = [\"*\"]",
            "path is empty",
        ),
        (
            "[[grant]]\nid = \"spiffe://aurae.test/x\"\nmethods = [\"aurae.runtime.v0.Runtime/Nope\"]\nnames = [\"*\"]",
            "names no method",
        ),
    ];
    for (i, (text, want)) in bad_policy.iter().enumerate() {
        let p = dir.path().join(format!("policy{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let e = start_err(
            &[
                "--pki-dir",
                pki,
                "--socket",
                sock,
                "--policy",
                p.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    // A socket directory others can enter is refused.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = start_err(
        &[
            "--pki-dir",
            pki,
            "--socket",
            open.join("a.sock").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(e.contains("0700"), "{e}");
    // The running daemon's socket is not stolen.
    let e = start_err(
        &["--pki-dir", pki, "--socket", d.socket.to_str().unwrap()],
        dir.path(),
    );
    assert!(e.contains("another auraed is listening"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_shutdown_rpc_stop_the_daemon_in_order() {
    let mut d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let status = d
        .terminate(Duration::from_secs(15))
        .unwrap()
        .expect("exited after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
    assert!(d.log_text().contains("auraed stopped"));

    let mut d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    let c = d.client("admin").await.unwrap();
    let s = c
        .daemon()
        .shutdown(pb::ShutdownRequest {
            grace_period: None,
            reboot: true,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "reboot is PID 1 only");
    c.daemon()
        .shutdown(pb::ShutdownRequest::default())
        .await
        .unwrap();
    let status = d
        .wait_exit(Duration::from_secs(15))
        .unwrap()
        .expect("exited after Shutdown");
    assert!(status.success());
    assert!(d.log_text().contains("shutdown requested over the API"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_state_directory() {
    let mut d = Daemon::start(bin(), DaemonOptions::default())
        .await
        .unwrap();
    d.terminate(Duration::from_secs(15)).unwrap();
    let state = d.dir.path().join("state");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("store/daemon/boot.json")).unwrap())
            .unwrap();
    assert_eq!(rec["boots"], 1);
}
