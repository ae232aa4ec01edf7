//! Builds the micro-guest (`guest/`) from source into a flat binary in `OUT_DIR`, and compiles
//! the seccomp filters of every thread kind into BPF (`OUT_DIR/seccomp_programs.rs`).
//!
//! The guest is freestanding 64-bit C linked at a fixed address (see `guest/guest.ld`) and
//! turned into a flat image with `objcopy -O binary`; the VMM embeds it with `include_bytes!`.
//! Where no C toolchain exists the build still succeeds with an empty image, and the VMM
//! reports "micro-guest not built" when asked to run it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

// The allow-lists, the very files the library compiles at run time as a fallback (see
// `src/confine/mod.rs`): the build script and the library cannot disagree on a rule.
#[path = "src/confine/base.rs"]
#[allow(dead_code)]
mod base;
#[path = "src/confine/kind.rs"]
#[allow(dead_code)]
mod kind;
#[path = "src/confine/kinds.rs"]
mod kinds;

use kind::{ThreadKind, KINDS};

/// Largest number of vCPUs the guest gives a stack to; must match `guest::MAX_CPUS`.
const GUEST_MAX_CPUS: u32 = 32;
/// log2 of each vCPU's stack size.
const GUEST_STACK_SHIFT: u32 = 14;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let guest = manifest.join("guest");
    for file in ["guest.c", "start.S", "guest.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=SNAPVMM_GUEST_CC");
    seccomp_programs(&manifest, &out);
    let bin = out.join("micro-guest.bin");
    if let Err(message) = build(&guest, &out, &bin) {
        println!("cargo:warning=micro-guest not built: {message}");
        std::fs::write(&bin, []).expect("write empty micro-guest image");
    }
}

fn build(guest: &Path, out: &Path, bin: &Path) -> Result<(), String> {
    let cc = std::env::var("SNAPVMM_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let elf = out.join("micro-guest.elf");
    let status = Command::new(&cc)
        .args([
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-no-pie",
            "-m64",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-DGUEST_MAX_CPUS={GUEST_MAX_CPUS}"))
        .arg(format!("-DGUEST_STACK_SHIFT={GUEST_STACK_SHIFT}"))
        .arg("-T")
        .arg(guest.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(guest.join("start.S"))
        .arg(guest.join("guest.c"))
        .status()
        .map_err(|e| format!("cannot run {cc}: {e}"))?;
    if !status.success() {
        return Err(format!("{cc} failed ({status})"));
    }
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(bin)
        .status()
        .map_err(|e| format!("cannot run objcopy: {e}"))?;
    if !status.success() {
        return Err(format!("objcopy failed ({status})"));
    }
    Ok(())
}

/// Writes `OUT_DIR/seccomp_programs.rs`: `EMBEDDED`, each thread kind's BPF program for the
/// `kill` (trap) and `log` modes, so that no process compiles a filter at run time; `None`
/// when the build machine's syscall numbers (the `libc` constants the rules name) are not the
/// target's, i.e. a cross build, which then compiles the filters at run time.
fn seccomp_programs(manifest: &Path, out: &Path) {
    for file in ["base.rs", "kind.rs", "kinds.rs"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest.join("src/confine").join(file).display()
        );
    }
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let native = target_arch == std::env::consts::ARCH && target_os == std::env::consts::OS;
    let arch = seccompiler::TargetArch::try_from(target_arch.as_str());
    let mut code = String::from(
        "/// Each thread kind's BPF program, compiled by the build script: `[mode][kind]`, mode 0 \
         traps (`kill`), 1 logs.\n",
    );
    let (true, Ok(arch)) = (native, arch) else {
        code.push_str("pub(super) static EMBEDDED: Option<[[&[sock_filter]; KINDS]; 2]> = None;\n");
        std::fs::write(out.join("seccomp_programs.rs"), code).expect("write seccomp programs");
        return;
    };
    code.push_str("pub(super) static EMBEDDED: Option<[[&[sock_filter]; KINDS]; 2]> = Some([\n");
    for action in [
        seccompiler::SeccompAction::Trap,
        seccompiler::SeccompAction::Log,
    ] {
        code.push_str("    [\n");
        let programs: [_; KINDS] = ThreadKind::ALL.map(|kind| {
            let rules = kinds::rules(kind).expect("seccomp rules");
            let filter = seccompiler::SeccompFilter::new(
                rules,
                action.clone(),
                seccompiler::SeccompAction::Allow,
                arch,
            )
            .expect("seccomp filter");
            let program: seccompiler::BpfProgram = filter.try_into().expect("seccomp program");
            (kind, program)
        });
        for (kind, program) in programs {
            let _ = writeln!(code, "        // {kind:?}: {} instructions", program.len());
            code.push_str("        &[");
            for insn in program {
                let _ = write!(
                    code,
                    "sock_filter {{ code: {}, jt: {}, jf: {}, k: {} }}, ",
                    insn.code, insn.jt, insn.jf, insn.k
                );
            }
            code.push_str("],\n");
        }
        code.push_str("    ],\n");
    }
    code.push_str("]);\n");
    std::fs::write(out.join("seccomp_programs.rs"), code).expect("write seccomp programs");
}
