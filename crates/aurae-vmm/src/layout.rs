//! The guest physical memory map (x86_64) and the e820 table that describes it.
//!
//! ```text
//! 0x0000_0000 .. 0x0000_0500   real-mode IVT / BDA (RAM, unused by us)
//! 0x0000_0500                  GDT (4 entries)            BOOT_GDT_START
//! 0x0000_0520                  IDT (empty, limit 7)       BOOT_IDT_START
//! 0x0000_7000                  zero page (boot_params)    ZERO_PAGE_START
//! 0x0000_8ff0                  initial stack pointer      BOOT_STACK_POINTER
//! 0x0000_9000 .. 0x0000_f000   PML4, PDPT, 4 PDs (identity map of the first 4 GiB)
//! 0x0002_0000                  kernel command line        CMDLINE_START
//! 0x0009_fc00 .. 0x0010_0000   EBDA, VGA, ROM: reserved (no e820 RAM entry)
//! 0x000e_0000 .. 0x0010_0000   ACPI: RSDP at 0xe0000, then XSDT, FADT, MADT, DSDT
//! 0x0010_0000 ..               bzImage protected-mode code (vmlinux: its own p_paddr,
//!                              usually 16 MiB)
//! top of low RAM (≤ 3 GiB)     initramfs, page aligned, below initrd_addr_max
//! 0xc000_0000 .. 0x1_0000_0000 32-bit MMIO hole:
//!   0xd000_0000 + n * 0x1000     virtio-mmio device n (GSI 5 + n)
//!   0xfec0_0000                  IOAPIC
//!   0xfee0_0000                  local APICs
//!   0xfffb_d000                  KVM's TSS
//! 0x1_0000_0000 ..             RAM above 3 GiB is placed here
//! ```
//!
//! Memory sizes are `u64` throughout: no size wraps at 4 GiB.

use vm_memory::GuestAddress;

/// Where the GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is.
pub const BOOT_IDT_START: u64 = 0x520;
/// Where `boot_params` (the "zero page") is written; `rsi` points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The boot stack pointer (`rsp`, `rbp`) at entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The PML4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// The PDPT of the identity page tables.
pub const PDPTE_START: u64 = 0xa000;
/// The first of the page directories (512 × 2 MiB pages = 1 GiB each) of the identity
/// page tables; [`IDENTITY_MAP_GIB`] of them follow each other.
pub const PDE_START: u64 = 0xb000;
/// GiB identity-mapped at boot: all of the 32-bit space, MMIO hole included.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, terminating NUL included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: low RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory (1 MiB): kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB): RAM above the hole starts here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Start of the ACPI tables (the RSDP is the first; the BIOS area Linux scans for it is
/// 0xe0000..0x100000).
pub const ACPI_START: u64 = 0x000e_0000;
/// End of the ACPI area (one past the last byte).
pub const ACPI_END: u64 = HIMEM_START;
/// The first virtio-mmio device's registers; device `n` is at `+ n * MMIO_DEVICE_SIZE`.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Each virtio-mmio device's register window (4 KiB).
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices: GSIs 5..=23 of the IOAPIC's 24 pins.
pub const MAX_MMIO_DEVICES: usize = 19;
/// The GSI of virtio-mmio device 0; device `n` has `FIRST_DEVICE_GSI + n`.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// The IOAPIC's registers (KVM's in-kernel IOAPIC, 24 pins).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// The register window of virtio-mmio device `n`.
pub const fn mmio_device_addr(n: usize) -> u64 {
    MMIO_DEVICES_START + n as u64 * MMIO_DEVICE_SIZE
}

/// The GSI (IOAPIC pin) of virtio-mmio device `n`.
pub const fn mmio_device_gsi(n: usize) -> u32 {
    FIRST_DEVICE_GSI + n as u32
}

/// KVM's TSS (3 pages) for Intel real-mode emulation, inside the MMIO hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The guest page size.
pub const PAGE_SIZE: u64 = 0x1000;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One guest RAM region: guest physical start and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RamRegion {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One e820 entry as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest RAM layout for a given memory size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<RamRegion>,
}

impl MemoryLayout {
    /// Lays out `mem_bytes` of RAM: all of it below the MMIO hole when it fits (≤ 3 GiB),
    /// otherwise 3 GiB below the hole and the rest from 4 GiB up.
    pub fn new(mem_bytes: u64) -> Self {
        let regions = if mem_bytes <= MMIO_HOLE_START {
            vec![RamRegion {
                start: 0,
                len: mem_bytes,
            }]
        } else {
            vec![
                RamRegion {
                    start: 0,
                    len: MMIO_HOLE_START,
                },
                RamRegion {
                    start: MMIO_HOLE_END,
                    len: mem_bytes - MMIO_HOLE_START,
                },
            ]
        };
        Self { regions }
    }

    /// The RAM regions, in address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// One past the last byte of RAM below the MMIO hole.
    pub fn low_mem_end(&self) -> u64 {
        self.regions.first().map_or(0, RamRegion::end)
    }

    /// One past the last byte of guest RAM.
    pub fn mem_end(&self) -> u64 {
        self.regions.last().map_or(0, RamRegion::end)
    }

    /// `(start, len)` pairs in the form vm-memory's `from_ranges` takes; fails only where a
    /// region does not fit in the host's `usize`.
    pub fn ranges(&self) -> Option<Vec<(GuestAddress, usize)>> {
        self.regions
            .iter()
            .map(|r| {
                usize::try_from(r.len)
                    .ok()
                    .map(|l| (GuestAddress(r.start), l))
            })
            .collect()
    }

    /// The e820 map given to the kernel: RAM below the EBDA, then RAM from 1 MiB to the end
    /// of low memory, then RAM above 4 GiB if any. The EBDA/ROM area and the MMIO hole are
    /// left out (the kernel treats gaps as reserved).
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut out = vec![E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        }];
        let low_end = self.low_mem_end();
        if low_end > HIMEM_START {
            out.push(E820Entry {
                addr: HIMEM_START,
                size: low_end - HIMEM_START,
                kind: E820_RAM,
            });
        }
        for r in self.regions.iter().skip(1) {
            out.push(E820Entry {
                addr: r.start,
                size: r.len,
                kind: E820_RAM,
            });
        }
        out
    }
}

// The fixed boot addresses do not overlap (checked at compile time).
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
    assert!(ZERO_PAGE_START + PAGE_SIZE <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + IDENTITY_MAP_GIB * PAGE_SIZE <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START <= ACPI_START && ACPI_END <= HIMEM_START);
    assert!(mmio_device_addr(MAX_MMIO_DEVICES) <= IOAPIC_ADDR);
    assert!(mmio_device_gsi(MAX_MMIO_DEVICES - 1) == 23);
    assert!(KVM_TSS_ADDRESS >= MMIO_HOLE_START && KVM_TSS_ADDRESS + 3 * PAGE_SIZE <= MMIO_HOLE_END);
};

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_region() {
        let l = MemoryLayout::new(256 * MIB);
        assert_eq!(
            l.regions(),
            &[RamRegion {
                start: 0,
                len: 256 * MIB
            }]
        );
        assert_eq!(l.low_mem_end(), 256 * MIB);
        assert_eq!(l.total_bytes(), 256 * MIB);
        let e = l.e820();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(
            e[1],
            E820Entry {
                addr: HIMEM_START,
                size: 256 * MIB - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn exactly_three_gib_fits_below_the_hole() {
        let l = MemoryLayout::new(3 * GIB);
        assert_eq!(l.regions().len(), 1);
        assert_eq!(l.mem_end(), MMIO_HOLE_START);
    }

    #[test]
    fn more_than_three_gib_is_split_around_the_hole() {
        let l = MemoryLayout::new(5 * GIB);
        assert_eq!(
            l.regions(),
            &[
                RamRegion {
                    start: 0,
                    len: 3 * GIB
                },
                RamRegion {
                    start: 4 * GIB,
                    len: 2 * GIB
                },
            ]
        );
        assert_eq!(l.total_bytes(), 5 * GIB);
        assert_eq!(l.mem_end(), 6 * GIB);
        let e = l.e820();
        assert_eq!(e.len(), 3);
        assert_eq!(e[2].addr, 4 * GIB);
        assert_eq!(e[2].size, 2 * GIB);
        // No e820 RAM entry touches the hole.
        assert!(
            e.iter()
                .all(|x| x.addr + x.size <= MMIO_HOLE_START || x.addr >= MMIO_HOLE_END)
        );
        let ranges = l.ranges().unwrap();
        assert_eq!(ranges[1], (GuestAddress(4 * GIB), (2 * GIB) as usize));
    }
}
