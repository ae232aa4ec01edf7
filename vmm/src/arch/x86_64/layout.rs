//! The guest-physical address map, in one place.
//!
//! ```text
//! 0x0000_0500  GDT                        0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)                0x0000_a000  PDPT
//! 0x0000_6000  micro-guest boot info      0x0000_b000  4 page directories (4 GiB, 2 MiB pages)
//! 0x0000_7000  Linux zero page            0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM (EBDA)      0x000e_0000  ACPI RSDP
//! 0x000f_f000  VM generation ID
//! 0x0010_0000  kernel / micro-guest       0xc000_0000  32-bit MMIO hole: virtio-mmio devices
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC  0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// Guest address of the global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Guest address of the (empty) interrupt descriptor table.
pub const IDT_ADDR: u64 = 0x520;
/// Guest address of the micro-guest's boot info page.
pub const BOOT_INFO_ADDR: u64 = 0x6000;
/// Guest address of the Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest address of the top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Guest address of the first of the four page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Gigabytes identity-mapped by the boot page tables (covers RAM below the hole and MMIO).
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Guest address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest kernel command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of usable low memory (the EBDA starts here on a PC).
pub const EBDA_START: u64 = 0x9fc00;
/// Guest address of the ACPI RSDP, inside the BIOS area the kernel scans.
pub const RSDP_ADDR: u64 = 0xe0000;
/// Guest address of the 16-byte VM generation ID: the last page of the reserved BIOS area,
/// after the ACPI tables (see [`crate::devices::vmgenid`]).
pub const VMGENID_ADDR: u64 = 0xf_f000;
/// GSI of the VM generation ID's change notification (ISA IRQ 3, COM2's, unused here).
pub const VMGENID_GSI: u32 = 3;
/// Where a kernel or the micro-guest is loaded and entered.
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM beyond it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First guest address above the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Highest GSI the in-kernel IOAPIC routes (24 pins).
pub const MAX_GSI: u32 = 23;
/// I/O port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// Guest address of the IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Guest address of the local APICs.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Guest address of KVM's TSS pages (three pages, inside the MMIO hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// The guest-physical window of virtio-mmio device `index`.
pub fn virtio_mmio_window(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

/// The GSI of virtio-mmio device `index`, or `None` past the IOAPIC's last pin.
pub fn virtio_gsi(index: usize) -> Option<u32> {
    let gsi = VIRTIO_FIRST_GSI.checked_add(u32::try_from(index).ok()?)?;
    (gsi <= MAX_GSI).then_some(gsi)
}
