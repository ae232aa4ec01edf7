//! Builds the micro-guest (`guest/`) from source into a flat binary in `OUT_DIR`.
//!
//! The guest is freestanding 64-bit C linked at a fixed address (see `guest/guest.ld`) and
//! turned into a flat image with `objcopy -O binary`; the VMM embeds it with `include_bytes!`.
//! Where no C toolchain exists the build still succeeds with an empty image, and the VMM
//! reports "micro-guest not built" when asked to run it.

use std::path::{Path, PathBuf};
use std::process::Command;

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
