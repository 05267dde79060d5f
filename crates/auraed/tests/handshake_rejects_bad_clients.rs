//! A client without a certificate, from another CA, expired or not yet valid, without a
//! SPIFFE ID, from another trust domain, presenting a server-only certificate, or vouched
//! for by an intermediate CA that may not vouch for it (no SPIFFE ID of its own, or an ID
//! the client's is not below) is rejected at the TLS handshake, on the Unix socket and on
//! TCP: 100 % of attempts. An intermediate with a SPIFFE ID vouches for IDs below its own.
//! auraed refuses to start with the CA key in its PKI directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

use aurae_client::{Client, Endpoint};
use aurae_testkit::{
    Daemon, DaemonOptions, TRUST_DOMAIN,
    identities::{BadClient, delegated},
};

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
    // The client sees the refusal before auraed's log line is written: give the log a
    // moment to catch up.
    let mut log = d.log_text();
    for _ in 0..40 {
        if log.matches("TLS handshake rejected").count() >= total {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        log = d.log_text();
    }
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
        "IntermediateWithoutSpiffeId",
        "NotBelowIntermediate",
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

/// The delegation rule against a real daemon: an intermediate CA signed by the daemon's CA
/// vouches only for SPIFFE IDs strictly below its own, and without an ID for no one. The
/// first case is the attack that webpki alone accepts (it ignores the root's pathLen 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediates_vouch_only_below_their_own_spiffe_id() {
    let policy = format!(
        r#"
[[grant]]
id = "spiffe://{TRUST_DOMAIN}/operator/admin"
methods = ["*"]
names = ["*"]

[[grant]]
id = "spiffe://{TRUST_DOMAIN}/instance/a/x"
methods = ["aurae.runtime.v0.Daemon/Info"]
names = []
"#
    );
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions {
            tcp: true,
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let endpoints = [
        (Endpoint::Unix(d.socket.clone()), "localhost"),
        (Endpoint::Tcp(d.tcp.unwrap().to_string()), "127.0.0.1"),
    ];
    let info = |tls, endpoint: Endpoint, name: &'static str| async move {
        let c = Client::connect_with(&endpoint, name, tls)
            .await
            .map_err(|e| e.to_string())?;
        c.daemon()
            .info(aurae_proto::runtime::v0::InfoRequest::default())
            .await
            .map(|r| r.into_inner().peer_id)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    for (endpoint, name) in &endpoints {
        // Accepted: /instance/a/x below the intermediate /instance/a, also two levels down.
        let tls = delegated(
            &d.pki.dir,
            TRUST_DOMAIN,
            Some("/instance/a"),
            "/instance/a/x",
        )
        .unwrap();
        let id = info(tls, endpoint.clone(), name).await.unwrap();
        assert_eq!(id, format!("spiffe://{TRUST_DOMAIN}/instance/a/x"));
        // Refused at the handshake, before any RPC.
        for (intermediate, leaf) in [
            (None, "/operator/admin"),
            (Some("/instance/a"), "/operator/admin"),
            (Some("/instance/a"), "/instance/ab"),
            (Some("/instance/a"), "/instance/a"),
            (Some("/instance/a/x"), "/instance/a"),
        ] {
            let tls = delegated(&d.pki.dir, TRUST_DOMAIN, intermediate, leaf).unwrap();
            let r = info(tls, endpoint.clone(), name).await;
            assert!(
                r.is_err(),
                "{leaf} via {intermediate:?} over {endpoint:?} was accepted as {r:?}"
            );
            if let Err(e) = &r {
                assert!(
                    !e.starts_with("PermissionDenied"),
                    "{leaf} via {intermediate:?}: passed the handshake, stopped only by \
                     the policy: {e}"
                );
            }
        }
    }
    // The client sees the refusal before auraed's log line is written: give the log a
    // moment to catch up.
    let mut log = d.log_text();
    for _ in 0..40 {
        if log.matches("NotBelowIntermediate").count() >= 8
            && log.matches("IntermediateWithoutSpiffeId").count() >= 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        log = d.log_text();
    }
    // At least one logged rejection per attempt (a client may retry its handshake).
    assert!(
        log.matches("IntermediateWithoutSpiffeId").count() >= 2,
        "one rogue-intermediate rejection per transport:\n{log}"
    );
    assert!(
        log.matches("NotBelowIntermediate").count() >= 8,
        "four out-of-path rejections per transport:\n{log}"
    );
    for leaf in ["instance/ab", "instance/a "] {
        assert!(
            !log.contains(&format!("{leaf} method=")),
            "a refused identity reached an RPC:\n{log}"
        );
    }
}

/// auraed never needs the CA key: with `ca.key` in its PKI directory it refuses to start,
/// naming the file and where to move it; moved there, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auraed_refuses_to_start_next_to_the_ca_key() {
    let d = Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_auraed")),
        DaemonOptions::default(),
    )
    .await
    .unwrap();
    // The harness's PKI (made by Pki::init, as `aer pki init` does) keeps the key outside.
    assert!(d.pki.ca_key.exists());
    assert!(!d.pki.ca_key.starts_with(&d.pki.dir));
    let in_dir = d.pki.dir.join("ca.key");
    assert!(!in_dir.exists());
    std::fs::copy(&d.pki.ca_key, &in_dir).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_auraed"))
        .arg("--pki-dir")
        .arg(&d.pki.dir)
        .arg("--socket")
        .arg(d.dir.path().join("run2/auraed.sock"))
        .arg("--state-dir")
        .arg(d.dir.path().join("state2"))
        .arg("--cgroup-root")
        .arg(d.dir.path().join("no-cgroup2/aurae"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "auraed started next to ca.key:\n{err}"
    );
    assert!(err.contains(&in_dir.display().to_string()), "{err}");
    assert!(
        err.contains(&format!(
            "mv {} {}/",
            in_dir.display(),
            d.pki.ca_key_dir.display()
        )),
        "{err}"
    );
    assert!(
        !d.dir.path().join("run2/auraed.sock").exists(),
        "it refused before listening"
    );
    std::fs::remove_file(&in_dir).unwrap();
}
