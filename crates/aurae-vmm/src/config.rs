//! What a VM is made of, and the range checks applied before anything is allocated.

use std::{fmt, io::Write, path::PathBuf};

/// Fewest vCPUs.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs (the e820/MP limits of this phase; the APIC ids fit in 8 bits).
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory: 16 MiB.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
/// Most guest memory, whatever the host has: 256 GiB. [`crate::Vm::new`] also refuses more
/// than the host's physical memory.
pub const MAX_MEM_BYTES: u64 = 256 << 30;

/// Where the guest's serial console output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// A virtio-blk drive backed by a host file (a raw image).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveConfig {
    /// The image file; its length, rounded down to 512-byte sectors, is the disk size.
    /// Opened by this path unless `opened` is given (then it only names the drive in
    /// errors).
    pub path: PathBuf,
    /// Refuse guest writes (`VIRTIO_BLK_F_RO`; the file is opened read-only).
    pub read_only: bool,
    /// The image, opened beforehand (read-write only if the drive is writable): what an
    /// embedder that jails the VMM hands over, so that the jail need not hold the file.
    pub opened: Option<OpenedFile>,
}

/// A file opened beforehand, shared by the configurations cloned from one (two are equal
/// when they are the same open file).
#[derive(Clone, Debug)]
pub struct OpenedFile(pub std::sync::Arc<std::fs::File>);

impl PartialEq for OpenedFile {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OpenedFile {}

/// A virtio-net device on a host TAP interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface's name (at most 15 bytes). It is opened with `TUNSETIFF`, which
    /// creates it if it does not exist (that needs CAP_NET_ADMIN); a persistent TAP made
    /// beforehand (`ip tuntap add NAME mode tap user UID`) needs nothing.
    pub tap: String,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
}

/// A VM's configuration. Build it with struct-update syntax over [`Default`]:
/// `VmConfig { kernel, cmdline, ..Default::default() }` (1 vCPU, 128 MiB, no devices,
/// serial output discarded, no seccomp).
pub struct VmConfig {
    /// The guest kernel: a bzImage or an uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// An optional initramfs (cpio, possibly compressed), loaded at the top of low memory.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line (at most [`crate::layout::CMDLINE_MAX_SIZE`] − 1 bytes).
    /// Typical: `console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux
    /// i8042.nopnp i8042.dumbkbd`.
    pub cmdline: String,
    /// Number of vCPUs, [`MIN_VCPUS`]..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest RAM in bytes, [`MIN_MEM_BYTES`]..=[`MAX_MEM_BYTES`], a multiple of 4 KiB.
    pub mem_bytes: u64,
    /// Where the serial console (COM1, port 0x3f8) output is written.
    pub serial_out: SerialSink,
    /// virtio-blk drives, in order: the first is `/dev/vda` in a Linux guest. They get
    /// virtio-mmio slots 0.. (see [`crate::layout::mmio_device_addr`]).
    pub drives: Vec<DriveConfig>,
    /// An optional virtio-net device (the virtio-mmio slot after the drives).
    pub net: Option<NetConfig>,
    /// An optional virtio console (the slot after the network device; `hvc0` in a Linux
    /// guest that loads `virtio_console`), its output written here: a whole buffer per
    /// exit where the UART takes an exit per byte.
    pub console_out: Option<SerialSink>,
    /// Install per-thread seccomp filters ([`crate::seccomp`]) on the VMM's threads.
    pub seccomp: bool,
    /// What CPUID the guest sees ([`crate::template`]).
    pub cpu_template: crate::CpuTemplate,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_bytes: 128 << 20,
            serial_out: Box::new(std::io::sink()),
            drives: Vec::new(),
            net: None,
            console_out: None,
            seccomp: false,
            cpu_template: crate::CpuTemplate::default(),
        }
    }
}

impl fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmConfig")
            .field("kernel", &self.kernel)
            .field("initramfs", &self.initramfs)
            .field("cmdline", &self.cmdline)
            .field("vcpus", &self.vcpus)
            .field("mem_bytes", &self.mem_bytes)
            .field("drives", &self.drives)
            .field("net", &self.net)
            .field("console", &self.console_out.is_some())
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// A configuration value out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `vcpus` outside 1..=32.
    #[error("vcpus must be {MIN_VCPUS}..={MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    /// `mem_bytes` outside the allowed range.
    #[error("mem_bytes must be {min}..={max}, got {got}")]
    Memory {
        /// What was asked.
        got: u64,
        /// The least allowed.
        min: u64,
        /// The most allowed (the fixed cap, or the host's memory if less).
        max: u64,
    },
    /// `mem_bytes` not a multiple of the page size.
    #[error("mem_bytes must be a multiple of 4096, got {0}")]
    MemoryAlignment(u64),
    /// The command line does not fit (with its NUL) in the space the boot protocol allows.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most bytes allowed (NUL excluded).
        max: usize,
    },
    /// The command line holds a NUL byte or a non-printable character.
    #[error("kernel command line holds a NUL or control character")]
    CmdlineInvalid,
    /// More virtio devices than GSIs for them.
    #[error("{0} virtio devices asked; at most {max} fit", max = crate::layout::MAX_MMIO_DEVICES)]
    TooManyDevices(usize),
    /// The TAP name is empty, too long or holds a NUL or `/`.
    #[error("invalid TAP interface name {0:?}")]
    TapName(String),
    /// The MAC address is a multicast (or broadcast) address.
    #[error("MAC address {0:02x?} is not unicast")]
    Mac([u8; 6]),
}

impl VmConfig {
    /// Checks every range that does not depend on the host; `max_mem` is the memory cap
    /// in force ([`MAX_MEM_BYTES`], or less where the host has less).
    pub fn validate_with_cap(&self, max_mem: u64) -> Result<(), ConfigError> {
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let max = max_mem.min(MAX_MEM_BYTES);
        if !(MIN_MEM_BYTES..=max).contains(&self.mem_bytes) {
            return Err(ConfigError::Memory {
                got: self.mem_bytes,
                min: MIN_MEM_BYTES,
                max,
            });
        }
        if !self.mem_bytes.is_multiple_of(crate::layout::PAGE_SIZE) {
            return Err(ConfigError::MemoryAlignment(self.mem_bytes));
        }
        let devices = self.drives.len()
            + usize::from(self.net.is_some())
            + usize::from(self.console_out.is_some());
        if devices > crate::layout::MAX_MMIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(net) = &self.net {
            let t = &net.tap;
            if t.is_empty()
                || t.len() >= crate::sys::IFNAMSIZ
                || t.bytes()
                    .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
            {
                return Err(ConfigError::TapName(t.clone()));
            }
            if net.mac[0] & 1 != 0 {
                return Err(ConfigError::Mac(net.mac));
            }
        }
        check_cmdline(&self.cmdline)
    }

    /// [`Self::validate_with_cap`] with the fixed cap only.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with_cap(MAX_MEM_BYTES)
    }
}

/// Checks a kernel command line's length and characters.
pub fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    let max = crate::layout::CMDLINE_MAX_SIZE - 1;
    if cmdline.len() > max {
        return Err(ConfigError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.bytes().any(|b| b.is_ascii_control()) {
        return Err(ConfigError::CmdlineInvalid);
    }
    Ok(())
}

/// The host's physical memory in bytes (`/proc/meminfo`'s `MemTotal`, read through
/// `sysinfo(2)`: one syscall, no `/proc` needed in a jail); `None` if it fails.
pub fn host_mem_bytes() -> Option<u64> {
    crate::sys::total_ram()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpus: u8, mem_bytes: u64, cmdline: &str) -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent"),
            initramfs: None,
            cmdline: cmdline.into(),
            vcpus,
            mem_bytes,
            ..Default::default()
        }
    }

    #[test]
    fn devices_are_checked() {
        let mut c = cfg(1, 128 << 20, "");
        c.drives = vec![DriveConfig::default(); 19];
        assert_eq!(c.validate(), Ok(()));
        c.net = Some(NetConfig {
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 0, 1],
        });
        assert_eq!(c.validate(), Err(ConfigError::TooManyDevices(20)));
        c.drives.clear();
        assert_eq!(c.validate(), Ok(()));
        for bad in ["", "a-name-of-16-chr", "a/b", "a b"] {
            c.net = Some(NetConfig {
                tap: bad.into(),
                mac: [2, 0, 0, 0, 0, 1],
            });
            assert_eq!(c.validate(), Err(ConfigError::TapName(bad.into())));
        }
        c.net = Some(NetConfig {
            tap: "tap0".into(),
            mac: [1, 0, 0, 0, 0, 1],
        });
        assert!(matches!(c.validate(), Err(ConfigError::Mac(_))));
    }

    #[test]
    fn default_is_a_valid_shape() {
        let c = VmConfig::default();
        assert_eq!((c.vcpus, c.mem_bytes, c.seccomp), (1, 128 << 20, false));
        assert!(c.drives.is_empty() && c.net.is_none());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(cfg(1, 128 << 20, "").validate(), Ok(()));
        assert_eq!(cfg(32, 5 << 30, "").validate(), Ok(()));
        assert_eq!(cfg(0, 128 << 20, "").validate(), Err(ConfigError::Vcpus(0)));
        assert_eq!(
            cfg(33, 128 << 20, "").validate(),
            Err(ConfigError::Vcpus(33))
        );
        assert!(matches!(
            cfg(1, (16 << 20) - 4096, "").validate(),
            Err(ConfigError::Memory { .. })
        ));
        assert!(matches!(
            cfg(1, MAX_MEM_BYTES + 4096, "").validate(),
            Err(ConfigError::Memory { .. })
        ));
        assert_eq!(
            cfg(1, (128 << 20) + 1, "").validate(),
            Err(ConfigError::MemoryAlignment((128 << 20) + 1))
        );
        // A host cap below the fixed cap wins.
        assert_eq!(
            cfg(1, 2 << 30, "").validate_with_cap(1 << 30),
            Err(ConfigError::Memory {
                got: 2 << 30,
                min: MIN_MEM_BYTES,
                max: 1 << 30
            })
        );
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let long = "a".repeat(crate::layout::CMDLINE_MAX_SIZE);
        assert_eq!(
            cfg(1, 128 << 20, &long).validate(),
            Err(ConfigError::CmdlineTooLong {
                len: crate::layout::CMDLINE_MAX_SIZE,
                max: crate::layout::CMDLINE_MAX_SIZE - 1
            })
        );
        let fits = "a".repeat(crate::layout::CMDLINE_MAX_SIZE - 1);
        assert_eq!(check_cmdline(&fits), Ok(()));
        assert_eq!(check_cmdline("a\nb"), Err(ConfigError::CmdlineInvalid));
    }

    #[test]
    fn host_memory_is_read_and_is_meminfos_total() {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(host_mem_bytes(), Some(kib * 1024));
    }

    #[test]
    fn debug_does_not_need_the_sink() {
        let s = format!("{:?}", cfg(2, 64 << 20, "console=ttyS0"));
        assert!(s.contains("console=ttyS0") && s.contains("vcpus: 2"));
    }
}
