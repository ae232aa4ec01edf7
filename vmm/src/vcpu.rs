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

pub mod persist;

/// A vCPU's file descriptor, shared between its thread (which holds the lock only around
/// `KVM_RUN` and the exit it handles) and the checkpoint code (which takes it while the vCPU
/// is parked).
pub type SharedVcpuFd = Arc<parking_lot::Mutex<VcpuFd>>;

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
    fd: SharedVcpuFd,
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
        Ok(Vcpu {
            index,
            fd: Arc::new(parking_lot::Mutex::new(fd)),
        })
    }

    /// Creates vCPU `index` with nothing set up: a restore writes its whole state.
    pub fn create_bare(vm: &Vm, index: u8) -> Result<Self> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(Error::kvm(format!("KVM_CREATE_VCPU {index}")))?;
        Ok(Vcpu {
            index,
            fd: Arc::new(parking_lot::Mutex::new(fd)),
        })
    }

    /// Creates vCPU `index` of `count` with only its CPUID set (normalised from `cpuid`, as
    /// [`Vcpu::new`] sets it): a VM shell's vCPU, whose restore then finds the CPUID it
    /// would set already there when the checkpoint came from this host.
    pub fn create_with_cpuid(vm: &Vm, cpuid: &CpuId, index: u8, count: u8) -> Result<Self> {
        let vcpu = Self::create_bare(vm, index)?;
        let mut cpuid = cpuid.clone();
        cpuid::normalize(&mut cpuid, index, count);
        vcpu.fd
            .lock()
            .set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        Ok(vcpu)
    }

    /// The vCPU's file descriptor, for saving and loading its state while it is parked.
    pub fn shared_fd(&self) -> SharedVcpuFd {
        self.fd.clone()
    }

    /// The vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Starts the vCPU on its own thread, held outside `KVM_RUN` whenever `gate` is paused.
    pub fn start(
        self,
        buses: Arc<IoBuses>,
        exit: ExitHandle,
        stop: Arc<AtomicBool>,
        gate: Arc<PauseGate>,
    ) -> Result<VcpuThread> {
        install_kick_handler()?;
        let index = self.index;
        let thread_gate = gate.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                crate::confine::enter_or_abort(crate::confine::ThreadKind::Vcpu);
                self.run(&buses, &exit, &stop, &thread_gate)
            })
            .map_err(Error::io(format!("spawning vCPU {index}")))?;
        gate.register(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
        Ok(VcpuThread { index, handle })
    }

    fn run(self, buses: &IoBuses, exit: &ExitHandle, stop: &AtomicBool, gate: &PauseGate) {
        let index = self.index;
        while !stop.load(Ordering::Acquire) {
            if gate.is_paused() {
                if let Some(reason) = self.complete_pending_io(buses) {
                    exit.request(reason);
                    break;
                }
                gate.park(stop);
                continue;
            }
            let mut fd = self.fd.lock();
            let outcome = match fd.run() {
                Ok(vcpu_exit) => handle_exit(index, vcpu_exit, buses),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: re-check the stop flag. Clear immediate_exit in case it was used.
                    fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => Some(ExitReason::Error(format!("vCPU {index}: KVM_RUN: {e}"))),
            };
            drop(fd);
            if let Some(reason) = outcome {
                exit.request(reason);
                break;
            }
        }
        tracing::debug!("vCPU {index} stopped");
    }

    /// Lets KVM finish an instruction whose port or MMIO read user space just answered
    /// (KVM completes it on the next `KVM_RUN`): with `immediate_exit` set, `KVM_RUN`
    /// completes it and returns without entering the guest. Without this, registers saved
    /// while parked would miss the read's result.
    fn complete_pending_io(&self, buses: &IoBuses) -> Option<ExitReason> {
        let mut fd = self.fd.lock();
        // A string instruction may exit again once per element; bound the loop.
        for _ in 0..4096 {
            fd.set_kvm_immediate_exit(1);
            let result = fd.run();
            match result {
                Ok(vcpu_exit) => {
                    if let Some(reason) = handle_exit(self.index, vcpu_exit, buses) {
                        fd.set_kvm_immediate_exit(0);
                        return Some(reason);
                    }
                }
                Err(_) => break,
            }
        }
        fd.set_kvm_immediate_exit(0);
        None
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

/// Holds vCPU threads outside `KVM_RUN` while the VM is paused (the API's `/vm/pause`).
///
/// [`PauseGate::pause`] raises the gate and kicks every registered vCPU thread until each
/// one is parked; [`PauseGate::resume`] lets them run again.
#[derive(Debug, Default)]
pub struct PauseGate {
    paused: parking_lot::Mutex<bool>,
    changed: parking_lot::Condvar,
    parked: std::sync::atomic::AtomicUsize,
    /// Threads to kick; emptied by [`PauseGate::forget_threads`] before any is joined.
    threads: parking_lot::Mutex<Vec<libc::pthread_t>>,
}

impl PauseGate {
    /// An open gate with no threads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the vCPUs are asked to stay paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock()
    }

    fn register(&self, thread: libc::pthread_t) {
        self.threads.lock().push(thread);
    }

    /// Forgets every thread and opens the gate; called before the vCPU threads are joined,
    /// so that no later pause kicks a thread that is gone.
    pub fn forget_threads(&self) {
        self.threads.lock().clear();
        self.resume();
    }

    /// Pauses every vCPU, returning once all are parked; on timeout the gate opens again
    /// and the error says so.
    pub fn pause(&self, timeout: Duration) -> Result<()> {
        *self.paused.lock() = true;
        let deadline = Instant::now() + timeout;
        loop {
            let threads = self.threads.lock();
            if self.parked.load(Ordering::Acquire) >= threads.len() {
                return Ok(());
            }
            for &thread in threads.iter() {
                // SAFETY: `thread` was not joined: joins happen only after
                // `forget_threads` emptied this list, under the lock held here.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            let wanted = threads.len();
            drop(threads);
            // A kicked vCPU parks within microseconds: poll briefly before sleeping, so a
            // checkpoint's stop is not rounded up to the sleep's millisecond.
            let spin_until = Instant::now() + Duration::from_micros(500);
            while Instant::now() < spin_until {
                if self.parked.load(Ordering::Acquire) >= wanted {
                    return Ok(());
                }
                std::thread::yield_now();
            }
            if Instant::now() > deadline {
                self.resume();
                return Err(Error::Vcpu {
                    index: 0,
                    message: format!("not every vCPU paused within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Closes the gate without kicking anyone: vCPU threads started afterwards park before
    /// their first `KVM_RUN` (a VM restored paused).
    pub fn close(&self) {
        *self.paused.lock() = true;
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        *self.paused.lock() = false;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread: waits while the gate is closed and the VM not stopping.
    fn park(&self, stop: &AtomicBool) {
        self.parked.fetch_add(1, Ordering::AcqRel);
        let mut paused = self.paused.lock();
        while *paused && !stop.load(Ordering::Acquire) {
            self.changed
                .wait_for(&mut paused, Duration::from_millis(10));
        }
        drop(paused);
        self.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn pause_gate_parks_and_releases_threads() {
        install_kick_handler().unwrap();
        let gate = Arc::new(PauseGate::new());
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(0));
        let handle = std::thread::spawn({
            let (gate, stop, counter) = (gate.clone(), stop.clone(), counter.clone());
            move || {
                while !stop.load(Ordering::Acquire) {
                    if gate.is_paused() {
                        gate.park(&stop);
                        continue;
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    // Stands in for KVM_RUN: a kick ends the sleep early.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        gate.register(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
        gate.pause(Duration::from_secs(5)).unwrap();
        assert!(gate.is_paused());
        let held = counter.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(counter.load(Ordering::Relaxed), held, "ran while paused");
        gate.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter.load(Ordering::Relaxed) == held {
            assert!(Instant::now() < deadline, "did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.pause(Duration::from_secs(5)).unwrap();
        // Stopping releases a paused thread.
        stop.store(true, Ordering::Release);
        gate.forget_threads();
        handle.join().unwrap();
    }
}
