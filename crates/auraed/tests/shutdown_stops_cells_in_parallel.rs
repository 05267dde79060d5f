//! Shutdown stops every cell at once: 8 cells whose processes ignore SIGTERM take about
//! one grace period (plus the kill), not eight (host tier).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{
    Daemon, DaemonOptions,
    tier::{self, Tier},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_8_stubborn_cells_takes_one_grace_period() {
    if !tier::check(
        "shutdown_of_8_stubborn_cells_takes_one_grace_period",
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
    let c = d.client("admin").await.unwrap();
    const CELLS: usize = 8;
    const GRACE: Duration = Duration::from_secs(2);
    let mut pids = Vec::new();
    for i in 0..CELLS {
        let cell = format!("stubborn-{i}");
        c.cells()
            .allocate(pb::Cell {
                name: cell.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        // Nested too: children are stopped with their parent.
        c.cells()
            .allocate(pb::Cell {
                name: format!("{cell}/child"),
                ..Default::default()
            })
            .await
            .unwrap();
        for cell in [cell.clone(), format!("{cell}/child")] {
            let st = c
                .runtime()
                .run_executable(pb::Executable {
                    cell,
                    name: "ignore-term".into(),
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "trap '' TERM; while :; do sleep 1; done".into(),
                    ],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            pids.push(st.pid);
        }
    }
    // Let the shells install their trap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    c.daemon()
        .shutdown(pb::ShutdownRequest {
            grace_period: Some(prost_types::Duration {
                seconds: GRACE.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = d.wait_exit(Duration::from_secs(60)).unwrap();
    let took = t0.elapsed();
    println!(
        "shutdown of {CELLS} cells (+{CELLS} nested) ignoring SIGTERM, grace {GRACE:?}: {took:?} (serial would be >= {:?})",
        GRACE * CELLS as u32
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        took < GRACE * 2 + Duration::from_secs(3),
        "shutdown took {took:?}: cells were stopped one after another"
    );
    assert!(took >= GRACE, "the grace period was not given: {took:?}");
    // Every process is gone.
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "pid {pid} survived the shutdown"
        );
    }
}
