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
    // The default is under test: a SNAPVMM_SECCOMP in the environment must not change it.
    command
        .env_remove("SNAPVMM_SECCOMP")
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

/// Runs `command` until its stderr says the trigger survived, then kills it; returns stderr and
/// the process id.
fn survives(mut command: Command) -> (String, u32) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvmm");
    let pid = child.id();
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
    (seen.join("\n"), pid)
}

/// The kernel's audit line for a logged seccomp violation of `pid`, when the kernel log is
/// readable here (`None` when it is not).
fn audit_line(pid: u32) -> Option<Option<String>> {
    let output = Command::new("dmesg").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let log = String::from_utf8_lossy(&output.stdout).into_owned();
    let found = log
        .lines()
        .find(|l| l.contains("type=1326") && l.contains(&format!(" pid={pid} ")))
        .map(str::to_string);
    Some(found)
}

#[test]
fn seccomp_log_and_off_let_the_forbidden_syscall_run() {
    if !have_kvm("seccomp_log_and_off_let_the_forbidden_syscall_run") {
        return;
    }
    let (log, pid) = survives(triggered(&["--seccomp=log"]));
    assert!(!log.contains("forbidden syscall"), "{log}");
    // SECCOMP_RET_LOG: the kernel names the syscall and the thread in its audit log.
    match audit_line(pid) {
        Some(Some(line)) => assert!(
            line.contains("comm=\"forbidden\"") && line.contains(" syscall=41 "),
            "{line}"
        ),
        Some(None) => panic!("no audit line for pid {pid} in the kernel log"),
        None => eprintln!("kernel log not readable here: the audit line is not checked"),
    }
    let (off, _) = survives(triggered(&["--seccomp=off"]));
    assert!(off.contains("socket(2) returned"), "{off}");
}

/// A stop and continue (Ctrl-Z, `kill -STOP`/`-CONT`, a debugger attaching) makes the kernel
/// resume the threads' interrupted sleeps and polls through `restart_syscall`: the default
/// filters must let it in, or every stopped VMM dies by SIGSYS when continued.
#[test]
fn a_stopped_and_continued_vmm_keeps_running() {
    if !have_kvm("a_stopped_and_continued_vmm_keeps_running") {
        return;
    }
    let vm = test_support::snapvmm_binary!().start_vm(1 << 20);
    vm.wait_progress();
    let pid = vm.pid().expect("running") as libc::pid_t;
    for _ in 0..5 {
        // SAFETY: plain kill(2) on the child this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.wait_progress();
    vm.ctl_ok(&["info"]);
    // Exits cleanly (a SIGSYS death fails here).
    vm.shutdown();
}
