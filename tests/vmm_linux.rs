//! Linux under `snapvmm run --kernel`: Debian's stock cloud kernel, fetched by
//! `scripts/fetch-guest-kernel.sh` (never committed), reports our E820 map and our ACPI tables
//! on the serial console; and our DSDT disassembles with `iasl -d`.
//!
//! This host's KVM is software-only (kvm_pvm): a stock kernel gets through early boot but not
//! much further, so the tests read the console until the ACPI table lines appear and then stop
//! the VM. Where /proc/cpuinfo shows vmx or svm the kernel must also boot fully, into the
//! busybox initramfs of `scripts/build-initramfs.sh`, whose `read-vda` workload loads the
//! virtio modules, reads all of /dev/vda through our virtio-mmio disk and prints
//! `snapvmm: read-vda ok`; elsewhere that part is skipped, saying why.
//!
//! Two images of the same kernel: the uncompressed ELF `vmlinux` the fetch script extracts
//! (about 25 s to the ACPI lines here), and the bzImage itself, whose decompressor alone takes
//! minutes on software KVM; the bzImage test therefore runs only with hardware virtualization
//! or `SNAPVMM_LINUX_BZIMAGE=1`, and says so when skipped.
//!
//! Skips (printing why) without a usable /dev/kvm unless `SNAPVMM_REQUIRE_KVM=1`, without a
//! kernel it can fetch likewise, and without `iasl` unless `SNAPVMM_REQUIRE_IASL=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_support::require::{have_iasl, have_kvm, skip, Need};
use vmm::arch::x86_64::acpi::{self, MmioDevice};

/// How long the ELF kernel may take to print its ACPI table lines: about 25 s on this host's
/// software KVM, well under a second with hardware virtualization.
const EARLY_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// As [`EARLY_BOOT_TIMEOUT`] for the bzImage, whose decompressor runs first.
const BZIMAGE_EARLY_BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// How long a full boot to the initramfs's workload may take (hardware virtualization only).
const FULL_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest RAM: the E820 lines below are for this size.
const MEMORY_MIB: u64 = 128;

/// The Debian kernel, fetched (or found cached) by the repository's script.
fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-guest-kernel.sh");
    let outcome = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))
        .and_then(|output| {
            if output.status.success() {
                let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
                Ok(PathBuf::from(path))
            } else {
                Err(format!(
                    "{} failed ({}): {}",
                    script.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        });
    match outcome {
        Ok(path) if path.is_file() => Some(path),
        Ok(path) => panic!("{test}: the fetch script named {path:?}, which is no file"),
        Err(reason) => {
            skip(Need::Kvm, test, format_args!("no guest kernel: {reason}"));
            None
        }
    }
}

/// The busybox initramfs of `scripts/build-initramfs.sh` (built or found cached).
fn initramfs(test: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-initramfs.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{test}: running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{test}: {} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Whether the host CPU has hardware virtualization, or why not.
fn hardware_virtualization() -> Result<(), String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    let has = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if has {
        Ok(())
    } else {
        Err(
            "/proc/cpuinfo shows neither vmx nor svm (software KVM: a stock kernel stops in \
             early boot)"
                .into(),
        )
    }
}

/// `snapvmm run --kernel` with the console in `serial`, one raw disk so the DSDT has a
/// virtio-mmio device, and a panic that resets the VM. With `initrd`, the kernel boots into
/// it and runs its `read-vda` workload, which ends in a reset (`snapvmm.end=reboot`).
fn start(kernel: &Path, initrd: Option<&Path>, dir: &Path, serial: &Path) -> Child {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 64 * 1024]).unwrap();
    let mut cmdline =
        String::from("console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 loglevel=8");
    let mut command = Command::new(env!("CARGO_BIN_EXE_snapvmm"));
    command.arg("run").arg("--kernel").arg(kernel);
    if let Some(initrd) = initrd {
        command.arg("--initrd").arg(initrd);
        cmdline.push_str(" snapvmm.workload=read-vda snapvmm.end=reboot");
    }
    command
        .args([
            "--cmdline",
            &cmdline,
            "--memory",
            &MEMORY_MIB.to_string(),
            "--serial",
        ])
        .arg(serial)
        .arg("--disk")
        .arg(format!("path={},format=raw", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapvmm")
}

/// Polls the console until `done` holds or `timeout` passes; returns the console text and
/// whether `done` held. Fails at once if snapvmm exits with an error first.
fn watch(
    child: &mut Child,
    serial: &Path,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> (String, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
        if done(&text) {
            return (text, true);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            let text =
                String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
            if !status.success() {
                panic!("snapvmm exited with {status}\nstderr:\n{stderr}\nconsole:\n{text}");
            }
            let seen = done(&text);
            return (text, seen);
        }
        if Instant::now() > deadline {
            return (text, false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The E820 lines Linux prints for a [`MEMORY_MIB`] guest, from the map in
/// `vmm::arch::x86_64::e820` (written out here, so a change to the map fails the test).
const E820_LINES: [&str; 4] = [
    "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
    "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
    "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
];

/// The ACPI table lines, as (signature, what else the line must say).
const ACPI_LINES: [(&str, &str); 5] = [
    ("RSDP", "0x00000000000E0000 000024 (v02 SNAPVM)"),
    ("XSDT", "SNAPVM SVMMXSDT"),
    ("FACP", "SNAPVM SVMMFACP"),
    ("DSDT", "SNAPVM SVMMDSDT"),
    ("APIC", "SNAPVM SVMMAPIC"),
];

/// The console line announcing ACPI table `signature`, once the kernel has finished writing
/// it: the console is read while the guest writes, so a line without its newline yet may be
/// cut anywhere.
fn acpi_line<'a>(console: &'a str, signature: &str) -> Option<&'a str> {
    let prefix = format!("ACPI: {signature} 0x");
    let complete = console.rfind('\n').map_or("", |end| &console[..end]);
    complete.lines().find(|line| line.contains(&prefix))
}

fn early_boot_done(console: &str) -> bool {
    ACPI_LINES
        .iter()
        .all(|(signature, _)| acpi_line(console, signature).is_some())
}

#[test]
fn debian_vmlinux_sees_our_e820_map_and_acpi_tables() {
    let test = "debian_vmlinux_sees_our_e820_map_and_acpi_tables";
    if !have_kvm(test) {
        return;
    }
    let Some(bzimage) = kernel_or_skip(test) else {
        return;
    };
    let vmlinux = bzimage.with_file_name("vmlinux");
    if !vmlinux.is_file() {
        let reason = format!(
            "{} was not extracted (the fetch script needs the payload's decompressor, lz4 \
             for Debian's kernel)",
            vmlinux.display()
        );
        skip(Need::Kvm, test, reason);
        return;
    }
    boot_and_check(test, &vmlinux, EARLY_BOOT_TIMEOUT);
}

#[test]
fn debian_bzimage_sees_our_e820_map_and_acpi_tables() {
    let test = "debian_bzimage_sees_our_e820_map_and_acpi_tables";
    if let Err(reason) = hardware_virtualization() {
        if std::env::var("SNAPVMM_LINUX_BZIMAGE").as_deref() != Ok("1") {
            eprintln!(
                "skipping {test}: {reason}; the bzImage decompressor takes minutes there \
                 (SNAPVMM_LINUX_BZIMAGE=1 runs it anyway)"
            );
            return;
        }
    }
    if !have_kvm(test) {
        return;
    }
    let Some(bzimage) = kernel_or_skip(test) else {
        return;
    };
    boot_and_check(test, &bzimage, BZIMAGE_EARLY_BOOT_TIMEOUT);
}

/// Boots `kernel` and checks the console: banner, command line, E820 map, ACPI tables; with
/// hardware virtualization, a full boot too.
fn boot_and_check(test: &str, kernel: &Path, timeout: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("console.log");
    let full_boot = hardware_virtualization();
    let initrd = full_boot.as_ref().ok().map(|()| initramfs(test));
    let started = Instant::now();
    let mut child = start(kernel, initrd.as_deref(), dir.path(), &serial);
    let (console, seen) = watch(&mut child, &serial, timeout, early_boot_done);
    let early = started.elapsed();
    let stop = |mut child: Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    if !seen {
        stop(child);
        panic!("no ACPI table lines within {timeout:?}; console:\n{console}");
    }
    eprintln!("{test}: banner, E820 and ACPI lines after {early:.1?}");

    assert!(
        console.contains("Linux version "),
        "no banner; console:\n{console}"
    );
    assert!(
        console.contains("Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200"),
        "the kernel did not get our command line; console:\n{console}"
    );
    for line in E820_LINES {
        assert!(
            console.contains(line),
            "missing {line:?}; console:\n{console}"
        );
    }
    let e820_lines = console.lines().filter(|l| l.contains("BIOS-e820:")).count();
    assert_eq!(
        e820_lines,
        E820_LINES.len(),
        "unexpected E820 entries; console:\n{console}"
    );
    for (signature, detail) in ACPI_LINES {
        let line = acpi_line(&console, signature).unwrap();
        assert!(
            line.contains(detail),
            "ACPI {signature} line {line:?} lacks {detail:?}"
        );
    }
    assert!(
        !console.contains("ACPI BIOS Error") && !console.contains("Invalid checksum"),
        "the kernel complained about our tables; console:\n{console}"
    );

    match full_boot {
        Err(reason) => {
            stop(child);
            eprintln!("{test}: skipping the full boot: {reason}");
        }
        Ok(()) => {
            // The initramfs loads the virtio modules, reads /dev/vda through our virtio-mmio
            // disk and resets the VM (reboot=k: the i8042), which ends snapvmm cleanly.
            let ok_line = "snapvmm: read-vda ok";
            let (console, seen) = watch(&mut child, &serial, FULL_BOOT_TIMEOUT, |text| {
                text.contains(ok_line)
            });
            if !seen {
                stop(child);
                panic!("no {ok_line:?} within {FULL_BOOT_TIMEOUT:?}; console:\n{console}");
            }
            let status = child.wait().expect("wait");
            assert!(
                status.success(),
                "snapvmm did not end cleanly after the guest's reset: {status}"
            );
        }
    }
}

/// A DSDT with two virtio-mmio devices, as the VMM builds it.
fn sample_dsdt() -> Vec<u8> {
    acpi::dsdt(&[
        MmioDevice {
            mmio_base: 0xd000_0000,
            gsi: 5,
        },
        MmioDevice {
            mmio_base: 0xd000_1000,
            gsi: 6,
        },
    ])
    .unwrap()
}

/// ASL with iasl's `/* */` and `//` comments removed and whitespace collapsed.
fn without_comments(asl: &str) -> String {
    let mut code = String::new();
    for line in asl.lines() {
        let mut line = line.split("//").next().unwrap_or_default().to_string();
        while let Some(start) = line.find("/*") {
            match line[start..].find("*/") {
                Some(end) => line.replace_range(start..start + end + 2, ""),
                None => line.truncate(start),
            }
        }
        code.push_str(&line);
        code.push(' ');
    }
    code.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn dsdt_disassembles_with_iasl() {
    let test = "dsdt_disassembles_with_iasl";
    if !have_iasl(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("dsdt.dat");
    std::fs::write(&table, sample_dsdt()).unwrap();
    let output = Command::new("iasl")
        .current_dir(dir.path())
        .args(["-d", "dsdt.dat"])
        .output()
        .expect("run iasl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl -d failed:\n{log}");
    assert!(
        !log.to_ascii_lowercase().contains("error"),
        "iasl reported errors:\n{log}"
    );
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).expect("iasl wrote dsdt.dsl");
    let compact = without_comments(&dsl);
    for needle in [
        "DefinitionBlock (\"\", \"DSDT\", 2, \"SNAPVM\", \"SVMMDSDT\"",
        "Device (COM1)",
        "Name (_HID, EisaId (\"PNP0501\")",
        "IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )",
        "Device (V000)",
        "Device (V001)",
        "Name (_HID, \"LNRO0005\")",
        "Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )",
        "Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000, )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000006, }",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
    ] {
        assert!(compact.contains(needle), "{needle:?} not in:\n{dsl}");
    }
}
