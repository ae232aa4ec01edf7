//! Guest memory: anonymous mappings tracked by vm-memory's [`AtomicBitmap`].
//!
//! KVM's dirty log sees only the guest's own writes; the bitmap records the VMM's writes
//! (virtio-blk reads landing in guest buffers, used-ring updates, boot setup), so an
//! incremental memory snapshot can OR the two and miss nothing.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{HIGH_RAM_START, MMIO_HOLE_START};
use crate::error::{Error, Result};

pub mod persist;
pub mod uffd;

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Splits `size` bytes of RAM around the 32-bit MMIO hole: the ranges to map.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), (size - low) as usize));
    }
    ranges
}

/// Creates `size` bytes of zeroed guest RAM.
pub fn create(size: u64) -> Result<GuestMemoryMmap> {
    if size == 0 || size % (2 << 20) != 0 {
        return Err(Error::Config(format!(
            "memory size {size} is not a positive multiple of 2 MiB"
        )));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|e| Error::Memory(format!("mapping {size} bytes: {e}")))
}

/// Host address, guest address and size of every region, for KVM's memory slots.
pub fn regions(memory: &GuestMemoryMmap) -> Vec<(u64, GuestAddress, u64)> {
    memory
        .iter()
        .map(|region| {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map(|p| p as u64)
                .unwrap_or_default();
            (host, region.start_addr(), region.len())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::Bytes;

    #[test]
    fn splits_around_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(big[1], (GuestAddress(HIGH_RAM_START), (1 << 30) as usize));
    }

    #[test]
    fn vmm_writes_are_tracked() {
        let memory = create(4 << 20).unwrap();
        memory.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let region = memory.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x5000));
    }

    #[test]
    fn refuses_odd_sizes() {
        assert!(create(0).is_err());
        assert!(create(3 << 19).is_err());
    }
}
