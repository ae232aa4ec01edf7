//! The guest's physical memory map as the BIOS E820 call would report it, for the zero page.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   RAM (low memory: zero page, page tables, command line)
//! 0x0009_fc00 .. 0x000a_0000   reserved (EBDA)
//! 0x000e_0000 .. 0x0010_0000   reserved (BIOS area: ACPI tables from the RSDP on)
//! 0x0010_0000 .. min(end, 3 GiB)  RAM
//! 0x1_0000_0000 ..             RAM above the MMIO hole, when there is more than 3 GiB
//! ```

use super::layout::{EBDA_START, HIGH_RAM_START, KERNEL_LOAD_ADDR, MMIO_HOLE_START, RSDP_ADDR};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Most entries the zero page holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES: usize = 128;

/// End of the legacy VGA/BIOS hole that follows the EBDA.
const EBDA_END: u64 = 0xa_0000;

/// One range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

impl E820Entry {
    /// The range's last byte, as Linux prints it.
    pub fn last(&self) -> u64 {
        self.addr + self.size - 1
    }
}

/// The memory map of a guest with `memory_size` bytes of RAM split around the MMIO hole as
/// [`crate::memory::ram_ranges`] maps it. `memory_size` must exceed 1 MiB.
pub fn memory_map(memory_size: u64) -> Vec<E820Entry> {
    let entry = |addr: u64, end: u64, kind: u32| E820Entry {
        addr,
        size: end - addr,
        kind,
    };
    let low_end = memory_size.min(MMIO_HOLE_START);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, EBDA_END, E820_RESERVED),
        entry(RSDP_ADDR, KERNEL_LOAD_ADDR, E820_RESERVED),
    ];
    if low_end > KERNEL_LOAD_ADDR {
        map.push(entry(KERNEL_LOAD_ADDR, low_end, E820_RAM));
    }
    if memory_size > low_end {
        map.push(entry(
            HIGH_RAM_START,
            HIGH_RAM_START + (memory_size - low_end),
            E820_RAM,
        ));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest() {
        let map = memory_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0xe0000,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
        assert_eq!(map[3].last(), 0x7ff_ffff);
    }

    #[test]
    fn large_guest_continues_above_the_hole() {
        let map = memory_map(4 << 30);
        assert_eq!(map.len(), 5);
        assert_eq!(map[3].addr + map[3].size, MMIO_HOLE_START);
        assert_eq!(map[4].addr, HIGH_RAM_START);
        assert_eq!(map[4].size, 1 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // The EBDA and BIOS area are carved out of the RAM below 1 MiB.
        assert_eq!(ram, (4 << 30) - (0x10_0000 - 0x9fc00));
    }
}
