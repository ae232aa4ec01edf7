//! Shim: these helpers now live in the `test_support` crate (`test-support/`). Kept only so
//! that `tests/snapshot_tree.rs`, edited on another branch while this one moved the helpers,
//! still builds; the lead removes it after the merge and points the file at `test_support`.
#![allow(unused_imports)]

pub use test_support::image::{open_ro, open_rw, read_all, snapvmm_create, write_raw};
pub use test_support::pattern::{
    assert_same, compressible, holds_tag, pattern, sector_tag, tagged_sectors, TAG_SECTOR,
};
pub use test_support::qemu::{
    assert_check_clean, assert_check_consistent, assert_qemu_compare_equal, qemu_check,
    qemu_create, qemu_img, qemu_io, qemu_read_all, run, CheckResult,
};
pub use test_support::reference::{apply, mixed_ops, Model, NullDevice, Op};
pub use test_support::require::{have_qemu as need_qemu, qemu_available};
