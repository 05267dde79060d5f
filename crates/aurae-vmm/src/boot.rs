//! x86_64 direct 64-bit Linux boot: the kernel (bzImage or ELF `vmlinux`) and initramfs
//! in guest memory, the command line, the zero page (`boot_params` with the e820 map), the
//! GDT and identity page tables, and the long-mode register state the kernel expects at its
//! 64-bit entry point (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
//!
//! Everything here is plain data written into guest memory or returned as KVM structs, so
//! it is tested without `/dev/kvm`.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::{
    configurator::{BootConfigurator, BootParams, linux::LinuxBootConfigurator},
    loader::{
        KernelLoader,
        bootparam::{XLF_KERNEL_64, boot_params, setup_header},
        bzimage::BzImage,
        elf::Elf,
    },
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    self, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, CMDLINE_START, HIMEM_START,
    MemoryLayout, PAGE_SIZE, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

/// The boot sector signature in `setup_header.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `HdrS` in `setup_header.header`.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The bzImage 64-bit entry point is 0x200 past the protected-mode code's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Oldest boot protocol with `xloadflags` (2.12).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Default alignment of a relocatable kernel (16 MiB).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why a guest could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file could not be opened or read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is neither an ELF image nor a bzImage.
    #[error("{path} is not a Linux kernel: no ELF magic and no bzImage `HdrS` header")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// A bzImage too old for the 64-bit boot protocol, or built without a 64-bit entry.
    #[error("{path}: bzImage boot protocol {version:#06x} without a 64-bit entry point")]
    No64BitEntry {
        /// The file.
        path: PathBuf,
        /// Its boot protocol version.
        version: u16,
    },
    /// linux-loader refused the image (bad headers, or it does not fit in guest memory).
    #[error("loading kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error(
        "initramfs of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel (with its decompression space) ends.
        kernel_end: u64,
        /// The highest address allowed.
        limit: u64,
    },
    /// A write to guest memory failed (an address outside RAM).
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// The cause.
        source: vm_memory::GuestMemoryError,
    },
    /// The ACPI tables do not fit in the BIOS area.
    #[error("ACPI tables would end at {end:#x}, past the BIOS area")]
    AcpiTooLarge {
        /// Where they would end.
        end: u64,
    },
    /// The zero page could not be written.
    #[error("writing boot_params: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// What kind of kernel image a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A bzImage (as in `/boot/vmlinuz-*`).
    BzImage,
}

/// Tells an ELF image from a bzImage by their magic numbers (`\x7fELF` at 0, `HdrS` at
/// 0x202); `None` for anything else.
pub fn detect_kernel<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelKind>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if read_full(image, &mut magic)? && magic == *b"\x7fELF" {
        return Ok(Some(KernelKind::Elf));
    }
    image.seek(SeekFrom::Start(0x202))?;
    if read_full(image, &mut magic)? && u32::from_le_bytes(magic) == HDRS_MAGIC {
        return Ok(Some(KernelKind::BzImage));
    }
    Ok(None)
}

/// Reads exactly `buf.len()` bytes; `false` at a short file.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Its format.
    pub kind: KernelKind,
    /// The 64-bit entry point (`rip`).
    pub entry: u64,
    /// The end of the memory the kernel needs (for a bzImage, its decompression space).
    pub end: u64,
    /// The bzImage setup header, to be completed into the zero page.
    pub header: Option<setup_header>,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let kind =
        detect_kernel(&mut file)
            .map_err(read_err)?
            .ok_or_else(|| BootError::NotAKernel {
                path: path.to_owned(),
            })?;
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match kind {
        KernelKind::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                kind,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let header = r.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_owned(),
            })?;
            let (version, xloadflags, init_size) =
                (header.version, header.xloadflags, header.init_size);
            if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: path.to_owned(),
                    version,
                });
            }
            // The decompressor runs in place and needs `init_size` bytes from the load
            // address (boot.rst); nothing else may be put there.
            let end = r.kernel_end.max(r.kernel_load.0 + u64::from(init_size));
            Ok(LoadedKernel {
                kind,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                header: Some(header),
            })
        }
    }
}

/// Where an initramfs of `size` bytes goes: page aligned, as high as possible below both
/// the end of low memory and the kernel's `initrd_addr_max`, and above `kernel_end`.
pub fn initramfs_address(
    layout: &MemoryLayout,
    initrd_addr_max: Option<u32>,
    kernel_end: u64,
    size: u64,
) -> Result<u64, BootError> {
    // `initrd_addr_max` is the highest address the initrd's last byte may occupy.
    let limit = initrd_addr_max
        .map_or(u64::MAX, |m| u64::from(m) + 1)
        .min(layout.low_mem_end());
    let too_large = || BootError::InitramfsTooLarge {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(too_large());
    }
    Ok(start)
}

/// Loads the initramfs at `path` for a kernel ending at `kernel_end`; returns its guest
/// address and size.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let max = kernel.header.map(|h| h.initrd_addr_max);
    let addr = initramfs_address(layout, max, kernel.end, size)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge {
        size,
        kernel_end: kernel.end,
        limit: layout.low_mem_end(),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::Memory {
            what: "initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), crate::ConfigError> {
    crate::config::check_cmdline(cmdline)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| crate::ConfigError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        })
}

/// The zero page: the kernel's setup header (or a minimal one for an ELF kernel) completed
/// with the loader id, the command line, the initramfs and the e820 map.
pub fn build_boot_params(
    header: Option<setup_header>,
    layout: &MemoryLayout,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.boot_flag = BOOT_FLAG_MAGIC;
    p.hdr.header = HDRS_MAGIC;
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32 + 1;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    if let Some((addr, size)) = initramfs {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    let e820 = layout.e820();
    let mut n = 0u8;
    for (slot, e) in p.e820_table.iter_mut().zip(&e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
        n += 1;
    }
    p.e820_entries = n;
    p
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(BootError::BootParams)
}

/// A GDT descriptor from its flags (access byte in bits 0..8, flags nibble in 12..16),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|source| BootError::Memory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| BootError::Memory {
            what: "IDT",
            source,
        })
}

/// Writes identity page tables for the first 4 GiB (2 MiB pages): PML4 → PDPT → four PDs.
/// The MMIO hole (3–4 GiB: virtio-mmio, IOAPIC, LAPIC) is mapped uncached (PCD|PWT), so
/// that boot code can reach the devices before the kernel builds its own tables.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |source| BootError::Memory {
        what: "page tables",
        source,
    };
    // Present | writable.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    for pd in 0..layout::IDENTITY_MAP_GIB {
        mem.write_obj(
            (PDE_START + pd * PAGE_SIZE) | 0x03,
            GuestAddress(PDPTE_START + pd * 8),
        )
        .map_err(err)?;
    }
    for i in 0..512 * layout::IDENTITY_MAP_GIB {
        let addr = i << 21;
        // Present | writable | page size (2 MiB); + PWT | PCD in the MMIO hole.
        let flags = if addr >= layout::MMIO_HOLE_START {
            0x9b
        } else {
            0x83
        };
        mem.write_obj(addr | flags, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// Puts `sregs` in 64-bit long mode with paging on, the boot GDT's flat segments and the
/// identity page tables.
pub fn configure_long_mode(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    // The reset value of CR0 has caching disabled (CD, NW): keeping those makes the guest
    // run uncached until its own CR0 write, which a bzImage decompressor never does.
    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The general registers at the 64-bit entry: `rip` = entry, `rsi` = the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn mem(layout: &MemoryLayout) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout.ranges().unwrap()).unwrap()
    }

    #[test]
    fn gdt_encodings_match_the_usual_values() {
        // The values every x86 VMM boots with (flat 4 GiB, granularity 4 KiB).
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s),
            (8, 0xb, 1, 0, 1, 1, 1)
        );
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (0x10, 0x3, 0, 1));
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!(
            (tr.selector, tr.type_, tr.s, tr.unusable),
            (0x18, 0xb, 0, 0)
        );
        let null = segment_from_gdt(GDT[0], 0);
        assert_eq!(null.unusable, 1);
        // Base and limit bits land where the descriptor format puts them.
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!((s.base, s.limit, s.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for pd in 0..4u64 {
            let pdpt: u64 = m.read_obj(GuestAddress(PDPTE_START + 8 * pd)).unwrap();
            assert_eq!(pdpt, (PDE_START + pd * 0x1000) | 3);
        }
        for i in [0u64, 1, 8, 511, 512, 1535] {
            let pde: u64 = m.read_obj(GuestAddress(PDE_START + 8 * i)).unwrap();
            assert_eq!(pde, (i * 2 * MIB) | 0x83);
        }
        // The MMIO hole (3 GiB..4 GiB) is uncached.
        for i in [1536u64, 2047] {
            let pde: u64 = m.read_obj(GuestAddress(PDE_START + 8 * i)).unwrap();
            assert_eq!(pde, (i * 2 * MIB) | 0x9b);
        }
        let pdpt4: u64 = m.read_obj(GuestAddress(PDPTE_START + 32)).unwrap();
        assert_eq!(pdpt4, 0, "nothing above 4 GiB");
    }

    #[test]
    fn gdt_and_idt_are_written() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        write_gdt(&m).unwrap();
        for (i, e) in GDT.iter().enumerate() {
            let got: u64 = m
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *e);
        }
    }

    #[test]
    fn long_mode_sregs() {
        // CR0 as KVM reports it after reset: CD | NW | ET.
        let mut s = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_long_mode(&mut s);
        assert_eq!(s.cr0, 0x8000_0011, "PG | ET | PE, caches on");
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l), (8, 1));
        assert_eq!(s.ss.selector, 0x10);
        assert_eq!(s.gdt.limit, 31);
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER, 2)
        );
    }

    #[test]
    fn boot_params_carry_e820_cmdline_and_initramfs() {
        let layout = MemoryLayout::new(5 << 30);
        let p = build_boot_params(None, &layout, 12, Some((0x1_2345_6000, 0x20_0000)));
        let (flag, hdr, loader, cmd_ptr, cmd_size) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.type_of_loader,
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
        );
        assert_eq!((flag, hdr, loader), (0xaa55, HDRS_MAGIC, 0xff));
        assert_eq!((cmd_ptr, cmd_size), (CMDLINE_START as u32, 13));
        let (ri, rs, eri, ers) = (
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.ext_ramdisk_image,
            p.ext_ramdisk_size,
        );
        assert_eq!((ri, rs, eri, ers), (0x2345_6000, 0x20_0000, 1, 0));
        let n = p.e820_entries;
        assert_eq!(n, 3);
        let table = p.e820_table;
        let e: Vec<(u64, u64, u32)> = table[..3]
            .iter()
            .map(|x| (x.addr, x.size, x.r#type))
            .collect();
        assert_eq!(
            e,
            vec![
                (0, layout::EBDA_START, 1),
                (HIMEM_START, (3 << 30) - HIMEM_START, 1),
                (4 << 30, 2 << 30, 1),
            ]
        );
        // The bzImage header is kept and completed.
        let mut h = setup_header {
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        h.initrd_addr_max = 0x7fff_ffff;
        let p = build_boot_params(Some(h), &MemoryLayout::new(64 * MIB), 0, None);
        let (v, a, m) = (p.hdr.version, p.hdr.kernel_alignment, p.hdr.initrd_addr_max);
        assert_eq!((v, a, m), (0x020f, 0x20_0000, 0x7fff_ffff));
    }

    #[test]
    fn boot_params_are_written_at_the_zero_page() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        let p = build_boot_params(None, &layout, 5, None);
        write_boot_params(&m, &p).unwrap();
        let flag: u16 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        let entries: u8 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        let cmd: u32 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!((flag, entries, cmd), (0xaa55, 2, CMDLINE_START as u32));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory() {
        let layout = MemoryLayout::new(256 * MIB);
        let a = initramfs_address(&layout, None, 20 * MIB, 0x1234).unwrap();
        assert_eq!(a, 256 * MIB - 0x2000);
        // Below initrd_addr_max when that is lower.
        let a = initramfs_address(&layout, Some((128 * MIB - 1) as u32), 20 * MIB, MIB).unwrap();
        assert_eq!(a, 127 * MIB);
        // Above 3 GiB the hole limits it.
        let big = MemoryLayout::new(8 << 30);
        let a = initramfs_address(&big, Some(0x7fff_ffff), 20 * MIB, MIB).unwrap();
        assert_eq!(a, 0x8000_0000 - MIB);
        let a = initramfs_address(&big, Some(u32::MAX), 20 * MIB, MIB).unwrap();
        assert_eq!(a, (3 << 30) - MIB);
        // Does not fit above the kernel.
        assert!(matches!(
            initramfs_address(&layout, None, 200 * MIB, 100 * MIB),
            Err(BootError::InitramfsTooLarge { .. })
        ));
        assert!(matches!(
            initramfs_address(&layout, None, 0, 300 * MIB),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_is_written_with_its_nul() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        write_cmdline(&m, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&m, &long),
            Err(crate::ConfigError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn kernels_are_told_apart_by_magic() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01rest".to_vec());
        assert_eq!(detect_kernel(&mut elf).unwrap(), Some(KernelKind::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_kernel(&mut Cursor::new(bz)).unwrap(),
            Some(KernelKind::BzImage)
        );
        assert_eq!(
            detect_kernel(&mut Cursor::new(b"#!/bin/sh\n".to_vec())).unwrap(),
            None
        );
        assert_eq!(detect_kernel(&mut Cursor::new(Vec::new())).unwrap(), None);
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_a_precise_error() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x42; 4096]).unwrap();
        let err = load_kernel(&m, f.path()).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("is not a Linux kernel"));
        let err = load_kernel(&m, Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(matches!(err, BootError::Read { .. }), "{err}");
    }

    use aurae_testkit::vm::tiny_elf;

    #[test]
    fn an_elf_kernel_is_loaded_at_its_paddr() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&tiny_elf(0x100_0000, &[0xf4, 0x90, 0x90]))
            .unwrap();
        let k = load_kernel(&m, f.path()).unwrap();
        assert_eq!(k.kind, KernelKind::Elf);
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.end, 0x100_1000);
        assert!(k.header.is_none());
        let mut code = [0u8; 3];
        m.read_slice(&mut code, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(code, [0xf4, 0x90, 0x90]);
        // An ELF that does not fit in guest memory fails cleanly.
        let small = MemoryLayout::new(16 * MIB);
        let m = mem(&small);
        let err = load_kernel(&m, f.path()).unwrap_err();
        assert!(matches!(err, BootError::Load { .. }), "{err}");
    }

    /// A synthetic bzImage: a setup header and a payload.
    fn tiny_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut v = vec![0u8; (usize::from(setup_sects) + 1) * 512 + 0x1000];
        v[0x1f1] = setup_sects;
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        v[0x211] = 1; // loadflags: LOADED_HIGH
        v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        v[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        v[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
        v
    }

    #[test]
    fn a_bzimage_is_loaded_with_its_64bit_entry() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&tiny_bzimage(0x020f, XLF_KERNEL_64)).unwrap();
        let k = load_kernel(&m, f.path()).unwrap();
        assert_eq!(k.kind, KernelKind::BzImage);
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + 0x40_0000);
        let h = k.header.unwrap();
        let max = h.initrd_addr_max;
        assert_eq!(max, 0x7fff_ffff);

        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&tiny_bzimage(0x020b, 0)).unwrap();
        let err = load_kernel(&m, f.path()).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::No64BitEntry {
                    version: 0x020b,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_initramfs_is_loaded_below_the_limit() {
        let layout = MemoryLayout::new(64 * MIB);
        let m = mem(&layout);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 5000]).unwrap();
        let k = LoadedKernel {
            kind: KernelKind::Elf,
            entry: 0x100_0000,
            end: 0x110_0000,
            header: None,
        };
        let (addr, size) = load_initramfs(&m, &layout, f.path(), &k).unwrap();
        assert_eq!((addr, size), (64 * MIB - 0x2000, 5000));
        let b: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0x5a);
    }
}
