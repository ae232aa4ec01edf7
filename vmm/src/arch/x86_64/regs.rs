//! Entering a guest in 64-bit mode: GDT, identity page tables and the vCPU's registers.
//!
//! Both boot paths use it: the Linux 64-bit boot protocol and the micro-guest start in long
//! mode with paging on, flat segments, and interrupts off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{GDT_ADDR, IDENTITY_MAPPED_GIB, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, and (in a page directory) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_LARGE: u64 = 0x80;

/// The boot GDT: null, 64-bit code, data, TSS (Firecracker's layout, which Linux accepts).
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// Selector of the code segment.
pub const CODE_SELECTOR: u16 = 0x8;
/// Selector of the data segments.
pub const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Packs a GDT descriptor from its flags (access byte and granularity nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` KVM wants for GDT entry `entry` at selector `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = flag(55, 1);
    kvm_segment {
        base,
        // With G set the limit counts 4 KiB pages: KVM wants it in bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 0x3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g,
        avl: flag(52, 1),
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the low 4 GiB (RAM and the
/// MMIO hole) with 2 MiB pages.
pub fn write_boot_tables(memory: &GuestMemoryMmap) -> Result<()> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing boot tables at {addr:#x}: {e}")))
    };
    for (i, entry) in GDT.iter().enumerate() {
        write(*entry, GDT_ADDR + i as u64 * 8)?;
    }
    write(0, IDT_ADDR)?;
    write(PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let directory = PD_ADDR + gib * 0x1000;
        write(directory | PTE_PRESENT_RW, PDPT_ADDR + gib * 8)?;
        for i in 0..512u64 {
            let page = ((gib << 30) | (i << 21)) | PTE_PRESENT_RW | PDE_LARGE;
            write(page, directory + i * 8)?;
        }
    }
    Ok(())
}

/// Puts `sregs` (as read from a fresh vCPU) into 64-bit mode on the boot tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[3], TSS_SELECTOR);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    // Caches on (a firmware hands over with CD/NW clear), protected mode, paging.
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !(CR0_CD | CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers for entering at `entry` with `rdi`/`rsi` arguments and stack `rsp`.
pub fn entry_regs(entry: u64, rsp: u64, rdi: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp,
        rbp: rsp,
        rdi,
        rsi,
        // Bit 1 is reserved and reads as one; IF is clear.
        rflags: 0x2,
        ..Default::default()
    }
}

/// The FPU state after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Sets up `vcpu` to enter the guest at `entry` in 64-bit mode.
pub fn setup(vcpu: &kvm_ioctls::VcpuFd, regs: &kvm_regs) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    vcpu.set_fpu(&boot_fpu()).map_err(Error::kvm("KVM_SET_FPU"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code = segment(GDT[1], CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_, data.s), (0, 1, 3, 1));
        let tss = segment(GDT[3], TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let memory = crate::memory::create(2 << 20).unwrap();
        write_boot_tables(&memory).unwrap();
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt3: u64 = memory.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3, (PD_ADDR + 0x3000) | 3);
        // The last 2 MiB page below 4 GiB maps itself.
        let last: u64 = memory
            .read_obj(GuestAddress(PD_ADDR + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }
}
