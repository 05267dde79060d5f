//! What an operator meets first, with the real binaries: `aer health --wait` for a daemon
//! that starts later, error lines that print each cause once, times in RFC 3339 in JSON
//! and relative in tables. No root needed: auraed serves its API without cells.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aurae_testkit::cli::auraed_beside;

const AER: &str = env!("CARGO_BIN_EXE_aer");

/// Kills (by its handle) and reaps the auraed it holds.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn aer(pki: &Path, socket: &Path) -> Command {
    let mut c = Command::new(AER);
    c.arg("--pki-dir")
        .arg(pki)
        .arg("--socket")
        .arg(socket)
        .env_remove("AURAE_CONFIG")
        .env_remove("AER_INSTANCE")
        .stdin(Stdio::null());
    c
}

/// `aer pki init` in `dir/pki`; that directory.
fn pki_init(dir: &Path) -> std::path::PathBuf {
    let pki = dir.join("pki");
    let init = Command::new(AER)
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    pki
}

fn start_auraed(dir: &Path, pki: &Path, socket: &Path) -> Reap {
    let auraed = auraed_beside(Path::new(AER)).unwrap();
    Reap(
        Command::new(auraed)
            .arg("--pki-dir")
            .arg(pki)
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            // Not a cgroup: cells answer FAILED_PRECONDITION; nothing here needs them.
            .arg("--cgroup-root")
            .arg(dir.join("no-cgroup"))
            .arg("--no-pid1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("auraed.log")).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn health_waits_for_a_daemon_that_starts_later_and_times_read_for_people_and_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_init(dir.path());
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let socket = run.join("auraed.sock");

    // Nothing listens yet: a short wait fails, naming the wait and the cause once.
    let out = aer(&pki, &socket)
        .args(["health", "--wait", "300ms"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did not serve within 300ms"), "{err}");
    assert_eq!(err.matches("does not exist").count(), 1, "{err}");

    // auraed starts a second after aer began to wait: aer answers SERVING.
    let waiting = aer(&pki, &socket)
        .args(["health", "--wait", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let _daemon = start_auraed(dir.path(), &pki, &socket);
    let out = waiting.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("SERVING"), "{text}");
    println!(
        "aer health --wait: SERVING {:?} after auraed was started",
        started.elapsed()
    );

    // Times: RFC 3339 (UTC) in JSON, relative in tables.
    let json = aer(&pki, &socket)
        .args(["-o", "json", "info"])
        .output()
        .unwrap();
    assert!(json.status.success(), "{json:?}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let at = v["started_at"].as_str().expect("started_at");
    let shape = at.len() == 24
        && at.ends_with('Z')
        && at.as_bytes()[4] == b'-'
        && at.as_bytes()[10] == b'T'
        && at.as_bytes()[19] == b'.';
    assert!(shape, "started_at {at:?} is not RFC 3339 with milliseconds");
    let table = aer(&pki, &socket).arg("info").output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    let line = table
        .lines()
        .find(|l| l.trim_start().starts_with("STARTED_AT"))
        .expect("STARTED_AT row");
    assert!(line.trim_end().ends_with(" ago"), "{line}");
}

#[test]
fn an_unreachable_daemon_is_one_line_with_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_init(dir.path());
    // A loopback port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(AER)
        .arg("--pki-dir")
        .arg(&pki)
        .args(["--endpoint", &format!("127.0.0.1:{port}"), "info"])
        .env_remove("AURAE_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("aer: cannot reach auraed at 127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert_eq!(err.matches("transport error").count(), 1, "{err}");
}
