//! vhost-user-blk: a Linux guest's `dd` through `snapvmm vhost-user-blk` and through
//! `qemu-storage-daemon --export type=vhost-user-blk`, on the same qcow2 image; the method
//! of `benches/compare-vhost.sh`.
//!
//! One QEMU (TCG, q35, memfd shared memory) boots Debian's kernel with the busybox
//! initramfs of `scripts/build-initramfs.sh` and its `dd-bench` workload, on each backend in
//! turn, alternating which goes first every round. The workload drops the guest's page
//! cache before each case and prints `snapvmm: dd CASE BYTES SECONDS`, timed by the guest:
//! 1 MiB sequential reads (readahead on), 4 KiB O_DIRECT reads, 1 MiB and 4 KiB O_DIRECT
//! writes. Each boot gives one sample per case, in MB/s. Both backends open the image
//! buffered with one queue. Under TCG the guest's CPU is emulated, so absolute figures are
//! low and noisy; the ratio of medians is what compares the backends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::images;
use super::model::{Figure, Status};
use super::process::Process;
use super::qemu_live::guest_files;
use super::qsd::qemu_escape;
use super::tools::describe;
use super::Bench;

const FAMILY: &str = "vhost-user-blk";
/// The workload's cases, in the order it runs them: (name, what `dd` does).
pub const CASES: [(&str, &str); 4] = [
    (
        "read-1M-seq",
        "dd if=/dev/vda bs=1M count=256 (sequential, guest readahead, cold cache)",
    ),
    (
        "read-4k-direct",
        "dd if=/dev/vda bs=4k count=16384 iflag=direct",
    ),
    (
        "write-1M-direct",
        "dd of=/dev/vda bs=1M count=256 oflag=direct",
    ),
    (
        "write-4k-direct",
        "dd of=/dev/vda bs=4k count=16384 oflag=direct",
    ),
];
/// The two backends: (figure id part, tool name).
const BACKENDS: [(&str, &str); 2] = [("snapvmm", "snapvmm"), ("qsd", "qemu-storage-daemon")];
/// Size of the image, every cluster allocated (the guest's writes land in place).
const IMAGE_BYTES: u64 = 512 << 20;
/// How long one boot, all cases included, may take under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The id of a case's figure for a backend (`vhost.write-1M-direct.snapvmm`).
pub fn figure_id(case: &str, backend: &str) -> String {
    format!("vhost.{case}.{backend}")
}

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let unmeasured = |bench: &mut Bench, status: Status, note: String| {
        for (_, _, figure) in figures() {
            bench.unmeasured(figure, status, note.clone());
        }
    };
    let Some(qemu) = bench.tools.qemu_system.clone() else {
        let note = "qemu-system-x86_64 not installed".into();
        return unmeasured(bench, Status::NotInstalled, note);
    };
    let Some(qsd) = bench.tools.qsd.clone() else {
        let note = "qemu-storage-daemon not installed".into();
        return unmeasured(bench, Status::NotInstalled, note);
    };
    let (kernel, initramfs) = guest_files();
    if !kernel.is_file() || !initramfs.is_file() {
        let note = format!(
            "no guest kernel/initramfs at {} and {} (scripts/fetch-guest-kernel.sh and \
             scripts/build-initramfs.sh, or set SNAPVMM_GUEST_DIR)",
            kernel.display(),
            initramfs.display()
        );
        return unmeasured(bench, Status::Skipped, note);
    }
    let dir = bench.dir.join("vhost");
    let image = dir.join("disk.qcow2");
    bench.step("vhost-user-blk: 512 MiB image");
    let made = images::fresh_dir(&dir).and_then(|()| images::data(&image, IMAGE_BYTES));
    let guest = Guest {
        qemu,
        kernel,
        initramfs,
        dir: dir.clone(),
    };
    // samples[backend][case]
    let mut samples = vec![vec![Vec::new(); CASES.len()]; BACKENDS.len()];
    let mut notes = vec![String::new(); BACKENDS.len()];
    let boots = bench.samples(1, 3);
    let result = made.and_then(|()| {
        for round in 0..boots {
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for b in order {
                bench.step(format!(
                    "vhost-user-blk: Linux guest on {} (TCG, boot {} of {boots})",
                    BACKENDS[b].1,
                    round + 1
                ));
                let backend = match b {
                    0 => start_snapvmm(&bench.exe, &image, &dir)?,
                    _ => start_qsd(&qsd, &image, &dir)?,
                };
                let console = guest.boot(&backend.socket, BACKENDS[b].0)?;
                drop(backend);
                let boot = parse_console(&console)
                    .map_err(|e| format!("guest on {}: {e}", BACKENDS[b].1))?;
                for (c, mbps) in boot.rates.iter().enumerate() {
                    samples[b][c].push(*mbps);
                }
                if notes[b].is_empty() {
                    notes[b] = boot.describe();
                }
            }
        }
        Ok(())
    });
    for (c, b, mut figure) in figures() {
        match &result {
            Ok(()) => {
                figure.note.clone_from(&notes[b]);
                bench.record(figure, Ok(std::mem::take(&mut samples[b][c])));
            }
            Err(e) => bench.record(figure, Err(e.clone())),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every figure of the family with its indices in [`CASES`] and [`BACKENDS`], the
/// backends side by side within each case.
fn figures() -> Vec<(usize, usize, Figure)> {
    let mut out = Vec::new();
    for (c, (case, dd)) in CASES.iter().enumerate() {
        for (b, (id, tool)) in BACKENDS.iter().enumerate() {
            let figure = Figure::new(
                &figure_id(case, id),
                FAMILY,
                &format!("guest {case} ({tool})"),
                tool,
                "MB/s",
            )
            .what(format!(
                "A QEMU-TCG Linux guest's {dd} on a 512 MiB allocated qcow2 served by {tool} \
                 over vhost-user-blk (one queue, image opened buffered): bytes / the guest's \
                 own clock, one sample per boot"
            ))
            .higher_is_better();
            out.push((c, b, figure));
        }
    }
    out
}

/// A running backend, killed when dropped.
struct Backend {
    socket: PathBuf,
    _process: Process,
}

/// Starts `snapvmm vhost-user-blk` on `image`.
fn start_snapvmm(exe: &Path, image: &Path, dir: &Path) -> Result<Backend, String> {
    let socket = dir.join("snapvmm.sock");
    let mut command = Command::new(exe);
    command
        .arg("vhost-user-blk")
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", image.display()))
        .args(["--num-queues", "1"]);
    start(&mut command, socket)
}

/// Starts `qemu-storage-daemon` exporting `image` as vhost-user-blk, buffered like ours.
fn start_qsd(qsd: &Path, image: &Path, dir: &Path) -> Result<Backend, String> {
    let socket = dir.join("qsd.sock");
    let mut command = Command::new(qsd);
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file,filename={},cache.direct=off",
            qemu_escape(&image.to_string_lossy())
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk,file=file"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
             writable=on,num-queues=1",
            qemu_escape(&socket.to_string_lossy())
        ));
    start(&mut command, socket)
}

/// Spawns `command` and waits for it to create `socket`.
fn start(command: &mut Command, socket: PathBuf) -> Result<Backend, String> {
    let _ = std::fs::remove_file(&socket);
    let what = describe(command);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut process = Process(child);
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !socket.exists() {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!("{what}: exited early: {status}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: no socket after {SOCKET_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Backend {
        socket,
        _process: process,
    })
}

/// What boots the guest.
struct Guest {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    dir: PathBuf,
}

impl Guest {
    /// Boots the `dd-bench` guest on the vhost-user-blk `socket` until it powers off;
    /// returns its console.
    fn boot(&self, socket: &Path, name: &str) -> Result<String, String> {
        let console = self.dir.join(format!("console-{name}.log"));
        let out = std::fs::File::create(&console)
            .map_err(|e| format!("creating {}: {e}", console.display()))?;
        let mut command = Command::new(&self.qemu);
        command
            .args([
                "-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512",
            ])
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-machine",
                "memory-backend=mem",
            ])
            .arg("-chardev")
            .arg(format!(
                "socket,id=blk,path={}",
                qemu_escape(&socket.to_string_lossy())
            ))
            .args(["-device", "vhost-user-blk-pci,chardev=blk,num-queues=1"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=-1 snapvmm.workload=dd-bench",
                "-nographic",
                "-nodefaults",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null());
        let what = describe(&command);
        let child = command.spawn().map_err(|e| format!("{what}: {e}"))?;
        wait_until(Process(child), BOOT_TIMEOUT)
            .map_err(|e| format!("{}: {e}", self.qemu.display()))?;
        std::fs::read_to_string(&console).map_err(|e| format!("reading {}: {e}", console.display()))
    }
}

/// Waits for `process` to exit, killing it after `timeout`.
fn wait_until(mut process: Process, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match process.0.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => return Err(format!("did not finish in {timeout:?}")),
            Err(e) => return Err(format!("waiting: {e}")),
        }
    }
}

/// One boot's figures, from its console.
#[derive(Debug, Clone, PartialEq)]
struct BootResult {
    /// MB/s of each of [`CASES`].
    rates: Vec<f64>,
    /// The guest driver's queue limits (`max_segments=...`), as it printed them.
    queue: String,
    /// (reads, writes) the driver sent for each case, when printed.
    requests: Vec<Option<(u64, u64)>>,
}

impl BootResult {
    /// How the guest's driver split the I/O, for the figures' notes.
    fn describe(&self) -> String {
        let requests: Vec<String> = CASES
            .iter()
            .zip(&self.requests)
            .filter_map(|((case, _), r)| r.map(|(reads, writes)| (case, reads + writes)))
            .map(|(case, n)| format!("{case} {n}"))
            .collect();
        if self.queue.is_empty() && requests.is_empty() {
            return String::new();
        }
        format!(
            "guest queue limits: {}; requests per case: {}",
            if self.queue.is_empty() {
                "not printed"
            } else {
                &self.queue
            },
            requests.join(", ")
        )
    }
}

/// Reads the `dd-bench` lines of a console: every case must have its figure.
fn parse_console(console: &str) -> Result<BootResult, String> {
    let mut rates = vec![None; CASES.len()];
    let mut requests = vec![None; CASES.len()];
    let mut queue = String::new();
    let index = |name: &str| CASES.iter().position(|(case, _)| *case == name);
    for line in console.lines() {
        let fields: Vec<&str> = line.trim_end_matches('\r').split_whitespace().collect();
        match fields[..] {
            ["snapvmm:", "dd", case, bytes, seconds] => {
                if let (Some(c), Ok(bytes), Ok(seconds)) =
                    (index(case), bytes.parse::<f64>(), seconds.parse::<f64>())
                {
                    if seconds > 0.0 {
                        rates[c] = Some(bytes / seconds / 1e6);
                    }
                }
            }
            ["snapvmm:", "dd-requests", case, reads, writes] => {
                if let (Some(c), Ok(reads), Ok(writes)) =
                    (index(case), reads.parse(), writes.parse())
                {
                    requests[c] = Some((reads, writes));
                }
            }
            ["snapvmm:", "dd-queue", ..] => queue = fields[2..].join(" "),
            _ => {}
        }
    }
    let missing: Vec<&str> = CASES
        .iter()
        .zip(&rates)
        .filter(|(_, r)| r.is_none())
        .map(|((case, _), _)| *case)
        .collect();
    if !missing.is_empty() {
        let tail: Vec<&str> = console.lines().rev().take(10).collect();
        return Err(format!(
            "no dd figures for {} (is the initramfs's dd-bench workload there?); console \
             ends: {}",
            missing.join(", "),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(BootResult {
        rates: rates.into_iter().flatten().collect(),
        queue,
        requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workload_lines() {
        let console = "noise\r\nsnapvmm: dd-queue max_segments=254 max_sectors_kb=1280\r\n\
                       snapvmm: dd read-1M-seq 268435456 2.0\r\n\
                       snapvmm: dd-requests read-1M-seq 257 0\r\n\
                       snapvmm: dd read-4k-direct 67108864 8\n\
                       snapvmm: dd write-1M-direct 268435456 1.0\n\
                       snapvmm: dd-requests write-1M-direct 0 256\n\
                       snapvmm: dd write-4k-direct 67108864 10\n";
        let boot = parse_console(console).unwrap();
        let expected = [134.217728, 8.388608, 268.435456, 6.7108864];
        for (got, want) in boot.rates.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert_eq!(boot.queue, "max_segments=254 max_sectors_kb=1280");
        assert_eq!(boot.requests[2], Some((0, 256)));
        assert_eq!(boot.requests[1], None);
        assert!(boot.describe().contains("write-1M-direct 256"));
    }

    #[test]
    fn a_missing_case_or_a_failed_dd_is_an_error() {
        let console = "snapvmm: dd read-1M-seq 268435456 2.0\nsnapvmm: dd read-4k-direct FAILED\n";
        let err = parse_console(console).unwrap_err();
        assert!(
            err.contains("read-4k-direct") && err.contains("write-1M-direct"),
            "{err}"
        );
        assert!(!err.contains("read-1M-seq,"), "{err}");
    }

    #[test]
    fn figures_pair_every_case_with_both_backends() {
        let ids: Vec<String> = figures().into_iter().map(|(_, _, f)| f.id).collect();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[4], "vhost.write-1M-direct.snapvmm");
        assert_eq!(ids[5], "vhost.write-1M-direct.qsd");
    }
}
