//! Helpers shared by snapvmm's whole-system tests (`tests/`, `storage/tests/`) and benches
//! (`benches/`). Not published.
//!
//! - [`require`]: whether a test can run on this machine (QEMU's tools, KVM, iasl), and the one
//!   place that turns a missing tool into a skip or, under `SNAPVMM_REQUIRE_*=1`, a failure.
//! - [`qemu`]: running qemu-img and qemu-io and judging their results (`qemu-img check`,
//!   `compare`, backing chains).
//! - [`pattern`]: deterministic data: pseudo-random bytes, tagged sectors, self-verifying
//!   blocks, and a byte comparison that names the first difference.
//! - [`image`]: creating, opening and reading images through snapvmm's storage crate.
//! - [`reference`](mod@reference): a byte-for-byte reference of a disk and the operation sequences applied
//!   alike to it and to a device.
//! - [`console`]: a guest's serial console captured in memory, and waiting on it.
//! - [`model`]: what each block of a live disk must hold while writer threads run.
//! - [`qemu_vm`]: a real Linux under QEMU-TCG on `snapvmm vhost-user-blk` (guest fixture, ext4
//!   base image, the daemon and `snapvmm ctl`, the QEMU command line, console watching).
//! - `vm` (feature `vm`): running the `snapvmm` binary, `snapvmm ctl`, and a VM child process.
#![warn(missing_docs)]

pub mod console;
pub mod image;
pub mod model;
pub mod pattern;
pub mod qemu;
pub mod qemu_vm;
pub mod reference;
pub mod require;
#[cfg(feature = "vm")]
pub mod vm;

/// A [`vm::Snapvmm`] for the `snapvmm` binary built by the package whose integration test or
/// bench expands this macro: cargo sets `CARGO_BIN_EXE_snapvmm` only while compiling those, so
/// the path has to be read there, not in this crate.
#[cfg(feature = "vm")]
#[macro_export]
macro_rules! snapvmm_binary {
    () => {
        $crate::vm::Snapvmm::new(env!("CARGO_BIN_EXE_snapvmm"))
    };
}
