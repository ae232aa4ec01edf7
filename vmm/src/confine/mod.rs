//! Confinement of the VMM process: one seccomp filter per thread kind.
//!
//! A guest that escapes into the VMM should find a process that can do almost nothing. Every
//! thread the VMM creates calls [`enter`] with its [`ThreadKind`] before it touches guest state;
//! the filter for that kind (built with rust-vmm's `seccompiler`, no hand-written BPF) is installed
//! on that thread only. Filters stack: a thread spawned by a confined thread keeps its parent's
//! filter as well as its own, so every kind's allow-list is the shared base list plus the
//! kind's extras, and what a kind may do is never wider than what its spawner may do.
//!
//! Embedders opt in with [`configure`] (the `snapvmm` binary does so for `run`, `restore`, `clone`
//! and `vhost-user-blk` unless `--seccomp=off`). Without it [`enter`] does nothing, so library
//! users and unit tests are unaffected.

mod base;
mod kinds;
mod sigsys;
mod spawner;

pub use spawner::spawn;

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a filter does with a syscall outside its allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter is installed.
    Off,
    /// The syscall runs but the kernel logs it (`SECCOMP_RET_LOG`, an `audit: type=1326` line):
    /// for finding what an allow-list misses.
    Log,
    /// The syscall traps (`SECCOMP_RET_TRAP`); the SIGSYS handler logs its number and name on
    /// stderr and the process dies by SIGSYS.
    #[default]
    Kill,
}

/// The kinds of thread the VMM runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main (control) thread once the VM is built: device and checkpoint management.
    Main,
    /// A vCPU thread: `KVM_RUN` and KVM ioctls, MMIO/PIO emulation.
    Vcpu,
    /// A virtio-blk / vhost-user-blk queue worker: file I/O on disk images.
    BlockWorker,
    /// The REST API thread (tokio runtime): a listening Unix socket.
    Api,
    /// The userfaultfd pager of a lazy restore.
    Pager,
    /// A virtio-vsock / guest-agent thread.
    Vsock,
    /// The spawner thread, the only one that may `execve` (clone children).
    Spawner,
}

/// The confinement an embedder asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// What happens to a syscall outside a thread's allow-list.
    pub seccomp: SeccompMode,
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `configure` was called twice with different settings.
    #[error("confinement already configured as {0:?}")]
    AlreadyConfigured(Confinement),
    /// The spawner thread could not be started.
    #[error("starting the spawner thread: {0}")]
    Spawner(std::io::Error),
    /// seccompiler refused the filter or the kernel refused to install it.
    #[error("seccomp filter for {kind:?} threads: {source}")]
    Seccomp {
        /// The thread kind whose filter failed.
        kind: ThreadKind,
        /// The seccompiler error.
        source: seccompiler::Error,
    },
    /// seccompiler refused the filter while compiling it.
    #[error("seccomp filter for {kind:?} threads: {source}")]
    Build {
        /// The thread kind whose filter failed.
        kind: ThreadKind,
        /// The seccompiler backend error.
        source: seccompiler::BackendError,
    },
}

static CONFINEMENT: OnceLock<Confinement> = OnceLock::new();

/// Sets the process-wide confinement that [`enter`] applies; once per process.
pub fn configure(confinement: Confinement) -> Result<(), ConfineError> {
    let current = *CONFINEMENT.get_or_init(|| confinement);
    if current != confinement {
        return Err(ConfineError::AlreadyConfigured(current));
    }
    if confinement.seccomp == SeccompMode::Off {
        return Ok(());
    }
    if confinement.seccomp == SeccompMode::Kill {
        sigsys::install_handler();
    }
    spawner::start().map_err(ConfineError::Spawner)?;
    Ok(())
}

/// The configured confinement, if [`configure`] was called.
pub fn configured() -> Option<Confinement> {
    CONFINEMENT.get().copied()
}

/// Confines the calling thread as `kind` (a no-op unless [`configure`] asked for seccomp).
pub fn enter(kind: ThreadKind) -> Result<(), ConfineError> {
    let Some(confinement) = configured() else {
        return Ok(());
    };
    let Some(action) = mismatch_action(confinement.seccomp) else {
        return Ok(());
    };
    let program = program(kind, action)?;
    seccompiler::apply_filter(program).map_err(|source| ConfineError::Seccomp { kind, source })?;
    tracing::debug!(
        "seccomp filter for {kind:?} installed ({:?})",
        confinement.seccomp
    );
    Ok(())
}

thread_local! {
    /// Whether this thread entered its [`ThreadKind::Main`] filter through [`confine_process`]:
    /// a second call on it (a second sandbox) does not stack the same filter again.
    static MAIN_ENTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Configures the process's confinement ([`configure`]) and confines the calling thread as
/// the control thread ([`ThreadKind::Main`]) for the rest of its life, once per thread; the
/// threads the VMM starts later confine themselves by kind. What the binary's `--seccomp` and
/// an embedder's `SandboxOptions::confinement` both do before a VM is built.
pub fn confine_process(confinement: Confinement) -> Result<(), ConfineError> {
    configure(confinement)?;
    if !MAIN_ENTERED.get() {
        enter(ThreadKind::Main)?;
        MAIN_ENTERED.set(true);
    }
    Ok(())
}

/// Confines the calling thread or, when that fails, ends the process: a thread that was asked to
/// be confined never runs unconfined (fail closed).
pub fn enter_or_abort(kind: ThreadKind) {
    if let Err(error) = enter(kind) {
        eprintln!("snapvmm: cannot confine a {kind:?} thread: {error}");
        std::process::abort();
    }
}

/// How many [`ThreadKind`]s there are.
const KINDS: usize = 7;

/// Each kind's program for the configured mode, compiled once per process (the mode is set
/// once): by the first thread of its kind, or ahead of it by [`precompile`]. Every vCPU and
/// queue worker then only installs it.
static PROGRAMS: [OnceLock<BpfProgram>; KINDS] = [const { OnceLock::new() }; KINDS];

/// The compiled program of `kind` answering `action` off its allow-list, from [`PROGRAMS`].
fn program(kind: ThreadKind, action: SeccompAction) -> Result<&'static BpfProgram, ConfineError> {
    let cell = &PROGRAMS[kind as usize];
    if let Some(program) = cell.get() {
        return Ok(program);
    }
    // Two threads of a kind starting at once may both compile; the programs are equal.
    let compiled = filter(kind, action)?;
    Ok(cell.get_or_init(|| compiled))
}

/// Compiles the programs of the threads a VM starts next (vCPUs, queue workers, the API
/// server), so that they only install them. The spawner thread, idle otherwise, runs this
/// while the VM is being built. A failure is left for the thread of that kind to report.
fn precompile() {
    let Some(action) = configured().and_then(|c| mismatch_action(c.seccomp)) else {
        return;
    };
    for kind in [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::BlockWorker] {
        let _ = program(kind, action.clone());
    }
}

/// What a filter in `mode` answers a syscall off its allow-list; `None` when no filter is
/// installed.
fn mismatch_action(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Off => None,
        SeccompMode::Log => Some(SeccompAction::Log),
        SeccompMode::Kill => Some(SeccompAction::Trap),
    }
}

/// Compiles the BPF program for `kind`, answering `mismatch` for anything off its allow-list.
pub fn filter(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, ConfineError> {
    let build = |source| ConfineError::Build { kind, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let rules = kinds::rules(kind).map_err(build)?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(build)?;
    filter.try_into().map_err(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every thread kind, in declaration order.
    const ALL: [ThreadKind; KINDS] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::Api,
        ThreadKind::Pager,
        ThreadKind::Vsock,
        ThreadKind::Spawner,
    ];

    #[test]
    fn kinds_index_the_program_cache() {
        for (index, kind) in ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index);
        }
    }

    #[test]
    fn every_kind_compiles() {
        for kind in ALL {
            let program = filter(kind, SeccompAction::Trap).unwrap();
            assert!(program.len() > 10, "{kind:?}");
        }
    }

    #[test]
    fn a_forbidden_syscall_fails_under_a_filter() {
        // Log mode would let it run; Errno makes the outcome observable without killing the test.
        let program = filter(ThreadKind::Vcpu, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let outcome = std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            // SAFETY: socket(2) with constant arguments; the result is only inspected.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            (fd, std::io::Error::last_os_error().raw_os_error())
        })
        .join()
        .unwrap();
        assert_eq!(outcome, (-1, Some(libc::EPERM)));
    }
}
