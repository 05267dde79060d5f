//! `kill -9` of auraed, then a restart on the same state directory and cgroup root (host
//! tier). What this auraed can promise today: nothing leaks — every process the dead
//! auraed started is killed and every cgroup removed, each reported (Daemon/Info warnings,
//! FREED events); the names are usable again; a second auraed on a state directory in use
//! is refused before it touches anything. (Re-adopting live workloads instead is not built.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::Path, time::Duration};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
};

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_leaks_no_process_and_no_cgroup() {
    if !tier::check(
        "kill_9_then_restart_leaks_no_process_and_no_cgroup",
        Tier::Host,
        tier::needs_cells(),
    ) {
        return;
    }
    let mut d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    let root = d.cgroup.clone().unwrap();
    let c = d.client("admin").await.unwrap();
    const CELLS: usize = 20;
    let mut pids = Vec::new();
    for i in 0..CELLS {
        let cell = format!("c{i}");
        c.cells()
            .allocate(pb::Cell {
                name: cell.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        if i % 5 == 0 {
            c.cells()
                .allocate(pb::Cell {
                    name: format!("{cell}/nested"),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        // Quiet ones sleep; chatty ones write all the time.
        let script = if i % 2 == 0 {
            "while :; do sleep 1; done"
        } else {
            "while :; do echo tick; sleep 0.05; done"
        };
        let st = c
            .runtime()
            .run_executable(pb::Executable {
                cell: cell.clone(),
                name: "w".into(),
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pids.push(st.pid);
    }
    assert!(pids.iter().all(|p| alive(*p)));
    // A second auraed on the same state directory is refused, naming the holder, and
    // the first one keeps serving.
    let (status, log) = d.start_second(Duration::from_secs(20)).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("in use by another auraed")
            && log.contains(&format!("pid {}", d.pid().unwrap())),
        "{log}"
    );
    assert_eq!(
        c.cells()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cells
            .len(),
        CELLS + CELLS / 5
    );

    d.crash_and_restart().await.unwrap();
    let c = d.client("admin").await.unwrap();
    let leaked: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let info = c
        .daemon()
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let swept = info
        .warnings
        .iter()
        .filter(|w| w.contains("left by a previous auraed"))
        .count();
    println!(
        "kill -9 with {CELLS} cells ({} nested), restart: {} processes leaked, {} cgroups left, {swept} reported",
        CELLS / 5,
        leaked.len(),
        left.len()
    );
    assert!(leaked.is_empty(), "processes leaked: {leaked:?}");
    assert!(left.is_empty(), "cgroups left: {left:?}");
    assert_eq!(swept, CELLS, "{:?}", info.warnings);
    // The names are free again.
    for i in 0..CELLS {
        c.cells()
            .allocate(pb::Cell {
                name: format!("c{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}
