//! Ports a PC guest pokes that need no behaviour: the POST diagnostic port, the CMOS/RTC
//! index, the other COM ports. Reads float high, writes are dropped. (Port 0x61, the speaker
//! gate, belongs to the in-kernel PIT.) Listing them keeps
//! the log quiet about accesses that are known to be harmless.

use super::bus::BusDevice;

/// A device that ignores writes and reads as all ones.
#[derive(Debug, Default)]
pub struct IgnoredPorts;

impl BusDevice for IgnoredPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Port ranges served by [`IgnoredPorts`]: (first port, count).
pub const IGNORED_PORT_RANGES: &[(u16, u64)] = &[
    (0x70, 2),  // CMOS index/data
    (0x80, 1),  // POST codes
    (0xed, 1),  // I/O delay port used by Linux
    (0x2f8, 8), // COM2
    (0x3e8, 8), // COM3
    (0x2e8, 8), // COM4
];
