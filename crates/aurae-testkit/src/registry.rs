//! A loopback OCI registry for tests: Debian's `docker-registry` (distribution 2.8) bound
//! to 127.0.0.1 on a free port, storing in a temp dir, no auth. Stopped (by its handle)
//! and removed on drop.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tempfile::TempDir;

/// Writes `dir/registry.yml`: docker-registry on `addr`, storing in `dir/data`, deletes
/// allowed, errors only in its log. Its path.
pub fn write_config(dir: &Path, addr: std::net::SocketAddr) -> std::io::Result<PathBuf> {
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )?;
    Ok(cfg)
}

/// Whether the registry on the other end of `s` (connected to `addr`) answers `GET /v2/`
/// with 200.
pub fn answers_v2(mut s: impl Read + Write, addr: std::net::SocketAddr) -> bool {
    let _ = s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

#[derive(Debug)]
pub struct LocalRegistry {
    pub addr: std::net::SocketAddr,
    pub dir: TempDir,
    child: Option<Child>,
}

/// `Some(reason)` unless `docker-registry` is installed.
pub fn needs_registry() -> Option<String> {
    (!Path::new("/usr/bin/docker-registry").exists())
        .then(|| "docker-registry is not installed (apt-get install docker-registry)".into())
}

/// For a host-tier container test: `None` (with a visible SKIP) unless cells, the
/// registry and busybox are there; else a started registry (and the crypto provider).
pub fn for_containers(test: &str) -> anyhow::Result<Option<LocalRegistry>> {
    use crate::tier::{self, Tier};
    if !tier::check(
        test,
        Tier::Host,
        tier::needs_cells()
            .or_else(needs_registry)
            .or_else(crate::oci::needs_busybox),
    ) {
        return Ok(None);
    }
    crate::init_crypto();
    LocalRegistry::start().map(Some)
}

impl LocalRegistry {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_in(None, crate::free_port()?)
    }

    /// A registry on `addr` inside the network namespace `netns` (`ip netns` name), for
    /// a daemon that runs in one of its own; killed by pid when dropped.
    pub fn start_in(netns: Option<&str>, addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("aurae-registry-")
            .tempdir()?;
        let cfg = write_config(dir.path(), addr)?;
        // `ip netns exec` enters the namespace and execs the registry: the pid is its own.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/bin/docker-registry"]);
                c
            }
            None => Command::new("/usr/bin/docker-registry"),
        };
        let child = cmd
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log"))?)
            .spawn()
            .context("starting docker-registry")?;
        let r = Self {
            addr,
            dir,
            child: Some(child),
        };
        let start = Instant::now();
        loop {
            if crate::dial_in(netns, addr).is_ok_and(|s| answers_v2(s, addr)) {
                return Ok(r);
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("docker-registry did not answer /v2/ within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:<port>`, as image references write it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
