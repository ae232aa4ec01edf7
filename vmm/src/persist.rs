//! The one shape every part of a checkpoint is saved and loaded through.
//!
//! Each part of the VM a checkpoint holds (the VM's interrupt controllers and clocks, each
//! vCPU, guest memory's layout, the virtio-mmio transports, the virtio-blk disks, the serial
//! console) implements [`Persist`] in the `persist.rs` beside it, and the checkpoint code
//! only goes through the trait. It follows Firecracker's `Persist<'a>` (`save` gives a
//! serialisable state, `restore` takes it back), shaped to what this VMM does: a revert
//! loads a checkpoint *into the running VM's objects* (whose file descriptors KVM already
//! knows: irqfds, ioeventfds, memory slots), so `restore` works in place rather than
//! building a new object, and `check` lets the checkpoint code refuse a checkpoint that
//! does not fit before anything has changed.
//!
//! KVM objects are driven through shared references (their ioctls take `&self`), and the
//! devices the vCPU threads drive sit behind a mutex; so the trait takes `&self`, and the
//! devices implement it on their mutex (locking it for the call).

use crate::error::Result;

/// A part of the VM that a checkpoint saves and loads back in place.
pub trait Persist {
    /// What a checkpoint stores of it (serialised into the manifest's machine state).
    type State;
    /// What [`Persist::save`] needs besides the part itself (a vCPU's MSR list, ...).
    type SaveArgs<'a>;
    /// What [`Persist::restore`] needs besides the state (memory files, first load, ...).
    type RestoreArgs<'a>;

    /// Captures the part's state. The VM is paused: vCPUs outside `KVM_RUN`, devices
    /// quiesced.
    fn save(&self, args: Self::SaveArgs<'_>) -> Result<Self::State>;

    /// Checks that `state` fits this part, changing nothing; the error says what differs.
    /// Every part of a checkpoint is checked before any is restored, so a checkpoint that
    /// does not fit leaves the VM as it was.
    fn check(&self, state: &Self::State) -> Result<()>;

    /// Loads `state` into the part, in place. The VM is paused; devices stay quiesced until
    /// the checkpoint code resumes them.
    fn restore(&self, args: Self::RestoreArgs<'_>, state: &Self::State) -> Result<()>;
}
