//! Issue 13, finding 3: after a snapshot froze a disk's image, starting a VM on that image
//! again (the path the user first gave) must not let the guest write into it. `snapvmm run`
//! refuses, with or without an API socket, naming the disk's current top, and the frozen
//! image stays byte for byte what the snapshot froze.

use std::time::Duration;

use test_support::require::have_kvm;
use test_support::vm::{run_with_timeout, Snapvmm};

fn snapvmm() -> Snapvmm {
    test_support::snapvmm_binary!()
}

#[test]
fn run_refuses_a_writable_disk_on_a_frozen_image() {
    if !have_kvm("run_refuses_a_writable_disk_on_a_frozen_image") {
        return;
    }
    let binary = snapvmm();
    let vm = binary.start_vm(1 << 20);
    vm.wait_progress();
    vm.ctl_ok(&["snapshot-create-as", "s1", "--disk-only"]);
    let (dir, _) = vm.shutdown();
    let base = dir.path().join("base.qcow2");
    let frozen = std::fs::read(&base).expect("read the frozen image");

    for with_api in [false, true] {
        let mut command = binary.command();
        command
            .arg("run")
            .args(["--guest", "builtin:io-loop", "--serial", "null", "--disk"])
            .arg(format!("path={}", base.display()));
        if with_api {
            command
                .arg("--api-socket")
                .arg(dir.path().join("again.sock"));
        }
        let output = run_with_timeout(command, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "a VM ran on the image s1 froze (api: {with_api}): {stderr}"
        );
        assert!(
            stderr.contains("base.s1.qcow2"),
            "the error names the disk's current top (api: {with_api}): {stderr}"
        );
        assert_eq!(
            std::fs::read(&base).expect("read the frozen image"),
            frozen,
            "the frozen image changed (api: {with_api})"
        );
    }
}
