//! The seccomp programs the build script compiled from the rules in `base.rs` and `kinds.rs`
//! (`build.rs`, as Firecracker compiles its filters at build time): a process only hands them
//! to the kernel, compiling nothing when it starts.

use seccompiler::sock_filter;

use super::kind::KINDS;
use super::{SeccompMode, ThreadKind};

include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));

/// The build-time program of `kind` in `mode`; `None` in `Off` mode or a cross build.
pub(super) fn program(kind: ThreadKind, mode: SeccompMode) -> Option<&'static [sock_filter]> {
    let programs = EMBEDDED.as_ref()?;
    let index = match mode {
        SeccompMode::Off => return None,
        SeccompMode::Kill => 0,
        SeccompMode::Log => 1,
    };
    Some(programs[index][kind as usize])
}
