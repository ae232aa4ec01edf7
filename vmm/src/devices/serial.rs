//! COM1: a 16550A UART (vm-superio) at port 0x3f8 whose interrupt is an irqfd on GSI 4.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::error::{Error, Result};

pub mod persist;

/// Ports covered by the UART.
pub const SERIAL_PORTS: u64 = 8;

/// Raises the UART's interrupt by writing an eventfd that KVM injects as a GSI.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A fresh trigger; register [`IrqTrigger::fd`] as an irqfd to route it.
    pub fn new() -> Result<Self> {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(IrqTrigger)
            .map_err(Error::io("creating the serial irqfd"))
    }

    /// The eventfd to register with KVM.
    pub fn fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console device.
pub struct Serial {
    pub(crate) uart: Uart<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART writing what the guest transmits to `out` and interrupting through `trigger`.
    pub fn new(trigger: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: Uart::new(trigger, out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                // The console is best effort: a full disk or closed pipe must not stop the VM.
                tracing::debug!("serial output: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_reports_empty_holding_register() {
        let capture = Capture::default();
        let mut serial = Serial::new(IrqTrigger::new().unwrap(), Box::new(capture.clone()));
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(&*capture.0.lock().unwrap(), b"hi\n");
        // Wide accesses are ignored rather than misrouted.
        serial.write(0, b"xy");
        assert_eq!(&*capture.0.lock().unwrap(), b"hi\n");
    }
}
