//! auraed as PID 1 of a machine or microVM: mounts, cgroup v2 with every controller,
//! hostname, kernel modules, network from the kernel command line, and an orderly power
//! off. Nothing here panics or exits: a failed step becomes a warning that `Daemon/Info`
//! reports, and auraed comes up with what it has.
//!
//! Kernel command line (all optional):
//! - `ip=<addr>::<gateway>:<netmask>:<hostname>:<device>:off` (the kernel's own format;
//!   the gateway is not used yet), or `aurae.ip=<addr>/<prefix>@<device>`
//! - `aurae.ip6=<addr>/<prefix>@<device>` (static IPv6; link-local comes with the link)
//! - `aurae.hostname=<name>`, `aurae.listen=<host:port>` (default `[::]:8443`)

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use nix::mount::{MsFlags, mount};

/// What PID 1 set up, and what it could not.
#[derive(Debug, Default, Clone)]
pub struct Boot {
    pub hostname: String,
    pub listen: Option<std::net::SocketAddr>,
    pub warnings: Vec<String>,
    /// Set when a parent spawned this machine as a microVM instance
    /// ([`crate::instance::handover::PLACE_FILE`]).
    pub lineage: Option<crate::instance::handover::Lineage>,
    pub bridge_gateway: Option<Ipv4Addr>,
    /// `aurae.probe` on the command line: a parent's KVM probe (print the marker, power
    /// off).
    pub probe: bool,
}

/// Where a PID 1 machine keeps the kernel and modules of its own microVM instances.
pub const INSTANCE_KERNEL: &str = "/var/lib/aurae/instance/vmlinuz";
pub const INSTANCE_MODULES: &str = "/var/lib/aurae/instance/modules";

/// Parameters of the kernel command line, `key=value` or bare `key`.
pub fn cmdline_params(text: &str) -> Vec<(String, String)> {
    text.split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (w.to_owned(), String::new()),
        })
        .collect()
}

/// The parameters the command line gives module `module` (`module.param=value`, with `-`
/// and `_` the same in module names, as `modprobe` reads them from `/proc/cmdline`), as
/// `finit_module` takes them.
pub fn module_params(params: &[(String, String)], module: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let module = norm(module);
    params
        .iter()
        .filter_map(|(k, v)| {
            let (m, p) = k.split_once('.')?;
            (norm(m) == module && !p.is_empty()).then(|| {
                if v.is_empty() {
                    p.to_owned()
                } else {
                    format!("{p}={v}")
                }
            })
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A static address for a device, from `ip=`, `aurae.ip=` or `aurae.ip6=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAddr {
    pub device: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then(|| u8::try_from(ones).unwrap_or(32))
}

/// Parses the network parameters; malformed ones become warnings, never a failed boot.
pub fn network_config(params: &[(String, String)]) -> (Vec<StaticAddr>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (k, v) in params {
        let parsed = match k.as_str() {
            "ip" if v.contains(':') => {
                let f: Vec<&str> = v.split(':').collect();
                let addr = f.first().and_then(|a| a.parse::<Ipv4Addr>().ok());
                let prefix = f
                    .get(3)
                    .and_then(|m| m.parse::<Ipv4Addr>().ok())
                    .and_then(prefix_of);
                let device = f.get(5).filter(|d| !d.is_empty()).map_or("eth0", |d| d);
                match (addr, prefix) {
                    (Some(a), Some(p)) => Ok(StaticAddr {
                        device: device.to_owned(),
                        addr: IpAddr::V4(a),
                        prefix: p,
                    }),
                    _ => Err(format!(
                        "ip={v}: expected <addr>::<gateway>:<netmask>:<host>:<device>:off"
                    )),
                }
            }
            "aurae.ip" | "aurae.ip6" => {
                let parse = || -> Option<StaticAddr> {
                    let (cidr, device) = v.split_once('@')?;
                    let (a, p) = cidr.split_once('/')?;
                    let addr: IpAddr = a.parse().ok()?;
                    let prefix: u8 = p.parse().ok()?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    (prefix <= max && !device.is_empty()).then(|| StaticAddr {
                        device: device.to_owned(),
                        addr,
                        prefix,
                    })
                };
                parse().ok_or_else(|| format!("{k}={v}: expected <addr>/<prefix>@<device>"))
            }
            _ => continue,
        };
        match parsed {
            Ok(a) => out.push(a),
            Err(w) => warnings.push(w),
        }
    }
    (out, warnings)
}

fn try_mount(
    w: &mut Vec<String>,
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) {
    let _ = fs::create_dir_all(target);
    if let Err(e) = mount(Some(src), target, Some(fstype), flags, data)
        && e != nix::errno::Errno::EBUSY
    {
        w.push(format!("mount {fstype} on {target}: {e}"));
    }
}

/// Reattaches stdio to the console (the kernel gives init none without /dev/console).
fn console_stdio() {
    use std::os::fd::AsFd;
    if let Ok(c) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = nix::unistd::dup2_stdin(c.as_fd());
        let _ = nix::unistd::dup2_stdout(c.as_fd());
        let _ = nix::unistd::dup2_stderr(c.as_fd());
    }
}

/// A microVM of ours has a virtio console: once its module is loaded, auraed's own output
/// (its log, an audit line per call) goes to `hvc0`, a whole buffer per exit, rather than
/// to the UART, an exit per byte (under nested virtualisation ~0.2 ms a byte). The
/// kernel's messages stay on the command line's console. A machine without one (no
/// `hvc0`, or nothing behind it) keeps the console it has.
fn prefer_virtio_console(w: &mut Vec<String>) {
    use std::os::{fd::AsFd, unix::fs::OpenOptionsExt};
    let hvc = Path::new("/dev/hvc0");
    if !hvc.exists() {
        return;
    }
    match fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(hvc)
    {
        Ok(c) => {
            let _ = nix::unistd::dup2_stdout(c.as_fd());
            let _ = nix::unistd::dup2_stderr(c.as_fd());
        }
        // The hvc driver's nodes without a console behind hvc0.
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ENODEV | nix::libc::ENXIO)) => {}
        Err(e) => w.push(format!(
            "{}: {e}: staying on the serial console",
            hvc.display()
        )),
    }
}

/// Where the initramfs contents move to.
const NEW_ROOT: &str = "/.aurae-root";

/// Moves the system off the initramfs onto a tmpfs root, as `switch_root` does, when `/` is
/// the kernel's rootfs (ramfs or tmpfs): rootfs can never be unmounted, so `pivot_root`
/// (which every container needs) refuses to work on it, and a chroot escape would reach
/// it. The contents are copied to a fresh tmpfs, deleted from rootfs (which stays empty
/// underneath), and the tmpfs is moved over `/`. Anything that fails becomes a warning;
/// the system stays on the initramfs then.
fn leave_initramfs(w: &mut Vec<String>) {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(st) = nix::sys::statfs::statfs("/") else {
        return;
    };
    let magic = st.filesystem_type().0;
    if magic != RAMFS_MAGIC && magic != TMPFS_MAGIC {
        return;
    }
    let r = (|| -> Result<(), String> {
        fs::create_dir(NEW_ROOT).map_err(|e| format!("creating {NEW_ROOT}: {e}"))?;
        mount(
            Some("tmpfs"),
            NEW_ROOT,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )
        .map_err(|e| format!("mounting a tmpfs on {NEW_ROOT}: {e}"))?;
        let mut names: Vec<_> = fs::read_dir("/")
            .map_err(|e| format!("reading /: {e}"))?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".aurae-root")
            .collect();
        names.sort();
        for n in &names {
            let from = Path::new("/").join(n);
            let to = Path::new(NEW_ROOT).join(n);
            copy_tree(&from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        }
        for n in &names {
            let p = Path::new("/").join(n);
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("chdir: {e}"))?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("moving the new root over /: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
        std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))
    })();
    if let Err(e) = r {
        w.push(format!(
            "leaving the initramfs: {e} (containers cannot pivot_root)"
        ));
    }
}

/// Instance templates' memory files in huge pages (whole 2 MiB stretches): a guest
/// restored from one then faults its memory in 2 MiB at a time (its nested page tables
/// follow ours) instead of 4 KiB, each fault an exit to this machine's KVM. Only where
/// `dir`'s parent (the state directory) is a tmpfs already — the templates are in memory
/// anyway —: a tmpfs of their own at `dir` with `huge=within_size`. The price: a memory
/// file's 4 KiB holes are filled up to whole huge pages. A warning when it cannot be.
pub fn templates_in_huge_pages(dir: &Path) -> Option<String> {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let parent = dir.parent()?;
    // Made as the state store makes it (0700), so its type can be read.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ok()?;
    let in_memory = statfs(parent).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC);
    // Already a mount point (of its own device): left as it is.
    let mounted = fs::metadata(dir)
        .and_then(|d| fs::metadata(parent).map(|p| d.dev() != p.dev()))
        .unwrap_or(false);
    if !in_memory || mounted {
        return None;
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,huge=within_size"),
    )
    .err()
    .map(|e| {
        format!(
            "instance templates in huge pages ({}: {e}): restored instances fault their memory in 4 KiB at a time",
            dir.display()
        )
    })
}

/// Copies a tree keeping modes, owners, symlinks and device nodes.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let md = fs::symlink_metadata(from)?;
    let ft = md.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        return std::os::unix::fs::lchown(to, Some(md.uid()), Some(md.gid()));
    }
    if ft.is_dir() {
        fs::create_dir(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else if ft.is_file() {
        fs::copy(from, to)?;
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() {
            nix::sys::stat::SFlag::S_IFCHR
        } else {
            nix::sys::stat::SFlag::S_IFBLK
        };
        nix::sys::stat::mknod(
            to,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(md.mode()),
            md.rdev(),
        )?;
    } else {
        // Sockets and fifos are not carried.
        return Ok(());
    }
    std::os::unix::fs::chown(to, Some(md.uid()), Some(md.gid()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))
}

/// Everything PID 1 does before the API starts. Synchronous: runs before the async
/// runtime exists. An instance template calls `ahead` before its snapshot: whatever the
/// start can make before it knows who it is (it adds its problems to the warnings).
pub fn prepare(ahead: &dyn Fn(&mut Vec<String>)) -> Boot {
    let mut w = Vec::new();
    leave_initramfs(&mut w);
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    try_mount(
        &mut w,
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    console_stdio();
    try_mount(&mut w, "proc", "/proc", "proc", nosuid, None);
    try_mount(&mut w, "sysfs", "/sys", "sysfs", nosuid, None);
    try_mount(
        &mut w,
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    try_mount(
        &mut w,
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid,
        Some("mode=1777"),
    );
    try_mount(
        &mut w,
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    try_mount(
        &mut w,
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    // favordynmods (Linux 6.0+): moving a process between cgroups (a spare cell init
    // joining its cell, see cell::pool) costs no RCU grace period; older kernels refuse
    // the option and mount without it.
    let _ = fs::create_dir_all("/sys/fs/cgroup");
    if mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        nosuid,
        Some("nsdelegate,favordynmods"),
    )
    .is_err()
    {
        try_mount(
            &mut w,
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid,
            Some("nsdelegate"),
        );
    }

    let mut params = cmdline_params(&fs::read_to_string("/proc/cmdline").unwrap_or_default());

    // Kernel modules the image carries, in the order listed, each with the parameters
    // the command line gives it (`kvm_amd.nested=1`).
    if let Ok(order) = fs::read_to_string("/lib/modules/order") {
        for m in order.split_whitespace() {
            let path = Path::new("/lib/modules").join(format!("{m}.ko"));
            let name = m.rsplit('/').next().unwrap_or(m);
            if let Err(e) = aurae_sys::process::load_module(&path, &module_params(&params, name)) {
                w.push(format!("module {m}: {e}"));
            }
        }
    }
    prefer_virtio_console(&mut w);

    // What needs nothing a restore hands over comes first: an instance template has
    // done it before its snapshot.
    // cgroup v2: every controller for the children of the root; auraed in its own leaf.
    match crate::workload::cgroup::settle_in(Path::new("/sys/fs/cgroup")) {
        Ok(mut warnings) => w.append(&mut warnings),
        Err(_) => w.push("no cgroup v2 at /sys/fs/cgroup: cells are unavailable".into()),
    }
    if let Err(e) = aurae_sys::net::set_link_up("lo") {
        w.push(format!("lo: {e}"));
    }
    // This machine routes for its VMs and instances (they sit behind its bridge).
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "IPv4 forwarding"),
        ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6 forwarding"),
    ] {
        if let Err(e) = fs::write(path, "1") {
            w.push(format!("{what}: {e}"));
        }
    }

    // An instance template: waits here for the handover a restore puts on its drive (the
    // snapshot is taken while it waits), becomes unique, and boots on with the
    // parameters it was handed. Without an identity it cannot serve: it powers off.
    let mut restored = None;
    if params
        .iter()
        .any(|(k, _)| k == crate::instance::template::TEMPLATE_PARAM)
    {
        match become_instance(&mut w, ahead) {
            Ok((more, times)) => {
                params.extend(cmdline_params(&more));
                restored = Some(times);
            }
            Err(e) => power_off(false, &format!("instance template: {e}")),
        }
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
    };

    let hostname = get("aurae.hostname").unwrap_or_else(|| "aurae".into());
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        w.push(format!("hostname {hostname:?}: {e}"));
    }

    let (addrs, mut net_warnings) = network_config(&params);
    w.append(&mut net_warnings);
    for a in addrs {
        if let Err(e) = configure(&a) {
            w.push(format!("{}: {} /{}: {e}", a.device, a.addr, a.prefix));
        }
    }
    if let Some(r) = restored
        && r.link_up
        && let Err(e) = crate::instance::template::own_link(r.mac, true, &mut w)
    {
        power_off(false, &format!("instance template: {e}"));
    }
    // Default routes: the gateway of `ip=` and `aurae.gw6=`.
    if let Some(gw) = params
        .iter()
        .find(|(k, v)| k == "ip" && v.contains(':'))
        .and_then(|(_, v)| v.split(':').nth(2).and_then(|g| g.parse::<Ipv4Addr>().ok()))
    {
        let dev = params
            .iter()
            .find(|(k, _)| k == "ip")
            .and_then(|(_, v)| {
                v.split(':')
                    .nth(5)
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "eth0".into());
        if let Err(e) = aurae_sys::netlink::add_default_route_v4(&dev, gw) {
            w.push(format!("default route via {gw}: {e}"));
        }
    }
    if let Some(gw6) = get("aurae.gw6") {
        match gw6.parse::<Ipv6Addr>() {
            Ok(g) => {
                if let Err(e) = aurae_sys::netlink::add_default_route_v6("eth0", g) {
                    w.push(format!("IPv6 default route via {g}: {e}"));
                }
            }
            Err(_) => w.push(format!("aurae.gw6={gw6}: not an IPv6 address")),
        }
    }
    // A spawned instance: its place (parent, depth, renewal endpoint) and policy.
    let place = Path::new(crate::instance::handover::PLACE_FILE);
    let (lineage, bridge_gateway) = if place.exists() {
        match fs::read_to_string(place)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_json::from_str::<crate::instance::handover::Place>(&t)
                    .map_err(|e| e.to_string())
            }) {
            Ok(p) => {
                let policy = fs::read_to_string("/etc/aurae/policy.toml").unwrap_or_default();
                (Some(p.lineage(policy)), Some(p.bridge_gateway))
            }
            Err(e) => {
                w.push(format!("{}: {e}", place.display()));
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    let listen = get("aurae.listen")
        .map(|l| {
            l.parse()
                .map_err(|_| w.push(format!("aurae.listen={l}: not host:port")))
                .ok()
        })
        .unwrap_or_else(|| Some(std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8443))));
    for warning in &w {
        tracing::warn!("pid1: {warning}");
    }
    // Where a restored template's time goes before auraed starts (whole milliseconds:
    // every byte on a microVM's serial console costs an exit).
    if let Some(read) = restored {
        tracing::info!(
            handover_ms = read
                .applied
                .saturating_duration_since(read.read)
                .as_millis() as u64,
            then_ms = read.applied.elapsed().as_millis() as u64,
            "pid1: restored from an instance template"
        );
    }
    Boot {
        hostname,
        listen,
        warnings: w,
        lineage,
        bridge_gateway,
        probe: params.iter().any(|(k, _)| k == "aurae.probe"),
    }
}

/// A template's wait for its handover drive (the device node appears shortly after
/// virtio_blk loads), then what it was handed applied.
fn become_instance(
    w: &mut Vec<String>,
    ahead: &dyn Fn(&mut Vec<String>),
) -> Result<(String, Restored), String> {
    use crate::instance::template;
    let dev = Path::new(template::DRIVE_DEVICE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dev.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within 10 s", dev.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // What costs time at start and needs no identity is done before the snapshot.
    ahead(w);
    let link_up = template::link_ahead(w);
    let handed = template::wait_for_handover(dev)?;
    let read = Instant::now();
    let more = template::apply(&handed, w)?;
    if !link_up {
        template::own_link(handed.mac, false, w)?;
    }
    Ok((
        more,
        Restored {
            read,
            applied: Instant::now(),
            mac: handed.mac,
            link_up,
        },
    ))
}

/// When a restored template had read its handover and applied it; its own MAC, and
/// whether its link was up before the snapshot (then the MAC is set once its addresses
/// are).
#[derive(Debug, Clone, Copy)]
struct Restored {
    read: Instant,
    applied: Instant,
    mac: [u8; 6],
    link_up: bool,
}

/// Waits (by short polling, with a deadline) for the device, then sets the address.
fn configure(a: &StaticAddr) -> std::io::Result<()> {
    let dev = Path::new("/sys/class/net").join(&a.device);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dev.exists() {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "device did not appear within 5 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The address first, then the link up announcing it (gratuitous ARP): a parent
    // already trying to reach it has a neighbour entry waiting, which this answers at
    // once instead of at its next ARP probe (a second later).
    let _ = fs::write(
        format!("/proc/sys/net/ipv4/conf/{}/arp_notify", a.device),
        "1",
    );
    match a.addr {
        IpAddr::V4(v4) => aurae_sys::net::set_ipv4(&a.device, v4, a.prefix)?,
        IpAddr::V6(v6) => {
            aurae_sys::net::set_link_up(&a.device)?;
            aurae_sys::net::add_ipv6(&a.device, v6, a.prefix)?;
        }
    }
    aurae_sys::net::set_link_up(&a.device)
}

/// Syncs and powers off (or reboots). Never returns: if the kernel refuses, it waits.
pub fn power_off(reboot: bool, reason: &str) -> ! {
    tracing::warn!(reboot, "pid1: {reason}: syncing and powering off");
    nix::unistd::sync();
    let mode = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let err = nix::sys::reboot::reboot(mode);
    tracing::error!("pid1: reboot({mode:?}) failed: {err:?}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mount points below `dir` in this mount namespace, with their options.
    fn mounts_below(dir: &Path) -> Vec<String> {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(4)
                    .is_some_and(|m| Path::new(m).starts_with(dir))
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn templates_get_huge_pages_only_where_the_state_is_in_memory_and_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP templates_get_huge_pages…: needs root (mount)");
            return;
        }
        let base = std::env::temp_dir().join(format!("aurae-huge-{}", std::process::id()));
        let state = base.join("state");
        fs::create_dir_all(&state).unwrap();
        // Not in memory (unless the temporary directory is a tmpfs itself): left alone.
        let on_disk = base.join("disk-state");
        let before = mounts_below(&base).len();
        let plain = nix::sys::statfs::statfs(&base).map(|s| s.filesystem_type());
        if plain.is_ok_and(|t| t != nix::sys::statfs::TMPFS_MAGIC) {
            assert_eq!(templates_in_huge_pages(&on_disk.join("t")), None);
            assert_eq!(mounts_below(&base).len(), before, "nothing mounted");
        }
        // A state directory in memory: the templates get a tmpfs of their own, once.
        mount(
            Some("tmpfs"),
            &state,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0700,size=16m"),
        )
        .unwrap();
        let dir = state.join(crate::instance::template::DIR);
        let warning = templates_in_huge_pages(&dir);
        let below = mounts_below(&dir);
        let again = templates_in_huge_pages(&dir);
        let below_again = mounts_below(&dir);
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&state, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&base);
        assert_eq!(warning, None);
        assert_eq!(below.len(), 1, "{below:?}");
        assert!(below[0].contains("huge=within_size"), "{below:?}");
        assert_eq!(again, None);
        assert_eq!(below_again.len(), 1, "mounted once: {below_again:?}");
    }

    #[test]
    fn module_parameters_come_from_the_command_line_as_modprobe_reads_them() {
        let p =
            cmdline_params("quiet kvm_amd.nested=1 kvm-amd.vgif=0 kvm.ignore_msrs kvm_amd. x.y=z");
        assert_eq!(module_params(&p, "kvm-amd"), "nested=1 vgif=0");
        assert_eq!(module_params(&p, "kvm"), "ignore_msrs");
        assert_eq!(module_params(&p, "virtio_net"), "");
    }

    #[test]
    fn network_parameters_parse_or_warn() {
        let p = cmdline_params(
            "console=ttyS0 ip=10.99.0.2::10.99.0.1:255.255.255.0:guest:eth0:off aurae.ip6=fd00::2/64@eth0 aurae.ip=bad quiet",
        );
        let (addrs, warnings) = network_config(&p);
        assert_eq!(
            addrs,
            vec![
                StaticAddr {
                    device: "eth0".into(),
                    addr: "10.99.0.2".parse().unwrap(),
                    prefix: 24
                },
                StaticAddr {
                    device: "eth0".into(),
                    addr: "fd00::2".parse().unwrap(),
                    prefix: 64
                },
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("aurae.ip=bad"));
        let (_, w) = network_config(&cmdline_params(
            "ip=10.0.0.1::1.1.1.1:255.0.255.0:h:eth0:off",
        ));
        assert_eq!(w.len(), 1, "a non-contiguous netmask is refused");
    }
}
