//! The embedding examples in `examples/` run as tests, so CI keeps them working: each is
//! compiled into this test as a module and its `main` called. The two that boot a VM need a
//! usable /dev/kvm: without one they print why and pass, unless `SNAPVMM_REQUIRE_KVM=1`.

use test_support::require::have_kvm;

#[path = "../examples/restore_checkpoint.rs"]
mod restore_checkpoint;
#[path = "../examples/snapshot_with_memory.rs"]
mod snapshot_with_memory;
#[path = "../examples/vhost_user_commit.rs"]
mod vhost_user_commit;

#[test]
fn example_snapshot_with_memory() {
    if !have_kvm("example_snapshot_with_memory") {
        return;
    }
    snapshot_with_memory::main().unwrap();
}

#[test]
fn example_restore_checkpoint() {
    if !have_kvm("example_restore_checkpoint") {
        return;
    }
    restore_checkpoint::main().unwrap();
}

#[test]
fn example_vhost_user_commit() {
    vhost_user_commit::main().unwrap();
}
