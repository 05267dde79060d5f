//! auraed as a host service, on the real binary: the `--config` file and its precedence
//! (flag > environment > file > default), relative paths made absolute at start (a
//! container runs from a daemon started with relative --state-dir/--pki-dir/--socket),
//! auraed's own identity checked at start (another CA's certificate, none without a
//! SPIFFE ID, a key of another certificate, … each stop it with one line naming the file
//! and the reason), and the warnings it starts with (a policy that grants nothing, an
//! expired certificate) in its log and in Daemon/Info.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aurae_client::{Client, Endpoint};
use aurae_identity::{Ca, IssueSpec, Pki, PkiPaths, SpiffeId, pki::default_server_sans};
use aurae_proto::runtime::v0 as pb;
use aurae_testkit::{TRUST_DOMAIN, init_crypto, oci, registry::for_containers, tier, workload};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_auraed"))
}

/// The AURAED_* variables auraed reads: cleared so the test's environment cannot leak in.
const ENV: &[&str] = &[
    "AURAED_CONFIG",
    "AURAED_PKI_DIR",
    "AURAED_SOCKET",
    "AURAED_LISTEN",
    "AURAED_METRICS_LISTEN",
    "AURAED_STATE_DIR",
    "AURAED_POLICY",
    "AURAED_CGROUP_ROOT",
    "AURAED_REGISTRY_AUTH",
    "AURAED_INSTANCE_KERNEL",
    "AURAED_INSTANCE_MODULES",
];

fn auraed(cwd: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .env("AURAED_LOG", "info");
    for v in ENV {
        c.env_remove(v);
    }
    c
}

/// Runs `cmd` until it exits (at most 20 s, then it is killed and the test fails):
/// its exit status and stderr.
fn run_to_exit(mut cmd: Command, log: &Path) -> (ExitStatus, String) {
    cmd.stderr(fs::File::create(log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, fs::read_to_string(log).unwrap_or_default());
        }
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "auraed kept running when it should have refused to start:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one line auraed prints on stderr when it refuses to start.
fn refusal(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("auraed: "))
        .unwrap_or_else(|| panic!("no `auraed: …` line in:\n{stderr}"))
}

/// A running auraed started by a test; killed (with its output holder) on drop.
struct Running {
    child: Option<Child>,
    log: PathBuf,
}

impl Running {
    fn start(mut cmd: Command, log: PathBuf) -> Self {
        cmd.stderr(fs::File::create(&log).unwrap());
        Self {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client on `socket` once auraed answers there (any answer to Daemon/Info: the
    /// policy may deny it).
    async fn client(&mut self, socket: &Path, tls: rustls::ClientConfig) -> Client {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("auraed exited during start-up ({st}):\n{}", self.log_text());
            }
            if socket.exists()
                && let Ok(c) = Client::connect_with(
                    &Endpoint::Unix(socket.to_owned()),
                    "localhost",
                    tls.clone(),
                )
                .await
                && c.daemon()
                    .info(pb::InfoRequest::default())
                    .await
                    .is_ok_or_denied()
            {
                return c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "auraed not serving after 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (its ordered shutdown) and the exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                self.child = Some(child);
                panic!("auraed did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let holder = aurae_testkit::holder_of(c.id());
            let _ = c.kill();
            let _ = c.wait();
            if let Some(h) = holder {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(h),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

trait OkOrDenied {
    fn is_ok_or_denied(&self) -> bool;
}

impl<T> OkOrDenied for Result<T, tonic::Status> {
    fn is_ok_or_denied(&self) -> bool {
        match self {
            Ok(_) => true,
            Err(s) => s.code() == tonic::Code::PermissionDenied,
        }
    }
}

/// A client TLS configuration presenting `name` (admin) of `pki`, verifying auraed.
fn admin_tls(pki: &PkiPaths) -> rustls::ClientConfig {
    aurae_identity::tls::client_config(&pki.ca_cert, &pki.admin_cert, &pki.admin_key).unwrap()
}

/// The PKI's CA (its key is beside the PKI directory, as `aer pki init` leaves it).
fn ca(pki: &PkiPaths) -> Ca {
    Ca::load(&pki.ca_cert, &pki.ca_key).unwrap()
}

/// auraed's server certificate spec as `aer pki init` issues it, with another ID.
fn server_spec(id: SpiffeId) -> IssueSpec {
    let (dns, ips) = default_server_sans();
    IssueSpec {
        client: true,
        ..IssueSpec::server(id, dns, ips, 1)
    }
}

fn auraed_id() -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "/auraed").unwrap()
}

/// Replaces auraed's certificate and key in `pki`.
fn install(pki: &PkiPaths, (cert, key): (String, String)) {
    fs::write(&pki.server_cert, cert).unwrap();
    fs::write(&pki.server_key, key).unwrap();
}

// ---------------------------------------------------------------------------------------
// The config file and its precedence.

#[test]
fn flag_beats_env_beats_file_beats_default_and_file_paths_start_at_its_directory() {
    let d = tempfile::tempdir().unwrap();
    let etc = d.path().join("etc");
    fs::create_dir(&etc).unwrap();
    let file = etc.join("auraed.toml");
    // The PKI directories do not exist: auraed refuses at once, naming the one it used.
    fs::write(&file, "pki_dir = \"file-pki\"\nstate_dir = \"state\"\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = auraed(d.path());
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let (st, err) = run_to_exit(c, &d.path().join("log"));
        assert!(!st.success(), "{err}");
        refusal(&err).to_owned()
    };
    let cfg = file.to_str().unwrap();

    let line = run(&[], &[]);
    assert!(line.contains("/etc/aurae/pki/ca.pem"), "default: {line}");

    let line = run(&["--config", cfg], &[]);
    let want = format!("{}/file-pki/ca.pem is missing", etc.display());
    assert!(line.contains(&want), "file (from its directory): {line}");

    let line = run(&[], &[("AURAED_CONFIG", cfg)]);
    assert!(line.contains(&want), "AURAED_CONFIG: {line}");

    let line = run(&["--config", cfg], &[("AURAED_PKI_DIR", "env-pki")]);
    let want = format!("{}/env-pki/ca.pem is missing", d.path().display());
    assert!(line.contains(&want), "env over file (from the cwd): {line}");

    let line = run(
        &["--config", cfg, "--pki-dir", "flag-pki"],
        &[("AURAED_PKI_DIR", "env-pki")],
    );
    let want = format!("{}/flag-pki/ca.pem is missing", d.path().display());
    assert!(line.contains(&want), "flag over env (from the cwd): {line}");

    // Refused before anything was made: the state directory of the file is not there.
    assert!(!etc.join("state").exists());
}

#[test]
fn an_unknown_key_or_a_wrong_type_stops_auraed_naming_key_and_file() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("auraed.toml");
    for (text, key) in [
        ("statedir = \"/var/lib/aurae\"\n", "statedir"),
        ("max_connections = \"lots\"\n", "max_connections"),
        (
            "insecure_registry = \"127.0.0.1:5000\"\n",
            "insecure_registry",
        ),
    ] {
        fs::write(&file, text).unwrap();
        let mut c = auraed(d.path());
        c.arg("--config").arg(&file);
        let (st, err) = run_to_exit(c, &d.path().join("log"));
        assert!(!st.success());
        let line = refusal(&err);
        assert!(
            line.contains(&format!("`{key}`")) && line.contains(file.to_str().unwrap()),
            "{line}"
        );
    }
}

#[test]
fn a_relative_path_without_a_working_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let gone = d.path().join("gone");
    fs::create_dir(&gone).unwrap();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("cd \"$1\" && rmdir \"$1\" && exec \"$2\" --state-dir state")
        .arg("sh")
        .arg(&gone)
        .arg(bin())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for v in ENV {
        c.env_remove(v);
    }
    let (st, err) = run_to_exit(c, &d.path().join("log"));
    assert!(!st.success());
    let line = refusal(&err);
    assert!(
        line.contains("--state-dir") && line.contains("working directory"),
        "{line}"
    );
}

/// The reported bug: with a relative --state-dir, RunCell failed (overlay lower
/// directories relative to auraed's cwd: ENOENT). Now every path is absolute at start.
#[tokio::test(flavor = "multi_thread")]
async fn relative_state_pki_and_socket_run_a_container() {
    let test = "relative_state_pki_and_socket_run_a_container";
    let Some(registry) = for_containers(test).unwrap() else {
        return;
    };
    let host = registry.host();
    oci::push_busybox(
        &host,
        "aurae/busybox",
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    )
    .unwrap();
    let d = tempfile::Builder::new()
        .prefix("aurae-relative-")
        .tempdir()
        .unwrap();
    let pki = Pki::init(&d.path().join("pki"), TRUST_DOMAIN, &[]).unwrap();
    let cgroup = tier::cgroup_parent()
        .unwrap()
        .join(format!("aurae-test-relative-{}", std::process::id()));
    struct RemoveCgroup(PathBuf);
    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            aurae_testkit::remove_cgroup_tree(&self.0);
        }
    }
    let _cg = RemoveCgroup(cgroup.clone());
    let mut c = auraed(d.path());
    c.args([
        "--state-dir",
        "state",
        "--pki-dir",
        "pki",
        "--socket",
        "run/a.sock",
    ])
    .arg("--cgroup-root")
    .arg(&cgroup)
    .args(["--insecure-registry", &host]);
    let mut daemon = Running::start(c, d.path().join("auraed.log"));
    let client = daemon
        .client(&d.path().join("run/a.sock"), admin_tls(&pki))
        .await;

    let st = client
        .runtime()
        .run_cell(pb::Cell {
            name: "rel".into(),
            container: Some(pb::Container {
                image: format!("{host}/aurae/busybox:v1"),
                entrypoint: vec!["sh".into(), "-c".into(), "echo relative-ok".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("RunCell: {e}\n{}", daemon.log_text()))
        .into_inner();
    let name = st.executables[0].name.clone();
    let exit = workload::wait(&client, "rel", &name).await.unwrap();
    let out = workload::output(&client, "rel", &name).await.unwrap();
    assert_eq!(out.trim(), "relative-ok", "{exit:?}\n{}", daemon.log_text());
    assert!(
        matches!(
            exit.exit.and_then(|e| e.how),
            Some(pb::exit_status::How::Code(0))
        ),
        "{}",
        daemon.log_text()
    );
    // The state went where the relative flag said, below the working directory.
    assert!(d.path().join("state").is_dir());
    client
        .cells()
        .free(pb::NameRef { name: "rel".into() })
        .await
        .unwrap();
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    drop(registry);
}

// ---------------------------------------------------------------------------------------
// auraed's own identity, checked at start.

/// Starts auraed on a fresh PKI (after `tamper`) and returns its one-line refusal (with
/// the temp dir and the PKI); asserts it made nothing (no state directory, no socket).
fn refused_identity(tamper: impl FnOnce(&PkiPaths)) -> (tempfile::TempDir, PkiPaths, String) {
    init_crypto();
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::init(&d.path().join("pki"), TRUST_DOMAIN, &[]).unwrap();
    tamper(&pki);
    let mut c = auraed(d.path());
    c.arg("--pki-dir")
        .arg(&pki.dir)
        .args(["--state-dir", "state", "--socket", "run/a.sock"])
        .args(["--cgroup-root", "no-cgroup/aurae"]);
    let (st, err) = run_to_exit(c, &d.path().join("log"));
    assert!(!st.success(), "auraed started:\n{err}");
    assert!(!d.path().join("state").exists() && !d.path().join("run").exists());
    let line = refusal(&err).to_owned();
    (d, pki, line)
}

#[test]
fn a_certificate_of_another_ca_stops_auraed() {
    let (_d, pki, line) = refused_identity(|pki| {
        let other = Ca::generate(TRUST_DOMAIN).unwrap();
        install(pki, other.issue(&server_spec(auraed_id())).unwrap());
    });
    assert!(
        line.contains(&format!("{}:", pki.server_cert.display()))
            && line.contains("is not issued by the CA in")
            && line.contains(pki.ca_cert.to_str().unwrap()),
        "{line}"
    );
}

#[test]
fn a_certificate_without_a_spiffe_id_stops_auraed() {
    let (_d, pki, line) = refused_identity(|pki| {
        let spec = IssueSpec {
            spiffe_id: None,
            ..server_spec(auraed_id())
        };
        install(pki, ca(pki).issue(&spec).unwrap());
    });
    assert!(
        line.contains(&format!("{}:", pki.server_cert.display())) && line.contains("no SPIFFE ID"),
        "{line}"
    );
}

#[test]
fn a_key_of_another_certificate_stops_auraed() {
    let (_d, pki, line) = refused_identity(|pki| {
        fs::copy(&pki.admin_key, &pki.server_key).unwrap();
    });
    assert!(
        line.contains(&format!("{}:", pki.server_key.display()))
            && line.contains("is not the key of the certificate in")
            && line.contains(pki.server_cert.to_str().unwrap()),
        "{line}"
    );
}

#[test]
fn a_certificate_of_another_trust_domain_stops_auraed() {
    let (_d, pki, line) = refused_identity(|pki| {
        let id = SpiffeId::new("elsewhere.test", "/auraed").unwrap();
        install(pki, ca(pki).issue(&server_spec(id)).unwrap());
    });
    assert!(
        line.contains(&format!("{}:", pki.server_cert.display()))
            && line.contains(&format!("not in the trust domain {TRUST_DOMAIN}")),
        "{line}"
    );
}

#[test]
fn a_client_only_certificate_stops_auraed() {
    let (_d, pki, line) = refused_identity(|pki| {
        install(
            pki,
            ca(pki).issue(&IssueSpec::client(auraed_id(), 1)).unwrap(),
        );
    });
    assert!(
        line.contains(&format!("{}:", pki.server_cert.display()))
            && line.contains("not valid for TLS server authentication"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------
// Warnings at start.

/// Accepts any server certificate: only to read Daemon/Info from an auraed whose own
/// certificate has expired (what the test is about), never elsewhere.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn trusting_any_server(pki: &PkiPaths) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = aurae_identity::tls::load_certs(&pki.admin_cert).unwrap();
    let key = aurae_identity::tls::load_key(&pki.admin_key).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    c.alpn_protocols = vec![b"h2".to_vec()];
    c
}

/// Starts auraed on a fresh PKI in a temp dir (after `prepare`), with `extra` flags.
async fn start(
    prepare: impl FnOnce(&Path, &PkiPaths),
    extra: &[&str],
    tls: impl FnOnce(&PkiPaths) -> rustls::ClientConfig,
) -> (tempfile::TempDir, Running, Client) {
    init_crypto();
    let d = tempfile::tempdir().unwrap();
    let pki = Pki::init(&d.path().join("pki"), TRUST_DOMAIN, &[]).unwrap();
    prepare(d.path(), &pki);
    let mut c = auraed(d.path());
    c.args([
        "--pki-dir",
        "pki",
        "--state-dir",
        "state",
        "--socket",
        "run/a.sock",
    ])
    .args(["--cgroup-root", "no-cgroup/aurae"])
    .args(extra);
    let mut r = Running::start(c, d.path().join("auraed.log"));
    let client = r.client(&d.path().join("run/a.sock"), tls(&pki)).await;
    (d, r, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_policy_is_a_warning_in_the_log() {
    let (_d, mut r, client) = start(
        |dir, _| fs::write(dir.join("policy.toml"), "# nothing granted\n").unwrap(),
        &["--policy", "policy.toml"],
        admin_tls,
    )
    .await;
    // The warning says which policy and why every call fails.
    let log = r.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("policy.toml has no grant")),
        "{log}"
    );
    // Daemon/Info, where the warning is listed too, is itself refused by such a policy:
    // the log is where an operator sees it (the list is shown below with a certificate).
    let e = client
        .daemon()
        .info(pb::InfoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(r.stop().success(), "{}", r.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_without_methods_is_a_warning_in_the_log() {
    let policy = format!(
        "[[grant]]\nid = \"spiffe://{TRUST_DOMAIN}/operator/admin\"\nmethods = []\nnames = [\"*\"]\n"
    );
    let (_d, mut r, _client) = start(
        move |dir, _| fs::write(dir.join("policy.toml"), policy).unwrap(),
        &["--policy", "policy.toml"],
        admin_tls,
    )
    .await;
    let log = r.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("grants no method to any identity")),
        "{log}"
    );
    assert!(r.stop().success(), "{}", r.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_is_a_warning_in_the_log_and_in_info() {
    let (dir, mut r, client) = start(
        |_, pki| {
            let fresh = server_spec(auraed_id());
            let spec = IssueSpec {
                not_after: fresh.not_before,
                not_before: fresh.not_before - (fresh.not_after - fresh.not_before),
                ..fresh
            };
            install(pki, ca(pki).issue(&spec).unwrap());
        },
        &[],
        trusting_any_server,
    )
    .await;
    let info = client
        .daemon()
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("auraed.pem expired at")),
        "{:?}",
        info.warnings
    );
    assert!(r.log_text().contains("auraed.pem expired at"));
    // A client that checks the server (every real one) refuses it, as the warning says.
    let d = dir.path().to_owned();
    let pki = PkiPaths::new(d.join("pki"));
    let strict = Client::connect_with(
        &Endpoint::Unix(d.join("run/a.sock")),
        "localhost",
        admin_tls(&pki),
    )
    .await;
    let refused = match strict {
        Err(_) => true,
        Ok(c) => c.daemon().info(pb::InfoRequest::default()).await.is_err(),
    };
    assert!(
        refused,
        "a verifying client accepted an expired server certificate"
    );
    assert!(r.stop().success(), "{}", r.log_text());
}
