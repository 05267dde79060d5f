//! Test harness shared by the integration tests (a dev-dependency only; never in a
//! normal dependency tree).
//!
//! - [`Daemon`]: a real `auraed` process in a private temp directory with its own PKI,
//!   socket and state, ready when gRPC health answers SERVING; stopped and cleaned on drop.
//! - [`identities`]: good and deliberately broken client certificates.
//! - [`tier`]: visible `SKIP` lines for tests whose machine lacks a precondition.
#![forbid(unsafe_code)]

pub mod cli;
pub mod cpio;
pub mod cri;
pub mod guest;
pub mod identities;
pub mod oci;
pub mod registry;
pub mod tier;
pub mod vm;
pub mod workload;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aurae_client::{Client, Endpoint};
use aurae_identity::{Pki, PkiPaths, SpiffeId};
use tempfile::TempDir;

/// Installs the ring provider once per test process (rustls needs one default).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The trust domain test PKIs use.
pub const TRUST_DOMAIN: &str = "aurae.test";

/// How to start a test daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Policy file contents; `None` = auraed's default policy.
    pub policy: Option<String>,
    /// Also listen on a loopback TCP port.
    pub tcp: bool,
    pub extra_args: Vec<String>,
    /// Where the state lives (default: `state` in the daemon's temp directory).
    pub state_dir: Option<PathBuf>,
    /// Run auraed in a network namespace of its own (made with `ip netns add`, removed
    /// on drop): what it does to the network (its bridge, veths) never touches the host's.
    pub own_netns: bool,
}

/// A running auraed. Dropping it kills the process (by its handle) and removes its files.
#[derive(Debug)]
pub struct Daemon {
    /// The cgroup v2 directory this daemon's cells live under (unique per daemon), if
    /// this machine lets us make one.
    pub cgroup: Option<PathBuf>,
    pub dir: TempDir,
    pub pki: PkiPaths,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub log: PathBuf,
    child: Option<Child>,
    /// Its network namespace (a name under /run/netns), if it has its own.
    pub netns: Option<String>,
    /// How it was started, for [`Daemon::crash_and_restart`].
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
}

/// Starts auraed with `args`, its log appended to `log`.
fn spawn_daemon(bin: &Path, args: &[std::ffi::OsString], log: &Path) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(args)
        .env(
            "AURAED_LOG",
            std::env::var("AURAE_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::OpenOptions::new().create(true).append(true).open(log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// A free loopback port (bound then released; the daemon binds it right after).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Daemon {
    /// Creates a PKI and starts `bin` (pass `env!("CARGO_BIN_EXE_auraed")`).
    pub async fn start(bin: &Path, opts: DaemonOptions) -> anyhow::Result<Self> {
        init_crypto();
        let dir = tempfile::Builder::new().prefix("aurae-test-").tempdir()?;
        let pki = Pki::init(&dir.path().join("pki"), TRUST_DOMAIN, &[])?;
        let socket = dir.path().join("run/auraed.sock");
        let log = dir.path().join("auraed.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--pki-dir")
            .arg(&pki.dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(
                opts.state_dir
                    .clone()
                    .unwrap_or_else(|| dir.path().join("state")),
            );
        let cgroup = tier::cgroup_parent().ok().map(|parent| {
            parent.join(format!(
                "aurae-test-{}-{}",
                std::process::id(),
                dir.path()
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("x")
                    .trim_start_matches("aurae-test-")
            ))
        });
        // Without a usable hierarchy, point at a path that is not one: cells then answer
        // FAILED_PRECONDITION instead of sharing a real root with other daemons.
        cmd.arg("--cgroup-root").arg(
            cgroup
                .clone()
                .unwrap_or_else(|| dir.path().join("no-cgroup/aurae")),
        );
        let tcp = if opts.tcp { Some(free_port()?) } else { None };
        if let Some(addr) = tcp {
            cmd.arg("--listen").arg(addr.to_string());
        }
        if let Some(p) = &opts.policy {
            let path = dir.path().join("policy.toml");
            fs::write(&path, p)?;
            cmd.arg("--policy").arg(path);
        }
        cmd.args(&opts.extra_args);
        let mut args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut program = bin.to_owned();
        let netns = if opts.own_netns {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let ns = format!(
                "aurae-d{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            );
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // nsenter joins only the network namespace (`ip netns exec` would also
            // remount /sys, hiding the cgroup hierarchy) and execs auraed in place.
            let mut wrapped: Vec<std::ffi::OsString> = vec![
                format!("--net=/run/netns/{ns}").into(),
                "--".into(),
                bin.into(),
            ];
            wrapped.append(&mut args);
            args = wrapped;
            program = PathBuf::from("nsenter");
            Some(ns)
        } else {
            None
        };
        let child = spawn_daemon(&program, &args, &log)?;
        let mut d = Self {
            cgroup,
            dir,
            pki,
            socket,
            tcp,
            log,
            child: Some(child),
            netns,
            bin: program,
            args,
        };
        d.wait_ready(Duration::from_secs(30)).await?;
        Ok(d)
    }

    /// `kill -9` auraed (its workloads are not told), then starts it again with the same
    /// arguments (state directory, cgroup root, socket, PKI) and waits until it serves.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.crash_and_restart_after(Duration::ZERO).await
    }

    /// [`Daemon::crash_and_restart`], with auraed down for `down` in between.
    pub async fn crash_and_restart_after(&mut self, down: Duration) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?; // SIGKILL
            c.wait()?;
        }
        tokio::time::sleep(down).await;
        self.start_again().await
    }

    /// `kill -9` auraed (its workloads are not told) and reap it; [`Daemon::start_again`]
    /// brings it back.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts auraed again with the same arguments (after it exited or was killed).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("auraed is still running");
        }
        self.child = Some(spawn_daemon(&self.bin, &self.args, &self.log)?);
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Starts auraed again (after it exited or was killed) with its arguments changed by
    /// `change` for this start only; waits until it serves. A later
    /// [`Daemon::start_again`] uses the original arguments.
    pub async fn start_again_with(
        &mut self,
        change: impl FnOnce(&mut Vec<std::ffi::OsString>),
    ) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("auraed is still running");
        }
        let mut args = self.args.clone();
        change(&mut args);
        self.child = Some(spawn_daemon(&self.bin, &args, &self.log)?);
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Starts a second auraed with the same arguments, without waiting for it: for
    /// tests that it is refused. Returns its exit status (or None if it kept running
    /// for `wait`, in which case it is killed) and its log.
    pub fn start_second(
        &self,
        wait: Duration,
    ) -> anyhow::Result<(Option<std::process::ExitStatus>, String)> {
        let log = self.dir.path().join("second.log");
        let mut c = spawn_daemon(&self.bin, &self.args, &log)?;
        let start = Instant::now();
        while start.elapsed() < wait {
            if let Some(s) = c.try_wait()? {
                return Ok((Some(s), fs::read_to_string(&log).unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill()?;
        c.wait()?;
        Ok((None, fs::read_to_string(&log).unwrap_or_default()))
    }

    /// Waits until health answers SERVING over the socket (and TCP, if enabled).
    async fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "auraed exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            if self.socket.exists()
                && let Ok(c) = self.client("admin").await
            {
                let r = c
                    .health()
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if r.is_ok_and(|r| r.into_inner().status == 1) {
                    return Ok(());
                }
            }
            if start.elapsed() > deadline {
                bail!("auraed not ready after {deadline:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Issues `<name>.pem/.key` with SPIFFE path `/operator/<name>` if not there yet.
    pub fn identity(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = self.pki.identity(name);
        if !cert.exists() {
            let id = SpiffeId::new(TRUST_DOMAIN, &format!("/operator/{name}"))?;
            Pki::issue_client(&self.pki.dir, name, &id, 1)?;
        }
        Ok((cert, key))
    }

    /// A connected client presenting identity `name` over the socket.
    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        let (cert, key) = self.identity(name)?;
        let tls = aurae_identity::tls::client_config(&self.pki.ca_cert, &cert, &key)?;
        Ok(Client::connect_with(&Endpoint::Unix(self.socket.clone()), "localhost", tls).await?)
    }

    /// A connected client presenting identity `name` over TCP.
    pub async fn tcp_client(&self, name: &str) -> anyhow::Result<Client> {
        let addr = self.tcp.context("daemon has no TCP listener")?;
        let (cert, key) = self.identity(name)?;
        let tls = aurae_identity::tls::client_config(&self.pki.ca_cert, &cert, &key)?;
        Ok(Client::connect_with(&Endpoint::Tcp(addr.to_string()), "127.0.0.1", tls).await?)
    }

    /// A client presenting identity `name` to a spawned instance at its `endpoint`,
    /// requiring exactly `spiffe_id` (as the parent's `InstanceStatus` says), connected
    /// from inside the daemon's network namespace.
    pub async fn instance_client(
        &self,
        name: &str,
        endpoint: &str,
        spiffe_id: &str,
    ) -> anyhow::Result<Client> {
        let identity = self.identity(name)?;
        instance_client(
            &self.pki,
            identity,
            self.netns.as_deref(),
            endpoint,
            spiffe_id,
        )
        .await
    }

    /// Runs `f` on a fresh thread inside the daemon's network namespace (or here).
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let ns = self.netns.clone();
        std::thread::spawn(move || -> anyhow::Result<T> {
            if let Some(ns) = ns {
                let file = fs::File::open(PathBuf::from("/run/netns").join(ns))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }

    /// The pid of spawned instance `name`'s auraed (the first process of its cgroup leaf
    /// `instances/<name>/_procs/auraed`).
    pub fn instance_pid(&self, name: &str) -> anyhow::Result<i32> {
        let p = self
            .cgroup
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the daemon has no cgroup"))?
            .join("instances")
            .join(name)
            .join("_procs/auraed/cgroup.procs");
        let text = fs::read_to_string(&p).with_context(|| p.display().to_string())?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no pid in {}", p.display()))
    }

    /// Resident set size of the daemon, in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> Option<usize> {
        Some(
            fs::read_dir(format!("/proc/{}/fd", self.pid()?))
                .ok()?
                .count(),
        )
    }

    /// Sends SIGTERM and waits for the exit status (None if it had to be killed).
    pub fn terminate(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        // Our own unreaped child: its pid cannot have been reused.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit(wait)
    }

    /// Waits for the daemon to exit by itself (e.g. after a Shutdown RPC).
    pub fn wait_exit(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let start = Instant::now();
        while start.elapsed() < wait {
            if let Some(s) = child.try_wait()? {
                self.child = None;
                return Ok(Some(s));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let holder = holder_of(child.id());
        child.kill()?;
        child.wait()?;
        self.child = None;
        if let Some(h) = holder {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(h),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(None)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// Which namespace of `kind` ("net", "mnt", …) process `pid` is in (`net:[4026…]`).
pub fn namespace_of(pid: u32, kind: &str) -> std::io::Result<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
}

/// The namespaces of `kind` process `pid` holds open as fds (`net:[…]`), sorted.
pub fn namespaces_held(pid: u32, kind: &str) -> Vec<PathBuf> {
    let prefix = format!("{kind}:[");
    let mut held: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with(&prefix))
        .collect();
    held.sort();
    held
}

/// The output holder the auraed `pid` started (its child `aurae-holder`), if any.
pub fn holder_of(pid: u32) -> Option<i32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let p: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmd = fs::read(e.path().join("cmdline")).ok()?;
        (ppid == pid && cmd.starts_with(b"aurae-holder\0")).then_some(p)
    })
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Its output holder outlives a SIGKILL of auraed by design: found (as the
            // daemon's child, by pid) before the kill, killed after it.
            let holder = holder_of(c.id());
            let _ = c.kill();
            let _ = c.wait();
            if let Some(h) = holder {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(h),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if let Some(cg) = &self.cgroup {
            remove_cgroup_tree(cg);
        }
        if let Some(ns) = &self.netns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A client of a spawned instance at `endpoint` presenting `identity` (cert, key) of the
/// PKI `pki`, requiring exactly `spiffe_id` (as the parent's `InstanceStatus` says),
/// dialled from inside network namespace `netns` (a name under /run/netns; `None`: here).
pub async fn instance_client(
    pki: &PkiPaths,
    identity: (PathBuf, PathBuf),
    netns: Option<&str>,
    endpoint: &str,
    spiffe_id: &str,
) -> anyhow::Result<Client> {
    let tls = aurae_identity::tls::client_config_expecting(
        aurae_identity::tls::load_certs(&pki.ca_cert)?,
        Some((
            aurae_identity::tls::load_certs(&identity.0)?,
            aurae_identity::tls::load_key(&identity.1)?,
        )),
        Some(spiffe_id.parse()?),
    )?;
    let addr: SocketAddr = endpoint.parse()?;
    let ns = netns.map(str::to_owned);
    let dial = move || dial_in(ns.as_deref(), addr);
    Ok(Client::connect_tcp_with(dial, &addr.ip().to_string(), tls).await?)
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Connects to `addr` with a socket made inside network namespace `ns` (a name under
/// /run/netns; `None`: here), on a fresh thread so no other thread changes namespace.
pub fn dial_in(ns: Option<&str>, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let ns = ns.map(|n| PathBuf::from("/run/netns").join(n));
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let f = fs::File::open(&ns)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
        }
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .join()
    .map_err(|_| std::io::Error::other("dial thread panicked"))?
}

/// The body of `GET /` from `endpoint` (`host:port`), dialled inside the network
/// namespace `ns` (or here), each read bounded by `timeout`.
pub fn http_get(ns: Option<&str>, endpoint: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr: SocketAddr = endpoint.parse().map_err(std::io::Error::other)?;
    let mut s = dial_in(ns, addr)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET / HTTP/1.0\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(out))
}

/// Kills every process below our own test cgroup and removes its directories, deepest
/// first. Only ever called on a directory this harness created.
pub fn remove_cgroup_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(root.join("cgroup.events")).is_ok_and(|e| e.contains("populated 1"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = fs::remove_dir(&d);
    }
}

/// A bench's rounds: `AURAE_BENCH_ROUNDS`, or `default`.
pub fn bench_rounds(default: usize) -> usize {
    std::env::var("AURAE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The runtime a bench drives its clients from: two workers (this fleet's two cores).
pub fn bench_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
