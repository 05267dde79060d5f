//! CPU templates: what CPUID the guest sees.
//!
//! KVM offers the host's features that it can virtualise (`KVM_GET_SUPPORTED_CPUID`).
//! Passing that set through as it is ([`CpuTemplate::Host`]) makes the guest's kernel run
//! whatever the host's CPU model asks of it, including what a microVM has no use for and
//! what costs seconds under nested virtualisation: on the QEMU TCG machines of the guest
//! tier the host reports an AMD family 0Fh CPU, so Linux searches for an AGP/GART aperture
//! with ~65 000 PCI configuration reads (3.3 s of a 7 s boot, each read two port-I/O exits),
//! and leaf 0xD lists state components the kernel then finds inconsistent (it warns and
//! boots without XSAVE).
//!
//! [`CpuTemplate::Normalized`] (the default) is the set a microVM guest needs, the same on
//! every host of one vendor: no PMU, no nested virtualisation, no debug/trace/monitoring
//! features, no TSX, MPX, SGX, PKU, LA57 or AMX, power-management leaves reduced to the
//! always-running APIC timer, leaf 0xD rebuilt for exactly the state components left,
//! and on AMD a CPU family that has no GART (17h, Zen 2) where the host's has one. Features are only ever removed (or the
//! family changed): nothing KVM did not offer is added. Firecracker's CPU templates do the
//! same job with per-model bit lists; this one is one list for all models, chosen for
//! what the guest kernel does with each bit.

use kvm_bindings::kvm_cpuid_entry2;

/// Which CPUID a guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuTemplate {
    /// The normalised set (see the module documentation).
    #[default]
    Normalized,
    /// KVM's supported set as it is (only the topology is fitted to each vCPU).
    Host,
}

impl CpuTemplate {
    /// Every template, by name.
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Normalized, CpuTemplate::Host];

    /// The template's name (stable: snapshots and the API use it).
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Normalized => "normalized",
            CpuTemplate::Host => "host",
        }
    }

    /// The template named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Applies the template to KVM's supported CPUID (before each vCPU's topology is
    /// patched in).
    pub fn apply(self, entries: &mut [kvm_cpuid_entry2]) {
        if self == CpuTemplate::Host {
            return;
        }
        let amd = is_amd(entries);
        let mut xcr0 = XCR0_ALLOWED;
        for e in entries.iter() {
            if e.function == 0xd && e.index == 0 {
                xcr0 &= u64::from(e.eax) | (u64::from(e.edx) << 32);
            }
        }
        // The state components' sizes, for leaf 0xD's maximum size.
        let mut xsave_max = XSAVE_LEGACY_AND_HEADER;
        for e in entries.iter() {
            if e.function == 0xd && e.index >= 2 && e.index < 64 && xcr0 & (1 << e.index) != 0 {
                xsave_max = xsave_max.max(e.ebx.saturating_add(e.eax));
            }
        }
        for e in entries.iter_mut() {
            match (e.function, e.index) {
                (0x1, _) => {
                    if amd {
                        e.eax = normalize_amd_signature(e.eax);
                    }
                    e.ecx &= !LEAF1_ECX_REMOVED;
                    e.edx &= !LEAF1_EDX_REMOVED;
                }
                (0x6, _) => {
                    // Thermal and power management: only "the APIC timer always runs".
                    e.eax &= LEAF6_EAX_ARAT;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0x7, 0) => {
                    e.ebx &= !LEAF7_EBX_REMOVED;
                    e.ecx &= !LEAF7_ECX_REMOVED;
                    e.edx &= !LEAF7_EDX_REMOVED;
                }
                (0x7, _) => {
                    // Sub-leaf 1 and later: AVX-VNNI, AMX-FP16, LAM… none needed.
                    clear(e);
                }
                // Architectural PMU (Intel), RDT monitoring/allocation, SGX, processor
                // trace, AMX tiles: nothing.
                (0xa | 0xf | 0x10 | 0x12 | 0x14 | 0x1d | 0x1e, _) => clear(e),
                (0xd, 0) => {
                    e.eax = xcr0 as u32;
                    e.edx = (xcr0 >> 32) as u32;
                    // EBX (the size for the guest's current XCR0) is recomputed by KVM at
                    // run time; start it at the legacy area + header.
                    e.ebx = XSAVE_LEGACY_AND_HEADER;
                    e.ecx = xsave_max;
                }
                (0xd, 1) => {
                    // XSAVEOPT, XSAVEC, XGETBV1 stay; XSAVES (supervisor states) and XFD
                    // (AMX's first-use trap) go, and with them the supervisor state mask.
                    e.eax &= !LEAFD1_EAX_REMOVED;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0xd, i) if i >= 64 || xcr0 & (1 << i) == 0 => clear(e),
                (0x8000_0001, _) => {
                    if amd {
                        e.eax = normalize_amd_signature(e.eax);
                    }
                    e.ecx &= !EXT1_ECX_REMOVED;
                }
                (0x8000_0007, _) => {
                    // Advanced power management: only the invariant TSC.
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx &= EXT7_EDX_INVARIANT_TSC;
                }
                // SVM features, AMD's performance-monitoring and IBS leaves.
                (0x8000_000a | 0x8000_001b | 0x8000_0022, _) => clear(e),
                _ => {}
            }
        }
    }
}

impl std::fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn clear(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Leaf 0's vendor string is "AuthenticAMD" (or Hygon's AMD-derived "HygonGenuine").
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        e.function == 0
            && ((e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
                || (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975))
    })
}

/// The family in a leaf-1 style signature (base + extended family).
pub fn family(signature: u32) -> u32 {
    let base = (signature >> 8) & 0xf;
    if base == 0xf {
        base + ((signature >> 20) & 0xff)
    } else {
        base
    }
}

/// The model in a leaf-1 style signature (extended model for families 6 and 0Fh+).
pub fn model(signature: u32) -> u32 {
    let base = (signature >> 4) & 0xf;
    let base_family = (signature >> 8) & 0xf;
    if base_family == 0x6 || base_family == 0xf {
        base | (((signature >> 16) & 0xf) << 4)
    } else {
        base
    }
}

/// AMD families whose north bridge has a GART, as Linux decides it (`amd_gart_present`):
/// on these it probes PCI configuration space for an aperture at boot.
fn amd_gart_family(signature: u32) -> bool {
    matches!(family(signature), 0xf..=0x11)
        || (family(signature) == 0x15 && model(signature) < 0x10)
}

/// Family 17h (base 0Fh + extended 08h), model 31h, stepping 0: Zen 2, which has no GART,
/// whose firmware quirks Linux applies only on bare metal, and which lacks Zen 1's DIV0
/// erratum (whose workaround costs every return to user space).
const AMD_NORMALIZED_SIGNATURE: u32 = (0x8 << 20) | (0x3 << 16) | (0xf << 8) | (0x1 << 4);

fn normalize_amd_signature(eax: u32) -> u32 {
    if amd_gart_family(eax) {
        // Keep the processor-type (12–13) and reserved (14–15, 28–31) bits; replace
        // family, model and stepping.
        (eax & 0xf000_f000) | AMD_NORMALIZED_SIGNATURE
    } else {
        eax
    }
}

/// Leaf 1 ECX: DTES64 (2), MONITOR (3), DS-CPL (4), VMX (5), SMX (6), EST (7), TM2 (8),
/// SDBG (11), xTPR (14), PDCM (15).
const LEAF1_ECX_REMOVED: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 14)
    | (1 << 15);
/// Leaf 1 EDX: DS (21), ACPI thermal (22), TM (29), PBE (31).
const LEAF1_EDX_REMOVED: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 6 EAX bit 2: the APIC timer runs in every C-state.
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 7.0 EBX: SGX (2), HLE (4), RTM (11), RDT-M (12), MPX (14), RDT-A (15),
/// Intel PT (25).
const LEAF7_EBX_REMOVED: u32 =
    (1 << 2) | (1 << 4) | (1 << 11) | (1 << 12) | (1 << 14) | (1 << 15) | (1 << 25);
/// Leaf 7.0 ECX: PKU (3), OSPKE (4), WAITPKG (5), LA57 (16), SGX-LC (30).
const LEAF7_ECX_REMOVED: u32 = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 30);
/// Leaf 7.0 EDX: TSX force-abort (13), hybrid (15), TSXLDTRK (16), PCONFIG (18),
/// arch LBR (19), AMX-BF16 (22), AMX-TILE (24), AMX-INT8 (25).
const LEAF7_EDX_REMOVED: u32 =
    (1 << 13) | (1 << 15) | (1 << 16) | (1 << 18) | (1 << 19) | (1 << 22) | (1 << 24) | (1 << 25);
/// Leaf 0xD.1 EAX: XSAVES (3), XFD (4).
const LEAFD1_EAX_REMOVED: u32 = (1 << 3) | (1 << 4);
/// The state components a guest may enable: x87 (0), SSE (1), AVX (2), AVX-512's opmask,
/// ZMM_Hi256 and Hi16_ZMM (5–7). Not MPX (3, 4), PKRU (9) or AMX (17, 18).
const XCR0_ALLOWED: u64 = 0b1110_0111;
/// The legacy FXSAVE area (512 bytes) and the XSAVE header (64).
const XSAVE_LEGACY_AND_HEADER: u32 = 576;
/// 0x8000_0001 ECX: SVM (2), IBS (10), SKINIT (12), WDT (13), LWP (15), PerfCtrExtCore
/// (23), PerfCtrExtNB (24), PerfCtrExtLLC (28), MWAITX (29).
const EXT1_ECX_REMOVED: u32 = (1 << 2)
    | (1 << 10)
    | (1 << 12)
    | (1 << 13)
    | (1 << 15)
    | (1 << 23)
    | (1 << 24)
    | (1 << 28)
    | (1 << 29);
/// 0x8000_0007 EDX bit 8: the TSC runs at a constant rate.
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// What KVM offered on a guest-tier machine (QEMU TCG `-cpu max`): AMD family 0Fh
    /// model 6Bh, PKU, LA57, MPX and PKRU state, SVM, the K7 counters.
    fn tcg_max() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(
                1,
                0,
                0x0006_0fb1,
                0x0000_0800,
                0xfed8_3203 | (1 << 15),
                0x178b_fbff | (1 << 29),
            ),
            leaf(6, 0, 0x4 | 0x2, 0x1, 0x9, 0x1),
            leaf(
                7,
                0,
                0,
                0x009c_4fbb | (1 << 14),
                (1 << 3) | (1 << 4) | (1 << 16) | (1 << 9),
                0,
            ),
            leaf(7, 1, 0x10, 0, 0, 0),
            leaf(0xa, 0, 0x0704_1002, 0, 0, 0x603),
            leaf(0xd, 0, 0x21f, 2696, 2696, 0),
            leaf(0xd, 1, 0xf, 0, 0, 0),
            leaf(0xd, 2, 256, 576, 0, 0),
            leaf(0xd, 3, 64, 960, 0, 0),
            leaf(0xd, 4, 64, 1024, 0, 0),
            leaf(0xd, 9, 8, 2688, 0, 0),
            leaf(
                0x8000_0001,
                0,
                0x0006_0fb1,
                0,
                (1 << 2) | (1 << 23) | 1,
                0x2fd3_fbff,
            ),
            leaf(0x8000_0007, 0, 0, 0, 0, 0x100 | 0x7),
            leaf(0x8000_000a, 0, 1, 0x10, 0, 0x1ff),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn names_round_trip() {
        for t in CpuTemplate::ALL {
            assert_eq!(CpuTemplate::from_name(t.name()), Some(t));
        }
        assert_eq!(CpuTemplate::from_name("T2"), None);
        assert_eq!(CpuTemplate::default(), CpuTemplate::Normalized);
    }

    #[test]
    fn host_changes_nothing() {
        let mut e = tcg_max();
        CpuTemplate::Host.apply(&mut e);
        assert_eq!(e, tcg_max());
    }

    #[test]
    fn amd_gart_family_becomes_17h() {
        let mut e = tcg_max();
        assert!(amd_gart_family(find(&e, 1, 0).eax));
        CpuTemplate::Normalized.apply(&mut e);
        for f in [1, 0x8000_0001] {
            let sig = find(&e, f, 0).eax;
            assert_eq!((family(sig), model(sig)), (0x17, 0x31), "leaf {f:#x}");
            assert!(!amd_gart_family(sig));
        }
        // Family 19h (Zen 3) and an Intel host keep theirs.
        let zen3 = (0xa << 20) | (0xf << 8) | (0x1 << 16) | 0x10;
        assert_eq!(normalize_amd_signature(zen3), zen3);
        let mut intel = vec![
            leaf(0, 0, 0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x0006_0f10, 0, 0, 0),
        ];
        CpuTemplate::Normalized.apply(&mut intel);
        assert_eq!(find(&intel, 1, 0).eax, 0x0006_0f10);
        // Family 15h before model 10h has a GART; later models do not.
        assert!(amd_gart_family((0x6 << 20) | (0xf << 8) | 0x20));
        assert!(!amd_gart_family((0x6 << 20) | (0xf << 8) | (0x1 << 16)));
    }

    #[test]
    fn removed_features_are_gone_and_nothing_is_added() {
        let before = tcg_max();
        let mut e = before.clone();
        CpuTemplate::Normalized.apply(&mut e);
        // Only removed: every register is a subset of what KVM offered (the signatures
        // and leaf 0xD's sizes, rewritten, aside).
        for (a, b) in before.iter().zip(&e) {
            if matches!(a.function, 1 | 0x8000_0001 | 0xd) {
                continue;
            }
            for (x, y) in [
                (a.eax, b.eax),
                (a.ebx, b.ebx),
                (a.ecx, b.ecx),
                (a.edx, b.edx),
            ] {
                assert_eq!(y & !x, 0, "leaf {:#x}.{} gained bits", a.function, a.index);
            }
        }
        let l7 = find(&e, 7, 0);
        assert_eq!(
            l7.ecx & ((1 << 3) | (1 << 4) | (1 << 16)),
            0,
            "PKU, OSPKE, LA57"
        );
        assert_eq!(l7.ecx & (1 << 9), 1 << 9, "VAES stays");
        assert_eq!(l7.ebx & (1 << 14), 0, "MPX");
        assert_eq!(find(&e, 1, 0).ecx & (1 << 15), 0, "PDCM");
        assert_eq!(find(&e, 1, 0).edx & (1 << 29), 0, "TM");
        assert_eq!(find(&e, 0xa, 0), leaf(0xa, 0, 0, 0, 0, 0), "no PMU");
        assert_eq!(find(&e, 7, 1), leaf(7, 1, 0, 0, 0, 0));
        let ext1 = find(&e, 0x8000_0001, 0);
        assert_eq!(ext1.ecx, 1, "SVM and PerfCtrExtCore go, LAHF stays");
        assert_eq!(find(&e, 0x8000_000a, 0), leaf(0x8000_000a, 0, 0, 0, 0, 0));
        assert_eq!(find(&e, 0x8000_0007, 0).edx, 0x100, "invariant TSC only");
        assert_eq!(find(&e, 6, 0).eax, 0x4, "ARAT only");
    }

    #[test]
    fn xsave_leaf_lists_exactly_the_components_left() {
        let mut e = tcg_max();
        CpuTemplate::Normalized.apply(&mut e);
        let d0 = find(&e, 0xd, 0);
        assert_eq!((d0.eax, d0.edx), (0x7, 0), "x87, SSE, AVX: not MPX or PKRU");
        assert_eq!(
            d0.ecx,
            576 + 256,
            "the largest offset + size of what is left"
        );
        assert_eq!(d0.ebx, 576);
        assert_eq!(find(&e, 0xd, 1).eax, 0x7, "XSAVES and XFD go");
        assert_eq!(find(&e, 0xd, 2), leaf(0xd, 2, 256, 576, 0, 0));
        for i in [3, 4, 9] {
            assert_eq!(find(&e, 0xd, i), leaf(0xd, i, 0, 0, 0, 0), "component {i}");
        }
    }
}
