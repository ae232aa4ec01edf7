//! vCPUs: setup, and the run loop each one executes on its own thread.
//!
//! Port and MMIO exits are routed to the device buses; everything the in-kernel irqchip does
//! (HLT, interrupts, the LAPIC timer) stays in the kernel. A vCPU thread leaves its loop when
//! the VM's stop flag is set; the VMM kicks it out of `KVM_RUN` with a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_regs, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::error::{Error, Result};
use crate::exit::{ExitHandle, ExitReason};
use crate::vm::Vm;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the kick handler once per process (the default action would kill it).
fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(|e| Error::Io {
            what: "installing the vCPU kick signal handler".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        });
    });
    result
}

/// How a vCPU starts.
#[derive(Debug, Clone)]
pub enum VcpuStart {
    /// In 64-bit mode at these registers.
    LongMode(kvm_regs),
    /// Waiting for INIT/SIPI from the boot vCPU (Linux application processors).
    WaitForSipi,
}

/// The buses a vCPU routes exits to.
#[derive(Debug, Default)]
pub struct IoBuses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and sets up its CPUID, MSRs, LAPIC and registers.
    pub fn new(vm: &Vm, cpuid: &CpuId, index: u8, count: u8, start: &VcpuStart) -> Result<Self> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(Error::kvm(format!("KVM_CREATE_VCPU {index}")))?;
        let mut cpuid = cpuid.clone();
        cpuid::normalize(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        msr::setup(&fd)?;
        interrupts::setup(&fd)?;
        if let VcpuStart::LongMode(registers) = start {
            regs::setup(&fd, registers)?;
            // KVM holds application processors in "wait for SIPI"; a vCPU given its own entry
            // point must run now.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(Vcpu { index, fd })
    }

    /// The vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Starts the vCPU on its own thread.
    pub fn start(
        self,
        buses: Arc<IoBuses>,
        exit: ExitHandle,
        stop: Arc<AtomicBool>,
    ) -> Result<VcpuThread> {
        install_kick_handler()?;
        let index = self.index;
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&buses, &exit, &stop))
            .map_err(Error::io(format!("spawning vCPU {index}")))?;
        Ok(VcpuThread { index, handle })
    }

    fn run(mut self, buses: &IoBuses, exit: &ExitHandle, stop: &AtomicBool) {
        let index = self.index;
        while !stop.load(Ordering::Acquire) {
            let outcome = match self.fd.run() {
                Ok(vcpu_exit) => handle_exit(index, vcpu_exit, buses),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: re-check the stop flag. Clear immediate_exit in case it was used.
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => Some(ExitReason::Error(format!("vCPU {index}: KVM_RUN: {e}"))),
            };
            if let Some(reason) = outcome {
                exit.request(reason);
                break;
            }
        }
        tracing::debug!("vCPU {index} stopped");
    }
}

/// Handles one exit; `Some` ends the VM.
fn handle_exit(index: u8, vcpu_exit: VcpuExit<'_>, buses: &IoBuses) -> Option<ExitReason> {
    match vcpu_exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                // Nothing decodes the port: the bus floats high.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                tracing::debug!("vCPU {index}: read of unclaimed MMIO {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
            }
        }
        VcpuExit::Hlt => {
            // With the in-kernel irqchip KVM handles HLT itself; seeing it means the guest
            // halted with nothing to wake it. Yield instead of spinning.
            std::thread::sleep(Duration::from_millis(1));
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => return Some(ExitReason::TripleFault),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                other => ExitReason::Error(format!("vCPU {index}: system event {other}")),
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: entry failed (reason {reason:#x}, host cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: KVM internal error"
            )))
        }
        other => {
            return Some(ExitReason::Error(format!(
                "vCPU {index}: unexpected exit {other:?}"
            )))
        }
    }
    None
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    index: u8,
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Kicks the thread out of `KVM_RUN` until it notices the stop flag, then joins it.
    /// The caller must have set the flag.
    pub fn stop(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() {
            if Instant::now() > deadline {
                return Err(Error::Vcpu {
                    index: usize::from(self.index),
                    message: "did not stop".into(),
                });
            }
            // The kick can land just before the thread enters KVM_RUN and be lost; repeat it.
            if let Err(e) = self.handle.kill(kick_signal()) {
                tracing::debug!("kicking vCPU {}: {e}", self.index);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.handle.join().map_err(|_| Error::Vcpu {
            index: usize::from(self.index),
            message: "the vCPU thread panicked".into(),
        })
    }
}
