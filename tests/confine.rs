//! Confinement of `snapvmm run`: the default seccomp filters kill the process on a forbidden
//! syscall and name it; `--seccomp=log` lets it run; `--seccomp=off` installs nothing. (Every
//! other CLI test runs with the default filters, so they check the allow-lists are complete.)
//!
//! Needs a usable /dev/kvm: without one each test prints why and passes, unless
//! `SNAPVMM_REQUIRE_KVM=1` (CI) makes it fail.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use test_support::require::have_kvm;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `snapvmm run` of the counter guest with the forbidden-syscall trigger and `extra` flags.
fn triggered(extra: &[&str]) -> Command {
    let mut command = test_support::snapvmm_binary!().command();
    command
        .args([
            "run",
            "--guest",
            "builtin:counter",
            "--memory",
            "64",
            "--serial",
            "null",
            "--debug-forbidden-syscall",
        ])
        .args(extra);
    command
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_by_sigsys_and_is_named() {
    if !have_kvm("a_forbidden_syscall_kills_the_vmm_by_sigsys_and_is_named") {
        return;
    }
    let output = test_support::vm::run_with_timeout(triggered(&[]), TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "{}\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains("seccomp: forbidden syscall socket (41)"),
        "no log line naming the syscall:\n{stderr}"
    );
    assert!(!stderr.contains("still alive"), "{stderr}");
}

/// Runs `command` until its stderr says the trigger survived, then kills it; returns stderr.
fn survives(mut command: Command) -> String {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvmm");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let alive = loop {
        match received.recv_timeout(TIMEOUT) {
            Ok(line) => {
                let done = line.contains("still alive");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        alive,
        "the VMM did not survive ({status}):\n{}",
        seen.join("\n")
    );
    seen.join("\n")
}

#[test]
fn seccomp_log_and_off_let_the_forbidden_syscall_run() {
    if !have_kvm("seccomp_log_and_off_let_the_forbidden_syscall_run") {
        return;
    }
    let log = survives(triggered(&["--seccomp=log"]));
    assert!(!log.contains("forbidden syscall"), "{log}");
    let off = survives(triggered(&["--seccomp=off"]));
    assert!(off.contains("socket(2) returned"), "{off}");
}
