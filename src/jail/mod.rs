//! `snapvmm jail`: run `snapvmm run|restore|vhost-user-blk` confined, as Firecracker's jailer
//! runs Firecracker.
//!
//! ```text
//! snapvmm jail --id vm1 --uid 1000 --gid 1000 --chroot-base /srv/jails \
//!     --file /images/disk.qcow2 --cgroup memory.max=512M -- \
//!     run --guest builtin:io-loop --disk path=/disk.qcow2 --api-socket /api.sock
//! ```
//!
//! The jailer, as root:
//! 1. validates everything ([`args`]) before touching the host: nothing is left by bad input;
//! 2. lays out `CHROOT_BASE/snapvmm/ID/root` on the host ([`layout`]) and makes the cgroup
//!    ([`cgroup`]);
//! 3. enters a new PID namespace and forks the jail's PID 1 ([`init`]), which enters new mount,
//!    IPC, UTS (and network) namespaces, bind-mounts libraries and placed files, pivots into
//!    the root ([`namespaces`]), applies resource limits and drops to UID:GID with no
//!    capabilities ([`privileges`]), then forks and execs the VMM and stays as its init;
//! 4. waits for it, forwarding SIGINT/SIGTERM/SIGHUP/SIGQUIT, and exits with its status
//!    (or, with `--daemonize`, returns once it has started).
//!
//! A failure before the VMM starts removes what the jailer made (from the host's mount
//! namespace, where the jail holds no mount: placed files are never reached). Once the VMM
//! has run, the jail dir is left as it is: it may hold snapshot overlays and checkpoints.

mod args;
mod cgroup;
mod init;
mod layout;
mod namespaces;
mod privileges;

use std::fs::File;
use std::io::Read;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid, Uid};

pub use args::JailArgs;

use args::JailSpec;
use cgroup::Cgroup;
use layout::Layout;

/// Runs `snapvmm jail`; returns the exit status (the VMM's, when it ran in the foreground).
pub fn main(args: JailArgs) -> u8 {
    match jail(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("snapvmm jail: error: {message}");
            1
        }
    }
}

/// The signals the jailer and the jail's init pass on to the VMM, and SIGCHLD.
pub(crate) fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        set.add(signal);
    }
    set
}

/// Exit status of a shell for a child that `status` describes: its code, or 128 + a signal.
pub(crate) fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

fn jail(args: JailArgs) -> Result<u8, String> {
    let spec = args::validate(args)?;
    if !Uid::effective().is_root() {
        return Err(
            "the jailer runs as root (it makes namespaces, mounts and device nodes, then drops \
             to --uid/--gid)"
                .into(),
        );
    }
    let binary = std::env::current_exe().map_err(|e| format!("finding the snapvmm binary: {e}"))?;
    let libraries = layout::libraries(&binary)?;
    let layout = layout::prepare(&spec, &binary, &libraries).inspect_err(|_| {
        layout::remove(&spec.jail_dir);
    })?;
    let cgroup = Cgroup::create(&spec.id, &spec.cgroups).inspect_err(|_| {
        layout::remove(&spec.jail_dir);
    })?;
    let started = launch(&spec, &layout, cgroup.as_ref());
    match started {
        Err(message) => {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            layout::remove(&spec.jail_dir);
            Err(message)
        }
        Ok(None) => Ok(0),
        Ok(Some(vmm)) => {
            let code = supervise(vmm);
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            Ok(u8::try_from(code).unwrap_or(1))
        }
    }
}

/// Starts the jail's init; returns its pid once the VMM has been exec'd (`None` when
/// daemonized), or the setup's error once the init has ended.
fn launch(
    spec: &JailSpec,
    layout: &Layout,
    cgroup: Option<&Cgroup>,
) -> Result<Option<Pid>, String> {
    let signals = handled_signals();
    // Blocked from here on, in the jailer and (inherited) in the init: they are taken with
    // sigwait and passed on. The VMM unblocks them before exec.
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // Setup errors come back through this pipe; it closes empty once the VMM is exec'd.
    let (report_read, report_write) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the jailer is single-threaded here (no thread has been started), so the child
    // may allocate and run ordinary Rust until it execs or exits.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(report_read);
            let code = init::run(spec, layout, cgroup, report_write, &signals);
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(report_write);
            let mut message = String::new();
            let _ = File::from(report_read).read_to_string(&mut message);
            if !message.is_empty() {
                let _ = waitpid(child, None);
                return Err(message);
            }
            Ok((!spec.daemonize).then_some(child))
        }
    }
}

/// Waits for the jail's init, passing signals on; returns its exit status.
fn supervise(init: Pid) -> i32 {
    let signals = handled_signals();
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => {
                    if let Some(code) = exit_code(status) {
                        return code;
                    }
                }
                Err(e) => {
                    eprintln!("snapvmm jail: error: waiting for the jail: {e}");
                    return 1;
                }
            },
            Ok(signal) => {
                let _ = kill(init, signal);
            }
            Err(e) => {
                eprintln!("snapvmm jail: error: sigwait: {e}");
                return 1;
            }
        }
    }
}
