//! ACPI tables for a Linux guest, built with `acpi_tables`.
//!
//! The guest gets a hardware-reduced platform: RSDP at [`RSDP_ADDR`] (inside the BIOS area the
//! kernel scans, and also named in the zero page), an XSDT pointing at the FADT and MADT, and a
//! DSDT describing COM1 and one `LNRO0005` device per virtio-mmio window. Debian's stock kernel
//! has `CONFIG_VIRTIO_MMIO=m` without command-line devices, so the DSDT is the only way it
//! finds our disks.
//!
//! ```text
//! 0xe0000  RSDP   0xe0040  XSDT   0xe0080  FACP   ...  APIC   ...  DSDT    (64-byte aligned)
//! ```

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    IOAPIC_ADDR, LAPIC_ADDR, RSDP_ADDR, SERIAL_GSI, SERIAL_PORT, VIRTIO_MMIO_SIZE, VMGENID_ADDR,
    VMGENID_GSI,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// OEM id written into every table.
pub const OEM_ID: [u8; 6] = *b"SNAPVM";
/// OEM revision written into every table.
const OEM_REVISION: u32 = 1;
/// Alignment of each table after the RSDP.
const TABLE_ALIGN: u64 = 64;
/// End (exclusive) of the area the tables live in: the BIOS area below the kernel, up to
/// the VM generation ID's page.
pub const ACPI_AREA_END: u64 = VMGENID_ADDR;
/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// IA-PC boot architecture flags: no legacy devices beyond what the DSDT says, no i8042
/// keyboard controller to probe (ours only resets), VGA not present, MSI not supported
/// (there is no PCI), CMOS RTC not present.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window ([`VIRTIO_MMIO_SIZE`] bytes).
    pub mmio_base: u64,
    /// Its (edge-triggered) interrupt.
    pub gsi: u32,
}

/// The DSDT: COM1 and one `LNRO0005` device per virtio-mmio window, under `\_SB_`.
pub fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    body.extend_from_slice(&com1());
    for (index, device) in devices.iter().enumerate() {
        body.extend_from_slice(&virtio_mmio_device(index, device)?);
    }
    body.extend_from_slice(&vmgenid(VMGENID_ADDR, VMGENID_GSI));
    let scope = aml::Scope::raw("\\_SB_".into(), body);
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"SVMMDSDT",
        OEM_REVISION,
    );
    table.append_slice(&scope);
    Ok(table.as_slice().to_vec())
}

/// The AML of COM1: an 8250 at [`SERIAL_PORT`] on [`SERIAL_GSI`].
fn com1() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let uid: aml::DWord = 0;
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let mut bytes = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// The AML of virtio-mmio device `index`: `_HID "LNRO0005"`, `_CRS` with its window and
/// its edge-triggered, active-high interrupt.
fn virtio_mmio_device(index: usize, device: &MmioDevice) -> Result<Vec<u8>> {
    let base = u32::try_from(device.mmio_base)
        .ok()
        .filter(|base| base.checked_add(VIRTIO_MMIO_SIZE as u32).is_some())
        .ok_or_else(|| {
            Error::Config(format!(
                "virtio-mmio window {:#x} is not below 4 GiB",
                device.mmio_base
            ))
        })?;
    // Device names are four characters: V000 .. VFFF.
    if index > 0xfff {
        return Err(Error::Config(format!(
            "{index} virtio-mmio devices: the DSDT names at most 4096"
        )));
    }
    let name = format!("V{index:03X}");
    let hid = "LNRO0005";
    let uid = index as aml::DWord;
    let window = aml::Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, device.gsi);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    let mut bytes = Vec::new();
    aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// The AML of the VM generation ID (`\\_SB_.VGEN`, as QEMU describes it: `_HID "QEMUVGID"`,
/// `_CID "VM_Gen_Counter"`, an `ADDR` method answering the ID's address as a package of two
/// DWORDs, low first) and of the Generic Event Device (`ACPI0013`) whose interrupt on `gsi`
/// runs `_EVT`, which notifies `VGEN` (0x80) that the ID changed, as Firecracker does.
fn vmgenid(addr: u64, gsi: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    let low = addr as u32 as aml::DWord;
    let high = (addr >> 32) as u32 as aml::DWord;
    let address = aml::Package::new(vec![&low, &high]);
    let ret = aml::Return::new(&address);
    let hid: &'static str = "QEMUVGID";
    let cid: &'static str = "VM_Gen_Counter";
    aml::Device::new(
        "VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_CID".into(), &cid),
            &aml::Name::new("_DDN".into(), &cid),
            &aml::Method::new("ADDR".into(), 0, false, vec![&ret]),
        ],
    )
    .to_aml_bytes(&mut bytes);

    let ged_hid: &'static str = "ACPI0013";
    let uid: aml::DWord = 0;
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let path: aml::Path = "\\_SB_.VGEN".into();
    let notify_value: aml::Byte = 0x80;
    let notify = aml::Notify::new(&path, &notify_value);
    let gsi_value: aml::DWord = gsi;
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi_value);
    let when = aml::If::new(&is_ours, vec![&notify]);
    aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &ged_hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&when]),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT: one enabled local APIC per vCPU (APIC id = index) and the IOAPIC at GSI base 0.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"SVMMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for index in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            index,
            index,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    bytes(&madt)
}

/// The FADT of a hardware-reduced platform, pointing at the DSDT at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"SVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    bytes(&builder.finalize())
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGN)
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT into guest memory from [`RSDP_ADDR`] on, and
/// returns the RSDP's address (for the zero page's `acpi_rsdp_addr`).
pub fn create_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<GuestAddress> {
    let dsdt = dsdt(devices)?;
    let madt = madt(vcpus);
    // Place the tables first, then build the ones holding pointers.
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);
    // An XSDT with two entries.
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_AREA_END {
        return Err(Error::Config(format!(
            "the ACPI tables end at {end:#x}, past {ACPI_AREA_END:#x}"
        )));
    }
    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, *b"SVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, table) in [
        (RSDP_ADDR, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        memory
            .write_slice(table, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing ACPI table at {addr:#x}: {e}")))?;
    }
    Ok(GuestAddress(RSDP_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    fn table_at(memory: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = memory.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut table = vec![0; len as usize];
        memory.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    #[test]
    fn tables_chain_from_the_rsdp() {
        let memory = crate::memory::create(4 << 20).unwrap();
        let devices = [
            MmioDevice {
                mmio_base: 0xd000_0000,
                gsi: 5,
            },
            MmioDevice {
                mmio_base: 0xd000_1000,
                gsi: 6,
            },
        ];
        let rsdp_addr = create_tables(&memory, 2, &devices).unwrap();
        let mut rsdp = [0u8; 36];
        memory.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&memory, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table_at(&memory, entries[0]);
        let madt = table_at(&memory, entries[1]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0, "HW_REDUCED_ACPI");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&memory, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Header (44 bytes), two local APICs (8 each), one IOAPIC (12).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(madt[60], 1, "IOAPIC entry");
        assert!(x_dsdt + dsdt.len() as u64 <= ACPI_AREA_END);
    }

    #[test]
    fn dsdt_names_each_virtio_device() {
        let dsdt = dsdt(&[
            MmioDevice {
                mmio_base: 0xd000_0000,
                gsi: 5,
            },
            MmioDevice {
                mmio_base: 0xd000_2000,
                gsi: 7,
            },
        ])
        .unwrap();
        let find = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"LNRO0005\0"), 2);
        assert_eq!(find(b"COM1"), 1);
        assert_eq!(find(b"V000"), 1);
        assert_eq!(find(b"V001"), 1);
        // Memory32Fixed(ReadWrite, 0xd0002000, 0x1000).
        let mut window = vec![0x86, 9, 0, 1];
        window.extend_from_slice(&0xd000_2000u32.to_le_bytes());
        window.extend_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(find(&window), 1);
        // Extended interrupt: consumer, edge, active high, exclusive, GSI 7.
        assert_eq!(find(&[0x89, 6, 0, 0b0011, 1, 7, 0, 0, 0]), 1);
        // COM1's IRQ 4.
        assert_eq!(find(&[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]), 1);
    }

    #[test]
    fn dsdt_describes_the_vm_generation_id() {
        let dsdt = dsdt(&[]).unwrap();
        let find = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"VGEN"), 2, "the device and the notify's path");
        assert_eq!(find(b"QEMUVGID\0"), 1);
        assert_eq!(find(b"VM_Gen_Counter\0"), 2);
        assert_eq!(find(b"ACPI0013\0"), 1);
        assert_eq!(find(b"ADDR"), 1);
        assert_eq!(find(b"_EVT"), 1);
        // The address package: DWORD low (0x0c prefix), then the high half (Zero).
        let mut low = vec![0x0c];
        low.extend_from_slice(&(VMGENID_ADDR as u32).to_le_bytes());
        assert_eq!(find(&low), 1);
        // The GED's interrupt on the ID's GSI.
        assert_eq!(
            find(&[0x89, 6, 0, 0b0011, 1, VMGENID_GSI as u8, 0, 0, 0]),
            1
        );
    }

    #[test]
    fn refuses_windows_above_4_gib() {
        assert!(dsdt(&[MmioDevice {
            mmio_base: 1 << 32,
            gsi: 5
        }])
        .is_err());
    }
}
