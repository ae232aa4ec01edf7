//! `snapvmm demo`: the whole story in one command, in-process on the `vmm` library.
//!
//! Boots the built-in micro-guest running `io-loop` (verified random reads and writes) on a
//! fresh qcow2 disk, and while it runs: a live disk-only snapshot, a stream (blockpull) that
//! makes the overlay standalone, a second snapshot, an active commit with pivot. Then the
//! guest reads back everything it wrote and checks it, the VM stops, and every image file
//! passes our check and `qemu-img check`. Each step is timed; a table (or `--json`) says
//! what happened.
//!
//! ```text
//! snapvmm demo [--dir DIR] [--size 1M] [--keep] [--json]
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::JobStatus;
use storage::qcow2::{CreateOptions, RepairMode};
use storage::LiveDisk;
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::console::{Console, SerialLine};
use vmm::{ExitReason, Vmm};

/// How long any one step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Seed of the guest's data pattern.
const SEED: u64 = 2026;
/// Guest RAM: the micro-guest needs little.
const MEMORY_MIB: u64 = 32;
/// How often a wait for the guest looks whether the VM has ended.
const POLL: Duration = Duration::from_millis(100);
/// Smallest disk: io-loop works in 16 KiB chunks and wants a few of them.
const MIN_SIZE: u64 = 64 << 10;

/// Arguments of `snapvmm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work in this directory (created if missing) instead of a temporary one; it is kept.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Size of the guest's disk (qemu-img suffixes: 256k, 1M, ...).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = crate::img::parse_size_arg)]
    size: u64,
    /// Keep the temporary directory (images and serial.log) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Print the steps as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One timed step of the demo.
#[derive(Debug, Clone, Serialize)]
struct Step {
    /// What was done.
    step: String,
    /// How long it took, in milliseconds.
    ms: f64,
    /// The guest's request count at the step's end, from its last progress line.
    guest_ops: Option<u64>,
    /// What came out of it.
    detail: String,
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    dir: String,
    /// Whether `dir` is left in place.
    kept: bool,
    steps: Vec<Step>,
    total_ms: f64,
    error: Option<String>,
}

/// The VM and what the demo knows about it while it runs.
struct Guest {
    vm: Option<Vmm>,
    disk: Arc<LiveDisk>,
    console: Console,
}

impl Guest {
    /// Waits for a console line for which `wanted` holds, printed at or after `since`.
    /// Fails after [`STEP_TIMEOUT`], or at once if the VM ends first (a guest that reset
    /// after an error prints nothing more).
    fn wait_line(
        &mut self,
        what: &str,
        since: Instant,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<SerialLine, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(line) = self.console.wait_for(POLL, &wanted) {
                if line.at >= since {
                    return Ok(line);
                }
                continue;
            }
            let ended = self.vm.as_ref().and_then(|vm| vm.exit_handle().reason());
            if ended.is_some() || Instant::now() > deadline {
                self.console.drain();
                let lines = self.console.lines();
                let tail: Vec<&str> = lines
                    .iter()
                    .skip(lines.len().saturating_sub(5))
                    .map(|l| l.text.as_str())
                    .collect();
                let why = match ended {
                    Some(reason) => format!("the VM ended ({reason:?})"),
                    None => format!("{STEP_TIMEOUT:?} passed"),
                };
                return Err(format!(
                    "{why} before the guest printed {what}; its last lines:\n  {}",
                    tail.join("\n  ")
                ));
            }
        }
    }

    /// Waits for an `io-loop ops N` progress line printed after `since`: proof that guest
    /// I/O goes on through whatever the disk is now.
    fn progress_after(&mut self, since: Instant) -> Result<u64, String> {
        let line = self.wait_line("an io-loop progress line", since, |l| {
            l.starts_with("io-loop ops ")
        })?;
        parse_ops(&line.text)
    }

    fn vm(&self) -> &Vmm {
        self.vm
            .as_ref()
            .expect("the VM runs until the demo stops it")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // An error left the VM running: stop it, so the process does not hang on vCPUs.
        if let Some(vm) = self.vm.take() {
            let _ = vm.stop();
        }
    }
}

/// `io-loop ops N errors E` -> N.
fn parse_ops(line: &str) -> Result<u64, String> {
    line.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unexpected progress line {line:?}"))
}

/// The steps so far, and the clock.
struct Steps {
    steps: Vec<Step>,
    start: Instant,
}

impl Steps {
    fn record(&mut self, step: &str, took: Duration, guest_ops: Option<u64>, detail: String) {
        self.steps.push(Step {
            step: step.to_string(),
            ms: took.as_secs_f64() * 1000.0,
            guest_ops,
            detail,
        });
    }
}

/// Runs a block job to its end; an active commit is completed (pivoted) once it is
/// ready. Returns the bytes it went through.
fn run_job(job: snapshot::Job, pivot: bool) -> Result<u64, String> {
    if pivot {
        if !job.wait_for(STEP_TIMEOUT, |s| {
            matches!(s, JobStatus::Ready | JobStatus::Concluded)
        }) {
            return Err(format!("job {} not ready in {STEP_TIMEOUT:?}", job.id()));
        }
        if job.status() == JobStatus::Ready {
            job.complete().map_err(|e| e.to_string())?;
        }
    }
    if !job.wait_for(STEP_TIMEOUT, |s| s == JobStatus::Concluded) {
        job.cancel();
        return Err(format!(
            "job {} did not finish in {STEP_TIMEOUT:?}",
            job.id()
        ));
    }
    job.wait().map_err(|e| format!("job {}: {e}", job.id()))?;
    Ok(job.progress().current)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn size_text(bytes: u64) -> String {
    crate::img::size::size_to_str(bytes)
}

/// The demo proper, recording into `steps`; the directory is prepared by the caller.
fn run_demo(dir: &Path, size: u64, steps: &mut Steps) -> Result<(), String> {
    let base = dir.join("base.qcow2");
    let s1 = dir.join("base.s1.qcow2");
    let s2 = dir.join("base.s1.s2.qcow2");
    for file in [&base, &s1, &s2] {
        if file.exists() {
            return Err(format!(
                "{} exists: give an empty --dir (the demo creates its own images)",
                file.display()
            ));
        }
    }

    let t = Instant::now();
    storage::qcow2::create(
        &base,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .map_err(|e| format!("creating {}: {e}", base.display()))?;
    steps.record(
        "create disk",
        t.elapsed(),
        None,
        format!("{} ({}, qcow2)", file_name(&base), size_text(size)),
    );

    let t = Instant::now();
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::IoLoop,
        seed: SEED,
    });
    config.memory_mib = MEMORY_MIB;
    config.disks.push(DiskConfig::new(&base));
    let log = std::fs::File::create(dir.join("serial.log"))
        .map_err(|e| format!("creating serial.log: {e}"))?;
    let (sink, console) = vmm::console::channel();
    let sink = sink.copy_to(Box::new(std::io::LineWriter::new(log)));
    let vm = Vmm::start_with_serial(&config, Box::new(sink)).map_err(|e| e.to_string())?;
    let disk = vm.disks()[0].disk.clone();
    let mut guest = Guest {
        vm: Some(vm),
        disk,
        console,
    };
    guest.wait_line("\"io-loop start\"", t, |l| l == "io-loop start")?;
    steps.record(
        "boot micro-guest",
        t.elapsed(),
        None,
        "io-loop on vda: verified 16 KiB random reads and writes".into(),
    );

    let t = Instant::now();
    let ops = guest.progress_after(t)?;
    steps.record(
        "guest I/O under way",
        t.elapsed(),
        Some(ops),
        "first progress line".into(),
    );

    live_step(&mut guest, steps, "live snapshot s1", |disk| {
        snapshot(disk, &s1)
    })?;
    // blockpull: copy base's data up into s1, which then stands alone.
    live_step(&mut guest, steps, "blockpull vda", |disk| {
        let job = stream(disk, StreamOptions::default()).map_err(|e| e.to_string())?;
        let copied = run_job(job, false)?;
        Ok(format!(
            "{} now standalone ({} examined)",
            file_name(&s1),
            size_text(copied)
        ))
    })?;
    live_step(&mut guest, steps, "live snapshot s2", |disk| {
        snapshot(disk, &s2)
    })?;
    // Active commit: s2 into s1, mirroring the guest's writes, then pivot onto s1.
    live_step(&mut guest, steps, "blockcommit --active --pivot", |disk| {
        let job = commit(disk, CommitOptions::default()).map_err(|e| e.to_string())?;
        let copied = run_job(job, true)?;
        let top = disk.top();
        if top.path() != s1 {
            return Err(format!(
                "after the pivot vda is on {}, not {}",
                top.path().display(),
                s1.display()
            ));
        }
        Ok(format!(
            "{} committed into {} ({}), vda pivoted",
            file_name(&s2),
            file_name(&s1),
            size_text(copied)
        ))
    })?;

    // The guest checks every chunk it wrote, then resets the VM.
    let t = Instant::now();
    vmm::guest::request_finish(guest.vm().memory()).map_err(|e| e.to_string())?;
    let verdict = guest.wait_line("its verdict", t, |l| l.starts_with("io-loop verify "))?;
    let vm = guest.vm.take().expect("still running");
    let reason = vm.wait().map_err(|e| format!("stopping the VM: {e}"))?;
    guest.console.drain();
    let total_ops = guest
        .console
        .lines()
        .iter()
        .rev()
        .find(|l| l.text.starts_with("io-loop ops "))
        .map(|l| parse_ops(&l.text))
        .transpose()?;
    let errors: Vec<&str> = guest
        .console
        .lines()
        .iter()
        .map(|l| l.text.as_str())
        .filter(|l| l.starts_with("io error"))
        .collect();
    if !errors.is_empty() {
        return Err(format!(
            "the guest saw {} I/O error(s):\n  {}",
            errors.len(),
            errors.join("\n  ")
        ));
    }
    if !verdict.text.starts_with("io-loop verify ok") {
        return Err(format!("the guest's verdict: {}", verdict.text));
    }
    if reason != ExitReason::Reset {
        return Err(format!(
            "the VM ended with {reason:?}, not the guest's reset"
        ));
    }
    steps.record(
        "guest verify + stop",
        t.elapsed(),
        total_ops,
        format!(
            "{}; no io error; disks flushed",
            verdict.text.trim_start_matches("io-loop ")
        ),
    );

    let images = [&base, &s1, &s2];
    let t = Instant::now();
    for image in images {
        let report = storage::qcow2::check(image, RepairMode::None)
            .map_err(|e| format!("checking {}: {e}", image.display()))?;
        if !report.is_clean() {
            return Err(format!(
                "{}: {} corruptions, {} leaks, {} check errors: {:?}",
                image.display(),
                report.corruptions,
                report.leaks,
                report.check_errors,
                report.messages
            ));
        }
    }
    steps.record(
        "snapvmm img check",
        t.elapsed(),
        None,
        format!("{} images clean", images.len()),
    );

    let t = Instant::now();
    let mut detail = format!("{} images clean", images.len());
    for image in images {
        // -U: this process may still hold the chain's images (and their locks) open.
        match Command::new("qemu-img")
            .args(["check", "-U"])
            .arg(image)
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => {
                return Err(format!(
                    "qemu-img check {}: {}{}",
                    image.display(),
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                detail = "skipped: qemu-img not installed (apt-get install qemu-utils)".into();
                break;
            }
            Err(e) => return Err(format!("running qemu-img: {e}")),
        }
    }
    steps.record("qemu-img check", t.elapsed(), None, detail);
    Ok(())
}

/// Runs `action` on the guest's disk while the guest does I/O, times it, and waits for a
/// guest progress line printed after it: proof that I/O goes on through the new chain.
/// `action` returns the step's detail.
fn live_step(
    guest: &mut Guest,
    steps: &mut Steps,
    step: &str,
    action: impl FnOnce(&Arc<LiveDisk>) -> Result<String, String>,
) -> Result<(), String> {
    let t = Instant::now();
    let detail = action(&guest.disk).map_err(|e| format!("{step}: {e}"))?;
    let took = t.elapsed();
    let ops = guest.progress_after(t + took)?;
    steps.record(step, took, Some(ops), detail);
    Ok(())
}

/// A live disk-only snapshot of `disk` into `overlay`; returns the step's detail.
fn snapshot(disk: &Arc<LiveDisk>, overlay: &Path) -> Result<String, String> {
    let report =
        external_snapshot(&[DiskOverlay::new(disk, overlay)]).map_err(|e| e.to_string())?;
    Ok(format!(
        "vda -> {}, guest I/O held {} us",
        file_name(overlay),
        report.quiesced_for.as_micros()
    ))
}

fn print_table(out: &mut impl Write, steps: &[Step], total: Duration) -> std::io::Result<()> {
    let width = steps.iter().map(|s| s.step.len()).max().unwrap_or(0).max(4);
    writeln!(
        out,
        "{:<width$}  {:>10}  {:>9}  detail",
        "step", "time", "guest ops"
    )?;
    for step in steps {
        let ops = step.guest_ops.map(|n| n.to_string()).unwrap_or_default();
        writeln!(
            out,
            "{:<width$}  {:>7.1} ms  {:>9}  {}",
            step.step, step.ms, ops, step.detail
        )?;
    }
    writeln!(
        out,
        "{:<width$}  {:>7.1} ms",
        "total",
        total.as_secs_f64() * 1000.0
    )
}

/// Runs `snapvmm demo`; returns the process exit status.
pub fn main(args: DemoArgs) -> u8 {
    if args.size < MIN_SIZE {
        eprintln!(
            "snapvmm demo: error: --size {}: the disk must hold at least {}",
            args.size,
            size_text(MIN_SIZE)
        );
        return 1;
    }
    if let Err(reason) = vmm::check_kvm() {
        eprintln!(
            "snapvmm demo: error: KVM is unusable: {reason}\n\
             The demo boots a VM: it needs /dev/kvm (a CPU with VT-x/AMD-V or a host KVM \
             module) and read-write access to it (root, or the kvm group)."
        );
        return 1;
    }
    let mut temp = None;
    let (dir, keep) = match &args.dir {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("snapvmm demo: error: --dir {}: {e}", dir.display());
                return 1;
            }
            (dir.clone(), true)
        }
        None => match tempfile::Builder::new().prefix("snapvmm-demo.").tempdir() {
            Ok(dir) => {
                let path = dir.path().to_path_buf();
                temp = Some(dir);
                (path, args.keep)
            }
            Err(e) => {
                eprintln!("snapvmm demo: error: creating a temporary directory: {e}");
                return 1;
            }
        },
    };
    let mut steps = Steps {
        steps: Vec::new(),
        start: Instant::now(),
    };
    let result = run_demo(&dir, args.size, &mut steps);
    let total = steps.start.elapsed();
    // Keep the evidence of a failure.
    let kept = keep || result.is_err();
    if kept {
        if let Some(temp) = temp {
            let _ = temp.keep();
        }
    }

    let mut out = std::io::stdout().lock();
    let written = if args.json {
        let report = Report {
            ok: result.is_ok(),
            dir: dir.display().to_string(),
            kept,
            steps: steps.steps,
            total_ms: total.as_secs_f64() * 1000.0,
            error: result.as_ref().err().cloned(),
        };
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        print_table(&mut out, &steps.steps, total).and_then(|()| {
            if result.is_ok() {
                writeln!(out, "demo ok")?;
            }
            if kept {
                writeln!(out, "files in {}", dir.display())?;
            }
            Ok(())
        })
    };
    if let Err(e) = written {
        eprintln!("snapvmm demo: error: writing the report: {e}");
        return 1;
    }
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("snapvmm demo: error: {message}");
            1
        }
    }
}
