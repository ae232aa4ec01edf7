//! `snapvmm bench`: a `--quick` run (with no QEMU on PATH) writes valid JSON and a
//! self-contained HTML page with its plots, and says "not installed" for the peers; and
//! the README's performance section is the committed run's JSON, rendered.
//!
//! Without a usable /dev/kvm the guest figures are recorded as skipped; the reports must be
//! valid all the same.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use test_support::vm::{assert_success, run_with_timeout};

/// A `snapvmm` command.
fn snapvmm() -> std::process::Command {
    test_support::snapvmm_binary!().command()
}

const TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn quick_run_writes_json_and_html_and_says_not_installed_without_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // A PATH with nothing on it: qemu-img, qemu-storage-daemon and QEMU are "not installed".
    let empty_path = dir.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    let json = dir.path().join("bench.json");
    let html = dir.path().join("bench.html");
    let mut command = snapvmm();
    command
        .env("PATH", &empty_path)
        .args(["bench", "--quick", "--memory", "64M", "--dir"])
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html);
    let stdout = assert_success(&run_with_timeout(command, TIMEOUT));
    assert!(stdout.contains("machine: "), "{stdout}");
    assert!(stdout.contains("not installed"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["format"], 1);
    assert_eq!(report["quick"], true);
    for key in ["cpu", "cores", "kernel", "kvm", "filesystem"] {
        assert!(!report["machine"][key].is_null(), "machine.{key} missing");
    }
    let figures = report["figures"].as_array().unwrap();
    let by_id = |id: &str| {
        figures
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("no figure {id}"))
    };
    for id in [
        "jobs.stream.offline.qemu-img",
        "jobs.commit.offline.qemu-img",
        "jobs.stream.live.qsd",
        "internal.create.qemu-img",
        "cow.write4k.qemu-img",
        "switch.qemu.qmp",
    ] {
        assert_eq!(by_id(id)["status"], "not-installed", "{id}");
    }
    // snapvmm's own storage figures need no KVM and no peer: measured, with a summary
    // over all samples.
    for id in [
        "switch.host.1x1GiB",
        "switch.host.8x1GiB",
        "jobs.stream.offline.snapvmm",
        "jobs.commit.live.snapvmm",
        "internal.create.snapvmm",
        "cow.write4k.snapvmm",
    ] {
        let f = by_id(id);
        assert_eq!(f["status"], "measured", "{id}: {}", f["note"]);
        let n = f["samples"].as_array().unwrap().len();
        assert!(n > 0);
        assert_eq!(f["summary"]["n"], n, "{id}");
        assert!(f["summary"]["p50"].as_f64().unwrap() > 0.0, "{id}");
    }
    for f in figures {
        let status = f["status"].as_str().unwrap();
        assert!(
            ["measured", "not-installed", "skipped", "failed"].contains(&status),
            "{f}"
        );
        assert_ne!(status, "failed", "{} failed: {}", f["id"], f["note"]);
    }
    // Ratios need both sides: none against a missing peer.
    let comparisons = report["comparisons"].as_array().unwrap();
    assert!(comparisons
        .iter()
        .filter(|c| c["peer"] == "qemu-img")
        .all(|c| c["ratio"].is_null()));
    assert!(!report["gaps"].as_array().unwrap().is_empty());

    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for section in ["machine", "results", "comparisons", "goals", "plots"] {
        assert!(
            page.contains(&format!("id=\"{section}\"")),
            "no {section} section"
        );
    }
    assert!(page.matches("<svg").count() >= 2, "too few plots");
    assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
    assert!(page.matches("<figcaption>").count() >= 2);
    assert!(page.contains("samples"), "captions state sample counts");
    assert!(!page.contains("src=\"http"), "self-contained");
    assert!(page.contains("not installed"));
}

/// The README's performance section is `snapvmm bench --markdown` of the committed run.
#[test]
fn readme_performance_section_is_the_committed_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = root.join("src/bench/readme-run.json");
    let mut command = snapvmm();
    command
        .args(["bench", "--markdown", "-", "--from-json"])
        .arg(&run);
    let section = assert_success(&run_with_timeout(command, Duration::from_secs(60)));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&section),
        "README.md's performance section differs from the committed run; regenerate it:\n  \
         snapvmm bench --from-json src/bench/readme-run.json --markdown - \n\
         and paste it between the markers. Expected:\n{section}"
    );
}
