//! Abuse of the API edge stays bounded while normal traffic goes on: 200 TCP sockets that
//! never start TLS are cut at the handshake deadline, and 1000 concurrent calls on one
//! connection queue behind the stream limit instead of failing or exhausting the daemon.
//! 1 100 silent TCP connections fill only the TCP listener's budget (the socket answers at
//! once; the extra connections are closed at once), one peer address holds at most its
//! handshake cap (64), and one identity at most its connection cap (128) while others get
//! through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{Daemon, DaemonOptions, TRUST_DOMAIN};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_a_thousand_streams_do_not_hurt_normal_traffic() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            // Every client of this test is 127.0.0.1: lift the per-address handshake cap
            // (its own test is below) so the silent sockets all wait for the deadline.
            extra_args: vec![
                "--handshake-timeout-s".into(),
                "2".into(),
                "--max-handshakes-per-peer".into(),
                "1000".into(),
            ],
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

/// The soft open-file limit of this test process, raised to the hard limit (the flood
/// below needs more than 1024 descriptors).
fn raise_own_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    if let Some(max) = l.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: l.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Sockets the daemon has closed (EOF or reset), without waiting.
fn count_closed(socks: &[TcpStream]) -> usize {
    socks
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            match s.try_read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

/// Polls until at least `want` of `socks` are closed, at most `limit`.
async fn wait_closed(socks: &[TcpStream], want: usize, limit: Duration) -> usize {
    let start = Instant::now();
    loop {
        let n = count_closed(socks);
        if n >= want || start.elapsed() > limit {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn health(c: &aurae_client::Client) -> bool {
    tokio::time::timeout(
        Duration::from_secs(5),
        c.health().check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .is_ok_and(|r| r.is_ok_and(|r| r.into_inner().status == 1))
}

/// Each listener's connection budget, as the daemon logged it when it started serving.
pub fn logged_budget(d: &Daemon) -> usize {
    let log = d.log_text();
    let at = log
        .find("max_connections_per_listener=")
        .expect("the daemon logs its budgets");
    log[at + "max_connections_per_listener=".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// A fresh connection over the socket and one health call: how long both took.
async fn fresh_socket_health(d: &Daemon) -> Duration {
    let t = Instant::now();
    let c = tokio::time::timeout(Duration::from_secs(10), d.client("admin"))
        .await
        .expect("connecting over the socket timed out")
        .unwrap();
    assert!(health(&c).await, "health over the socket");
    t.elapsed()
}

/// The flood: 1 100 TCP connections that never speak TLS. They fill the TCP
/// listener's budget (1 024 where the open-file limit allows; the rest are closed at once) and nothing else: the Unix
/// socket keeps answering at once. Once they go, TCP serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_flood_does_not_starve_the_socket() {
    const FLOOD: usize = 1100;
    const MAX_CONNECTIONS: usize = 1024;
    let fd_limit = raise_own_fd_limit();
    if fd_limit < (FLOOD + 200) as u64 {
        println!("SKIP: this test process may open only {fd_limit} files");
        return;
    }
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            // The per-address cap would close most of the flood at once (all of it comes
            // from 127.0.0.1; see the next test): lift it so the listener budget is what
            // binds, with a deadline long enough to outlast the measurements.
            extra_args: vec![
                "--handshake-timeout-s".into(),
                "30".into(),
                "--max-connections".into(),
                MAX_CONNECTIONS.to_string(),
                "--max-handshakes-per-peer".into(),
                "100000".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = d.tcp.unwrap();
    let budget = logged_budget(&d);
    assert!(
        budget + 20 < FLOOD,
        "this machine's open-file limit gives a TCP budget of {budget}"
    );
    let before = fresh_socket_health(&d).await;
    let t = Instant::now();
    let mut silent = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let connect_s = t.elapsed().as_secs_f64();
    // The connections over the budget are closed at once, not queued.
    let closed = wait_closed(&silent, FLOOD - budget, Duration::from_secs(10)).await;
    let refused_s = t.elapsed().as_secs_f64();
    // The socket, during the flood: fresh connections and calls, each within 1 s.
    let mut lat = Vec::new();
    for _ in 0..10 {
        lat.push(fresh_socket_health(&d).await);
    }
    let existing = d.client("admin").await.unwrap();
    let t = Instant::now();
    assert!(health(&existing).await);
    let on_open = t.elapsed();
    lat.sort();
    let worst = *lat.last().unwrap();
    // A TCP client now finds the TCP budget used up: closed at once, not left waiting.
    let t = Instant::now();
    let tcp_during = tokio::time::timeout(Duration::from_secs(10), d.tcp_client("admin")).await;
    let tcp_refused_in = t.elapsed();
    let tcp_refused = match tcp_during {
        Ok(Err(_)) => true,
        Ok(Ok(c)) => !health(&c).await,
        Err(_) => false,
    };
    let still_open = FLOOD - count_closed(&silent);
    // The flood goes away: the budget comes back.
    drop(silent);
    let t = Instant::now();
    let mut recovered = None;
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), d.tcp_client("admin")).await
            && health(&c).await
        {
            recovered = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = d.log_text();
    let refusal_lines = log.matches("connection closed at once").count();
    println!(
        "flood: {FLOOD} silent TCP connections made in {connect_s:.2} s; {closed} closed at once \
         (by {refused_s:.2} s), {still_open} held in the TCP budget of {budget}; socket health \
         on a fresh connection before {:.1} ms, during: worst of 10 {:.1} ms, median {:.1} ms; \
         on an open connection {:.1} ms; a TCP client during the flood refused in {:.1} ms; \
         TCP served again {:?} after the flood left; {refusal_lines} refusal log lines",
        before.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        lat[5].as_secs_f64() * 1e3,
        on_open.as_secs_f64() * 1e3,
        tcp_refused_in.as_secs_f64() * 1e3,
        recovered,
    );
    assert!(
        closed >= FLOOD - budget,
        "the connections over the TCP budget are closed at once: {closed}"
    );
    assert!(
        still_open >= budget - 8,
        "the budget holds the rest until their deadline: {still_open}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "the socket answers within 1 s during the flood: {worst:?}"
    );
    assert!(
        tcp_refused && tcp_refused_in < Duration::from_secs(2),
        "a TCP client over the budget is closed at once"
    );
    assert!(
        recovered.is_some(),
        "TCP serves again once the flood is gone"
    );
    assert!(
        (1..=15).contains(&refusal_lines),
        "refusals are logged, rate-limited: {refusal_lines} lines"
    );
}

/// One peer address may hold only 64 handshakes in progress: the rest of its connections
/// are closed at once, the budget stays free for other peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_handshake_cap() {
    const CAP: usize = 64;
    const SILENT: usize = 100;
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            extra_args: vec!["--handshake-timeout-s".into(), "30".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = d.tcp.unwrap();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let closed = wait_closed(&silent, SILENT - CAP, Duration::from_secs(5)).await;
    // Settle, then count again: nothing beyond the cap was closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closed_after = count_closed(&silent);
    // The socket is another listener, with its own budget.
    let sock = fresh_socket_health(&d).await;
    // When the address's handshakes end, it may connect again.
    drop(silent);
    let t = Instant::now();
    let mut again = false;
    while !again && t.elapsed() < Duration::from_secs(10) {
        again = match tokio::time::timeout(Duration::from_secs(2), d.tcp_client("admin")).await {
            Ok(Ok(c)) => health(&c).await,
            _ => false,
        };
        if !again {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "per-address cap: {SILENT} silent connections from 127.0.0.1: {closed_after} closed at once, \
         {} held (cap {CAP}); socket health {:.1} ms; the address connected again after {:.2} s",
        SILENT - closed_after,
        sock.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(closed, SILENT - CAP);
    assert_eq!(closed_after, SILENT - CAP, "the cap's {CAP} are held");
    assert!(again, "the address connects again once its handshakes end");
}

/// One identity may hold 128 connections (the default cap); the next are closed at once
/// while another identity still connects, and a closed connection gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_take_every_connection() {
    const CAP: usize = auraed::server::limits::MAX_CONNECTIONS_PER_IDENTITY;
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = [\"*\"]\nnames = [\"*\"]\n\n\
         [[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/alice\"\nmethods = [\"grpc.health.v1.Health/Check\"]\nnames = []\n"
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The readiness probe's connection may still be closing: wait until admin holds none.
    let mut admins = Vec::with_capacity(CAP);
    let t = Instant::now();
    while admins.len() < CAP && t.elapsed() < Duration::from_secs(20) {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), d.client("admin")).await
            && health(&c).await
        {
            admins.push(c);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(admins.len(), CAP, "admin gets its {CAP} connections");
    // The 65th, and more: closed at once.
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..5 {
        let ok = match tokio::time::timeout(Duration::from_secs(5), d.client("admin")).await {
            Ok(Ok(c)) => health(&c).await,
            _ => false,
        };
        refused += usize::from(!ok);
    }
    let refused_in = t.elapsed() / 5;
    // Another identity is not affected.
    let alice = d.client("alice").await.unwrap();
    let alice_ok = health(&alice).await;
    // The existing ones keep working; closing one gives its slot back.
    let all_ok = {
        let mut ok = true;
        for c in &admins {
            ok &= health(c).await;
        }
        ok
    };
    admins.pop();
    let t = Instant::now();
    let mut back = false;
    while !back && t.elapsed() < Duration::from_secs(10) {
        back = match tokio::time::timeout(Duration::from_secs(2), d.client("admin")).await {
            Ok(Ok(c)) => {
                let ok = health(&c).await;
                if ok {
                    admins.push(c);
                }
                ok
            }
            _ => false,
        };
        if !back {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let refusal_lines = d.log_text().matches("this identity already has").count();
    println!(
        "per-identity cap: {CAP} admin connections served; {refused}/5 beyond the cap refused \
         (each in {:.1} ms); alice served: {alice_ok}; a freed slot reused after {:.2} s; \
         {refusal_lines} refusal log lines",
        refused_in.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        refused, 5,
        "connections beyond the identity's cap are refused"
    );
    assert!(alice_ok, "another identity still gets through");
    assert!(all_ok, "the identity's open connections keep working");
    assert!(back, "a closed connection gives its slot back");
    assert!(refusal_lines >= 1, "the refusal is logged");
    drop(admins);
}
