//! The crate's only unsafe code: handing guest memory to KVM, reading KVM's internal-error
//! data, and opening a TAP device (`TUNSETIFF`).
//!
//! `KVM_SET_USER_MEMORY_REGION` tells the kernel to let the guest read and write a range of
//! our address space. That is sound only while the range stays mapped for as long as any
//! fd of that VM (the VM fd and every vCPU fd, which keep the kernel's VM alive) exists.
//! [`GuestVm`] and [`Vcpu`] enforce it by ownership: both hold an `Arc` of the guest
//! memory, and neither hands out its KVM fd by value or by `&mut` (so no fd can be moved
//! out and outlive the mapping).
#![allow(unsafe_code)]

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    sync::Arc,
};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A KVM VM with its guest memory registered.
#[derive(Debug)]
pub struct GuestVm {
    // Field order is drop order: the VM fd is closed before the memory is unmapped.
    vm: VmFd,
    mem: Arc<GuestMemoryMmap>,
}

impl GuestVm {
    /// Creates a VM and registers every region of `mem` as a KVM memory slot (slot `i` for
    /// the `i`th region).
    pub fn new(kvm: &Kvm, mem: Arc<GuestMemoryMmap>) -> Result<Self, kvm_ioctls::Error> {
        Self::with_vm(kvm.create_vm()?, mem)
    }

    /// Registers every region of `mem` in `vm`, a VM just created (`KVM_CREATE_VM`) with
    /// no memory yet.
    pub fn with_vm(vm: VmFd, mem: Arc<GuestMemoryMmap>) -> Result<Self, kvm_ioctls::Error> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: `region` is a live anonymous mapping of `region.len()` bytes owned by
            // `mem`. `mem` is an `Arc` held by this `GuestVm` and by every `Vcpu` it
            // creates, and the VM fd is dropped before `mem` (field order), so the mapping
            // outlives every fd through which the guest can reach it.
            unsafe { vm.set_user_memory_region(r)? };
        }
        Ok(Self { vm, mem })
    }

    /// The VM fd, for the ioctls that do not change memory (irqchip, PIT, irqfd).
    pub(crate) fn fd(&self) -> &VmFd {
        &self.vm
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// A shared handle on the guest memory, for devices (holding it only keeps the
    /// mapping alive longer).
    pub fn memory_arc(&self) -> Arc<GuestMemoryMmap> {
        Arc::clone(&self.mem)
    }

    /// Takes in a vCPU of this VM created before its memory was registered
    /// ([`crate::vm::VmShell`]).
    pub(crate) fn adopt_vcpu(&self, fd: VcpuFd) -> Vcpu {
        Vcpu {
            fd,
            _mem: Arc::clone(&self.mem),
        }
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, kvm_ioctls::Error> {
        Ok(Vcpu {
            fd: self.vm.create_vcpu(u64::from(id))?,
            _mem: Arc::clone(&self.mem),
        })
    }
}

/// A vCPU that keeps its VM's guest memory mapped while it exists.
#[derive(Debug)]
pub struct Vcpu {
    // Field order is drop order: the vCPU fd is closed before the memory is released.
    fd: VcpuFd,
    _mem: Arc<GuestMemoryMmap>,
}

impl Vcpu {
    /// The vCPU fd, for register and state ioctls.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the vCPU until its next exit to user space (`KVM_RUN`).
    pub fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.fd.run()
    }

    /// After a `KVM_EXIT_INTERNAL_ERROR`: the sub-error (1 = emulation failure) and its
    /// data words (for an emulation failure, the instruction bytes among them).
    pub fn internal_error(&mut self) -> (u32, Vec<u64>) {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            return (0, Vec::new());
        }
        // SAFETY: `exit_reason` says the kernel filled the `internal` member of the union;
        // every bit pattern is valid for its plain integer fields.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }

    /// Sets `kvm_run.immediate_exit`: while set, `KVM_RUN` returns `EINTR` at once.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// A TAP (Ethernet) device.
const IFF_TAP: libc::c_short = 0x0002;
/// No packet-information prefix on frames.
const IFF_NO_PI: libc::c_short = 0x1000;
/// `IFNAMSIZ`, the terminating NUL included.
pub const IFNAMSIZ: usize = 16;

/// Opens (creating it if it does not exist, which needs CAP_NET_ADMIN) the TAP device
/// `name` as `IFF_TAP | IFF_NO_PI` (no `IFF_VNET_HDR`), non-blocking and close-on-exec:
/// each `read` returns one Ethernet frame, each `write` sends one.
pub fn open_tap(name: &str) -> io::Result<File> {
    attach_tap(open_tun()?, name)
}

/// `/dev/net/tun` opened, not yet attached to a device (for [`attach_tap`]), non-blocking
/// and close-on-exec: a caller whose root is about to change opens it first.
pub fn open_tun() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
}

/// [`open_tap`] on a `/dev/net/tun` opened before ([`open_tun`]): the device `name` is
/// attached (or created) with the caller's rights at this call.
pub fn attach_tap(tun: File, name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    // struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member used here
    // is `short ifr_flags`; 40 bytes in all on x86_64.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: `tun` is an open fd of /dev/net/tun; TUNSETIFF reads and writes a
    // `struct ifreq`, and `ifr` is a live, writable buffer of its full size (40 bytes on
    // x86_64) for the duration of the call; no pointer is kept by the kernel.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB area, as [`kvm_ioctls::VcpuFd::get_xsave`] read
/// it.
pub fn set_xsave(fd: &VcpuFd, xsave: &kvm_bindings::kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: KVM_SET_XSAVE copies the vCPU's uabi XSAVE size from the pointer. The legacy
    // KVM_GET_XSAVE that produced a snapshot's area fails when that size exceeds
    // `sizeof(struct kvm_xsave)` (4 KiB, dynamically enabled features such as AMX), and
    // this monitor enables none, so the kernel reads at most the 4 KiB `xsave` holds.
    unsafe { fd.set_xsave(xsave) }
}

/// `sysinfo(2)`'s total usable RAM in bytes (what `/proc/meminfo` shows as `MemTotal`).
pub fn total_ram() -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: `sysinfo` writes one `struct sysinfo` into the buffer, which we own and
    // which has that type's size and alignment; it keeps no pointer to it.
    if unsafe { libc::sysinfo(info.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: zero is a valid value of every field, and the kernel filled it on success.
    let info = unsafe { info.assume_init() };
    info.totalram.checked_mul(u64::from(info.mem_unit))
}
