//! Shim: these helpers now live in the `test_support` crate (`test-support/`). Kept only so
//! that `tests/live_snapshot.rs`, `tests/live_jobs.rs` and `tests/live_crash.rs`, edited on
//! other branches while this one moved the helpers, still build; the lead removes it after
//! the merge and points those files at `test_support`.
#![allow(unused_imports)]

use std::path::Path;

pub use test_support::image::open_rw as open;
pub use test_support::model::{fill, verify, Model, Writers};
pub use test_support::pattern::{block_data, generation_of, BLOCK};
pub use test_support::qemu::{
    assert_check_clean as assert_qemu_check_clean,
    assert_check_consistent as assert_qemu_check_consistent, assert_qemu_chain, qemu_chain,
};
pub use test_support::require::have_qemu;

/// The old form with a cluster size (every caller passes the default 64 KiB); its
/// replacement is `test_support::image::qcow2(path, size, backing)`.
pub fn qcow2(path: &Path, size: u64, cluster_size: u64, backing: Option<&Path>) {
    let backing = backing.map(|b| b.display().to_string());
    test_support::image::snapvmm_create(
        path,
        Some(size),
        cluster_size,
        3,
        16,
        backing.as_deref().map(|b| (b, storage::ImageFormat::Qcow2)),
    );
}
