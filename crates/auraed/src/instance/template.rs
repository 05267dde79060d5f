//! Instance templates: a microVM instance booted once to "auraed up, waiting for its
//! identity", snapshotted, and restored for each `Spawn` of the same kernel, modules,
//! auraed binary and size, instead of booting a kernel each time.
//!
//! A restored copy must become unique before it serves anything. The template boots with
//! no identity, no address and its network link up without an IPv6 link-local address
//! ([`link_ahead`]), with one extra virtio-blk drive
//! holding zeros; its PID 1 prints [`WAITING_MARKER`] and polls that drive (`O_DIRECT`:
//! never the page cache). A restore puts the new instance's [`Personal`] handover where
//! the zeros were (a sealed memfd auraed wrote, copied into the VMM's jail): its freshly
//! minted SVID and keys, policy and place (exactly what a booted instance finds in its
//! initramfs), its MAC, addresses and hostname (what a booted one finds on its kernel
//! command line), the time, and 64 random bytes from the parent. The child mixes those
//! into its kernel's CRNG and reseeds it ([`aurae_sys::random::reseed`]) before anything
//! reads a random byte, sets its clock, and from there boots exactly as a booted
//! instance does, taking its own MAC and link-local address once its addresses are set
//! ([`own_link`]). Its keys are minted by the parent for this spawn, after the restore:
//! never shared by two instances. The kernel's boot ID is made on its first read, after
//! the reseed, so each copy has its own.
//!
//! Templates live under `<state dir>/instance-templates/` in the VM snapshot format
//! ([`crate::vm::snapshots`]: written into a partial directory, renamed into place,
//! checksummed state file; the memory file's SHA-256 is checked on first use by each
//! auraed process). A template's name carries the SHA-256 of everything it was made of:
//! when the kernel, the modules or auraed change, the old one is stale, never used, and
//! removed when a new one is built.

use std::{
    collections::HashSet,
    fs::File,
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::handover::{Handover, PLACE_FILE, Place};
use crate::{
    spec::Label,
    vm::snapshots::{SnapshotInfo, SnapshotStore},
    workload::WorkloadError,
};

/// Where templates are kept, in the state directory.
pub const DIR: &str = "instance-templates";

/// On a template's kernel command line: wait for the handover drive.
pub const TEMPLATE_PARAM: &str = "aurae.template";

/// What a template's PID 1 prints on its console once it polls its drive: the moment
/// to take the snapshot.
pub const WAITING_MARKER: &str = "AURAE_TEMPLATE_WAITING";

/// The handover drive's size (a multiple of the block size; a handover is ~10 KiB).
pub const DRIVE_BYTES: usize = 64 << 10;

/// The device the handover drive is in the guest (its only block device).
pub const DRIVE_DEVICE: &str = "/dev/vda";

const MAGIC: &[u8; 8] = b"AURAEHO1";

/// What a template's guest does before it waits, and how it reads its drive: part of every
/// template's name, so a change makes the old templates stale.
pub const FORMAT: u32 = 3;

/// Most templates kept (one per size in use); stale ones are removed first.
pub const MAX_TEMPLATES: usize = 8;

/// How often the waiting guest reads its drive.
const POLL: Duration = Duration::from_millis(2);

/// What a restored template instance is handed on its drive.
#[derive(Serialize, Deserialize)]
pub struct Personal {
    /// Identity, policy and place: what a booted instance finds in its initramfs.
    pub handover: Handover,
    /// Its MAC (the template's is in the guest driver's state).
    pub mac: [u8; 6],
    /// `ip=… aurae.ip6=… aurae.gw6=… aurae.hostname=…`: what a booted instance finds on
    /// its kernel command line.
    pub cmdline: String,
    /// Random bytes from the parent for the child's CRNG.
    pub seed: Vec<u8>,
    /// The parent's clock when it wrote this (seconds, nanoseconds since the epoch).
    pub now: (u64, u32),
}

impl std::fmt::Debug for Personal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Personal")
            .field("handover", &self.handover)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

impl Personal {
    /// A handover for `h`, with 64 fresh random bytes and the time now.
    pub fn new(handover: Handover, mac: [u8; 6], cmdline: String) -> Result<Self, String> {
        let mut seed = vec![0u8; 64];
        getrandom(&mut seed)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Self {
            handover,
            mac,
            cmdline,
            seed,
            now: (now.as_secs(), now.subsec_nanos()),
        })
    }
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("/dev/urandom: {e}"))
}

/// The drive's bytes: magic, length (u32 LE), JSON, its SHA-256, zeros to
/// [`DRIVE_BYTES`].
pub fn encode(p: &Personal) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(p).map_err(|e| format!("handover: {e}"))?;
    let len = u32::try_from(json.len()).map_err(|_| "handover too large".to_owned())?;
    let mut out = Vec::with_capacity(DRIVE_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&Sha256::digest(&json));
    if out.len() > DRIVE_BYTES {
        return Err(format!(
            "handover of {} bytes does not fit the {DRIVE_BYTES}-byte drive",
            out.len()
        ));
    }
    out.resize(DRIVE_BYTES, 0);
    Ok(out)
}

/// `None` while the drive holds no handover (zeros: the template before its restore);
/// an error when it holds a damaged one.
pub fn decode(bytes: &[u8]) -> Result<Option<Personal>, String> {
    if bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Ok(None);
    }
    let len = bytes
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or("handover: truncated")? as usize;
    let json = bytes.get(12..12 + len).ok_or("handover: truncated")?;
    let sum = bytes
        .get(12 + len..12 + len + 32)
        .ok_or("handover: truncated")?;
    if Sha256::digest(json).as_slice() != sum {
        return Err("handover: its checksum does not match".into());
    }
    serde_json::from_slice(json)
        .map(Some)
        .map_err(|e| format!("handover does not parse: {e}"))
}

/// The guest side, in a template's PID 1: says it waits, then reads `device` until a
/// handover appears (forever: the parent snapshots it and kills this copy).
pub fn wait_for_handover(device: &Path) -> Result<Personal, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_direct())
        .open(device)
        .map_err(|e| format!("{}: {e}", device.display()))?;
    // O_DIRECT needs a block-aligned buffer.
    let mut buf = vec![0u8; DRIVE_BYTES + 4096];
    let skew = buf.as_ptr() as usize % 4096;
    let start = (4096 - skew) % 4096;
    let aligned = &mut buf[start..start + DRIVE_BYTES];
    println!("{WAITING_MARKER}");
    let _ = std::io::stdout().flush();
    loop {
        f.read_exact_at(aligned, 0)
            .map_err(|e| format!("{}: {e}", device.display()))?;
        if let Some(p) = decode(aligned)? {
            return Ok(p);
        }
        std::thread::sleep(POLL);
    }
}

fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}

/// The guest side, once the handover is read: the CRNG reseeded first, the clock moved
/// forward to the parent's if it is behind, the identity, policy and place written where
/// a booted instance's initramfs has them, its MAC set. Returns the kernel command line
/// parameters to boot on with (as text); an error when it cannot serve (no identity
/// written).
pub fn apply(p: &Personal, w: &mut Vec<String>) -> Result<String, String> {
    if let Err(e) = aurae_sys::random::reseed(&p.seed) {
        // Serving with a CRNG cloned from the template would repeat another
        // instance's random bytes: refuse.
        return Err(format!("reseeding the kernel's CRNG: {e}"));
    }
    // The parent's clock when it wrote the handover: earlier than now by the restore.
    // A clock the restore already moved past it (KVM advances kvmclock by the time since
    // the snapshot) is closer to the truth and is kept: never set back.
    let handed = nix::sys::time::TimeSpec::new(
        i64::try_from(p.now.0).unwrap_or(i64::MAX),
        i64::from(p.now.1),
    );
    let ours = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME);
    let behind = ours.map_or(true, |t| t < handed);
    if behind && let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, handed) {
        w.push(format!("setting the clock: {e}"));
    }
    let h = &p.handover;
    let place = serde_json::to_string(&Place::of(h)).map_err(|e| e.to_string())?;
    for (path, mode, data) in [
        ("/etc/aurae/pki/ca.pem", 0o644, h.ca_pem.as_str()),
        ("/etc/aurae/pki/auraed.pem", 0o644, &h.cert_pem),
        ("/etc/aurae/pki/auraed.key", 0o600, &h.key_pem),
        ("/etc/aurae/pki/signer.pem", 0o644, &h.signer_chain_pem),
        ("/etc/aurae/pki/signer.key", 0o600, &h.signer_key_pem),
        ("/etc/aurae/policy.toml", 0o600, &h.policy_toml),
        (PLACE_FILE, 0o644, &place),
    ] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(data.as_bytes()))
            .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(p.cmdline.clone())
}

/// The template's network interface.
const LINK: &str = "eth0";

/// The interface's IPv6 setting `key`.
fn ipv6_conf(key: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{LINK}/{key}")
}

fn addr_gen_mode() -> String {
    ipv6_conf("addr_gen_mode")
}

/// Before the snapshot: the interface up (its driver posts its receive buffers then:
/// tens of milliseconds of a copy's start), but without the IPv6 link-local address the
/// kernel makes from the MAC at link-up: made from the template's MAC, every copy would
/// have it ([`own_link`] makes each copy's from its own). Returns whether it is up; it is
/// not when that address cannot be held back (it is brought up after the restore then).
pub fn link_ahead(w: &mut Vec<String>) -> bool {
    match std::fs::write(addr_gen_mode(), "1") {
        Ok(()) => {}
        // No IPv6: no link-local address to hold back.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            w.push(format!(
                "{LINK}: its link-local address cannot be held back ({}: {e}): brought up after the restore",
                addr_gen_mode()
            ));
            return false;
        }
    }
    match aurae_sys::net::set_link_up(LINK) {
        Ok(()) => true,
        Err(e) => {
            w.push(format!("{LINK}: up before the snapshot: {e}"));
            // Brought up after the restore, it makes its link-local address then.
            if let Err(e) = std::fs::write(addr_gen_mode(), "0")
                && e.kind() != std::io::ErrorKind::NotFound
            {
                w.push(format!("{LINK}: its IPv6 link-local address: {e}"));
            }
            false
        }
    }
}

/// A restored copy's own MAC. With its link up ([`link_ahead`]) after its addresses are
/// set: the kernel announces the change with a gratuitous ARP for its address
/// (`arp_notify`), which a parent already asking for it takes at once; then its IPv6
/// link-local address is made from it (EUI-64, as at a link-up). With its link down,
/// before anything (it is brought up with the right MAC).
///
/// A copy that cannot take its own MAC must not serve: it would share the template's
/// with every other copy on the bridge (an error).
pub fn own_link(mac: [u8; 6], link_up: bool, w: &mut Vec<String>) -> Result<(), String> {
    if let Err(live) = aurae_sys::net::set_mac(LINK, mac) {
        // A driver without live changes takes it with the link down (its IPv6
        // addresses kept across).
        let again = if link_up {
            let _ = std::fs::write(ipv6_conf("keep_addr_on_down"), "1");
            aurae_sys::net::set_link_down(LINK)
                .and_then(|()| aurae_sys::net::set_mac(LINK, mac))
                .and_then(|()| aurae_sys::net::set_link_up(LINK))
        } else {
            Err(live)
        };
        if let Err(e) = again {
            return Err(format!("{LINK}: setting its own MAC: {e}"));
        }
    }
    if link_up
        && let Err(e) = std::fs::write(addr_gen_mode(), "0")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        w.push(format!("{LINK}: its IPv6 link-local address: {e}"));
    }
    Ok(())
}

/// The digest of what a template is made of: its format, the kernel, the modules (their
/// `order` and files), auraed's own binary (the sealed copy every child runs), and the
/// size. Part of the template's name.
pub fn inputs_digest(
    kernel: &Path,
    modules: Option<&Path>,
    binary: &std::fs::File,
) -> Result<[u8; 32], String> {
    let mut h = Sha256::new();
    h.update(FORMAT.to_le_bytes());
    let file = |h: &mut Sha256, f: &std::fs::File, what: &str| {
        crate::vm::kernels::hash_file(h, f).map_err(|e| format!("{what}: {e}"))
    };
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    h.update(b"kernel");
    file(&mut h, &open(kernel)?, "the instance kernel")?;
    if let Some(dir) = modules {
        let order = std::fs::read_to_string(dir.join("order"))
            .map_err(|e| format!("{}/order: {e}", dir.display()))?;
        h.update(b"order");
        h.update(order.as_bytes());
        for m in order.split_whitespace() {
            h.update(m.as_bytes());
            let p = dir.join(format!("{m}.ko"));
            file(&mut h, &open(&p)?, &p.display().to_string())?;
        }
    }
    h.update(b"auraed");
    file(&mut h, binary, "our binary")?;
    Ok(h.finalize().into())
}

/// A template's name: its size and the first 16 hex digits of the digest of its
/// inputs and size, e.g. `t-1x512m-0123456789abcdef`.
pub fn name(digest: &[u8; 32], vcpus: u32, memory_bytes: u64) -> String {
    let mut h = Sha256::new();
    h.update(digest);
    h.update(vcpus.to_le_bytes());
    h.update(memory_bytes.to_le_bytes());
    let d = h.finalize();
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("t-{vcpus}x{}m-{hex}", memory_bytes >> 20)
}

/// The stored templates (see the module docs).
#[derive(Debug)]
pub struct Templates {
    store: Result<SnapshotStore, String>,
    /// The inputs' digest and the files' (path, size, mtime, inode) it was made from:
    /// hashed again only when one of them changes.
    digest: Mutex<Option<(Vec<Stamp>, [u8; 32])>>,
    /// Templates whose memory file's SHA-256 this process checked.
    verified: Mutex<HashSet<String>>,
    /// One build at a time.
    pub building: tokio::sync::Mutex<()>,
}

type Stamp = (PathBuf, u64, i64, u64);

fn stamps(kernel: &Path, modules: Option<&Path>) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let mut paths = vec![kernel.to_owned()];
    if let Some(dir) = modules {
        paths.push(dir.join("order"));
        if let Ok(order) = std::fs::read_to_string(dir.join("order")) {
            paths.extend(
                order
                    .split_whitespace()
                    .map(|m| dir.join(format!("{m}.ko"))),
            );
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let (len, mtime, ino) = m.map_or((0, 0, 0), |m| {
                (m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.ino())
            });
            (p, len, mtime, ino)
        })
        .collect()
}

/// A stored template, as listed.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub info: SnapshotInfo,
    pub memory_disk_bytes: u64,
    pub current: bool,
}

impl Templates {
    /// The store in `dir` (created 0700); what a crashed auraed left half written is
    /// removed and returned.
    pub fn open(dir: PathBuf) -> (Self, Vec<String>) {
        let (store, removed) = match SnapshotStore::open(dir) {
            Ok((s, removed)) => (Ok(s), removed),
            Err(e) => (Err(e.to_string()), Vec::new()),
        };
        (
            Self {
                store,
                digest: Mutex::new(None),
                verified: Mutex::new(HashSet::new()),
                building: tokio::sync::Mutex::new(()),
            },
            removed,
        )
    }

    pub fn store(&self) -> Result<&SnapshotStore, WorkloadError> {
        self.store
            .as_ref()
            .map_err(|e| WorkloadError::Precondition(format!("instance templates: {e}")))
    }

    /// The name the template of this size has now (blocking: may hash the inputs).
    pub fn current_name(
        &self,
        kernel: &Path,
        modules: Option<&Path>,
        binary: &std::fs::File,
        vcpus: u32,
        memory_bytes: u64,
    ) -> Result<String, String> {
        let now = stamps(kernel, modules);
        let mut g = self.digest.lock().map_err(|_| "digest lock poisoned")?;
        let digest = match g.as_ref() {
            Some((st, d)) if *st == now => *d,
            _ => {
                let d = inputs_digest(kernel, modules, binary)?;
                *g = Some((now, d));
                d
            }
        };
        Ok(name(&digest, vcpus, memory_bytes))
    }

    /// Whether `info` is the template `current_name` gives for its size (true while no
    /// name was asked for yet: nothing is known stale before the inputs are hashed).
    pub fn is_current(&self, info: &SnapshotInfo) -> bool {
        match self
            .digest
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|(_, d)| *d))
        {
            Some(d) => name(&d, info.vcpus, info.memory_bytes) == info.name,
            None => true,
        }
    }

    /// The template `name`'s two files, opened once (no symlink followed); its memory
    /// file's SHA-256 checked against its state file the first time this process uses
    /// it (blocking). A template that fails the check is removed.
    pub fn open_files(&self, name: &Label) -> Result<(File, File), WorkloadError> {
        let store = self.store()?;
        let (mut state, memory) = store.open_files(name)?;
        let checked = self
            .verified
            .lock()
            .is_ok_and(|v| v.contains(name.as_str()));
        if !checked {
            let verdict = aurae_vmm::Snapshot::read(&mut state)
                .and_then(|snap| aurae_vmm::snapshot::verify_memory(&snap.header, &memory));
            if let Err(e) = verdict {
                let _ = store.remove(name);
                return Err(WorkloadError::Precondition(format!(
                    "instance template {name}: {e} (it was removed)"
                )));
            }
            if let Ok(mut v) = self.verified.lock() {
                v.insert(name.to_string());
            }
        }
        Ok((state, memory))
    }

    /// Marks a template this process just wrote as checked.
    pub fn written(&self, name: &Label) {
        if let Ok(mut v) = self.verified.lock() {
            v.insert(name.to_string());
        }
    }

    /// Every stored template; `current` says which of them `current_name` would give.
    pub fn list(&self, current: impl Fn(&SnapshotInfo) -> bool) -> Vec<TemplateInfo> {
        use std::os::unix::fs::MetadataExt;
        let Ok(store) = self.store() else {
            return Vec::new();
        };
        store
            .list()
            .into_iter()
            .map(|info| {
                let memory_disk_bytes =
                    std::fs::metadata(store.dir().join(&info.name).join("memory"))
                        .map_or(0, |m| m.blocks() * 512);
                TemplateInfo {
                    current: current(&info),
                    info,
                    memory_disk_bytes,
                }
            })
            .collect()
    }

    pub fn remove(&self, name: &Label) -> Result<(), WorkloadError> {
        self.store()?.remove(name).map_err(|e| match e {
            WorkloadError::NotFound(_) => {
                WorkloadError::NotFound(format!("instance template {name:?} is not stored"))
            }
            e => e,
        })?;
        if let Ok(mut v) = self.verified.lock() {
            v.remove(name.as_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn personal() -> Personal {
        Personal::new(
            Handover {
                name: "i1".into(),
                spiffe_id: "spiffe://aurae.test/instance/node/i1".into(),
                ca_pem: "CA".into(),
                cert_pem: "CERT".into(),
                key_pem: "KEY".into(),
                signer_chain_pem: "SIGNER".into(),
                signer_key_pem: "SIGNERKEY".into(),
                policy_toml: "# policy".into(),
                interface: "eth0".into(),
                addr: Ipv4Addr::new(10, 200, 0, 2),
                gateway: Ipv4Addr::new(10, 200, 0, 1),
                addr6: Ipv6Addr::LOCALHOST,
                gateway6: Ipv6Addr::LOCALHOST,
                bridge_gateway: Ipv4Addr::new(10, 201, 2, 1),
                parent_endpoint: "10.200.0.1:8443".into(),
                parent_id: "spiffe://aurae.test/auraed".into(),
                depth: 1,
                max_depth: 2,
                svid_ttl_s: 3600,
            },
            [0x52, 0x54, 0, 1, 2, 3],
            "ip=10.200.0.2::10.200.0.1:255.255.255.0::eth0:off aurae.hostname=i1".into(),
        )
        .unwrap()
    }

    #[test]
    fn a_handover_reads_back_and_zeros_are_no_handover() {
        let p = personal();
        let bytes = encode(&p).unwrap();
        assert_eq!(bytes.len(), DRIVE_BYTES);
        let back = decode(&bytes).unwrap().unwrap();
        assert_eq!(back.handover.key_pem, "KEY");
        assert_eq!(back.mac, p.mac);
        assert_eq!(back.seed, p.seed);
        assert_eq!(back.seed.len(), 64);
        assert!(decode(&vec![0u8; DRIVE_BYTES]).unwrap().is_none());
        // Two handovers never carry the same seed.
        assert_ne!(personal().seed, p.seed);
    }

    #[test]
    fn a_damaged_or_truncated_handover_is_refused() {
        let mut bytes = encode(&personal()).unwrap();
        bytes[40] ^= 1;
        assert!(decode(&bytes).unwrap_err().contains("checksum"));
        let mut short = encode(&personal()).unwrap();
        short[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&short).unwrap_err().contains("truncated"));
        assert!(decode(&MAGIC[..]).unwrap_err().contains("truncated"));
    }

    #[test]
    fn a_handover_too_large_for_the_drive_is_refused() {
        let mut p = personal();
        p.handover.policy_toml = "x".repeat(DRIVE_BYTES);
        assert!(encode(&p).unwrap_err().contains("does not fit"));
    }

    fn stored(t: &Templates, name: &str, state: &[u8], vcpus: u32) -> Label {
        let label = Label::parse("name", name).unwrap();
        let p = t.store().unwrap().begin(&label).unwrap();
        std::io::Write::write_all(&mut &p.state, state).unwrap();
        p.commit(&SnapshotInfo {
            name: name.into(),
            vm: name.into(),
            vcpus,
            memory_bytes: 512 << 20,
            drives: 1,
            interfaces: 1,
            state_bytes: state.len() as u64,
            took_ns: 1,
            created_unix_s: 1,
            cpu_template: "normalized".into(),
        })
        .unwrap();
        label
    }

    #[test]
    fn a_template_that_does_not_check_out_is_removed_and_a_half_written_one_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (t, removed) = Templates::open(dir.path().join("templates"));
        assert!(removed.is_empty());
        // Another format version, or a damaged file: refused on first use, removed.
        let bad = stored(
            &t,
            "t-1x512m-0000000000000000",
            b"AURAESNP\xff\xff\xff\xff",
            1,
        );
        let e = t.open_files(&bad).unwrap_err().to_string();
        assert!(e.contains("it was removed"), "{e}");
        assert!(t.store().unwrap().info(&bad).is_err());
        let e = t.remove(&bad).unwrap_err();
        assert!(matches!(e, WorkloadError::NotFound(_)), "{e:?}");
        // A build cut off by a crash: swept at the next start, and said.
        let p = t.store().unwrap().begin(&bad).unwrap();
        drop(p);
        let (again, removed) = Templates::open(dir.path().join("templates"));
        assert_eq!(removed, [".t-1x512m-0000000000000000.partial"]);
        assert!(again.list(|_| true).is_empty());
    }

    #[test]
    fn a_template_of_other_inputs_is_listed_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = Templates::open(dir.path().join("templates"));
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        let bin = std::fs::File::open(&kernel).unwrap();
        // Nothing is known stale before the inputs were hashed.
        stored(&t, "t-1x512m-0000000000000000", b"x", 1);
        assert!(t.list(|i| t.is_current(i))[0].current);
        let now = t.current_name(&kernel, None, &bin, 1, 512 << 20).unwrap();
        stored(&t, &now, b"x", 1);
        let listed = t.list(|i| t.is_current(i));
        let current: Vec<_> = listed
            .iter()
            .map(|l| (l.info.name.as_str(), l.current))
            .collect();
        assert!(current.contains(&(now.as_str(), true)), "{current:?}");
        assert!(
            current.contains(&("t-1x512m-0000000000000000", false)),
            "{current:?}"
        );
        // The kernel changes: the stored one is stale.
        std::fs::write(&kernel, b"kernel 2").unwrap();
        let next = t.current_name(&kernel, None, &bin, 1, 512 << 20).unwrap();
        assert_ne!(next, now);
        assert!(t.list(|i| t.is_current(i)).iter().all(|l| !l.current));
    }

    #[test]
    fn names_change_with_every_input_and_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        let modules = dir.path().join("modules");
        std::fs::create_dir(&modules).unwrap();
        std::fs::write(&kernel, b"kernel 1").unwrap();
        std::fs::write(modules.join("order"), "a\n").unwrap();
        std::fs::write(modules.join("a.ko"), b"module a").unwrap();
        let bin_path = dir.path().join("auraed");
        std::fs::write(&bin_path, b"auraed 1").unwrap();
        let digest = || {
            inputs_digest(
                &kernel,
                Some(&modules),
                &std::fs::File::open(&bin_path).unwrap(),
            )
            .unwrap()
        };
        let d1 = digest();
        let n1 = name(&d1, 1, 512 << 20);
        assert!(n1.starts_with("t-1x512m-"), "{n1}");
        assert!(crate::spec::Label::parse("name", &n1).is_ok(), "{n1}");
        assert_eq!(n1, name(&digest(), 1, 512 << 20), "stable");
        assert_ne!(n1, name(&d1, 2, 512 << 20));
        assert_ne!(n1, name(&d1, 1, 256 << 20));
        for (path, data) in [
            (&kernel, &b"kernel 2"[..]),
            (&modules.join("a.ko"), b"module b"),
            (&bin_path, b"auraed 2"),
        ] {
            let old = std::fs::read(path).unwrap();
            std::fs::write(path, data).unwrap();
            assert_ne!(digest(), d1, "{} changed", path.display());
            std::fs::write(path, old).unwrap();
        }
        assert_eq!(digest(), d1);
        std::fs::remove_file(modules.join("a.ko")).unwrap();
        assert!(
            inputs_digest(
                &kernel,
                Some(&modules),
                &std::fs::File::open(&bin_path).unwrap()
            )
            .is_err()
        );
    }
}
