//! The UART's saved registers and receive FIFO.

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial as Uart;

use super::{IrqTrigger, Serial};
use crate::error::{Error, Result};
use crate::persist::Persist;

/// Receive FIFO depth of the 16550A vm-superio emulates.
const FIFO_SIZE: usize = 64;

/// The 16550A's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// The console is shared with the I/O bus the vCPUs drive: it is saved and restored
/// through its lock.
impl Persist for parking_lot::Mutex<Serial> {
    type State = SerialSnapshot;
    type SaveArgs<'a> = ();
    type RestoreArgs<'a> = ();

    /// The UART's registers and receive FIFO.
    fn save(&self, _args: ()) -> Result<SerialSnapshot> {
        Ok(self.lock().save_state())
    }

    /// The saved FIFO must fit the UART's.
    fn check(&self, state: &SerialSnapshot) -> Result<()> {
        check_fifo(state)
    }

    /// Loads the registers and FIFO, keeping the output and the interrupt line.
    fn restore(&self, _args: (), state: &SerialSnapshot) -> Result<()> {
        self.lock().restore_state(state)
    }
}

fn check_fifo(state: &SerialSnapshot) -> Result<()> {
    if state.in_buffer.len() > FIFO_SIZE {
        return Err(Error::Device {
            device: "serial".into(),
            message: format!(
                "saved receive FIFO holds {} bytes, more than {FIFO_SIZE}",
                state.in_buffer.len()
            ),
        });
    }
    Ok(())
}

impl Serial {
    fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore_state(&mut self, state: &SerialSnapshot) -> Result<()> {
        check_fifo(state)?;
        let dup = || {
            self.uart
                .interrupt_evt()
                .fd()
                .try_clone()
                .map(IrqTrigger)
                .map_err(Error::io("duplicating the serial irqfd"))
        };
        let (trigger, placeholder) = (dup()?, dup()?);
        let old = std::mem::replace(
            &mut self.uart,
            Uart::new(placeholder, Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        let saved = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // The FIFO length was checked above, the only way from_state fails.
        self.uart =
            Uart::from_state(&saved, trigger, NoEvents, out).map_err(|e| Error::Device {
                device: "serial".into(),
                message: format!("restoring: {e:?}"),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    #[test]
    fn registers_survive_a_round_trip() {
        let serial = parking_lot::Mutex::new(Serial::new(
            IrqTrigger::new().unwrap(),
            Box::new(std::io::sink()),
        ));
        serial.lock().write(7, &[0x5a]); // scratch
        serial.lock().write(3, &[0x03]); // 8N1
        let state = serial.save(()).unwrap();
        let other = parking_lot::Mutex::new(Serial::new(
            IrqTrigger::new().unwrap(),
            Box::new(std::io::sink()),
        ));
        other.restore((), &state).unwrap();
        let mut scratch = [0u8];
        other.lock().read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        assert_eq!(other.save(()).unwrap(), state);
        let mut bad = state;
        bad.in_buffer = vec![0; 65];
        assert!(other.check(&bad).is_err());
        assert!(other.restore((), &bad).is_err());
    }
}
