//! An embedded x86_64 microVM monitor on the rust-vmm crates (KVM).
//!
//! One [`Vm`] is one guest: [`VmConfig`] → [`Vm::new`] (allocates memory, loads the kernel,
//! configures vCPUs) → [`Vm::run`] (blocks until the guest ends or [`VmHandle::stop`]) →
//! [`VmExit`]. The daemon is expected to run each VM in a process of its own (jailed, one
//! per VM), so process-wide state here is limited to the vCPU kick signal's handler
//! ([`vm::vcpu_kick_signal`]).
//!
//! Modules: [`layout`] (guest memory map and e820), [`boot`] (64-bit Linux boot protocol),
//! [`acpi`] (RSDP, XSDT, FADT, MADT, DSDT), [`cpu`] (CPUID, MSRs, LAPIC), [`template`] (what CPUID the guest sees), [`devices`]
//! (serial, i8042, boot timer, ACPI power management), [`virtio`] (virtio-mmio transport,
//! block, net on TAP), [`seccomp`] (per-thread filters), [`snapshot`] (a stopped VM's state
//! and memory in two files, and their restore), [`vm`] (threads, exits), [`sys`]
//! (the only unsafe code: guest memory handed to KVM, TAP setup). See the crate's
//! README.md for the memory map, the ports and what is not built yet.
//!
//! Unsafe code is denied everywhere except [`sys`].

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod template;
pub mod virtio;
pub mod vm;

pub use boot::BootError;
pub use config::{ConfigError, DriveConfig, NetConfig, OpenedFile, SerialSink, VmConfig};
pub use snapshot::{Snapshot, SnapshotError};
pub use template::CpuTemplate;
pub use vm::{
    ExitError, Laps, RestoreConfig, RestoreInfo, SnapshotInfo, SnapshotTarget, Vm, VmExit,
    VmHandle, VmShell, VmmError,
};
