//! A client without a certificate, from another CA, expired or not yet valid, without a
//! SPIFFE ID, from another trust domain, or presenting a server-only certificate is
//! rejected at the TLS handshake, on the Unix socket and on TCP: 100 % of attempts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

use aurae_client::{Client, Endpoint};
use aurae_testkit::{Daemon, DaemonOptions, TRUST_DOMAIN, identities::BadClient};

const ATTEMPTS: usize = 10;

async fn attempt(endpoint: &Endpoint, server_name: &str, bad: BadClient, pki: &Path) -> bool {
    let tls = bad.config(pki, TRUST_DOMAIN).expect("client config");
    // Whether connect itself fails (TLS 1.2-style) or the first call does (TLS 1.3 sends
    // the server's verdict after the client's Finished), no call may succeed.
    match Client::connect_with(endpoint, server_name, tls).await {
        Err(_) => true,
        Ok(c) => c
            .health()
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_client_is_rejected_at_the_handshake() {
    let mut d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let unix = Endpoint::Unix(d.socket.clone());
    let tcp = Endpoint::Tcp(d.tcp.unwrap().to_string());
    let mut total = 0;
    let mut rejected = 0;
    for bad in BadClient::ALL {
        for (endpoint, name) in [(&unix, "localhost"), (&tcp, "127.0.0.1")] {
            let mut here = 0;
            for _ in 0..ATTEMPTS {
                total += 1;
                if attempt(endpoint, name, bad, &d.pki.dir).await {
                    rejected += 1;
                    here += 1;
                }
            }
            assert_eq!(
                here, ATTEMPTS,
                "{bad:?} over {endpoint}: only {here}/{ATTEMPTS} rejected"
            );
        }
    }
    println!(
        "handshake: {rejected}/{total} bad clients rejected ({} kinds x 2 transports x {ATTEMPTS})",
        BadClient::ALL.len()
    );
    assert_eq!(rejected, total);

    // The rejections happened at the handshake: auraed logged each, and no RPC ran.
    let log = d.log_text();
    let handshake_rejections = log.matches("TLS handshake rejected").count();
    assert!(
        handshake_rejections >= total,
        "{handshake_rejections} handshake rejections logged for {total} attempts:\n{log}"
    );
    assert!(
        !log.contains("operator/mallory method="),
        "a bad client reached an RPC:\n{log}"
    );
    for reason in [
        "BadSignature",
        "certificate expired",
        "certificate not valid yet",
        "NoSpiffeId",
        "ForeignTrustDomain",
        "peer sent no certificates",
        "extended key usage for client authentication",
    ] {
        assert!(
            log.contains(reason),
            "no rejection logged for {reason:?}:\n{log}"
        );
    }

    // The daemon stayed up and still serves good clients on both transports.
    assert!(d.alive());
    for c in [
        d.client("admin").await.unwrap(),
        d.tcp_client("admin").await.unwrap(),
    ] {
        let r = c
            .health()
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_cut_off() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            extra_args: vec!["--handshake-timeout-s".into(), "1".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    use tokio::io::AsyncReadExt;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(
            tokio::net::TcpStream::connect(d.tcp.unwrap())
                .await
                .unwrap(),
        );
    }
    let start = std::time::Instant::now();
    for s in &mut idle {
        let mut buf = [0u8; 1];
        // The daemon closes the connection: read returns 0 bytes (EOF) or an error.
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "idle connection not closed: {n:?}"
        );
    }
    println!(
        "20 silent TCP clients closed within {:?} (timeout 1 s)",
        start.elapsed()
    );
    let c = d.client("admin").await.unwrap();
    assert!(
        c.health()
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok()
    );
}
