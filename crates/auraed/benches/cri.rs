//! CRI pod start latency: what kubelet waits for when it starts a one-container pod —
//! `RunPodSandbox` + `CreateContainer` + `StartContainer` on `--cri-socket` — vs the same
//! container started through our own API in one call (`RunCell` of the image, a new cell:
//! the same cell, the same container machinery, without the CRI's records, log file and
//! the sandbox's separate init). Both run busybox `sleep 3600` from a cached image; the
//! clock stops when the call that starts the container returns. Clean-up (stop, remove,
//! free) is not timed. Rounds are interleaved so load drifts hit both alike.
//!
//! Needs root, cgroup v2, docker-registry and busybox-static (prints SKIP otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::{cri::v1 as cri, runtime::v0 as pb};
use aurae_testkit::{Daemon, DaemonOptions, TRUST_DOMAIN, oci, registry::for_containers};

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.1), at(0.9))
}

fn main() {
    let rt = aurae_testkit::bench_runtime().unwrap();
    rt.block_on(run());
}

async fn run() {
    let Some(registry) = for_containers("cri bench").unwrap() else {
        println!("SKIP cri bench: see the reason above");
        return;
    };
    let host = registry.host();
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run/cri.sock");
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\
         allow_uid_zero = true\nregistries = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/cri\"\nmethods = [\"*\"]\nnames = [\"k8s-*\"]\n\
         allow_uid_zero = true\nregistries = [\"*\"]\n"
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy),
            extra_args: vec![
                "--insecure-registry".to_owned(),
                host.clone(),
                "--cri-socket".to_owned(),
                socket.display().to_string(),
                "--cri-log-root".to_owned(),
                tmp.path().join("pods").display().to_string(),
                // No CNI configuration: both arms get loopback only.
                "--cni-conf-dir".to_owned(),
                tmp.path().display().to_string(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    oci::push_busybox(&host, "aurae/busybox", serde_json::json!({})).unwrap();
    let image = format!("{host}/aurae/busybox:v1");
    let (mut crt, mut cim) = aurae_testkit::cri::clients(&socket).await.unwrap();
    cim.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let aurae = d.client("admin").await.unwrap();
    let logs = tmp.path().join("pods");
    std::fs::create_dir_all(&logs).unwrap();

    let rounds = aurae_testkit::bench_rounds(20);
    let (mut via_cri, mut via_run_cell) = (Vec::new(), Vec::new());
    for i in 0..rounds + 2 {
        // CRI: sandbox, container, start.
        let dir = logs.join(format!("p{i}"));
        std::fs::create_dir_all(dir.join("c")).unwrap();
        let t = Instant::now();
        let sb = crt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cri::PodSandboxConfig {
                    metadata: Some(cri::PodSandboxMetadata {
                        name: format!("p{i}"),
                        uid: format!("u{i}"),
                        namespace: "bench".into(),
                        attempt: 0,
                    }),
                    log_directory: dir.display().to_string(),
                    ..Default::default()
                }),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let c = crt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sb.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "c".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/sleep".into(), "3600".into()],
                    log_path: "c/0.log".into(),
                    ..Default::default()
                }),
                sandbox_config: None,
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        crt.start_container(cri::StartContainerRequest { container_id: c })
            .await
            .unwrap();
        let cri_time = t.elapsed();
        crt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sb.clone(),
        })
        .await
        .unwrap();
        crt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sb })
            .await
            .unwrap();

        // Our API: RunCell of the image.
        let name = format!("rc{i}");
        let t = Instant::now();
        aurae
            .runtime()
            .run_cell(pb::Cell {
                name: name.clone(),
                container: Some(pb::Container {
                    image: image.clone(),
                    entrypoint: vec!["/bin/sleep".into()],
                    args: vec!["3600".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let run_cell_time = t.elapsed();
        aurae
            .cells()
            .stop(pb::StopRequest {
                name: name.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
            })
            .await
            .unwrap();
        aurae.cells().free(pb::NameRef { name }).await.unwrap();
        // The first two rounds warm caches (page cache, the pool) and are not counted.
        if i >= 2 {
            via_cri.push(cri_time);
            via_run_cell.push(run_cell_time);
        }
    }
    let (m, p10, p90) = stats(via_cri);
    let (m2, q10, q90) = stats(via_run_cell);
    println!("CRI pod start (RunPodSandbox + CreateContainer + StartContainer), {rounds} rounds");
    println!("  CRI, three calls                 median {m:8.2} ms  p10 {p10:8.2}  p90 {p90:8.2}");
    println!("  RunCell, one call                median {m2:8.2} ms  p10 {q10:8.2}  p90 {q90:8.2}");
    println!("  ratio CRI/RunCell = {:.2}", m / m2);
}
