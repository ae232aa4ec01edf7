//! The micro-guest under `snapvmm run`: virtio-blk I/O on a qcow2 chain and a raw disk, with
//! one and two vCPUs, checked from inside the guest (its serial output) and from the host
//! (the images' contents afterwards).
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use storage::OpenOptions;
use test_support::require::have_kvm;
use test_support::vm::assert_success;

/// Disks are small: on this host's software KVM every guest memory access is slow.
const DISK_SIZE: u64 = 256 * 1024;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A command running the `snapvmm` binary under test.
fn snapvmm() -> Command {
    test_support::snapvmm_binary!().command()
}

fn run_with_timeout(command: Command) -> Output {
    test_support::vm::run_with_timeout(command, RUN_TIMEOUT)
}

fn qcow2(path: &Path, backing: Option<&Path>) {
    test_support::image::qcow2(path, DISK_SIZE, backing);
}

fn raw(path: &Path, fill: u8) {
    std::fs::write(path, vec![fill; DISK_SIZE as usize]).unwrap();
}

fn read_image(path: &Path) -> Vec<u8> {
    let disk = storage::open(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut data = vec![0u8; disk.size() as usize];
    disk.read_at(&mut data, 0).unwrap();
    data
}

fn expected_pattern(seed: u64, disk: u64) -> Vec<u8> {
    let mut data = vec![0u8; DISK_SIZE as usize];
    vmm::guest::fill_pattern(&mut data, seed, disk, 1, 0);
    data
}

/// Runs `command` (stdout piped) until `enough` says so of a line of its stdout, then
/// kills it; returns the lines read. Fails if the output ends or stalls for [`RUN_TIMEOUT`].
fn lines_until(command: &mut Command, mut enough: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read on a thread so a silent guest cannot hang the test.
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receive.recv_timeout(left) {
            Ok(line) => {
                let done = enough(&line);
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the guest stopped short; its output:\n{}", lines.join("\n"));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// Each of `lines` must be a line of `stdout`, or begin one (followed by a space).
fn assert_lines(stdout: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            stdout
                .lines()
                .any(|l| l == *line || l.starts_with(&format!("{line} "))),
            "no {line:?} in:\n{stdout}"
        );
    }
}

struct Disks {
    _dir: tempfile::TempDir,
    base: PathBuf,
    top: PathBuf,
    second: PathBuf,
}

/// vda: a qcow2 overlay on a qcow2 base holding 0x5a everywhere; vdb: a raw file of 0x11.
fn disks() -> Disks {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let second = dir.path().join("second.raw");
    qcow2(&base, None);
    let image = storage::open(&base, &OpenOptions::default()).unwrap();
    image.write_at(&vec![0x5a; DISK_SIZE as usize], 0).unwrap();
    image.flush().unwrap();
    drop(image);
    qcow2(&top, Some(&base));
    raw(&second, 0x11);
    Disks {
        _dir: dir,
        base,
        top,
        second,
    }
}

#[test]
fn write_verify_on_a_qcow2_chain_and_a_raw_disk() {
    if !have_kvm("write_verify_on_a_qcow2_chain_and_a_raw_disk") {
        return;
    }
    let disks = disks();
    let mut command = snapvmm();
    command
        .args(["run", "--guest", "builtin:write-verify", "--seed", "7"])
        .arg("--disk")
        .arg(format!("path={}", disks.top.display()))
        .arg("--disk")
        .arg(format!(
            "path={},format=raw,queues=2",
            disks.second.display()
        ));
    let stdout = assert_success(&run_with_timeout(command));
    assert_lines(
        &stdout,
        &[
            "micro-guest: cpus 1 disks 2",
            "disk 0 id vda",
            "disk 1 id vdb",
            "disk 0 verify ok queues 1",
            "disk 1 verify ok queues 2",
            "verify ok",
        ],
    );
    assert!(!stdout.contains("io error"), "{stdout}");

    // The host sees exactly what the guest wrote, in the overlay; the base is untouched.
    assert!(
        read_image(&disks.top) == expected_pattern(7, 0),
        "vda content differs"
    );
    assert!(
        read_image(&disks.second) == expected_pattern(7, 1),
        "vdb content differs"
    );
    assert!(
        read_image(&disks.base).iter().all(|&b| b == 0x5a),
        "base was written"
    );
}

#[test]
fn two_vcpus_and_a_read_only_disk() {
    if !have_kvm("two_vcpus_and_a_read_only_disk") {
        return;
    }
    let disks = disks();
    let mut command = snapvmm();
    command
        .args([
            "run",
            "--guest",
            "builtin:write-verify",
            "--vcpus",
            "2",
            "--seed",
            "3",
        ])
        .arg("--disk")
        .arg(format!("path={},id=root", disks.top.display()))
        .arg("--disk")
        .arg(format!("path={},readonly=on", disks.second.display()));
    let stdout = assert_success(&run_with_timeout(command));
    assert_lines(
        &stdout,
        &[
            "micro-guest: cpus 2 disks 2",
            "disk 0 id root",
            "disk 1 read-only ok",
            "verify ok",
        ],
    );
    assert!(read_image(&disks.top) == expected_pattern(3, 0));
    assert!(
        read_image(&disks.second).iter().all(|&b| b == 0x11),
        "read-only disk written"
    );
}

#[test]
fn counter_counts_up_on_two_vcpus() {
    if !have_kvm("counter_counts_up_on_two_vcpus") {
        return;
    }
    let mut counters = Vec::new();
    let lines = lines_until(
        snapvmm().args([
            "run",
            "--guest",
            "builtin:counter",
            "--vcpus",
            "2",
            "--memory",
            "64",
        ]),
        |line| {
            if let Some(n) = line.strip_prefix("counter ") {
                counters.push(n.parse::<u64>().expect("counter value"));
            }
            counters.len() == 4
        },
    );
    assert!(
        lines
            .first()
            .is_some_and(|l| l == "micro-guest: cpus 2 disks 0"),
        "{lines:?}"
    );
    assert_eq!(counters, vec![1, 2, 3, 4], "{lines:?}");
}

#[test]
fn io_bench_reports_timed_windows() {
    if !have_kvm("io_bench_reports_timed_windows") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qcow2(&disk, None);
    let lines = lines_until(
        snapvmm()
            .args(["run", "--guest", "builtin:io-bench", "--disk"])
            .arg(format!("path={}", disk.display())),
        |line| line.starts_with("io-bench ops 128 "),
    );
    assert!(lines.iter().any(|l| l == "io-bench start"), "{lines:?}");
    // io-bench ops N ticks T max M errors 0, with M <= T: the longest request of a window
    // is part of its time.
    let windows: Vec<Vec<u64>> = lines
        .iter()
        .filter(|l| l.starts_with("io-bench ops "))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                (words.len(), words[3], words[5], words[7]),
                (9, "ticks", "max", "errors"),
                "{l}"
            );
            [2, 4, 6, 8]
                .iter()
                .map(|&i| words[i].parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(windows.len(), 2, "{lines:?}");
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(w[0], 64 * (i as u64 + 1), "{lines:?}");
        assert!(w[2] > 0 && w[2] <= w[1], "{lines:?}");
        assert_eq!(w[3], 0, "{lines:?}");
    }
}

#[test]
fn bad_disk_specs_are_refused() {
    // No KVM needed: refused before the VM is built.
    let output = run_with_timeout({
        let mut c = snapvmm();
        c.args([
            "run",
            "--guest",
            "builtin:write-verify",
            "--disk",
            "path=/nonexistent/x.qcow2",
        ]);
        c
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("vda") && stderr.contains("/nonexistent/x.qcow2"),
        "{stderr}"
    );
}
