//! Snapshots: a stopped VM's whole state in two files, and what [`crate::Vm::restore`]
//! needs to bring it back in a fresh process.
//!
//! **State file** (small, read whole): `AURAESNP`, the format version (u32), the payload's
//! length (u64), the payload, and the payload's SHA-256. The payload holds, in order: the
//! monitor's version, the CPU template's name and fingerprint (SHA-256 of the CPUID the
//! template gives on this host's KVM), vCPU count, memory size, the memory file's length
//! and SHA-256, when the snapshot was taken; the VM's state (PIC master and slave, IOAPIC,
//! PIT, kvmclock); each vCPU's (registers, special registers, XSAVE, XCRs, LAPIC, debug
//! registers, pending events, MP state, TSC frequency, CPUID, every MSR KVM could read);
//! the serial port's registers; each virtio-mmio transport's registers and queues. Every
//! KVM structure is stored as its bytes with its size, so a monitor built against another
//! layout refuses it instead of misreading it.
//!
//! **Memory file**: guest RAM, its regions one after another, sparse (pages of zeros are
//! holes). A restore maps it `MAP_PRIVATE`: restored VMs share its pages in the page cache
//! until they write them.
//!
//! A restore refuses, with a [`SnapshotError`] saying which: another format version or
//! monitor version, another CPU template or the same template giving other CPUID here (a
//! different CPU or KVM), a payload whose checksum does not match, a truncated or
//! misshapen payload, a memory file of another length. The memory file's SHA-256 is
//! recorded but not re-read on every restore (that would cost a pass over all of it):
//! [`verify_memory`] checks it, once, where a caller stores templates.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use sha2::{Digest, Sha256};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The first bytes of a state file.
pub const MAGIC: [u8; 8] = *b"AURAESNP";
/// The state file's format version; a restore refuses any other.
pub const FORMAT_VERSION: u32 = 1;
/// The monitor's version, recorded and compared.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Largest state file read (the state of 32 vCPUs is well under 1 MiB).
pub const MAX_STATE_BYTES: u64 = 16 << 20;
/// The unit of the memory file's holes.
const PAGE: usize = 4096;

/// Why a snapshot could not be taken, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a state file.
    #[error("not an aurae snapshot (bad magic)")]
    Magic,
    /// Another format version.
    #[error("snapshot format version {found}, this monitor reads version {FORMAT_VERSION}")]
    FormatVersion {
        /// The file's version.
        found: u32,
    },
    /// Another monitor version.
    #[error("snapshot taken by aurae-vmm {found}, this is {VMM_VERSION}")]
    VmmVersion {
        /// The version in the file.
        found: String,
    },
    /// The payload is not what its checksum says.
    #[error("snapshot state checksum mismatch: the file is corrupt")]
    Checksum,
    /// The payload ends early or has a field of the wrong size.
    #[error("snapshot state is malformed: {0}")]
    Malformed(String),
    /// Another CPU template, or the same template gives other CPUID on this host.
    #[error("snapshot CPU {what}: the snapshot has {found}, this host gives {here}")]
    Cpu {
        /// `template` or `fingerprint`.
        what: &'static str,
        /// The snapshot's.
        found: String,
        /// This host's.
        here: String,
    },
    /// The memory file is not the snapshot's.
    #[error("snapshot memory file: {0}")]
    Memory(String),
    /// A KVM ioctl failed while capturing or restoring.
    #[error("{what}: {source}")]
    Kvm {
        /// Which step.
        what: String,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A device's state does not fit the device rebuilt for it.
    #[error("device state: {0}")]
    Device(String),
}

impl SnapshotError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what, source }
    }

    pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        let what = what.into();
        move |source| Self::Kvm { what, source }
    }
}

/// The VM-wide KVM state.
#[derive(Clone)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// One vCPU's KVM state.
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// The guest's TSC frequency (0 if KVM could not say).
    pub tsc_khz: u32,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
}

/// One virtio-mmio transport's registers and queues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// The device type (2 = block, 1 = net): a restore checks the rebuilt device's.
    pub device_type: u32,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// The device status.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// Each queue.
    pub queues: Vec<QueueState>,
}

/// One virtqueue's state (`virtio_queue::QueueState`, fields in its order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// Next available-ring index to read.
    pub next_avail: u16,
    /// Next used-ring index to write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

/// The serial port's registers (`vm_superio::SerialState`, fields in its order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SerialRegs {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// What a snapshot is of: checked before anything else is restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The monitor's version.
    pub vmm_version: String,
    /// The CPU template's name.
    pub cpu_template: String,
    /// SHA-256 of the CPUID that template gives on the snapshotting host.
    pub cpu_fingerprint: [u8; 32],
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// The memory file's length.
    pub memory_len: u64,
    /// The memory file's SHA-256.
    pub memory_sha256: [u8; 32],
    /// When the snapshot was taken (ns since the Unix epoch).
    pub taken_unix_ns: u64,
}

/// A whole snapshot's state (the memory is in its own file).
#[derive(Clone)]
pub struct Snapshot {
    /// What it is of.
    pub header: Header,
    /// The VM's state.
    pub vm: VmState,
    /// Each vCPU's, by id.
    pub vcpus: Vec<VcpuState>,
    /// The serial port's.
    pub serial: SerialRegs,
    /// Each virtio-mmio transport's, by slot.
    pub transports: Vec<TransportState>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            ..*self
        }
    }
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("header", &self.header)
            .field("vcpus", &self.vcpus.len())
            .field("transports", &self.transports)
            .finish_non_exhaustive()
    }
}

/// Little-endian writer.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    /// A KVM structure: its size, then its bytes.
    fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

/// Little-endian reader over the payload.
struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(SnapshotError::Malformed(format!(
                "ends inside {} ({} bytes left, {n} needed)",
                self.what,
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn at(&mut self, what: &'static str) -> &mut Self {
        self.what = what;
        self
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, SnapshotError> {
        let what = self.what;
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| SnapshotError::Malformed(format!("{what} is not UTF-8")))
    }
    fn pod<T: FromBytes>(&mut self) -> Result<T, SnapshotError> {
        let what = self.what;
        let b = self.bytes()?;
        T::read_from_bytes(b).map_err(|_| {
            SnapshotError::Malformed(format!(
                "{what}: {} bytes, this monitor's structure has {}",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
    /// A count, bounded so a bad file cannot make us allocate much.
    fn count(&mut self, max: usize) -> Result<usize, SnapshotError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(SnapshotError::Malformed(format!(
                "{}: {n} entries, at most {max}",
                self.what
            )));
        }
        Ok(n)
    }
}

impl Snapshot {
    /// The state file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        let h = &self.header;
        e.bytes(h.vmm_version.as_bytes());
        e.bytes(h.cpu_template.as_bytes());
        e.0.extend_from_slice(&h.cpu_fingerprint);
        e.u8(h.vcpus);
        e.u64(h.mem_bytes);
        e.u64(h.memory_len);
        e.0.extend_from_slice(&h.memory_sha256);
        e.u64(h.taken_unix_ns);
        for c in &self.vm.irqchips {
            e.pod(c);
        }
        e.pod(&self.vm.pit);
        e.pod(&self.vm.clock);
        e.u32(self.vcpus.len() as u32);
        for v in &self.vcpus {
            e.pod(&v.regs);
            e.pod(&v.sregs);
            e.pod(&v.xsave);
            e.pod(&v.xcrs);
            e.pod(&v.lapic);
            e.pod(&v.debugregs);
            e.pod(&v.events);
            e.pod(&v.mp_state);
            e.u32(v.tsc_khz);
            e.u32(v.cpuid.len() as u32);
            for c in &v.cpuid {
                e.pod(c);
            }
            e.u32(v.msrs.len() as u32);
            for m in &v.msrs {
                e.pod(m);
            }
        }
        e.0.extend_from_slice(&self.serial.regs);
        e.bytes(&self.serial.in_buffer);
        e.u32(self.transports.len() as u32);
        for t in &self.transports {
            e.u32(t.device_type);
            e.u32(t.queue_select);
            e.u32(t.device_features_select);
            e.u32(t.driver_features_select);
            e.u64(t.driver_features);
            e.u32(t.status);
            e.u32(t.interrupt_status);
            e.u32(t.queues.len() as u32);
            for q in &t.queues {
                e.u16(q.max_size);
                e.u16(q.next_avail);
                e.u16(q.next_used);
                e.u8(u8::from(q.event_idx_enabled));
                e.u16(q.size);
                e.u8(u8::from(q.ready));
                e.u64(q.desc_table);
                e.u64(q.avail_ring);
                e.u64(q.used_ring);
            }
        }
        let payload = e.0;
        let mut out = Vec::with_capacity(payload.len() + 52);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&Sha256::digest(&payload));
        out
    }

    /// Reads a state file's bytes: magic, format version, checksum, then every field.
    /// The monitor version is compared too; the CPU is checked by the restore, which knows
    /// this host's.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut d = Dec {
            buf: bytes,
            what: "the header",
        };
        if d.take(8).map_err(|_| SnapshotError::Magic)? != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let version = d.u32()?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion { found: version });
        }
        let len = usize::try_from(d.u64()?)
            .map_err(|_| SnapshotError::Malformed("payload length".into()))?;
        let payload = d.at("the payload").take(len)?;
        let sum = d.at("the checksum").take(32)?;
        if !d.buf.is_empty() {
            return Err(SnapshotError::Malformed(format!(
                "{} bytes after the checksum",
                d.buf.len()
            )));
        }
        if Sha256::digest(payload).as_slice() != sum {
            return Err(SnapshotError::Checksum);
        }
        let mut d = Dec {
            buf: payload,
            what: "the monitor version",
        };
        let vmm_version = d.string()?;
        if vmm_version != VMM_VERSION {
            return Err(SnapshotError::VmmVersion { found: vmm_version });
        }
        let header = Header {
            vmm_version,
            cpu_template: d.at("the CPU template").string()?,
            cpu_fingerprint: d.at("the CPU fingerprint").arr()?,
            vcpus: d.at("the vCPU count").u8()?,
            mem_bytes: d.at("the memory size").u64()?,
            memory_len: d.at("the memory file length").u64()?,
            memory_sha256: d.at("the memory checksum").arr()?,
            taken_unix_ns: d.at("the time taken").u64()?,
        };
        let vm = VmState {
            irqchips: [
                d.at("the PIC master").pod()?,
                d.at("the PIC slave").pod()?,
                d.at("the IOAPIC").pod()?,
            ],
            pit: d.at("the PIT").pod()?,
            clock: d.at("the clock").pod()?,
        };
        let n = d
            .at("the vCPUs")
            .count(usize::from(crate::config::MAX_VCPUS))?;
        if n != usize::from(header.vcpus) {
            return Err(SnapshotError::Malformed(format!(
                "{n} vCPU states for {} vCPUs",
                header.vcpus
            )));
        }
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = VcpuState {
                regs: d.at("a vCPU's registers").pod()?,
                sregs: d.at("a vCPU's special registers").pod()?,
                xsave: d.at("a vCPU's XSAVE area").pod()?,
                xcrs: d.at("a vCPU's XCRs").pod()?,
                lapic: d.at("a vCPU's LAPIC").pod()?,
                debugregs: d.at("a vCPU's debug registers").pod()?,
                events: d.at("a vCPU's events").pod()?,
                mp_state: d.at("a vCPU's MP state").pod()?,
                tsc_khz: d.at("a vCPU's TSC frequency").u32()?,
                cpuid: Vec::new(),
                msrs: Vec::new(),
            };
            let c = d
                .at("a vCPU's CPUID")
                .count(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
            for _ in 0..c {
                v.cpuid.push(d.pod()?);
            }
            let m = d
                .at("a vCPU's MSRs")
                .count(kvm_bindings::KVM_MAX_MSR_ENTRIES)?;
            for _ in 0..m {
                v.msrs.push(d.pod()?);
            }
            vcpus.push(v);
        }
        let serial = SerialRegs {
            regs: d.at("the serial registers").arr()?,
            in_buffer: d.at("the serial input").bytes()?.to_vec(),
        };
        let n = d
            .at("the virtio transports")
            .count(crate::layout::MAX_MMIO_DEVICES)?;
        let mut transports = Vec::with_capacity(n);
        for _ in 0..n {
            let d = d.at("a virtio transport");
            let mut t = TransportState {
                device_type: d.u32()?,
                queue_select: d.u32()?,
                device_features_select: d.u32()?,
                driver_features_select: d.u32()?,
                driver_features: d.u64()?,
                status: d.u32()?,
                interrupt_status: d.u32()?,
                queues: Vec::new(),
            };
            let q = d.count(16)?;
            for _ in 0..q {
                t.queues.push(QueueState {
                    max_size: d.u16()?,
                    next_avail: d.u16()?,
                    next_used: d.u16()?,
                    event_idx_enabled: d.u8()? != 0,
                    size: d.u16()?,
                    ready: d.u8()? != 0,
                    desc_table: d.u64()?,
                    avail_ring: d.u64()?,
                    used_ring: d.u64()?,
                });
            }
            transports.push(t);
        }
        if !d.buf.is_empty() {
            return Err(SnapshotError::Malformed(format!(
                "{} bytes left after the last field",
                d.buf.len()
            )));
        }
        Ok(Self {
            header,
            vm,
            vcpus,
            serial,
            transports,
        })
    }

    /// Reads and decodes a state file (at most [`MAX_STATE_BYTES`]).
    pub fn read(file: &mut File) -> Result<Self, SnapshotError> {
        file.seek(SeekFrom::Start(0))
            .map_err(SnapshotError::io("reading the snapshot state"))?;
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(SnapshotError::io("reading the snapshot state"))?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::Malformed(format!(
                "state file over {MAX_STATE_BYTES} bytes"
            )));
        }
        Self::decode(&bytes)
    }
}

/// SHA-256 of CPUID entries as KVM gives them (the template's fingerprint), with the
/// fields that name the host CPU the call ran on (the initial and x2APIC ids) set as for
/// vCPU 0, so the same host gives the same fingerprint from any of its CPUs.
pub fn cpuid_fingerprint(entries: &[kvm_cpuid_entry2]) -> [u8; 32] {
    let mut entries = entries.to_vec();
    crate::cpu::patch_cpuid(&mut entries, 0, 1);
    let mut h = Sha256::new();
    for e in &entries {
        h.update(e.as_bytes());
    }
    h.finalize().into()
}

/// Captures the VM-wide state.
pub fn capture_vm(vm: &kvm_ioctls::VmFd) -> Result<VmState, SnapshotError> {
    let chip = |id| {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map(|()| c)
            .map_err(SnapshotError::kvm(format!("KVM_GET_IRQCHIP {id}")))
    };
    let mut clock = vm
        .get_clock()
        .map_err(SnapshotError::kvm("KVM_GET_CLOCK"))?;
    // Only KVM_CLOCK_REALTIME is meaningful on the way back in (it asks KVM to advance the
    // clock by the time since); TSC_STABLE and HOST_TSC are KVM's to say.
    clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
    Ok(VmState {
        irqchips: [
            chip(KVM_IRQCHIP_PIC_MASTER)?,
            chip(KVM_IRQCHIP_PIC_SLAVE)?,
            chip(KVM_IRQCHIP_IOAPIC)?,
        ],
        pit: vm.get_pit2().map_err(SnapshotError::kvm("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Restores the VM-wide state (the irqchip and PIT already created).
pub fn restore_vm(vm: &kvm_ioctls::VmFd, s: &VmState) -> Result<(), SnapshotError> {
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(SnapshotError::kvm(format!("KVM_SET_IRQCHIP {}", c.chip_id)))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(SnapshotError::kvm("KVM_SET_PIT2"))?;
    match vm.set_clock(&s.clock) {
        Ok(()) => Ok(()),
        // A kernel without KVM_CLOCK_REALTIME: the clock as it was.
        Err(_) if s.clock.flags != 0 => {
            let c = kvm_clock_data {
                flags: 0,
                ..s.clock
            };
            vm.set_clock(&c)
                .map_err(SnapshotError::kvm("KVM_SET_CLOCK"))
        }
        Err(e) => Err(SnapshotError::kvm("KVM_SET_CLOCK")(e)),
    }
}

/// Captures one vCPU (stopped, its pending I/O completed). `msr_indices` are the MSRs to
/// try; those KVM refuses to read are left out.
pub fn capture_vcpu(
    fd: &kvm_ioctls::VcpuFd,
    id: u8,
    msr_indices: &[u32],
) -> Result<VcpuState, SnapshotError> {
    let k = |what: &str| SnapshotError::kvm(format!("vCPU {id}: {what}"));
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(k("KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        regs: fd.get_regs().map_err(k("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
        lapic: fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
        debugregs: fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        events: fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
        tsc_khz: fd.get_tsc_khz().unwrap_or(0),
        cpuid: cpuid.as_slice().to_vec(),
        msrs: read_msrs(fd, msr_indices).map_err(k("KVM_GET_MSRS"))?,
    })
}

/// Reads every MSR of `indices` KVM will read: `KVM_GET_MSRS` stops at the first it
/// refuses, which is skipped, and the read goes on after it.
fn read_msrs(
    fd: &kvm_ioctls::VcpuFd,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut i = 0;
    while i < indices.len() {
        let chunk = &indices[i..indices.len().min(i + kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = fd.get_msrs(&mut msrs)?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        i += n;
        if n < chunk.len() {
            // KVM refused `indices[i]`: leave it out.
            i += 1;
        }
    }
    Ok(out)
}

/// Restores one vCPU, in the order KVM needs: CPUID first (it shapes what the rest may
/// hold), registers, FPU/XSAVE and XCRs, debug registers, LAPIC, MSRs, then pending events
/// and the MP state.
pub fn restore_vcpu(fd: &kvm_ioctls::VcpuFd, id: u8, s: &VcpuState) -> Result<(), SnapshotError> {
    let k = |what: &str| SnapshotError::kvm(format!("vCPU {id}: {what}"));
    let cpuid = kvm_bindings::CpuId::from_entries(&s.cpuid)
        .map_err(|_| SnapshotError::Malformed(format!("vCPU {id}: CPUID entries")))?;
    fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
    if s.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
        fd.set_tsc_khz(s.tsc_khz).map_err(k("KVM_SET_TSC_KHZ"))?;
    }
    fd.set_mp_state(s.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
    crate::sys::set_xsave(fd, &s.xsave).map_err(k("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(k("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(k("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
    let msrs = kvm_bindings::Msrs::from_entries(&s.msrs)
        .map_err(|_| SnapshotError::Malformed(format!("vCPU {id}: MSR entries")))?;
    let set = fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
    if set != s.msrs.len() {
        return Err(SnapshotError::Device(format!(
            "vCPU {id}: KVM refused MSR {:#x} ({set} of {} set)",
            s.msrs[set].index,
            s.msrs.len()
        )));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(k("KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(s.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// Writes guest memory to `out` (its regions one after another, pages of zeros left as
/// holes); returns the length and the SHA-256 of the whole (holes read as zeros).
pub fn write_memory(
    mem: &vm_memory::GuestMemoryMmap,
    out: &File,
) -> Result<(u64, [u8; 32]), SnapshotError> {
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(0)
        .map_err(SnapshotError::io("truncating the memory file"))?;
    out.set_len(total)
        .map_err(SnapshotError::io("sizing the memory file"))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut file_off = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = (region.len() - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, region.start_addr().unchecked_add(done))
                .map_err(|e| SnapshotError::Memory(format!("reading guest memory: {e}")))?;
            hash.update(&*chunk);
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                if !is_zero(page) {
                    out.write_all_at(page, file_off + done + (i * PAGE) as u64)
                        .map_err(SnapshotError::io("writing the memory file"))?;
                }
            }
            done += n as u64;
        }
        file_off += region.len();
    }
    Ok((total, hash.finalize().into()))
}

/// Whether a page is all zeros (eight bytes at a time).
fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.as_chunks::<8>();
    words.iter().all(|w| u64::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}

/// Checks a memory file against its snapshot: length and SHA-256 (one pass over it).
pub fn verify_memory(header: &Header, memory: &File) -> Result<(), SnapshotError> {
    let len = memory
        .metadata()
        .map_err(SnapshotError::io("reading the memory file"))?
        .len();
    if len != header.memory_len {
        return Err(SnapshotError::Memory(format!(
            "{len} bytes, the snapshot's has {}",
            header.memory_len
        )));
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = memory
            .read_at(&mut buf, off)
            .map_err(SnapshotError::io("reading the memory file"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        off += n as u64;
    }
    if <[u8; 32]>::from(hash.finalize()) != header.memory_sha256 {
        return Err(SnapshotError::Memory(
            "its SHA-256 is not the snapshot's: the file is corrupt or another".into(),
        ));
    }
    Ok(())
}

/// Guest memory mapped `MAP_PRIVATE | MAP_NORESERVE` from a snapshot's memory file, its
/// regions at their offsets in the file: pages come from the page cache on first touch
/// (shared by every VM restored from the file) and are copied on first write.
pub fn map_memory(
    memory: &File,
    ranges: &[(vm_memory::GuestAddress, usize)],
    expected_len: u64,
) -> Result<vm_memory::GuestMemoryMmap, SnapshotError> {
    use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion, mmap::MmapRegionBuilder};
    let len = memory
        .metadata()
        .map_err(SnapshotError::io("reading the memory file"))?
        .len();
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    if len != expected_len || len != total {
        return Err(SnapshotError::Memory(format!(
            "{len} bytes, the snapshot's has {expected_len} for {total} bytes of guest memory"
        )));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(addr, size) in ranges {
        let file = memory
            .try_clone()
            .map_err(SnapshotError::io("duplicating the memory file"))?;
        let region: MmapRegion = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Memory(format!("mapping it: {e}")))?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| SnapshotError::Memory("a region overflows".into()))?,
        );
        offset += size as u64;
    }
    vm_memory::GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Memory(format!("{e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> Snapshot {
        let regs = kvm_regs {
            rip: 0x20_0123,
            ..Default::default()
        };
        let vcpu = VcpuState {
            regs,
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::default(),
            debugregs: kvm_debugregs::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 3 },
            tsc_khz: 2_000_000,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0xa10f11,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 77,
                ..Default::default()
            }],
        };
        Snapshot {
            header: Header {
                vmm_version: VMM_VERSION.into(),
                cpu_template: "normalized".into(),
                cpu_fingerprint: [7; 32],
                vcpus: 2,
                mem_bytes: 64 << 20,
                memory_len: 64 << 20,
                memory_sha256: [9; 32],
                taken_unix_ns: 1,
            },
            vm: VmState {
                irqchips: [kvm_irqchip::default(); 3],
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 12345,
                    ..Default::default()
                },
            },
            vcpus: vec![vcpu.clone(), vcpu],
            serial: SerialRegs {
                regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                in_buffer: b"in".to_vec(),
            },
            transports: vec![TransportState {
                device_type: 2,
                status: 15,
                driver_features: 1 << 32,
                queues: vec![QueueState {
                    max_size: 256,
                    size: 128,
                    ready: true,
                    next_avail: 5,
                    next_used: 4,
                    desc_table: 0x1000,
                    avail_ring: 0x2000,
                    used_ring: 0x3000,
                    event_idx_enabled: false,
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_snapshot_round_trips_field_by_field() {
        let s = sample();
        let d = Snapshot::decode(&s.encode()).unwrap();
        assert_eq!(d.header, s.header);
        assert_eq!(d.serial, s.serial);
        assert_eq!(d.transports, s.transports);
        assert_eq!(d.vcpus.len(), 2);
        assert_eq!(d.vcpus[1].regs.rip, 0x20_0123);
        assert_eq!(d.vcpus[1].mp_state.mp_state, 3);
        assert_eq!(d.vcpus[1].tsc_khz, 2_000_000);
        assert_eq!(d.vcpus[1].msrs[0].data, 77);
        assert_eq!(d.vcpus[1].cpuid[0].eax, 0xa10f11);
        assert_eq!(d.vm.clock.clock, 12345);
        assert_eq!(d.encode(), s.encode());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Snapshot::decode(&bytes[..n]).is_err(), "{n} bytes");
        }
        // Every byte after the version: the checksum or the length catches it.
        for i in 12..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(Snapshot::decode(&b).is_err(), "byte {i}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Snapshot::decode(&long).is_err());
    }

    #[test]
    fn a_well_checksummed_but_misshapen_payload_is_refused() {
        // A vCPU count that disagrees with the header, re-checksummed.
        let mut s = sample();
        s.header.vcpus = 3;
        let e = Snapshot::decode(&s.encode()).unwrap_err();
        assert!(e.to_string().contains("2 vCPU states for 3 vCPUs"), "{e}");
        // A KVM structure of another size (another kvm-bindings layout).
        let mut bytes = sample().encode();
        let payload_len = bytes.len() - 20 - 32;
        let payload = &mut bytes[20..20 + payload_len];
        // The PIC master's size field follows the header fields.
        let at = 4 + VMM_VERSION.len() + 4 + "normalized".len() + 32 + 1 + 8 + 8 + 32 + 8;
        payload[at..at + 4].copy_from_slice(&519u32.to_le_bytes());
        let sum = Sha256::digest(&*payload);
        let n = bytes.len();
        bytes[n - 32..].copy_from_slice(&sum);
        let e = Snapshot::decode(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::Malformed(_)), "{e}");
    }

    #[test]
    fn zero_pages_are_found() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
        p[PAGE - 1] = 0;
        p[3] = 1;
        assert!(!is_zero(&p));
    }
}
