//! vCPU state for the 64-bit boot: CPUID (KVM's supported set, with each vCPU's APIC id),
//! boot MSRs, FPU and the local APIC's LINT0/LINT1 wiring.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot;

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what}: {source}")]
    Kvm {
        /// Which vCPU.
        vcpu: u8,
        /// Which step.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM set fewer MSRs than asked.
    #[error("vCPU {vcpu}: KVM accepted {set} of {asked} boot MSRs")]
    Msrs {
        /// Which vCPU.
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were asked.
        asked: usize,
    },
}

/// CPUID.1:ECX bit 31: running under a hypervisor.
const CPUID_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor.
const CPUID_HTT: u32 = 1 << 28;

/// Fits KVM's supported CPUID to one vCPU: its APIC id in leaf 1 (`EBX[31:24]`) and in the
/// x2APIC topology leaves 0xb and 0x1f (EDX), the logical processor count, and the
/// hypervisor bit.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], apic_id: u8, vcpus: u8) {
    for e in entries {
        match e.function {
            0x1 => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            0xb | 0x1f => e.edx = u32::from(apic_id),
            _ => {}
        }
    }
}

/// MSR indices set at boot.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6). Without it
/// all guest memory is uncacheable where KVM honours guest MTRRs, and the guest crawls.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// The boot MSRs: syscall/sysenter state cleared, TSC at 0, fast strings on, MTRRs on
/// with write-back as the default memory type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let m = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        m(MSR_IA32_SYSENTER_CS, 0),
        m(MSR_IA32_SYSENTER_ESP, 0),
        m(MSR_IA32_SYSENTER_EIP, 0),
        m(MSR_STAR, 0),
        m(MSR_CSTAR, 0),
        m(MSR_KERNEL_GS_BASE, 0),
        m(MSR_SYSCALL_MASK, 0),
        m(MSR_LSTAR, 0),
        m(MSR_IA32_TSC, 0),
        m(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        m(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// The FPU at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// LAPIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A 32-bit LAPIC register.
pub fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

/// Sets the delivery mode (bits 8..11) of an LVT entry.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the 8259 PIC's output) and LINT1 to NMI, as a PC's BIOS does.
pub fn configure_lint(l: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// KVM's supported CPUID, read once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| CpuError::Kvm {
            vcpu: 0,
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })
}

/// Configures vCPU `id` of `vcpus`: CPUID, MSRs, FPU, LAPIC; the boot vCPU (0) also gets
/// the long-mode segment state and the entry registers. Application processors wait for
/// INIT/SIPI from the guest, which resets their registers anyway.
pub fn configure_vcpu(
    fd: &VcpuFd,
    id: u8,
    vcpus: u8,
    supported: &CpuId,
    entry: u64,
) -> Result<(), CpuError> {
    let err = |what| {
        move |source| CpuError::Kvm {
            vcpu: id,
            what,
            source,
        }
    };
    let mut cpuid = supported.clone();
    patch_cpuid(cpuid.as_mut_slice(), id, vcpus);
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        vcpu: id,
        set: 0,
        asked: entries.len(),
    })?;
    let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            vcpu: id,
            set,
            asked: entries.len(),
        });
    }
    fd.set_fpu(&boot_fpu()).map_err(err("KVM_SET_FPU"))?;

    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    configure_lint(&mut lapic);
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    if id == 0 {
        let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        boot::configure_long_mode(&mut sregs);
        fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        fd.set_regs(&boot::boot_regs(entry))
            .map_err(err("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_gets_the_apic_id() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xaabb_0800,
                edx: CPUID_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 0x1234,
                ..Default::default()
            },
        ];
        patch_cpuid(&mut e, 3, 4);
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_ne!(e[0].ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!((e[1].edx, e[2].edx), (3, 3));
        assert_eq!(e[3].ebx, 0x1234);
        patch_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].ebx, 0x0001_0800);
        assert_eq!(e[0].edx & CPUID_HTT, 0);
    }

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi() {
        let mut l = kvm_lapic_state::default();
        // Masked, with some vector bits, as after reset.
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_lapic_reg(&mut l, APIC_LVT1, 0x0001_0000);
        configure_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x0001_0400);
        set_lapic_reg(&mut l, APIC_LVT0, 0);
        configure_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x700);
    }

    #[test]
    fn boot_msrs_and_fpu() {
        let m = boot_msrs();
        assert!(Msrs::from_entries(&m).is_ok());
        let misc = m.iter().find(|e| e.index == MSR_IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.data, 1);
        let mtrr = m.iter().find(|e| e.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
