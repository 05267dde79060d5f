//! The guest tier: auraed as PID 1 of a QEMU guest (TCG with `-cpu max` here; KVM where
//! the host has real KVM), reached over mTLS through a TAP device on a bridge inside a
//! network namespace this harness creates, so no traffic leaves it.
//!
//! Artifacts come from `cargo xtask guest` (kernel and modules from Debian's kernel
//! package, busybox-static, a static auraed) in `target/guest` or `$AURAE_GUEST_DIR`.
//! Each boot gets a fresh PKI whose server certificate names the guest's address; the CA
//! key stays on the host. Readiness is health answering SERVING, never a sleep.

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aurae_client::Client;
use aurae_identity::{Pki, PkiPaths};
use tempfile::TempDir;

use crate::{TRUST_DOMAIN, cpio};

/// Busybox applets linked into the guest's /bin for test workloads.
const APPLETS: &[&str] = &[
    "sh", "sleep", "dd", "cat", "ls", "true", "false", "echo", "ps", "timeout", "head", "tr",
    "grep", "kill", "mkdir", "id", "hostname", "sync", "uname", "wc", "seq", "yes", "env",
];

/// Where the guest artifacts are.
pub fn artifacts() -> PathBuf {
    std::env::var_os("AURAE_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    )
}

/// `Some(reason)` unless this machine can boot the guest tier.
pub fn needs_guest() -> Option<String> {
    if let Some(r) = crate::tier::needs_root() {
        return Some(r);
    }
    let dir = artifacts();
    for f in [
        "vmlinuz",
        "auraed",
        "busybox",
        "modules/order",
        "instance-modules/order",
    ] {
        if !dir.join(f).exists() {
            return Some(format!(
                "{} is missing: run `cargo xtask guest` first",
                dir.join(f).display()
            ));
        }
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return Some(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    None
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A booted guest. Dropping it kills QEMU (by its handle) and deletes the namespace.
#[derive(Debug)]
pub struct Guest {
    pub dir: TempDir,
    pub pki: PkiPaths,
    pub netns: String,
    pub addr: SocketAddr,
    pub serial: PathBuf,
    /// Time from QEMU start to health answering SERVING.
    pub boot_time: Duration,
    qemu: Option<Child>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Options of a boot.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Replace /init with a busybox script that prints a marker and powers off (the
    /// boot-time peer).
    pub busybox_init: bool,
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// Module names added to /lib/modules/order without a file (a missing module).
    pub missing_modules: Vec<String>,
    /// More entries for the initramfs (parents before children), e.g. a seeded image
    /// store under var/lib/aurae.
    pub extra_files: Vec<cpio::Entry>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            cpus: 2,
            busybox_init: false,
            timeout: Duration::from_secs(180),
            extra_cmdline: String::new(),
            missing_modules: Vec::new(),
            extra_files: Vec::new(),
        }
    }
}

/// The marker the busybox peer init prints.
pub const MARKER: &str = "AURAE_BUSYBOX_INIT_MARKER";

impl Guest {
    /// A client of an instance at `endpoint` presenting `who`, requiring exactly `id`,
    /// dialled from inside the harness's network namespace (through the guest).
    pub async fn instance_client(
        &self,
        who: &str,
        endpoint: &str,
        id: &str,
    ) -> anyhow::Result<aurae_client::Client> {
        crate::instance_client(
            &self.pki,
            self.pki.identity(who),
            Some(&self.netns),
            endpoint,
            id,
        )
        .await
    }

    /// Builds an initramfs and boots it; returns once auraed answers health (or, for the
    /// busybox peer, once the marker is on the serial console).
    pub async fn boot(opts: GuestOptions) -> anyhow::Result<Self> {
        crate::init_crypto();
        let art = artifacts();
        let dir = tempfile::Builder::new().prefix("aurae-guest-").tempdir()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = 100 + (std::process::id() + n) % 100;
        let (host_ip, guest_ip) = (format!("10.99.{subnet}.1"), format!("10.99.{subnet}.2"));
        let pki = Pki::init(
            &dir.path().join("pki"),
            TRUST_DOMAIN,
            std::slice::from_ref(&guest_ip),
        )?;
        let initrd = dir.path().join("initramfs.cpio");
        build_initramfs(&art, &pki, &initrd, &opts)?;

        let netns = format!("aurae-g{}-{n}", std::process::id());
        ip(&["netns", "add", &netns])?;
        let mut g = Self {
            addr: SocketAddr::new(guest_ip.parse()?, 8443),
            serial: dir.path().join("serial.log"),
            dir,
            pki,
            netns: netns.clone(),
            boot_time: Duration::ZERO,
            qemu: None,
        };
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        ip(&["-n", &netns, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&["-n", &netns, "link", "set", "tap0", "master", "br0"])?;
        ip(&["-n", &netns, "link", "set", "tap0", "up"])?;
        // IPv6 drops addresses while the bridge has no carrier (before QEMU opens the TAP)
        // unless told to keep them.
        let keep = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/br0/keep_addr_on_down",
            ])
            .status()?;
        if !keep.success() {
            bail!("setting keep_addr_on_down on br0 failed");
        }
        let v6 = format!("fd00:99:{subnet}::1/64");
        ip(&["-n", &netns, "addr", "add", &v6, "dev", "br0", "nodad"])?;

        let append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 ip={guest_ip}::{host_ip}:255.255.255.0:guest:eth0:off \
             aurae.ip6=fd00:99:{subnet}::2/64@eth0 aurae.hostname=guest {}",
            opts.extra_cmdline
        );
        let kvm = Path::new("/dev/kvm").exists() && std::env::var_os("AURAE_GUEST_KVM").is_some();
        let log = fs::File::create(g.dir.path().join("qemu.log"))?;
        let start = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "qemu-system-x86_64"])
            .args(if kvm {
                ["-accel", "kvm", "-cpu", "host"]
            } else {
                ["-accel", "tcg", "-cpu", "max"]
            })
            .args([
                "-m",
                &opts.memory_mib.to_string(),
                "-smp",
                &opts.cpus.to_string(),
            ])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", g.serial.display()))
            .arg("-kernel")
            .arg(art.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu")?;
        g.qemu = Some(child);

        let deadline = start + opts.timeout;
        loop {
            if let Some(q) = g.qemu.as_mut()
                && let Some(st) = q.try_wait()?
            {
                if opts.busybox_init && g.serial_text().contains(MARKER) {
                    g.boot_time = start.elapsed();
                    g.qemu = None;
                    return Ok(g);
                }
                bail!(
                    "qemu exited during boot ({st}); serial:\n{}\nqemu:\n{}",
                    g.serial_text(),
                    g.qemu_text()
                );
            }
            if opts.busybox_init {
                if g.serial_text().contains(MARKER) {
                    g.boot_time = start.elapsed();
                    return Ok(g);
                }
            } else if let Ok(c) = g.client("admin").await
                && c.health()
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1)
            {
                g.boot_time = start.elapsed();
                return Ok(g);
            }
            if Instant::now() > deadline {
                bail!(
                    "guest not ready after {:?}; serial:\n{}",
                    opts.timeout,
                    g.serial_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The QEMU process's pid while it runs.
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Child::id)
    }

    pub fn serial_text(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn qemu_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    /// The guest's static IPv6 address (`aurae.ip6=` on its command line).
    pub fn addr6(&self) -> SocketAddr {
        let subnet = match self.addr.ip() {
            std::net::IpAddr::V4(v4) => v4.octets()[2],
            std::net::IpAddr::V6(_) => 0,
        };
        SocketAddr::new(
            format!("fd00:99:{subnet}::2")
                .parse()
                .unwrap_or(std::net::Ipv6Addr::LOCALHOST.into()),
            8443,
        )
    }

    /// A client presenting identity `name`, connected from inside the namespace.
    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        self.client_at(name, self.addr).await
    }

    /// Like [`Guest::client`], to another of the guest's addresses.
    pub async fn client_at(&self, name: &str, addr: SocketAddr) -> anyhow::Result<Client> {
        let (cert, key) = self.pki.identity(name);
        if !cert.exists() {
            let id = aurae_identity::SpiffeId::new(TRUST_DOMAIN, &format!("/operator/{name}"))?;
            Pki::issue_client(&self.pki.dir, name, &id, 1)?;
        }
        let tls = aurae_identity::tls::client_config(&self.pki.ca_cert, &cert, &key)?;
        let ns = self.netns.clone();
        let dial = move || crate::dial_in(Some(&ns), addr);
        // The server certificate names the IPv4 address; check the same name over IPv6.
        Ok(Client::connect_tcp_with(dial, &self.addr.ip().to_string(), tls).await?)
    }

    /// Waits for QEMU to exit (the guest powered off); `false` on timeout.
    pub fn wait_poweroff(&mut self, timeout: Duration) -> bool {
        let Some(q) = self.qemu.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(q.try_wait(), Ok(Some(_))) {
                self.qemu = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Writes the initramfs: auraed as /init (or the busybox peer), busybox, modules, PKI.
fn build_initramfs(
    art: &Path,
    pki: &PkiPaths,
    out: &Path,
    opts: &GuestOptions,
) -> anyhow::Result<()> {
    let busybox_init = opts.busybox_init;
    use cpio::Entry::{CharDev, Dir, File, Symlink};
    let mut e = Vec::new();
    for d in [
        "bin",
        "dev",
        "etc",
        "etc/aurae",
        "etc/aurae/pki",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "var/lib",
        "sbin",
        "usr",
        "usr/bin",
    ] {
        e.push(Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    e.push(CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    e.push(CharDev {
        path: "dev/null".into(),
        mode: 0o666,
        major: 1,
        minor: 3,
    });
    e.push(File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: fs::read(art.join("busybox"))?,
    });
    for a in APPLETS {
        e.push(Symlink {
            path: format!("bin/{a}"),
            target: "busybox".into(),
        });
    }
    let order = fs::read_to_string(art.join("modules/order"))?;
    for m in order.split_whitespace() {
        e.push(File {
            path: format!("lib/modules/{m}.ko"),
            mode: 0o644,
            data: fs::read(art.join(format!("modules/{m}.ko")))?,
        });
    }
    let mut order = order;
    for m in &opts.missing_modules {
        order.push_str(m);
        order.push('\n');
    }
    e.push(File {
        path: "lib/modules/order".into(),
        mode: 0o644,
        data: order.into_bytes(),
    });
    for (src, name, mode) in [
        (&pki.ca_cert, "ca.pem", 0o644),
        (&pki.server_cert, "auraed.pem", 0o644),
        (&pki.server_key, "auraed.key", 0o600),
        (&pki.signer_cert, "signer.pem", 0o644),
        (&pki.signer_key, "signer.key", 0o600),
    ] {
        e.push(File {
            path: format!("etc/aurae/pki/{name}"),
            mode,
            data: fs::read(src)?,
        });
    }
    if busybox_init {
        let script = format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\necho {MARKER} uptime=$(/bin/busybox cat /proc/uptime)\n/bin/busybox poweroff -f\n"
        );
        e.push(File {
            path: "init".into(),
            mode: 0o755,
            data: script.into_bytes(),
        });
    } else {
        e.push(File {
            path: "init".into(),
            mode: 0o755,
            data: fs::read(art.join("auraed"))?,
        });
    }
    e.extend(opts.extra_files.iter().cloned());
    let mut f = std::io::BufWriter::new(fs::File::create(out)?);
    cpio::write(&mut f, &e)?;
    f.flush()?;
    Ok(())
}

/// The microVM's initramfs: busybox, the virtio modules of the same kernel, and an init
/// that writes the boot-timer port (0x440), prints [`MICROVM_MARKER`], with `network` reads
/// its first drive (a sector, then 1 MiB and 512 KiB requests) and tries to write it, brings
/// eth0 up with the address auraed put on its command line and pings the gateway over the
/// TAP, and powers off.
pub fn microvm_initramfs(network: bool) -> anyhow::Result<Vec<u8>> {
    let net = if network { NET_SCRIPT } else { "" };
    microvm_initramfs_with(&format!(
        "printf '\\173' | dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null\necho {MICROVM_MARKER}\n{CPU_SCRIPT}{net}"
    ))
}

/// Entries for a machine's initramfs that give it `/var/lib/aurae/vm-images` (auraed's
/// default VM image root) holding the guest kernel as `vmlinuz` and `initrd`.
pub fn vm_image_files(initrd: Vec<u8>) -> anyhow::Result<Vec<cpio::Entry>> {
    use crate::cpio::Entry::{Dir, File};
    Ok(vec![
        Dir {
            path: "var/lib/aurae".into(),
            mode: 0o700,
        },
        Dir {
            path: "var/lib/aurae/vm-images".into(),
            mode: 0o755,
        },
        File {
            path: "var/lib/aurae/vm-images/vmlinuz".into(),
            mode: 0o644,
            data: std::fs::read(artifacts().join("vmlinuz"))?,
        },
        File {
            path: "var/lib/aurae/vm-images/initrd".into(),
            mode: 0o644,
            data: initrd,
        },
    ])
}

/// An entry for a machine's initramfs: the guest kernel uncompressed (the ELF `vmlinux`
/// `cargo xtask guest` takes out of `vmlinuz`) as `/var/lib/aurae/vm-images/vmlinux`,
/// beside [`vm_image_files`]. 63 MiB: only for what boots it.
pub fn vmlinux_file() -> anyhow::Result<cpio::Entry> {
    let path = artifacts().join("vmlinux");
    Ok(cpio::Entry::File {
        path: "var/lib/aurae/vm-images/vmlinux".into(),
        mode: 0o644,
        data: std::fs::read(&path)
            .with_context(|| format!("{} (made by `cargo xtask guest`)", path.display()))?,
    })
}

/// [`microvm_initramfs`]'s busybox, modules and mounts with `body` as the rest of the init
/// script (before its `poweroff -f`).
pub fn microvm_initramfs_with(body: &str) -> anyhow::Result<Vec<u8>> {
    use crate::cpio::Entry::{CharDev, Dir, File, Symlink};
    let art = artifacts();
    let modroot = std::fs::read_dir(art.join("kernel-pkg/lib/modules"))?
        .flatten()
        .next()
        .context("no kernel modules in the guest artifacts")?
        .path()
        .join("kernel");
    let mut e = Vec::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "tmp"] {
        e.push(Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    e.push(CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    e.push(File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: std::fs::read(art.join("busybox"))?,
    });
    for a in [
        "sh", "mount", "dd", "printf", "ip", "ping", "insmod", "cat", "sed", "echo", "poweroff",
        "grep", "mknod", "sleep", "dmesg", "head", "uname",
    ] {
        e.push(Symlink {
            path: format!("bin/{a}"),
            target: "busybox".into(),
        });
    }
    let mods = [
        "drivers/virtio/virtio",
        "drivers/virtio/virtio_ring",
        "drivers/virtio/virtio_mmio",
        "net/core/failover",
        "drivers/net/net_failover",
        "drivers/net/virtio_net",
        "drivers/block/virtio_blk",
    ];
    for m in mods {
        let name = m.rsplit('/').next().unwrap_or(m);
        e.push(File {
            path: format!("lib/{name}.ko"),
            mode: 0o644,
            data: std::fs::read(modroot.join(format!("{m}.ko")))?,
        });
    }
    let script = format!(
        "#!/bin/sh\nexport PATH=/bin\nmount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{body}poweroff -f\n"
    );
    e.push(File {
        path: "init".into(),
        mode: 0o755,
        data: script.as_bytes().to_vec(),
    });
    let mut out = Vec::new();
    crate::cpio::write(&mut out, &e)?;
    Ok(out)
}

/// What a guest needs to spawn microVM instances of its own: the same kernel at
/// `var/lib/aurae/instance/vmlinuz` and the modules a nested instance needs (virtio-mmio
/// network; bridge and veth for its own cell-isolated instances) in
/// `var/lib/aurae/instance/modules` (see `auraed --instance-kernel/--instance-modules`).
pub fn instance_files() -> anyhow::Result<Vec<cpio::Entry>> {
    use crate::cpio::Entry::{Dir, File};
    let art = artifacts();
    let mut e = Vec::new();
    for d in [
        "var/lib/aurae",
        "var/lib/aurae/instance",
        "var/lib/aurae/instance/modules",
    ] {
        e.push(Dir {
            path: d.into(),
            mode: 0o755,
        });
    }
    e.push(File {
        path: "var/lib/aurae/instance/vmlinuz".into(),
        mode: 0o644,
        data: std::fs::read(art.join("vmlinuz"))?,
    });
    // `cargo xtask guest` puts the instance kernel's modules there.
    e.extend(module_entries(
        &art.join("instance-modules"),
        "var/lib/aurae/instance/modules",
    )?);
    Ok(e)
}

/// QEMU as the benches run it inside a guest (`-M microvm`).
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The benches' QEMU peer: `-M microvm` with KVM and `-cpu host`, 1 vCPU, 256 MiB, the serial
/// console on stdout, SeaBIOS's microvm build, `kernel` + `initrd` + `cmdline`, no reboot.
pub fn qemu_microvm_argv(kernel: &str, initrd: &str, cmdline: &str) -> Vec<String> {
    [
        QEMU,
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-bios",
        "/usr/share/seabios/bios-microvm.bin",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
const QEMU_FIRMWARE: [&str; 4] = [
    "/usr/share/seabios/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/linuxboot.bin",
];

/// `path` (and its parent directories) as initramfs entries, symlinks followed.
fn host_file(
    path: &Path,
    seen: &mut std::collections::BTreeSet<String>,
    out: &mut Vec<cpio::Entry>,
) {
    let rel = path.to_string_lossy().trim_start_matches('/').to_owned();
    let mut acc = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for p in &parts[..parts.len() - 1] {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(p);
        if seen.insert(acc.clone()) {
            out.push(cpio::Entry::Dir {
                path: acc.clone(),
                mode: 0o755,
            });
        }
    }
    if seen.insert(rel.clone())
        && let Ok(data) = fs::read(path)
    {
        out.push(cpio::Entry::File {
            path: rel,
            mode: 0o755,
            data,
        });
    }
}

/// [`QEMU`], the shared libraries `ldd` names, and the microvm firmware, as entries for
/// a guest's initramfs (beside the directories it already has); `None` if `ldd` fails.
pub fn qemu_files() -> Option<Vec<cpio::Entry>> {
    let mut seen = initramfs_dirs();
    let mut out = Vec::new();
    host_file(Path::new(QEMU), &mut seen, &mut out);
    libraries(Path::new(QEMU), &mut seen, &mut out).ok()?;
    for f in QEMU_FIRMWARE {
        host_file(Path::new(f), &mut seen, &mut out);
    }
    Some(out)
}

/// A program of this machine for a guest's initramfs (beside the directories it already
/// has): stripped of its debug information, at `at` (e.g. `usr/local/bin/walk`), with the
/// shared libraries `ldd` names at their paths. How a test binary runs itself inside L1.
pub fn program_files(program: &Path, at: &str) -> anyhow::Result<Vec<cpio::Entry>> {
    let tmp = tempfile::tempdir()?;
    let stripped = tmp.path().join("program");
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(program)
        .status()
        .context("running strip (binutils)")?;
    if !st.success() {
        bail!("strip --strip-debug {} failed: {st}", program.display());
    }
    let mut seen = initramfs_dirs();
    let mut out = Vec::new();
    let mut dir = String::new();
    for p in at
        .split('/')
        .collect::<Vec<_>>()
        .split_last()
        .map_or(&[][..], |(_, d)| d)
    {
        if !dir.is_empty() {
            dir.push('/');
        }
        dir.push_str(p);
        if seen.insert(dir.clone()) {
            out.push(cpio::Entry::Dir {
                path: dir.clone(),
                mode: 0o755,
            });
        }
    }
    out.push(cpio::Entry::File {
        path: at.to_owned(),
        mode: 0o755,
        data: fs::read(&stripped)?,
    });
    libraries(program, &mut seen, &mut out)?;
    Ok(out)
}

/// The directories every guest's initramfs has.
fn initramfs_dirs() -> std::collections::BTreeSet<String> {
    [
        "bin", "dev", "etc", "lib", "proc", "sys", "run", "tmp", "var", "var/lib", "sbin", "usr",
        "usr/bin",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// The shared libraries `ldd` names for `program`, as initramfs entries at their paths.
fn libraries(
    program: &Path,
    seen: &mut std::collections::BTreeSet<String>,
    out: &mut Vec<cpio::Entry>,
) -> anyhow::Result<()> {
    // A static program: ldd says so and fails; it needs no libraries.
    let ldd = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
            host_file(Path::new(p), seen, out);
        }
    }
    Ok(())
}

/// The modules a directory lists in `order` (`<name>.ko` beside it), as initramfs entries
/// `<into>/<name>.ko` and `<into>/order`.
pub fn module_entries(dir: &Path, into: &str) -> anyhow::Result<Vec<cpio::Entry>> {
    let order = fs::read_to_string(dir.join("order"))
        .with_context(|| format!("{}/order (run cargo xtask guest)", dir.display()))?;
    let mut e = Vec::new();
    for name in order.split_whitespace() {
        e.push(cpio::Entry::File {
            path: format!("{into}/{name}.ko"),
            mode: 0o644,
            data: fs::read(dir.join(format!("{name}.ko")))?,
        });
    }
    e.push(cpio::Entry::File {
        path: format!("{into}/order"),
        mode: 0o644,
        data: order.into_bytes(),
    });
    Ok(e)
}

/// The marker the microVM's init prints once it runs.
pub const MICROVM_MARKER: &str = "AURAE_MICROVM_MARKER";

/// What the first drive of the network-enabled microVM starts with (the test writes it).
pub const MICROVM_DISK_MARKER: &str = "AURAE_DISK_CONTENT";

const NET_SCRIPT: &str = r#"for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net virtio_blk; do insmod /lib/$m.ko; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vda ] && break; sleep 1; done
[ -e /dev/vda ] || mknod /dev/vda b $(sed 's/:/ /' /sys/block/vda/dev)
if dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -q AURAE_DISK_CONTENT; then echo AURAE_MICROVM_DISK_OK; else echo AURAE_MICROVM_DISK_FAILED; fi
if dd if=/dev/vda of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null && dd if=/dev/vda of=/dev/null bs=512K count=2 iflag=direct 2>/dev/null; then echo AURAE_MICROVM_BIG_READS_OK; else echo AURAE_MICROVM_BIG_READS_FAILED; fi
if echo x | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then echo AURAE_MICROVM_DISK_WRITABLE; else echo AURAE_MICROVM_DISK_READONLY; fi
ADDR=$(sed -n 's/.*ip=\([0-9.]*\)::\([0-9.]*\):.*/\1/p' /proc/cmdline)
GW=$(sed -n 's/.*ip=\([0-9.]*\)::\([0-9.]*\):.*/\2/p' /proc/cmdline)
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 1; done
ip addr add $ADDR/24 dev eth0
ip link set eth0 up
if ping -c 1 -W 10 $GW >/dev/null; then echo AURAE_MICROVM_PING_OK; else echo AURAE_MICROVM_PING_FAILED; fi
"#;

/// How often [`with_live_guest`] asks the machine's auraed for its health.
pub const WATCH_EVERY: Duration = Duration::from_secs(10);
/// Consecutive unanswered health checks (each given [`WATCH_EVERY`]) that make a machine
/// wedged.
pub const WATCH_MISSES: u32 = 4;

/// Boots a guest with `opts` and runs `body` on it; when the machine itself stops answering
/// (its auraed's health unanswered [`WATCH_MISSES`] times in a row, [`WATCH_EVERY`] apart)
/// the body is dropped with the machine and run once more on a fresh one, printing
/// `RETRY`. Under QEMU TCG's emulated SVM the whole L1 machine has been seen to stop while
/// it ran an L2 guest (its vCPUs spinning, nothing more on its console): the emulator's
/// fault, not the test's. A body that panics fails the test at once, as without this.
pub async fn with_live_guest<F, Fut>(what: &str, opts: GuestOptions, body: F) -> anyhow::Result<()>
where
    F: Fn(Guest) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    for attempt in 1..=2 {
        let g = Guest::boot(opts.clone())
            .await
            .with_context(|| format!("{what}: booting the guest"))?;
        let watch = g
            .client("admin")
            .await
            .with_context(|| format!("{what}: a client of the guest"))?;
        let mut task = tokio::spawn(body(g));
        let mut misses = 0;
        loop {
            tokio::select! {
                r = &mut task => match r {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => bail!("{what}: {e}"),
                },
                () = tokio::time::sleep(WATCH_EVERY) => {
                    let mut health = watch.health();
                    let check = health.check(tonic_health::pb::HealthCheckRequest::default());
                    let answered = tokio::time::timeout(WATCH_EVERY, check)
                        .await
                        .is_ok_and(|r| r.is_ok());
                    misses = if answered { 0 } else { misses + 1 };
                    if misses >= WATCH_MISSES {
                        task.abort();
                        let _ = (&mut task).await;
                        if attempt == 2 {
                            bail!("{what}: the guest machine stopped answering, twice");
                        }
                        println!(
                            "RETRY {what}: the guest machine left {WATCH_MISSES} health checks in a row unanswered (QEMU TCG's emulated SVM); booting a fresh one"
                        );
                        break;
                    }
                }
            }
        }
    }
    bail!("{what}: the guest machine stopped answering, twice")
}

/// Prints what the guest's kernel made of its CPU: `AURAE_CPU family=N aperture=N` (how
/// many times it searched for an AGP/GART aperture) and `AURAE_CPU_FLAGS …`.
const CPU_SCRIPT: &str = r#"echo AURAE_CPU family=$(sed -n 's/^cpu family[^:]*: //p' /proc/cpuinfo | head -n 1) aperture=$(dmesg | grep -c 'Checking aperture')
echo AURAE_CPU_FLAGS $(sed -n 's/^flags[^:]*: //p' /proc/cpuinfo | head -n 1) END
"#;

/// Whether `message` (a Spawn or RunPod error, or a VM's end, from a guest) says the nested
/// (L2) guest triple-faulted or stopped before it was ready. Under QEMU TCG's emulated SVM an L2 Linux triple-faults at a
/// random point of its boot or run: 3 of 10 boots of the same kernel and initramfs on
/// 2026-12-02 (`nested_probe`, in kernel code each time, with either CPU template): the
/// emulator's fault, not the workload's. The guest tests try such a step again, up to
/// [`NESTED_TRIES`] times in all, saying so.
pub fn nested_guest_faulted(message: &str) -> bool {
    // A nested guest that stopped (its L1 machine still answering) ends its spawn at the
    // ready deadline: "… was not ready in time …".
    message.contains("triple fault") || message.contains("was not ready in time")
}

/// How many times in all a guest test tries a step that boots a nested guest.
pub const NESTED_TRIES: usize = 4;

/// Runs `step` until it succeeds, fails otherwise than by a nested guest's triple fault, or
/// has been tried [`NESTED_TRIES`] times; each retry is printed as `RETRY what: …`.
pub async fn retry_nested<T, F, Fut>(what: &str, mut step: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut tried = 1;
    loop {
        match step().await {
            Err(e) if nested_guest_faulted(e.message()) && tried < NESTED_TRIES => {
                println!(
                    "RETRY {what} (try {} of {NESTED_TRIES}): the nested guest triple-faulted: {}",
                    tried + 1,
                    e.message()
                );
                tried += 1;
            }
            r => return r,
        }
    }
}
