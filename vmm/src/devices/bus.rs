//! Address buses: map guest port-I/O or MMIO addresses to devices.
//!
//! A bus is built once before the vCPUs start and never changes afterwards, so vCPU threads
//! share it without a lock; each device has its own mutex, and vCPUs touching different
//! devices never contend.

use std::sync::Arc;

use parking_lot::Mutex;

/// A device on a bus. Offsets are relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    /// Sorted by base.
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

/// Returned by [`Bus::insert`] when a range is empty or overlaps another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `base..base + len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Overlap> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(Overlap { base, len });
        };
        let at = self.ranges.partition_point(|r| r.base < base);
        let clashes_before = at > 0 && self.ranges[at - 1].base + self.ranges[at - 1].len > base;
        let clashes_after = self.ranges.get(at).is_some_and(|r| r.base < end);
        if clashes_before || clashes_after {
            return Err(Overlap { base, len });
        }
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device covering the whole access `addr..addr + size`, with the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((&range.device, offset))
    }

    /// Routes a read; returns false (leaving `data` alone) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device.lock().read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device.lock().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u64);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill((offset + self.0) as u8);
        }
        fn write(&mut self, offset: u64, _data: &[u8]) {
            self.0 = offset;
        }
    }

    fn echo() -> SharedDevice {
        Arc::new(Mutex::new(Echo(0)))
    }

    #[test]
    fn routes_by_range() {
        let mut bus = Bus::new();
        bus.insert(echo(), 0x100, 0x10).unwrap();
        bus.insert(echo(), 0x200, 0x10).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x105, &mut byte));
        assert_eq!(byte[0], 5);
        assert!(!bus.read(0x110, &mut byte));
        assert!(!bus.read(0xff, &mut byte));
        // An access straddling the end of a range is not routed.
        let mut word = [0u8; 4];
        assert!(!bus.read(0x10e, &mut word));
        assert!(bus.write(0x20f, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(echo(), 0x100, 0x10).unwrap();
        assert!(bus.insert(echo(), 0x10f, 1).is_err());
        assert!(bus.insert(echo(), 0xf0, 0x11).is_err());
        assert!(bus.insert(echo(), 0x300, 0).is_err());
        assert!(bus.insert(echo(), u64::MAX, 2).is_err());
        bus.insert(echo(), 0x110, 1).unwrap();
    }
}
