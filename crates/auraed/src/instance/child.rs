//! The child side of a cell-isolated instance: auraed re-executed from its parent's
//! sealed copy as the init of a new cell (new PID, mount, network, UTS, IPC and cgroup
//! namespaces, born into its own cgroup). Before it serves it takes its handover from fd
//! 3, makes its own view of the machine and configures its network:
//!
//! - mounts: everything private; a fresh `/proc`, `/sys` and cgroup2 (rooted at its own
//!   cgroup: a delegated subtree); tmpfs on `/run` (its identity, state and socket live
//!   there: memory, never the host's disk, and the host's `/run` — the parent's socket —
//!   is hidden) and `/tmp`; the host's root filesystem read-only;
//! - cgroup: itself in `auraed/`, its cells under `cells/`, every controller it got
//!   enabled for them;
//! - network: `lo`, its veth peer with its IPv4 and IPv6 addresses, default routes
//!   through its parent, forwarding on (its own children sit behind it).
//!
//! Every failure of a step that it can serve without is a warning in `Daemon/Info`; one it
//! cannot (no handover, no identity) ends it with a message on stderr, which the parent
//! keeps in the instance's log.

use std::{
    fs,
    io::{Read, Seek},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::mount::{MsFlags, mount};

use super::handover::{Handover, Lineage, Place};

/// Where a cell-isolated instance keeps what it was handed and its state (tmpfs).
pub const RUN_DIR: &str = "/run/aurae";

/// What the child serves with.
#[derive(Debug)]
pub struct ChildBoot {
    pub pki_dir: PathBuf,
    pub policy: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_root: PathBuf,
    pub listen: std::net::SocketAddr,
    pub bridge_gateway: std::net::Ipv4Addr,
    pub lineage: Lineage,
    pub warnings: Vec<String>,
}

/// Reads the handover from fd 3 (and closes it).
fn read_handover() -> Result<Handover, String> {
    let fd = aurae_sys::fd::take_passed().ok_or("no handover on fd 3")?;
    let mut f = fs::File::from(fd);
    f.rewind().map_err(|e| format!("handover: {e}"))?;
    let mut buf = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| format!("handover: {e}"))?;
    drop(f);
    serde_json::from_slice(&buf).map_err(|e| format!("handover does not parse: {e}"))
}

fn write_secret(dir: &Path, name: &str, data: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    let p = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&p)
        .and_then(|mut f| f.write_all(data.as_bytes()))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Sets the child up; see the module docs. An `Err` means it cannot serve at all.
pub fn prepare() -> Result<ChildBoot, String> {
    let h = read_handover()?;
    let mut w = Vec::new();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    let must = |src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>| {
        mount(Some(src), target, Some(fstype), flags, data)
            .map_err(|e| format!("mount {fstype} on {target}: {e}"))
    };
    must("proc", "/proc", "proc", nosuid, None)?;
    must("tmpfs", "/run", "tmpfs", nosuid, Some("mode=0755"))?;
    if let Err(e) = must(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    ) {
        w.push(e);
    }
    must("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_RDONLY, None)?;
    must(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid,
        Some("nsdelegate"),
    )?;

    // Its identity and policy, in its own tmpfs.
    let run = Path::new(RUN_DIR);
    let pki = run.join("pki");
    let state = run.join("state");
    for d in [run, &pki, &state] {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    write_secret(&pki, "ca.pem", &h.ca_pem, 0o644)?;
    write_secret(&pki, "auraed.pem", &h.cert_pem, 0o644)?;
    write_secret(&pki, "auraed.key", &h.key_pem, 0o600)?;
    write_secret(&pki, "signer.pem", &h.signer_chain_pem, 0o644)?;
    write_secret(&pki, "signer.key", &h.signer_key_pem, 0o600)?;
    write_secret(run, "policy.toml", &h.policy_toml, 0o600)?;

    // The host's root read-only in this mount namespace (its own mounts stay writable).
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        w.push(format!("remounting / read-only: {e}"));
    }

    // cgroup: a delegated subtree; auraed in a leaf, cells beside it.
    let cg = Path::new("/sys/fs/cgroup");
    match crate::workload::cgroup::settle_in(cg) {
        Ok(mut warnings) => w.append(&mut warnings),
        Err(e) => w.push(e),
    }

    if let Err(e) = nix::unistd::sethostname(&h.name) {
        w.push(format!("hostname {:?}: {e}", h.name));
    }
    network(&h, &mut w)?;

    for warning in &w {
        tracing::warn!("instance: {warning}");
    }
    Ok(ChildBoot {
        pki_dir: pki,
        policy: run.join("policy.toml"),
        state_dir: state,
        socket: run.join("auraed.sock"),
        cgroup_root: cg.join("cells"),
        listen: std::net::SocketAddr::from((h.addr, super::handover::INSTANCE_PORT)),
        bridge_gateway: h.bridge_gateway,
        lineage: Place::of(&h).lineage(h.policy_toml.clone()),
        warnings: w,
    })
}

/// `lo`, the veth peer (which the parent creates right after the clone: waited for),
/// addresses, default routes, forwarding.
fn network(h: &Handover, w: &mut Vec<String>) -> Result<(), String> {
    if let Err(e) = aurae_sys::net::set_link_up("lo") {
        w.push(format!("lo: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !aurae_sys::netlink::link_exists(&h.interface) {
        if Instant::now() > deadline {
            return Err(format!(
                "interface {} did not appear within 10 s",
                h.interface
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let dev = h.interface.as_str();
    // Announce the address when the link comes up (gratuitous ARP): the address may have
    // been another instance's a moment ago, and the parent's neighbour entry must not keep
    // pointing at that one's link for seconds.
    if let Err(e) = fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/arp_notify"), "1") {
        w.push(format!("{dev} arp_notify: {e}"));
    }
    aurae_sys::net::set_ipv4(dev, h.addr, 24)
        .and_then(|()| aurae_sys::net::set_link_up(dev))
        .map_err(|e| format!("{dev} {}/24: {e}", h.addr))?;
    aurae_sys::netlink::add_default_route_v4(dev, h.gateway)
        .map_err(|e| format!("default route via {}: {e}", h.gateway))?;
    match aurae_sys::net::add_ipv6(dev, h.addr6, 64) {
        Ok(()) => {
            // The address is usable once duplicate detection is done; the route may be
            // added before.
            if let Err(e) = aurae_sys::netlink::add_default_route_v6(dev, h.gateway6) {
                w.push(format!("IPv6 default route via {}: {e}", h.gateway6));
            }
        }
        Err(e) => w.push(format!("{dev} {}/64: {e}", h.addr6)),
    }
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "IPv4 forwarding"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6 forwarding"),
    ] {
        if let Err(e) = fs::write(path, "1") {
            w.push(format!("{what}: {e}"));
        }
    }
    Ok(())
}
