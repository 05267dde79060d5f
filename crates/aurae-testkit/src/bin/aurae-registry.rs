//! A registry on loopback for trying images by hand (the README's walkthrough):
//! `aurae-registry start 127.0.0.1:5000 DIR` starts Debian's `docker-registry` on that
//! address, storing in DIR, pushes `aurae/busybox:latest` (busybox-static, `sh` by default)
//! and `aurae/web:latest` (busybox `httpd` serving a page on port 8080), writes the
//! registry's pid to DIR/pid and returns; `aurae-registry stop DIR` stops it (through a
//! pidfd, after checking its exact command line) and removes DIR. DIR must be new or empty
//! at start, and stop removes only a directory with the registry.yml start wrote.
#![forbid(unsafe_code)]

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aurae_testkit::{
    oci,
    registry::{self, needs_registry},
};

const USAGE: &str = "usage: aurae-registry start ADDR DIR | aurae-registry stop DIR";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["start", addr, dir] => start(addr, Path::new(dir)),
        ["stop", dir] => stop(Path::new(dir)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aurae-registry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn answers_v2(addr: SocketAddr) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    registry::answers_v2(s, addr)
}

fn start(addr: &str, dir: &Path) -> anyhow::Result<()> {
    if let Some(reason) = needs_registry().or_else(oci::needs_busybox) {
        bail!("{reason}");
    }
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("ADDR {addr:?}: write IP:PORT, e.g. 127.0.0.1:5000"))?;
    if !addr.ip().is_loopback() {
        bail!("ADDR {addr}: this registry has no authentication; use a loopback address");
    }
    if answers_v2(addr) {
        bail!("something already serves a registry on {addr}");
    }
    // `stop` removes DIR: only one that is new or empty is taken.
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "DIR {}: not empty (`aurae-registry stop` removes it): give a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let cfg = registry::write_config(&dir, addr)?;
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log"))?)
        .spawn()
        .context("starting docker-registry")?;
    std::fs::write(dir.join("pid"), format!("{}\n", child.id()))?;
    let started = Instant::now();
    while !answers_v2(addr) {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = stop(&dir);
            bail!("docker-registry did not answer on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let host = addr.to_string();
    let busybox = oci::busybox_rootfs()?.finish()?;
    let config = serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]});
    let d1 = oci::push_image(&host, "aurae/busybox", "latest", &[busybox], config)?;
    let d2 = oci::push_http_server_as(&host, "aurae/web", "latest", 8080, "hello from a pod\n")?;
    println!("{host}/aurae/busybox:latest {d1}");
    println!("{host}/aurae/web:latest {d2}");
    println!(
        "registry pid {} (stop: aurae-registry stop {})",
        child.id(),
        dir.display()
    );
    Ok(())
}

/// The command line `start` gives the registry it starts in the directory `dir`.
fn registry_argv(dir: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    vec![
        b"/usr/bin/docker-registry".to_vec(),
        b"serve".to_vec(),
        dir.join("registry.yml").as_os_str().as_bytes().to_vec(),
    ]
}

fn stop(dir: &Path) -> anyhow::Result<()> {
    // `start` wrote the config with the canonical path; `stop` may be given another.
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let cfg: PathBuf = dir.join("registry.yml");
    // Only a directory `start` made is removed at the end.
    if !cfg.is_file() {
        bail!(
            "{}: no registry.yml there: not a directory `aurae-registry start` made; leaving it",
            dir.display()
        );
    }
    let pid_file = dir.join("pid");
    let text = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("{}: no registry started there", pid_file.display()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{}: not a pid", pid_file.display()))?;
    // Only that registry: a pidfd first (it names this process, whatever reuses the pid
    // later), then its exact command line (`docker-registry serve DIR/registry.yml`).
    let pidfd = aurae_sys::Pidfd::open(pid).ok();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv: Vec<Vec<u8>> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    match pidfd {
        Some(pidfd) if argv == registry_argv(dir) => {
            pidfd.send_signal(nix::libc::SIGTERM)?;
            let started = Instant::now();
            // Alive (signal 0 reaches it) and not yet a zombie.
            while pidfd.send_signal(0).is_ok()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ")
            {
                if started.elapsed() > Duration::from_secs(5) {
                    let _ = pidfd.send_signal(nix::libc::SIGKILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => eprintln!(
            "aurae-registry: pid {pid} is no longer the registry of {}",
            dir.display()
        ),
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}
