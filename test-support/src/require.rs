//! Whether a test can run on this machine. This is the one place that reads
//! `SNAPVMM_REQUIRE_QEMU`, `SNAPVMM_REQUIRE_KVM` and `SNAPVMM_REQUIRE_IASL`: a test whose tool is
//! missing prints `skipped: TEST: REASON` and passes, unless the matching variable is `1` (CI
//! sets all three), in which case it fails.
//!
//! Tests start with `if !require::have_qemu("name") { return; }` (or `have_kvm`, `have_iasl`);
//! a test that finds something else missing (a guest kernel, mkfs) calls [`skip`] with the
//! [`Need`] whose variable should govern it.

use std::fmt::Display;
use std::process::Command;
use std::sync::OnceLock;

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// QEMU's tools: qemu-img and qemu-io, and for some tests qemu-system-x86_64.
    Qemu,
    /// A usable `/dev/kvm` (and what a KVM guest needs, such as a kernel to boot).
    Kvm,
    /// The ACPI disassembler `iasl`.
    Iasl,
}

impl Need {
    /// The environment variable that, set to `1`, turns this need's absence into a failure.
    pub fn variable(self) -> &'static str {
        match self {
            Need::Qemu => "SNAPVMM_REQUIRE_QEMU",
            Need::Kvm => "SNAPVMM_REQUIRE_KVM",
            Need::Iasl => "SNAPVMM_REQUIRE_IASL",
        }
    }

    /// Whether the environment demands it (its variable is `1`).
    pub fn required(self) -> bool {
        std::env::var(self.variable()).as_deref() == Ok("1")
    }
}

/// `test` cannot run because of `reason`: panics (at the caller) when `need` is required,
/// otherwise prints `skipped: TEST: REASON` on stderr. Always returns false, so a probe can
/// end with `|| skip(...)`.
#[track_caller]
pub fn skip(need: Need, test: &str, reason: impl Display) -> bool {
    if need.required() {
        panic!("{test}: {}=1 but {reason}", need.variable());
    }
    eprintln!("skipped: {test}: {reason}");
    false
}

/// Whether `program --version` runs and succeeds.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `qemu-img` and `qemu-io` run on this machine (probed once per process).
pub fn qemu_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| runs("qemu-img") && runs("qemu-io"))
}

/// Whether `test` can use qemu-img and qemu-io; otherwise [`skip`]s it under [`Need::Qemu`].
#[track_caller]
pub fn have_qemu(test: &str) -> bool {
    qemu_available()
        || skip(
            Need::Qemu,
            test,
            "qemu-img/qemu-io not found (install qemu-utils)",
        )
}

/// Whether `test` can use `iasl`; otherwise [`skip`]s it under [`Need::Iasl`].
#[track_caller]
pub fn have_iasl(test: &str) -> bool {
    // Only whether it starts: the exit status of `iasl -v` is not relied on.
    Command::new("iasl").arg("-v").output().is_ok()
        || skip(
            Need::Iasl,
            test,
            "iasl not found (Debian package acpica-tools)",
        )
}

/// Whether `test` can use KVM; otherwise [`skip`]s it under [`Need::Kvm`], saying why KVM is
/// unusable.
#[cfg(feature = "vm")]
#[track_caller]
pub fn have_kvm(test: &str) -> bool {
    match vmm::check_kvm() {
        Ok(()) => true,
        Err(reason) => skip(Need::Kvm, test, format_args!("KVM unusable: {reason}")),
    }
}
