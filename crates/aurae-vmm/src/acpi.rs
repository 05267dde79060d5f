//! ACPI tables, so that a stock kernel (`CONFIG_ACPI=y`) finds the CPUs, the IOAPIC and
//! the virtio-mmio devices without command-line help: RSDP → XSDT → FADT (→ DSDT) and
//! MADT, built with the rust-vmm `acpi_tables` crate and written at
//! [`crate::layout::ACPI_START`] (the RSDP first, in the BIOS area Linux scans; its
//! address is also given in `boot_params.acpi_rsdp_addr`).
//!
//! The platform is *hardware-reduced* ACPI (as Firecracker's): no PM timer, no SCI, no
//! fixed-feature registers; Linux then bypasses the 8259 PIC and the PIT for timekeeping
//! and uses the local APICs and the IOAPIC. Power-off and reset go through the FADT's
//! sleep control and reset registers, both at I/O port [`ACPI_PM_PORT`] (see
//! [`crate::devices::AcpiPm`]), with `\_S5` in the DSDT.
//!
//! | table | contents                                                                  |
//! |-------|---------------------------------------------------------------------------|
//! | MADT  | one enabled local APIC per vCPU (UID = APIC id = vCPU index), the IOAPIC at 0xfec00000 (GSI base 0). No interrupt source overrides: KVM's default routing sends GSI n to IOAPIC pin n, which is the ISA identity mapping Linux assumes without overrides. |
//! | FADT  | HW_REDUCED_ACPI, power/sleep buttons as control-method devices, RESET_REG_SUP; boot flags: i8042 present, no VGA, no MSI, no CMOS RTC |
//! | DSDT  | `\_SB.COM1` (PNP0501, I/O 0x3f8–0x3ff, IRQ 4), one `\_SB.Vnnn` per virtio-mmio device (`_HID "LNRO0005"`, `_CRS` = 4 KiB fixed memory range + edge, active-high interrupt), `\_S5` |

use acpi_tables::{
    Aml,
    aml::{self, Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate},
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic},
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    boot::BootError,
    devices::{SERIAL_IRQ, SERIAL_PORT_BASE},
    layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR},
};

/// The OEM id in every table.
pub const OEM_ID: [u8; 6] = *b"AURAE ";
/// The I/O port of the ACPI sleep control register (write `SLP_TYP << 2 | SLP_EN`) and of
/// the reset register (write [`ACPI_RESET_VALUE`]); the sleep status register is at
/// `ACPI_PM_PORT + 1`.
pub const ACPI_PM_PORT: u16 = 0x600;
/// The value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off), as `\_S5` in the DSDT says.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control: SLP_EN (bit 5).
pub const SLEEP_ENABLE: u8 = 1 << 5;

/// FADT IA-PC boot architecture flags: 8042 present (bit 1), VGA not present (bit 2), MSI
/// not supported (bit 3), no CMOS RTC (bit 5).
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5);

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest physical address of its register window.
    pub addr: u64,
    /// Size of the window.
    pub len: u32,
    /// Its GSI (IOAPIC pin).
    pub gsi: u32,
}

/// The tables, serialised, with the guest address of each.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// `(guest address, bytes)`, RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// The RSDP's guest address (what `boot_params.acpi_rsdp_addr` gets).
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }

    /// The table with this signature (`b"RSD "` for the RSDP).
    pub fn find(&self, sig: &[u8; 4]) -> Option<&(u64, Vec<u8>)> {
        self.tables
            .iter()
            .find(|(_, b)| b.get(..4) == Some(&sig[..]))
    }
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The AML of one virtio-mmio device, named `Vnnn` (`n` in hex).
pub fn virtio_device_aml(index: usize, dev: &MmioDeviceInfo) -> Vec<u8> {
    let name = format!("V{:03X}", index % 0x1000);
    let mem = Memory32Fixed::new(true, dev.addr as u32, dev.len);
    let irq = Interrupt::new(true, true, false, false, dev.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    to_bytes(&Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The DSDT's AML body: `\_SB` with COM1 and the virtio-mmio devices, and `\_S5`.
pub fn dsdt_aml(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let com1_io = IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let mut sb_body = to_bytes(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    ));
    for (i, d) in devices.iter().enumerate() {
        sb_body.extend(virtio_device_aml(i, d));
    }
    let body = RawAml(&sb_body);
    let mut out = to_bytes(&aml::Scope::new("\\_SB_".into(), vec![&body]));
    out.extend(to_bytes(&Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE]),
    )));
    out
}

/// AML bytes already serialised.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.0);
    }
}

/// Rounds up to 16 bytes.
const fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Builds every table for `vcpus` CPUs and the given virtio-mmio devices, laid out from
/// [`ACPI_START`]: RSDP, XSDT, FADT, MADT, DSDT (16-byte aligned). Fails only where they
/// would not fit below [`ACPI_END`].
pub fn build(vcpus: u8, devices: &[MmioDeviceInfo]) -> Result<AcpiTables, BootError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + 2 entries (FADT, MADT).
    let fadt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let madt_addr = align16(fadt_addr + acpi_tables::fadt::FADT::len() as u64);

    let mut madt = MADT::new(
        OEM_ID,
        *b"AURAEAPI",
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    let madt = to_bytes(&madt);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"AURAEDSD", 1);
    dsdt.append_slice(&dsdt_aml(devices));
    let dsdt = dsdt.as_slice().to_vec();

    let pm = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"AURAEFAC", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = pm(ACPI_PM_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = pm(ACPI_PM_PORT);
    fadt.sleep_status_reg = pm(ACPI_PM_PORT + 1);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"AURAEVMM").into();
    let fadt = to_bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, *b"AURAEXSD", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(BootError::AcpiTooLarge { end });
    }
    Ok(AcpiTables {
        tables: vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, tables: &AcpiTables) -> Result<(), BootError> {
    for (addr, bytes) in &tables.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| BootError::Memory {
                what: "ACPI tables",
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn devices(n: usize) -> Vec<MmioDeviceInfo> {
        (0..n)
            .map(|i| MmioDeviceInfo {
                addr: crate::layout::mmio_device_addr(i),
                len: crate::layout::MMIO_DEVICE_SIZE as u32,
                gsi: crate::layout::mmio_device_gsi(i),
            })
            .collect()
    }

    #[test]
    fn checksums_lengths_and_links() {
        let t = build(4, &devices(2)).unwrap();
        let (rsdp_addr, rsdp) = t.find(b"RSD ").unwrap();
        assert_eq!(*rsdp_addr, 0xe0000);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2 (XSDT)");
        assert_eq!(u32_at(rsdp, 20), 36);
        for (addr, b) in &t.tables[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{:?}", &b[..4]);
            assert_eq!(sum(b), 0, "{:?}", &b[..4]);
            assert_eq!(addr % 16, 0);
            assert!(*addr >= ACPI_START && addr + b.len() as u64 <= ACPI_END);
        }
        // Tables do not overlap.
        for w in t.tables.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
        let (xsdt_addr, xsdt) = t.find(b"XSDT").unwrap();
        assert_eq!(u64_at(rsdp, 24), *xsdt_addr);
        assert_eq!(xsdt.len(), 36 + 16);
        let (fadt_addr, fadt) = t.find(b"FACP").unwrap();
        let (madt_addr, madt) = t.find(b"APIC").unwrap();
        assert_eq!(u64_at(xsdt, 36), *fadt_addr);
        assert_eq!(u64_at(xsdt, 44), *madt_addr);
        // FADT: 276 bytes (ACPI 6.5), X_DSDT at 140, flags at 112, boot arch at 109.
        assert_eq!(fadt.len(), 276);
        let (dsdt_addr, dsdt) = t.find(b"DSDT").unwrap();
        assert_eq!(u64_at(fadt, 140), *dsdt_addr);
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
        // Reset register: GAS at 116 (I/O space, 8 bits, port 0x600), value at 128.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_PM_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // Sleep control / status registers at 244 / 256.
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_PM_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(ACPI_PM_PORT) + 1);
        assert!(dsdt.len() > 36);
        // MADT: header 44 bytes, 4 local APICs of 8, one IOAPIC of 12.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        let t = build(3, &[]).unwrap();
        let (_, madt) = t.find(b"APIC").unwrap();
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            match kind {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, vec![(0, 0xfec0_0000, 0)]);
    }

    /// The AML of `Device (V000)` compared with bytes assembled by hand from the ACPI
    /// spec (what `iasl` makes of the equivalent ASL).
    #[test]
    fn virtio_device_aml_matches_known_bytes() {
        let dev = MmioDeviceInfo {
            addr: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x5b, 0x82, 0x41, 0x04,                   // DeviceOp, PkgLength 65
            b'V', b'0', b'0', b'0',
            0x08, b'_', b'H', b'I', b'D',             // Name (_HID, "LNRO0005")
            0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0x00,
            0x08, b'_', b'U', b'I', b'D', 0x00,       // Name (_UID, Zero)
            0x08, b'_', b'C', b'C', b'A', 0x01,       // Name (_CCA, One)
            0x08, b'_', b'C', b'R', b'S',             // Name (_CRS, Buffer)
            0x11, 0x1a, 0x0a, 0x17,                   // BufferOp, PkgLength 26, size 23
            0x86, 0x09, 0x00, 0x01,                   // Memory32Fixed (ReadWrite,
            0x00, 0x00, 0x00, 0xd0,                   //   0xd0000000,
            0x00, 0x10, 0x00, 0x00,                   //   0x1000)
            0x89, 0x06, 0x00, 0x03, 0x01,             // Interrupt (Consumer, Edge,
            0x05, 0x00, 0x00, 0x00,                   //   ActiveHigh, Exclusive) { 5 }
            0x79, 0x00,                               // EndTag
        ];
        assert_eq!(virtio_device_aml(0, &dev), expected);
    }

    #[test]
    fn dsdt_describes_every_device_and_s5() {
        let aml = dsdt_aml(&devices(3));
        let count = |pat: &[u8]| aml.windows(pat.len()).filter(|w| *w == pat).count();
        assert_eq!(count(b"LNRO0005"), 3);
        assert_eq!(count(b"V002"), 1);
        assert_eq!(count(b"COM1"), 1);
        assert_eq!(count(b"_S5_"), 1);
        // PNP0501 as an EISA id: 0x0105d041.
        assert_eq!(count(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
    }

    #[test]
    fn tables_fit_with_the_most_devices_and_vcpus() {
        let t = build(
            crate::config::MAX_VCPUS,
            &devices(crate::layout::MAX_MMIO_DEVICES),
        )
        .unwrap();
        let (addr, last) = t.tables.last().unwrap();
        assert!(addr + last.len() as u64 <= ACPI_END);
    }

    #[test]
    fn tables_are_written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let t = build(1, &devices(1)).unwrap();
        write(&mem, &t).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
