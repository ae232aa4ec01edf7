//! `snapvmm img commit` and `snapvmm img rebase` against qemu-img on identical chains.
//!
//! Each test builds a chain with qemu-img/qemu-io, copies it, runs qemu-img on one copy and
//! snapvmm on the other, and compares what the images read as (`qemu-img compare`), their
//! backing chains, and `qemu-img check`.

use std::path::Path;
use std::process::Command;

use test_support::qemu::{assert_check_clean, ok_in};
use test_support::require::have_qemu;

const SNAPVMM: &str = env!("CARGO_BIN_EXE_snapvmm");

/// base (64 KiB clusters) <- mid (16 KiB) <- top, with overlapping data, zero writes and a
/// sub-cluster write in each, under `dir`; then the same files copied to `dir/q/`.
fn chain(dir: &Path) -> std::path::PathBuf {
    let io = |file: &str, cmd: &str| ok_in(dir, "qemu-io", &["-f", "qcow2", "-c", cmd, file]);
    ok_in(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    ok_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    );
    ok_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io("base.qcow2", "write -P 0x11 0 2M");
    io("mid.qcow2", "write -P 0x22 512k 1M");
    io("mid.qcow2", "write -z 1536k 64k");
    io("top.qcow2", "write -P 0x33 1M 1M");
    io("top.qcow2", "write -P 0x44 3M 4k");
    io("top.qcow2", "write -z 64k 64k");
    let q = dir.join("q");
    std::fs::create_dir(&q).unwrap();
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(dir.join(f), q.join(f)).unwrap();
    }
    q
}

fn same_contents(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn backing_of(path: &Path) -> Option<String> {
    let out = ok_in(
        path.parent().unwrap(),
        "qemu-img",
        &["info", "-U", "--output=json", path.to_str().unwrap()],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["backing-filename"].as_str().map(str::to_string)
}

/// Whether `top` holds any data itself (qemu-img map depth 0).
fn holds_data(top: &Path) -> bool {
    let out = ok_in(
        top.parent().unwrap(),
        "qemu-img",
        &["map", "-U", "--output=json", top.to_str().unwrap()],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .any(|e| e["depth"] == 0 && e["data"] == true)
}

#[test]
fn img_commit_matches_qemu_img_and_empties_the_top() {
    if !have_qemu("img_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = chain(d);
    let out = ok_in(d, SNAPVMM, &["img", "commit", "-p", "top.qcow2"]);
    assert!(out.contains("Image committed."), "{out}");
    ok_in(&q, "qemu-img", &["commit", "-q", "top.qcow2"]);
    for f in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        same_contents(&d.join(f), &q.join(f));
        assert_check_clean(&d.join(f));
    }
    assert!(!holds_data(&d.join("top.qcow2")), "top was not emptied");
    assert_eq!(
        backing_of(&d.join("top.qcow2")).as_deref(),
        Some("mid.qcow2")
    );
}

#[test]
fn img_commit_with_base_matches_qemu_img() {
    if !have_qemu("img_commit_base") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = chain(d);
    ok_in(
        d,
        SNAPVMM,
        &["img", "commit", "-q", "-b", "base.qcow2", "top.qcow2"],
    );
    ok_in(
        &q,
        "qemu-img",
        &["commit", "-q", "-b", "base.qcow2", "top.qcow2"],
    );
    // BASE now reads as TOP did; TOP still does (not emptied).
    same_contents(&d.join("base.qcow2"), &q.join("base.qcow2"));
    same_contents(&d.join("top.qcow2"), &q.join("base.qcow2"));
    assert!(holds_data(&d.join("top.qcow2")));
    assert_check_clean(&d.join("base.qcow2"));
}

#[test]
fn img_rebase_safe_standalone_and_onto_base_keep_contents() {
    if !have_qemu("img_rebase") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = chain(d);
    // Onto base, skipping mid: what mid held is copied into top.
    ok_in(
        d,
        SNAPVMM,
        &[
            "img",
            "rebase",
            "-p",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    same_contents(&d.join("top.qcow2"), &q.join("top.qcow2"));
    assert_eq!(
        backing_of(&d.join("top.qcow2")).as_deref(),
        Some("base.qcow2")
    );
    assert_check_clean(&d.join("top.qcow2"));
    // Standalone, beside qemu-img doing the same.
    ok_in(d, SNAPVMM, &["img", "rebase", "-b", "", "top.qcow2"]);
    ok_in(&q, "qemu-img", &["rebase", "-q", "-b", "", "top.qcow2"]);
    same_contents(&d.join("top.qcow2"), &q.join("top.qcow2"));
    assert_eq!(backing_of(&d.join("top.qcow2")), None);
    assert_check_clean(&d.join("top.qcow2"));
}

#[test]
fn img_rebase_unsafe_rewrites_only_the_header() {
    if !have_qemu("img_rebase_unsafe") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    ok_in(
        d,
        SNAPVMM,
        &[
            "img",
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    ok_in(
        d,
        "qemu-img",
        &[
            "rebase",
            "-q",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "q/top.qcow2",
        ],
    );
    same_contents(&d.join("top.qcow2"), &d.join("q/top.qcow2"));
    assert_eq!(
        backing_of(&d.join("top.qcow2")).as_deref(),
        Some("base.qcow2")
    );
    // mid's data is not copied: the contents changed, as -u means.
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(d.join("top.qcow2"))
        .arg(d.join("q/mid.qcow2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}
