//! `--seccomp` for the commands that run a VM (`run`, `restore`, `vhost-user-blk`): confines
//! the process through `vmm::confine` before the VM is built.

use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, ValueEnum};
use vmm::confine::{Confinement, SeccompMode, ThreadKind};

/// Whether `--debug-forbidden-syscall` was given.
static TRIGGER: AtomicBool = AtomicBool::new(false);

/// The `--seccomp` values.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum SeccompFlag {
    /// No filters.
    Off,
    /// Filters that let forbidden syscalls run but have the kernel log them (audit type 1326).
    Log,
    /// Filters that kill the process with SIGSYS on a forbidden syscall, naming it on stderr.
    #[default]
    Kill,
}

/// The confinement flags shared by the commands that run a VM.
#[derive(Debug, Default, Args)]
pub struct ConfineArgs {
    /// Seccomp filters, one per thread kind (see README "Confinement").
    #[arg(long, value_enum, env = "SNAPVMM_SECCOMP", default_value_t = SeccompFlag::Kill)]
    seccomp: SeccompFlag,
    /// Debugging aid for the confinement tests, hidden: once the VM runs, a thread confined
    /// as a block worker calls socket(2), which its filter forbids.
    #[arg(long, hide = true)]
    debug_forbidden_syscall: bool,
}

impl ConfineArgs {
    /// Configures the process's confinement and confines the calling (main) thread; the
    /// threads the VMM starts later confine themselves by kind.
    pub fn apply(&self) -> Result<(), String> {
        let seccomp = match self.seccomp {
            SeccompFlag::Off => SeccompMode::Off,
            SeccompFlag::Log => SeccompMode::Log,
            SeccompFlag::Kill => SeccompMode::Kill,
        };
        TRIGGER.store(self.debug_forbidden_syscall, Ordering::Relaxed);
        vmm::confine::confine_process(Confinement { seccomp }).map_err(|e| e.to_string())
    }
}

/// Runs the hidden forbidden-syscall trigger if `--debug-forbidden-syscall` asked for it (called
/// once the VM runs).
pub fn trigger() {
    if !TRIGGER.load(Ordering::Relaxed) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("forbidden".into())
        .spawn(|| {
            vmm::confine::enter_or_abort(ThreadKind::BlockWorker);
            eprintln!("snapvmm: debug: calling socket(2) from a block-worker thread");
            // SAFETY: socket(2) with constant arguments; a descriptor it returns is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            if fd >= 0 {
                // SAFETY: closes the descriptor just created, owned by nobody else.
                unsafe { libc::close(fd) };
            }
            eprintln!("snapvmm: debug: socket(2) returned {fd}: still alive");
        })
        .map(|handle| handle.join());
}
