//! Confinement of the VMM process: one seccomp filter per thread kind.
//!
//! A guest that escapes into the VMM should find a process that can do almost nothing. Every
//! thread the VMM creates calls [`enter`] with its [`ThreadKind`] before it touches guest state;
//! the filter for that kind (built with rust-vmm's `seccompiler`, no hand-written BPF) is installed
//! on that thread only. The programs are compiled when the crate is built (`build.rs` compiles
//! the rules of `base.rs` and `kinds.rs` and the `embedded` module includes them): a thread's
//! confinement costs only the kernel's install, which matters on the path of a whole-process
//! restore. Filters stack: a thread spawned by a confined thread keeps its parent's filter as
//! well as its own, so every kind's allow-list is the shared base list plus the
//! kind's extras, and what a kind may do is never wider than what its spawner may do.
//!
//! Embedders opt in with [`configure`] (the `snapvmm` binary does so for `run`, `restore`, `clone`
//! and `vhost-user-blk` unless `--seccomp=off`). Without it [`enter`] does nothing, so library
//! users and unit tests are unaffected.

mod base;
mod embedded;
mod kind;
mod kinds;
mod sigsys;
mod spawner;

pub use kind::ThreadKind;
pub use spawner::spawn;

use std::borrow::Cow;
use std::sync::OnceLock;

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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
    let program = program(kind, confinement.seccomp, action)?;
    seccompiler::apply_filter(&program).map_err(|source| ConfineError::Seccomp { kind, source })?;
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

/// The program of `kind` for `mode`: the one the build script compiled (see
/// [`embedded`]), so that installing a filter costs only the kernel's share; compiled here
/// from the same rules only in a cross build, where the build machine's syscall numbers are
/// not the target's.
fn program(
    kind: ThreadKind,
    mode: SeccompMode,
    action: SeccompAction,
) -> Result<Cow<'static, [sock_filter]>, ConfineError> {
    match embedded::program(kind, mode) {
        Some(program) => Ok(Cow::Borrowed(program)),
        None => Ok(Cow::Owned(filter(kind, action)?)),
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

    const ALL: [ThreadKind; kind::KINDS] = ThreadKind::ALL;

    #[test]
    fn kinds_index_the_program_cache() {
        for (index, kind) in ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index);
        }
    }

    #[test]
    fn the_build_time_programs_are_the_rules_programs() {
        // On the architectures the filters are written for, the build is never a cross build
        // in CI: the embedded programs must exist, and equal what the rules compile to now.
        assert!(embedded::EMBEDDED.is_some());
        for (mode, action) in [
            (SeccompMode::Kill, SeccompAction::Trap),
            (SeccompMode::Log, SeccompAction::Log),
        ] {
            for kind in ALL {
                let built = embedded::program(kind, mode).unwrap();
                assert_eq!(
                    built,
                    filter(kind, action.clone()).unwrap(),
                    "{kind:?} {mode:?}"
                );
            }
        }
        assert!(embedded::program(ThreadKind::Main, SeccompMode::Off).is_none());
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
