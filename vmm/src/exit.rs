//! How a VM ends: the first reason reported wins, and the VMM's main thread is woken.

use std::sync::Arc;

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 0xFE, or KVM_SYSTEM_EVENT_RESET): a clean end.
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The VMM was asked to stop the VM.
    Stopped,
    /// A vCPU or device failed; the message says which and why.
    Error(String),
}

impl ExitReason {
    /// Whether the guest ended as it intended to.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Reset | ExitReason::PowerOff | ExitReason::Stopped
        )
    }
}

struct Inner {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

/// A cloneable handle through which vCPUs and devices end the VM.
#[derive(Clone)]
pub struct ExitHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitHandle")
            .field("reason", &*self.inner.reason.lock())
            .finish()
    }
}

impl ExitHandle {
    /// A handle with no exit requested yet.
    pub fn new() -> Result<Self> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(Error::io("creating the exit eventfd"))?;
        Ok(ExitHandle {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                event,
            }),
        })
    }

    /// Asks the VM to stop for `reason`; later requests keep the first reason.
    pub fn request(&self, reason: ExitReason) {
        let mut current = self.inner.reason.lock();
        if current.is_none() {
            *current = Some(reason);
            // The counter only wakes the waiter; a full counter (impossible at 1 per VM)
            // would still leave it readable.
            let _ = self.inner.event.write(1);
        }
    }

    /// The reason, once one was requested.
    pub fn reason(&self) -> Option<ExitReason> {
        self.inner.reason.lock().clone()
    }

    /// Whether an exit was requested.
    pub fn is_requested(&self) -> bool {
        self.inner.reason.lock().is_some()
    }

    /// The event fd that becomes readable on the first request.
    pub fn event(&self) -> &EventFd {
        &self.inner.event
    }

    /// Blocks until an exit is requested, then returns its reason.
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            let mut fd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.inner.event),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `fd` is a valid pollfd array of length 1 for the duration of the call.
            unsafe { libc::poll(&mut fd, 1, 1000) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let exit = ExitHandle::new().unwrap();
        assert!(!exit.is_requested());
        exit.request(ExitReason::Reset);
        exit.request(ExitReason::Error("late".into()));
        assert_eq!(exit.wait(), ExitReason::Reset);
        assert!(ExitReason::Reset.is_clean());
        assert!(!ExitReason::TripleFault.is_clean());
    }
}
