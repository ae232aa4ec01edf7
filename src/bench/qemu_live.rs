//! QEMU's own live external snapshot under a guest write load: a Linux guest (Debian's
//! kernel and the busybox initramfs of `scripts/build-initramfs.sh`, `shell` workload) under
//! QEMU-TCG writes 4 KiB blocks to its virtio disk with O_DIRECT in a loop and prints a
//! line per block; QMP `blockdev-snapshot-sync` moves the disk onto a new overlay meanwhile.
//!
//! Two figures: the QMP command's round trip (QEMU drains the disk and switches inside it,
//! holding the big lock, so it bounds the host-side hold), and the guest-visible stall: the
//! gap between the loop's lines that spans the command, against the loop's usual gap. TCG
//! is slow and the loop forks `dd` for every block, so the gaps carry milliseconds of noise;
//! the figure says what a guest saw, not a sub-millisecond hold.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::images;
use super::model::{Figure, Status};
use super::qmp::Qmp;
use super::qsd::qemu_escape;
use super::Bench;

/// How long the guest may take to boot to its shell under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest may stay silent once its loop runs.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest's write loop: 4 KiB, O_DIRECT, random block of the first 512 MiB, a line each.
const LOOP: &str = "while :; do dd if=/dev/zero of=/dev/vda bs=4096 count=1 \
                    seek=$((RANDOM * 4)) oflag=direct 2>/dev/null; echo w; done\n";

/// The kernel and initramfs: `SNAPVMM_GUEST_DIR` (as `scripts/fetch-guest-kernel.sh` and
/// `scripts/build-initramfs.sh` fill it), else `target/guest` under the current directory.
pub(super) fn guest_files() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("SNAPVMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/guest"));
    (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"))
}

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let family = "Live overlay switch";
    let qmp_fig = Figure::new(
        "switch.qemu.qmp",
        family,
        "QEMU blockdev-snapshot-sync, QMP round trip",
        "QEMU (TCG)",
        "ms",
    )
    .what(
        "QMP blockdev-snapshot-sync of a 1 GiB qcow2 virtio disk of a QEMU-TCG Linux guest \
         writing 4 KiB O_DIRECT blocks in a loop: command to reply (QEMU drains and switches \
         the disk inside the command)",
    );
    let guest_fig = Figure::new(
        "switch.qemu.guest",
        family,
        "QEMU guest write-loop gap spanning the snapshot",
        "QEMU (TCG)",
        "ms",
    )
    .what(
        "The same guest: the gap between two lines of its write loop (one dd of 4 KiB \
         O_DIRECT per line) that spans the blockdev-snapshot-sync, minus the loop's median \
         gap: the guest-visible stall, with TCG's and fork's noise",
    );
    let (kernel, initramfs) = guest_files();
    let reason = if bench.tools.qemu_system.is_none() {
        Some((
            Status::NotInstalled,
            "qemu-system-x86_64 not installed".to_string(),
        ))
    } else if bench.quick {
        Some((
            Status::Skipped,
            "not run with --quick (boots a Linux guest under TCG)".to_string(),
        ))
    } else if !kernel.is_file() || !initramfs.is_file() {
        Some((
            Status::Skipped,
            format!(
                "no guest kernel/initramfs at {} and {} (scripts/fetch-guest-kernel.sh and \
                 scripts/build-initramfs.sh, or set SNAPVMM_GUEST_DIR)",
                kernel.display(),
                initramfs.display()
            ),
        ))
    } else {
        None
    };
    if let Some((status, note)) = reason {
        bench.unmeasured(qmp_fig, status, &note);
        bench.unmeasured(guest_fig, status, note);
        return;
    }
    let Some(qemu) = bench.tools.qemu_system.clone() else {
        return;
    };
    bench.step("QEMU-TCG guest: booting (slow)");
    let dir = bench.dir.join("qemu-live");
    let count = bench.samples(3, 10);
    let result =
        images::fresh_dir(&dir).and_then(|()| measure(&qemu, &kernel, &initramfs, &dir, count));
    match result {
        Ok((qmp, guest)) => {
            bench.record(qmp_fig, Ok(qmp));
            bench.record(guest_fig, Ok(guest));
        }
        Err(e) => {
            bench.record(qmp_fig, Err(e.clone()));
            bench.record(guest_fig, Err(e));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The QEMU process, killed when dropped.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    /// Waits for a console line containing `text`.
    fn wait_for(&self, text: &str, timeout: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(text) => return Ok(at),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "the QEMU guest did not print {text:?} in {timeout:?}"
                    ))
                }
            }
        }
    }

    /// The instants of the loop's next `n` lines.
    fn loop_lines(&self, n: usize) -> Result<Vec<Instant>, String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.lines.recv_timeout(LINE_TIMEOUT) {
                Ok((at, line)) if line.trim() == "w" => out.push(at),
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "the guest's write loop stalled for {LINE_TIMEOUT:?}"
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// Boots the guest, starts its loop, takes `count` snapshots: (QMP round trips, stalls) in ms.
fn measure(
    qemu: &Path,
    kernel: &Path,
    initramfs: &Path,
    dir: &Path,
    count: usize,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let disk = dir.join("disk.qcow2");
    images::qcow2(&disk, 1 << 30, None)?;
    let socket = dir.join("qmp.sock");
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet snapvmm.workload=shell"])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,id=vda,cache=none",
            qemu_escape(&disk.to_string_lossy())
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            qemu_escape(&socket.to_string_lossy())
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
        (Some(i), Some(o)) => (i, o),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            return Err("QEMU's console pipes are missing".into());
        }
    };
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut vm = Vm {
        child,
        stdin,
        lines,
    };
    let mut qmp = Qmp::connect(&socket, BOOT_TIMEOUT)?;
    vm.wait_for("workload shell", BOOT_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(1));
    vm.stdin
        .write_all(LOOP.as_bytes())
        .map_err(|e| format!("typing into the QEMU guest: {e}"))?;
    // The loop's usual gap, from 50 lines once it runs.
    let warm = vm.loop_lines(50)?;
    let mut gaps: Vec<f64> = warm.windows(2).map(|w| ms(w[1] - w[0])).collect();
    gaps.sort_by(f64::total_cmp);
    let usual = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);

    let (mut round_trips, mut stalls) = (Vec::new(), Vec::new());
    for n in 0..count {
        // Forget lines already printed; the next one is the gap's start.
        while vm.lines.try_recv().is_ok() {}
        let before = vm.loop_lines(1)?[0];
        let overlay = dir.join(format!("s{n}.qcow2"));
        let start = Instant::now();
        qmp.execute(
            "blockdev-snapshot-sync",
            json!({
                "device": "vda",
                "snapshot-file": overlay.to_string_lossy(),
                "format": "qcow2",
            }),
        )?;
        let end = Instant::now();
        round_trips.push(ms(end - start));
        // The first line after the command: the gap from the last line before it spans it.
        let mut last = before;
        loop {
            let at = vm.loop_lines(1)?[0];
            if at > end {
                stalls.push((ms(at - last) - usual).max(0.0));
                break;
            }
            last = at;
        }
        let _ = vm.loop_lines(10)?;
    }
    let _ = qmp.execute("quit", json!({}));
    Ok((round_trips, stalls))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
