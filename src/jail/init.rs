//! The jail's PID 1.
//!
//! It sets the jail up (still root), drops privileges, then forks the VMM (PID 2) and stays
//! as a minimal init: it passes SIGINT/SIGTERM/SIGHUP/SIGQUIT on to the VMM, reaps every
//! process that ends in the namespace, and exits with the VMM's status, which ends the
//! namespace (the kernel kills what is left in it). The VMM is not PID 1 itself because the
//! kernel drops signals a PID 1 has no handler for, so `kill -TERM` from the host would do
//! nothing to `snapvmm run`.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::OFlag;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{dup2, execve, fork, setsid, ForkResult, Pid};

use super::args::JailSpec;
use super::cgroup::Cgroup;
use super::layout::{Layout, JAILED_BINARY};
use super::{exit_code, namespaces, privileges};

/// Environment variables the VMM keeps; everything else is dropped.
const KEPT_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

/// Runs as the jail's PID 1; returns its exit status. Setup errors are written to `report`.
pub fn run(
    spec: &JailSpec,
    layout: &Layout,
    cgroup: Option<&Cgroup>,
    report: OwnedFd,
    signals: &SigSet,
) -> i32 {
    let mut report = File::from(report);
    if let Err(message) = setup(spec, layout, cgroup) {
        let _ = report.write_all(message.as_bytes());
        return 1;
    }
    // SAFETY: this process is single-threaded (forked from the single-threaded jailer).
    match unsafe { fork() } {
        Err(e) => {
            let _ = write!(report, "fork: {e}");
            1
        }
        Ok(ForkResult::Child) => {
            let message = exec_vmm(spec, signals);
            let _ = report.write_all(message.as_bytes());
            127
        }
        Ok(ForkResult::Parent { child }) => {
            drop(report);
            reap(child, signals)
        }
    }
}

/// Everything between the jailer's fork and the VMM's: the cgroup, namespaces, the root,
/// limits, detaching, dropping privileges.
fn setup(spec: &JailSpec, layout: &Layout, cgroup: Option<&Cgroup>) -> Result<(), String> {
    if let Some(cgroup) = cgroup {
        cgroup.join()?;
    }
    namespaces::enter(spec)?;
    namespaces::pivot(&spec.root(), layout)?;
    privileges::limit(&spec.limits)?;
    if spec.daemonize {
        setsid().map_err(|e| format!("setsid: {e}"))?;
        let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty())
            .map_err(|e| format!("opening /dev/null in the jail: {e}"))?;
        for fd in 0..3 {
            dup2(null, fd).map_err(|e| format!("dup2: {e}"))?;
        }
        if null > 2 {
            let _ = nix::unistd::close(null);
        }
    }
    privileges::drop_to(spec.uid, spec.gid)?;
    if !spec.daemonize {
        // A foreground jail ends with its jailer, even one killed by SIGKILL: the kernel
        // forces this signal on a namespace's PID 1 as it comes from an ancestor namespace.
        // (Set after the credential change, which clears it.)
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    }
    Ok(())
}

/// Execs the jailed `snapvmm`; returns only with the reason it could not.
fn exec_vmm(spec: &JailSpec, signals: &SigSet) -> String {
    if let Err(e) = signals.thread_unblock() {
        return format!("unblocking signals: {e}");
    }
    let argv: Result<Vec<CString>, _> = std::iter::once("snapvmm")
        .chain(spec.command.iter().map(String::as_str))
        .map(CString::new)
        .collect();
    let env: Result<Vec<CString>, _> = std::env::vars_os()
        .filter(|(key, _)| KEPT_ENV.iter().any(|k| key.as_bytes() == k.as_bytes()))
        .map(|(key, value)| CString::new([key.as_bytes(), b"=", value.as_bytes()].concat()))
        .collect();
    let (Ok(argv), Ok(env)) = (argv, env) else {
        return "an argument or environment variable holds a NUL byte".into();
    };
    let binary = CString::new(JAILED_BINARY).expect("a constant without NUL");
    match execve(&binary, &argv, &env) {
        Err(e) => format!("exec {JAILED_BINARY} in the jail: {e}"),
        Ok(never) => match never {},
    }
}

/// The init loop: pass signals on to `vmm`, reap everything, end with `vmm`.
fn reap(vmm: Pid, signals: &SigSet) -> i32 {
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) if status.pid() == Some(vmm) => {
                        return exit_code(status).unwrap_or(1);
                    }
                    // An orphan the namespace handed to its init, or a stop/continue.
                    Ok(_) => {}
                }
            },
            Ok(signal) => {
                let _ = kill(vmm, signal);
            }
            Err(_) => return 1,
        }
    }
}
