//! The second case: auraed under an open-file limit of 1024 (soft and hard), flooded
//! with 1 100 silent TCP connections. The listeners' budgets are cut to fit the limit with
//! a reserve to spare, so the flood fills the TCP budget and is closed at once beyond it;
//! the descriptor table never runs out, and an authenticated call over the socket answers
//! at once (before: `accept` hit EMFILE and calls failed with INTERNAL "Too many open
//! files").
//!
//! Its own test binary: the daemon is started through a shell that lowers the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use aurae_testkit::{Daemon, DaemonOptions};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;

const LIMIT: u64 = 1024;
const FLOOD: usize = 1100;

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

fn closed(socks: &[TcpStream]) -> usize {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_under_a_1024_fd_limit_leaves_the_socket_served() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // This process needs more than the daemon's 1024 for the flood.
    let own = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: own.maximum,
            maximum: own.maximum,
        },
    );
    if getrlimit(Resource::Nofile)
        .current
        .is_some_and(|c| c < (FLOOD + 200) as u64)
    {
        println!("SKIP: this test process may not open {} files", FLOOD + 200);
        return;
    }
    // auraed, started by a shell that lowers its limit to 1024 (soft and hard).
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("auraed-at-1024");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -S -n {LIMIT} && ulimit -H -n {LIMIT} || exit 97\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_auraed")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o700)).unwrap();
    let d = Daemon::start(
        &wrapper,
        DaemonOptions {
            tcp: true,
            extra_args: vec![
                "--handshake-timeout-s".into(),
                "30".into(),
                // All of the flood comes from 127.0.0.1: lift the per-address cap so the
                // listener budget is what binds.
                "--max-handshakes-per-peer".into(),
                "100000".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid().unwrap())).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        nofile.split_whitespace().nth(3) == Some("1024"),
        "the daemon runs under the lowered limit: {nofile}"
    );
    let log = d.log_text();
    let budget: usize = log
        .split("max_connections_per_listener=")
        .nth(1)
        .map(|r| {
            r.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .expect("the daemon logs its budgets");
    assert_eq!(budget, 256, "(1024 - 512 reserved) / 2 listeners");

    let addr = d.tcp.unwrap();
    let t = Instant::now();
    let mut silent = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut refused = 0;
    while t.elapsed() < Duration::from_secs(10) {
        refused = closed(&silent);
        if refused >= FLOOD - budget {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fds = d.fd_count().unwrap_or(0);
    // Authenticated calls over the socket, each on a fresh connection, during the flood.
    let mut worst = Duration::ZERO;
    let mut ok = 0;
    for _ in 0..10 {
        let t = Instant::now();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), d.client("admin")).await
            && health(&c).await
        {
            ok += 1;
        }
        worst = worst.max(t.elapsed());
    }
    drop(silent);
    let log = d.log_text();
    println!(
        "fd limit {LIMIT}: budget {budget} per listener; {FLOOD} silent TCP connections: {refused} \
         closed at once; daemon fds during the flood {fds}; socket calls {ok}/10 ok, worst {:.1} ms; \
         EMFILE in the log: {}",
        worst.as_secs_f64() * 1e3,
        log.contains("out of file descriptors") || log.contains("Too many open files")
    );
    assert!(refused >= FLOOD - budget, "over the budget: closed at once");
    assert!(fds < LIMIT as usize - 256, "descriptors to spare: {fds}");
    assert_eq!(ok, 10, "every socket call answered");
    assert!(worst < Duration::from_secs(1), "within 1 s: {worst:?}");
    assert!(
        !log.contains("Too many open files"),
        "the daemon never ran out of descriptors"
    );
}
