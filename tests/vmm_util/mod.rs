//! Shim: these helpers now live in the `test_support` crate (`test-support/`, module `vm`).
//! Kept only so that `tests/api_e2e.rs`, `tests/api_ctl.rs` and `tests/vmm_checkpoint.rs`,
//! edited on other branches while this one moved the helpers, still build; the lead removes
//! it after the merge and points those files at `test_support` (`snapvmm_binary!()` gives the
//! binary these adapters fill in).
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::process::{Command, Output};

pub use test_support::image::qcow2;
pub use test_support::qemu::assert_check_clean_if_available as qemu_img_check;
pub use test_support::require::have_kvm as kvm_or_skip;
pub use test_support::vm::{assert_success, counters, last_counter, run_with_timeout};

/// The binary under test.
pub const SNAPVMM: &str = env!("CARGO_BIN_EXE_snapvmm");

fn binary() -> test_support::vm::Snapvmm {
    test_support::snapvmm_binary!()
}

/// A `snapvmm` command.
pub fn snapvmm() -> Command {
    binary().command()
}

/// `snapvmm ctl --api-socket SOCKET ARGS`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    binary().ctl(socket, args)
}

/// `snapvmm ctl` that must succeed; returns its stdout.
pub fn ctl_ok(socket: &Path, args: &[&str], context: impl FnOnce() -> String) -> String {
    binary().ctl_ok(socket, args, context)
}

/// `test_support::vm::RunningVm` with the old constructors, which knew the binary.
pub struct RunningVm(test_support::vm::RunningVm);

impl RunningVm {
    /// See `Snapvmm::start_vm`.
    pub fn start(disk_size: u64) -> RunningVm {
        RunningVm(binary().start_vm(disk_size))
    }

    /// See `Snapvmm::launch_vm`.
    pub fn launch(dir: tempfile::TempDir, guest: &str, disk: &Path) -> RunningVm {
        RunningVm(binary().launch_vm(dir, guest, disk))
    }

    /// See `test_support::vm::RunningVm::shutdown`.
    pub fn shutdown(self) -> (tempfile::TempDir, String) {
        self.0.shutdown()
    }
}

impl std::ops::Deref for RunningVm {
    type Target = test_support::vm::RunningVm;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
