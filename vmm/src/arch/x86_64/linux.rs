//! Loading a Linux bzImage for the 64-bit boot protocol (Documentation/arch/x86/boot.rst).
//!
//! The protected-mode kernel goes to [`KERNEL_LOAD_ADDR`] (1 MiB) and is entered at its
//! `startup_64`, 0x200 bytes in, in long mode on the identity-mapped boot page tables with
//! RSI pointing at the zero page ([`ZERO_PAGE_ADDR`]). The zero page carries the kernel's own
//! setup header (completed by us), the command line pointer ([`CMDLINE_ADDR`]), the initrd,
//! the E820 map and the RSDP address.
//!
//! An uncompressed ELF `vmlinux` is accepted too (as Firecracker boots it): its segments go
//! to their physical addresses and it is entered at its ELF entry, `startup_64`, under the
//! same protocol. It skips the bzImage decompressor, which on a software-only KVM takes
//! minutes.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use kvm_bindings::kvm_regs;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::e820::{self, E820_MAX_ENTRIES};
use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, KERNEL_LOAD_ADDR, MMIO_HOLE_START, ZERO_PAGE_ADDR,
};
use super::regs;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Offset of `startup_64` from the start of the protected-mode kernel.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Stack pointer at entry: the top of the free page between the zero page and the PML4.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// `boot_flag` magic of the setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic of the setup header ("HdrS").
const HEADER_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` of a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// First boot protocol version with `xloadflags` (and so the 64-bit entry point).
const MIN_PROTOCOL_VERSION: u16 = 0x020c;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The first bytes of an ELF file.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// `kernel_alignment` given to an ELF vmlinux (which has no setup header): 16 MiB.
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `initrd_addr_max` assumed for an ELF vmlinux: the protocol's default.
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
/// Alignment of the initrd's load address.
const INITRD_ALIGN: u64 = 0x1000;

/// What a loaded kernel needs from the VMM next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Guest address of `startup_64`.
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub kernel_end: u64,
    /// Where the initrd went and its size, if there is one.
    pub initrd: Option<(GuestAddress, u64)>,
}

impl LoadedKernel {
    /// The boot vCPU's registers for the 64-bit boot protocol: RIP at `startup_64`,
    /// RSI at the zero page, interrupts off.
    pub fn boot_regs(&self) -> kvm_regs {
        regs::entry_regs(self.entry.0, BOOT_STACK_POINTER, 0, ZERO_PAGE_ADDR)
    }
}

/// Loads `kernel` (a bzImage), `initrd` and `cmdline` into `memory` of `memory_size` bytes
/// and writes the zero page, naming the RSDP at `rsdp`. The boot page tables and GDT are
/// written separately ([`regs::write_boot_tables`]).
pub fn load(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<LoadedKernel> {
    let mut file = File::open(kernel)
        .map_err(|e| Error::Load(format!("opening kernel {}: {e}", kernel.display())))?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    file.rewind()
        .map_err(|e| Error::Load(format!("kernel {}: {e}", kernel.display())))?;
    let (loaded, entry, header) = if is_elf {
        // An uncompressed vmlinux: segments at their physical addresses, entered at
        // `startup_64` (the ELF entry) under the same 64-bit protocol. No setup header:
        // the zero page gets the defaults a boot loader would use.
        let loaded = Elf::load(
            memory,
            None,
            &mut file,
            Some(GuestAddress(KERNEL_LOAD_ADDR)),
        )
        .map_err(|e| Error::Load(format!("kernel {}: {e}", kernel.display())))?;
        let header = setup_header {
            kernel_alignment: ELF_KERNEL_ALIGNMENT,
            initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
            ..Default::default()
        };
        (loaded, loaded.kernel_load, header)
    } else {
        let loaded = BzImage::load(
            memory,
            Some(GuestAddress(KERNEL_LOAD_ADDR)),
            &mut file,
            Some(GuestAddress(KERNEL_LOAD_ADDR)),
        )
        .map_err(|e| Error::Load(format!("kernel {}: {e}", kernel.display())))?;
        let header = loaded
            .setup_header
            .ok_or_else(|| Error::Load(format!("kernel {}: not a bzImage", kernel.display())))?;
        let (version, xloadflags) = (header.version, header.xloadflags);
        if version < MIN_PROTOCOL_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::Load(format!(
                "kernel {}: boot protocol {}.{:02} without a 64-bit entry point (need 2.12+, \
                 XLF_KERNEL_64)",
                kernel.display(),
                version >> 8,
                version & 0xff
            )));
        }
        let entry = loaded.kernel_load.unchecked_add(STARTUP_64_OFFSET);
        (loaded, entry, header)
    };

    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HEADER_MAGIC;

    // The kernel says how long a command line it takes (without the NUL).
    let kernel_limit = match params.hdr.cmdline_size {
        0 => 255,
        n => n as usize,
    };
    let capacity = CMDLINE_MAX_SIZE.min(kernel_limit + 1);
    let line = Cmdline::try_from(cmdline, capacity).map_err(|e| {
        Error::Load(format!(
            "command line of {} bytes (at most {}): {e}",
            cmdline.len(),
            capacity - 1
        ))
    })?;
    load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| Error::Load(format!("writing the command line: {e}")))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    let low_end = memory_size.min(MMIO_HOLE_START);
    let initrd = match initrd {
        Some(path) => {
            let (addr, size) = load_initrd(
                memory,
                path,
                loaded.kernel_end,
                low_end,
                u64::from(params.hdr.initrd_addr_max),
            )?;
            params.hdr.ramdisk_image = addr.0 as u32;
            params.hdr.ramdisk_size = size as u32;
            Some((addr, size))
        }
        None => None,
    };

    params.acpi_rsdp_addr = rsdp.raw_value();
    let map = e820::memory_map(memory_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(Error::Load(format!("{} E820 entries", map.len())));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        memory,
    )
    .map_err(|e| Error::Load(format!("writing the zero page: {e}")))?;

    Ok(LoadedKernel {
        entry,
        kernel_end: loaded.kernel_end,
        initrd,
    })
}

/// Loads the initrd as high in low memory as the kernel allows (`initrd_addr_max`), above
/// the kernel image, page-aligned; returns its address and size.
fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
    initrd_addr_max: u64,
) -> Result<(GuestAddress, u64)> {
    let mut file = File::open(path)
        .map_err(|e| Error::Load(format!("opening initrd {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| Error::Load(format!("initrd {}: {e}", path.display())))?
        .len();
    // `initrd_addr_max` is the highest address the initrd's last byte may have.
    let limit = low_end.min(initrd_addr_max.saturating_add(1));
    let addr = limit
        .checked_sub(size)
        .map(|addr| addr & !(INITRD_ALIGN - 1))
        .filter(|addr| *addr >= kernel_end && size <= u64::from(u32::MAX))
        .ok_or_else(|| {
            Error::Load(format!(
                "initrd {} ({size} bytes) does not fit between the kernel's end {kernel_end:#x} \
                 and {limit:#x}: give the VM more memory",
                path.display()
            ))
        })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Load(format!("reading initrd {}: {e}", path.display())))?;
    Ok((GuestAddress(addr), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: one setup sector after the boot sector, then `payload`.
    fn fake_bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 2 * 512];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        image.extend_from_slice(payload);
        image
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn loads_kernel_initrd_and_zero_page() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = write(&dir, "bzImage", &fake_bzimage(0x020f, 0x3, &[0xab; 4096]));
        let initrd = write(&dir, "initrd", &[0xcd; 5000]);
        let size = 64 << 20;
        let memory = crate::memory::create(size).unwrap();
        let loaded = load(
            &memory,
            size,
            &kernel,
            Some(&initrd),
            "console=ttyS0 panic=1",
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!(loaded.entry, GuestAddress(0x10_0200));
        assert_eq!(loaded.kernel_end, 0x10_1000);
        let regs = loaded.boot_regs();
        assert_eq!((regs.rip, regs.rsi), (0x10_0200, ZERO_PAGE_ADDR));
        let byte: u8 = memory.read_obj(GuestAddress(KERNEL_LOAD_ADDR)).unwrap();
        assert_eq!(byte, 0xab);

        let (initrd_addr, initrd_size) = loaded.initrd.unwrap();
        assert_eq!(initrd_size, 5000);
        assert_eq!(initrd_addr.0 % 0x1000, 0);
        assert!(initrd_addr.0 + 5000 <= size);
        let byte: u8 = memory.read_obj(initrd_addr).unwrap();
        assert_eq!(byte, 0xcd);

        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 21);
        assert_eq!({ hdr.ramdisk_image }, initrd_addr.0 as u32);
        assert_eq!({ hdr.ramdisk_size }, 5000);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let map = e820::memory_map(size);
        assert_eq!(usize::from(params.e820_entries), map.len());
        let last = params.e820_table[map.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x10_0000, size - 0x10_0000)
        );
        let mut line = [0u8; 22];
        memory
            .read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 panic=1\0");
    }

    /// A minimal ELF vmlinux: one 256-byte PT_LOAD segment at physical 2 MiB, entered there.
    fn fake_vmlinux() -> Vec<u8> {
        let mut image = vec![0u8; 0x1100];
        image[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        let put = |image: &mut Vec<u8>, offset: usize, bytes: &[u8]| {
            image[offset..offset + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut image, 16, &2u16.to_le_bytes()); // e_type: executable
        put(&mut image, 18, &0x3eu16.to_le_bytes()); // e_machine: x86-64
        put(&mut image, 20, &1u32.to_le_bytes()); // e_version
        put(&mut image, 24, &0x20_0000u64.to_le_bytes()); // e_entry
        put(&mut image, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut image, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut image, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut image, 56, &1u16.to_le_bytes()); // e_phnum
        put(&mut image, 64, &1u32.to_le_bytes()); // p_type: PT_LOAD
        put(&mut image, 68, &5u32.to_le_bytes()); // p_flags: R+X
        put(&mut image, 72, &0x1000u64.to_le_bytes()); // p_offset
        put(&mut image, 80, &0xffff_ffff_8120_0000u64.to_le_bytes()); // p_vaddr
        put(&mut image, 88, &0x20_0000u64.to_le_bytes()); // p_paddr
        put(&mut image, 96, &0x100u64.to_le_bytes()); // p_filesz
        put(&mut image, 104, &0x100u64.to_le_bytes()); // p_memsz
        put(&mut image, 112, &0x1000u64.to_le_bytes()); // p_align
        image[0x1000..].fill(0xee);
        image
    }

    #[test]
    fn loads_an_elf_vmlinux_at_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = write(&dir, "vmlinux", &fake_vmlinux());
        let size = 16 << 20;
        let memory = crate::memory::create(size).unwrap();
        let loaded = load(
            &memory,
            size,
            &kernel,
            None,
            "console=ttyS0",
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!(loaded.entry, GuestAddress(0x20_0000));
        assert_eq!(loaded.boot_regs().rip, 0x20_0000);
        let byte: u8 = memory.read_obj(GuestAddress(0x20_00ff)).unwrap();
        assert_eq!(byte, 0xee);
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HEADER_MAGIC);
        assert_eq!({ hdr.kernel_alignment }, ELF_KERNEL_ALIGNMENT);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
    }

    #[test]
    fn refuses_what_cannot_boot() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 << 20;
        let memory = crate::memory::create(size).unwrap();
        let rsdp = GuestAddress(0xe0000);
        let old = write(&dir, "old", &fake_bzimage(0x020b, 0, &[0; 512]));
        let err = load(&memory, size, &old, None, "", rsdp).unwrap_err();
        assert!(err.to_string().contains("64-bit entry"), "{err}");
        let garbage = write(&dir, "garbage", &[0x55; 4096]);
        assert!(load(&memory, size, &garbage, None, "", rsdp).is_err());
        let missing = dir.path().join("missing");
        assert!(load(&memory, size, &missing, None, "", rsdp).is_err());

        let kernel = write(&dir, "bzImage", &fake_bzimage(0x020f, 1, &[0; 512]));
        let long = "x".repeat(5000);
        assert!(load(&memory, size, &kernel, None, &long, rsdp).is_err());
        let huge = write(&dir, "initrd", &vec![0; 17 << 20]);
        let err = load(&memory, size, &kernel, Some(&huge), "", rsdp).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
