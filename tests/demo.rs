//! `snapvmm demo`, the README's main command: it must succeed end to end (guest-verified
//! data, clean images) and report every step, as a table and as JSON.
//!
//! Needs a usable /dev/kvm: without one the KVM tests print why and pass, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes them fail.

use std::process::Command;
use std::time::Duration;

use test_support::require::have_kvm;
use test_support::vm::{assert_success, run_with_timeout};

const TIMEOUT: Duration = Duration::from_secs(300);

/// A command running the `snapvmm` binary under test.
fn snapvmm() -> Command {
    test_support::snapvmm_binary!().command()
}

/// The steps, in order, as the table names them.
const STEPS: [&str; 10] = [
    "create disk",
    "boot micro-guest",
    "guest I/O under way",
    "live snapshot s1",
    "blockpull vda",
    "live snapshot s2",
    "blockcommit --active --pivot",
    "guest verify + stop",
    "snapvmm img check",
    "qemu-img check",
];

#[test]
fn demo_prints_every_step_and_succeeds() {
    if !have_kvm("demo_prints_every_step_and_succeeds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("demo");
    let mut command = snapvmm();
    command.args(["demo", "--size", "256k", "--dir"]).arg(&work);
    let stdout = assert_success(&run_with_timeout(command, TIMEOUT));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("step") && lines[0].contains("time"),
        "{stdout}"
    );
    for (i, step) in STEPS.iter().enumerate() {
        let line = lines.get(i + 1).copied().unwrap_or_default();
        assert!(
            line.starts_with(step) && line.contains(" ms"),
            "row {} should be {step:?}:\n{stdout}",
            i + 1
        );
    }
    let row = |step: &str| lines.iter().find(|l| l.starts_with(step)).unwrap();
    assert!(row("guest verify + stop").contains("verify ok"), "{stdout}");
    assert!(
        row("snapvmm img check").contains("3 images clean"),
        "{stdout}"
    );
    assert!(lines.iter().any(|l| l.starts_with("total")), "{stdout}");
    assert!(lines.contains(&"demo ok"), "{stdout}");

    // --dir keeps the images: the disk ends up on s1, which stands alone after the stream.
    for file in [
        "base.qcow2",
        "base.s1.qcow2",
        "base.s1.s2.qcow2",
        "serial.log",
    ] {
        assert!(work.join(file).exists(), "{file} missing");
    }
    let serial = std::fs::read_to_string(work.join("serial.log")).unwrap();
    assert!(serial.contains("io-loop verify ok"), "{serial}");
    assert!(!serial.contains("io error"), "{serial}");
    let s1 = storage::open(
        &work.join("base.s1.qcow2"),
        &storage::OpenOptions::default(),
    )
    .unwrap();
    assert!(s1.backing().is_none(), "s1 still has a backing file");

    // A second run in the same directory refuses to overwrite the images.
    let mut again = snapvmm();
    again.args(["demo", "--dir"]).arg(&work);
    let output = run_with_timeout(again, TIMEOUT);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("base.qcow2 exists"), "{stderr}");
}

#[test]
fn demo_json_report() {
    if !have_kvm("demo_json_report") {
        return;
    }
    let mut command = snapvmm();
    command.args(["demo", "--size", "256k", "--json"]);
    let stdout = assert_success(&run_with_timeout(command, TIMEOUT));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["ok"], true, "{stdout}");
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, STEPS);
    assert!(steps.iter().all(|s| s["ms"].as_f64().unwrap() >= 0.0));
    // The guest's request count grows from step to step: I/O went on throughout.
    let ops: Vec<u64> = steps
        .iter()
        .filter_map(|s| s["guest_ops"].as_u64())
        .collect();
    // (The last, the count at the guest's final verify, may equal the one before.)
    let during = &ops[..ops.len().saturating_sub(1)];
    assert!(ops.len() >= 6, "{ops:?}");
    assert!(during.windows(2).all(|w| w[0] < w[1]), "{ops:?}");
    assert!(ops[ops.len() - 1] >= ops[ops.len() - 2], "{ops:?}");
    // Without --keep the temporary directory is gone.
    assert_eq!(report["kept"], false);
    let dir = report["dir"].as_str().unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

#[test]
fn demo_refuses_a_disk_too_small() {
    // No KVM needed: refused before anything starts.
    let mut command = snapvmm();
    command.args(["demo", "--size", "4k"]);
    let output = run_with_timeout(command, TIMEOUT);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--size 4096") && stderr.contains("64 KiB"),
        "{stderr}"
    );
}
