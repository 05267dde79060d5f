//! Load: 64 concurrent mTLS clients, each on its own connection, × 200 unary calls on
//! loopback TCP. Asserts 0 errors; prints p50/p99 latency and the daemon's RSS and fd
//! count before and after (figures recorded in SPECIFICATION.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions};

const CLIENTS: usize = 64;
const CALLS: usize = 200;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_two_hundred_calls_each_without_errors() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rss_before = d.rss_kib().unwrap();
    let fds_before = d.fd_count().unwrap();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(d.tcp_client("admin").await.unwrap());
    }
    let fds_connected = d.fd_count().unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            let mut daemon = c.daemon();
            let mut lat = Vec::with_capacity(CALLS);
            let mut errors = 0usize;
            for _ in 0..CALLS {
                let t = Instant::now();
                match daemon.info(pb::InfoRequest {}).await {
                    Ok(r) if r.get_ref().peer_id.ends_with("/operator/admin") => {
                        lat.push(t.elapsed())
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors, c)
        }));
    }
    let mut all = Vec::with_capacity(CLIENTS * CALLS);
    let mut errors = 0;
    let mut open = Vec::new();
    for t in tasks {
        let (lat, e, c) = t.await.unwrap();
        all.extend(lat);
        errors += e;
        open.push(c);
    }
    let wall = start.elapsed();
    let rss_loaded = d.rss_kib().unwrap();
    drop(open);
    tokio::time::sleep(Duration::from_millis(300)).await;
    all.sort();
    let rss_after = d.rss_kib().unwrap();
    let fds_after = d.fd_count().unwrap();
    println!(
        "load: {CLIENTS} clients x {CALLS} calls = {} ok, {errors} errors in {:.2} s ({:.0} calls/s); \
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; auraed RSS {} KiB idle -> {} KiB loaded -> {} KiB after; fds {} idle -> {} connected -> {} after",
        all.len(),
        wall.as_secs_f64(),
        all.len() as f64 / wall.as_secs_f64(),
        pct(&all, 0.50).as_secs_f64() * 1e3,
        pct(&all, 0.99).as_secs_f64() * 1e3,
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        rss_before,
        rss_loaded,
        rss_after,
        fds_before,
        fds_connected,
        fds_after,
    );
    assert_eq!(errors, 0);
    assert_eq!(all.len(), CLIENTS * CALLS);
    assert!(
        fds_connected + 2 >= fds_before + CLIENTS,
        "each client holds a connection"
    );
    assert!(
        fds_after <= fds_before + 2,
        "connections closed: {fds_before} -> {fds_after} fds"
    );
}
