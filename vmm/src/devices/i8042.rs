//! The i8042 keyboard controller, reduced to what a guest uses to reset the machine: the
//! "pulse reset line" command (0xFE written to the command port) ends the VM.

use super::bus::BusDevice;
use crate::exit::{ExitHandle, ExitReason};

/// First port of the controller: the data port (0x60); the command/status port is 0x64.
pub const I8042_BASE: u16 = 0x60;
/// Ports covered, 0x60..=0x64.
pub const I8042_PORTS: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

/// The i8042 reset device.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so polling guests move on.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET) {
            tracing::info!("guest requested reset through the i8042");
            self.exit.request(ExitReason::Reset);
        }
    }
}
