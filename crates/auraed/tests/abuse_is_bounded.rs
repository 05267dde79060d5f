//! Abuse of the API edge stays bounded while normal traffic goes on: 200 TCP sockets that
//! never start TLS are cut at the handshake deadline, and 1000 concurrent calls on one
//! connection queue behind the stream limit instead of failing or exhausting the daemon.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_a_thousand_streams_do_not_hurt_normal_traffic() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            extra_args: vec!["--handshake-timeout-s".into(), "2".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = d.tcp.unwrap();
    // 200 sockets that never speak.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Normal traffic during the abuse: a fresh client, sequential calls.
    let normal = d.tcp_client("admin").await.unwrap();
    let mut lat = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        normal.daemon().info(pb::InfoRequest {}).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let p99 = lat[98];
    // 1000 concurrent calls on one connection (the server allows 128 streams at once).
    let one = d.tcp_client("admin").await.unwrap();
    let t = Instant::now();
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let mut c = one.daemon();
            tokio::spawn(async move { c.info(pb::InfoRequest {}).await.is_ok() })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        ok += usize::from(c.await.unwrap());
    }
    let burst = t.elapsed();
    // The silent sockets are closed by the deadline.
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut closed = 0;
    for s in &mut silent {
        let mut b = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    println!(
        "abuse: normal p99 {:.2} ms during 200 silent sockets; 1000 calls on one connection: {ok} ok in {:.2} s; {closed}/200 silent sockets closed ({:.1} s after the checks)",
        p99.as_secs_f64() * 1e3,
        burst.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        ok, 1000,
        "calls beyond the stream limit queue, they do not fail"
    );
    assert_eq!(
        closed, 200,
        "every silent socket is cut at the handshake deadline"
    );
    assert!(
        p99 < Duration::from_secs(1),
        "normal traffic stays served: p99 {p99:?}"
    );
}
