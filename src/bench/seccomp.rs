//! What the seccomp filters cost, side by side in one run: `snapvmm run` processes of the
//! `io-bench` micro-guest with `--seccomp=off` and with the default filters (`kill`), rounds
//! alternating between the two, measuring the guest's 4 KiB I/O rate, a checkpoint save through
//! the API, and a whole-process `snapvmm restore` of that checkpoint to its API answering.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use snapvmm_api::ApiClient;

use super::model::{Figure, Status};
use super::process::{restore_until_api, wait_api, Process};
use super::Bench;

const FAMILY: &str = "Seccomp";
/// How long the guest may stay silent.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The guest's disk: every cluster allocated, as the other io-bench figures use it.
const DISK_SIZE: u64 = 16 << 20;
/// Guest memory of the measured VMs.
const MEMORY_MIB: u64 = 64;
/// The two modes, in the order each round runs them.
const MODES: [&str; 2] = ["off", "kill"];

/// Measures I/O rate, checkpoint save and whole-process restore with and without filters.
pub fn run(bench: &mut Bench) {
    let figures: Vec<[Figure; 3]> = MODES.iter().map(|mode| figures(mode)).collect();
    if let Err(reason) = vmm::check_kvm() {
        for fig in figures.into_iter().flatten() {
            bench.unmeasured(fig, Status::Skipped, format!("KVM unusable: {reason}"));
        }
        return;
    }
    bench.step("seccomp filters on and off".to_string());
    let dir = bench.dir.join("seccomp");
    // Differences of a few percent under run-to-run noise of tens: more rounds than elsewhere.
    let rounds = bench.samples(2, 10);
    let window = if bench.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    let mut samples: Vec<[Result<Vec<f64>, String>; 3]> = MODES
        .iter()
        .map(|_| [Ok(Vec::new()), Ok(Vec::new()), Ok(Vec::new())])
        .collect();
    let prepared = super::images::fresh_dir(&dir)
        .and_then(|()| super::micro_guest::filled_disk(&dir.join("base.qcow2"), DISK_SIZE));
    for round in 0..rounds {
        for (mode, results) in MODES.iter().zip(samples.iter_mut()) {
            let round_dir = dir.join(format!("{mode}-{round}"));
            let measured = prepared
                .clone()
                .and_then(|()| one_round(&bench.exe, &dir, &round_dir, mode, window));
            for (slot, value) in results.iter_mut().zip(split(measured)) {
                if let Ok(list) = slot {
                    match value {
                        Ok(v) => list.push(v),
                        Err(e) => *slot = Err(e),
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&round_dir);
        }
    }
    for (figs, results) in figures.into_iter().zip(samples) {
        for (fig, result) in figs.into_iter().zip(results) {
            bench.record(fig, result);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One round's three values, or its error three times.
fn split(measured: Result<[f64; 3], String>) -> [Result<f64, String>; 3] {
    match measured {
        Ok(values) => values.map(Ok),
        Err(e) => [Err(e.clone()), Err(e.clone()), Err(e)],
    }
}

/// The figures of `mode`: I/O rate, checkpoint save, whole-process restore.
fn figures(mode: &str) -> [Figure; 3] {
    let tool = format!("--seccomp={mode}");
    let label = |what: &str| format!("{what}, seccomp {mode}");
    [
        Figure::new(
            &format!("seccomp.io4k.{mode}"),
            FAMILY,
            &label("guest 4K I/O rate"),
            &tool,
            "ops/s",
        )
        .higher_is_better()
        .what(format!(
            "io-bench micro-guest ({MEMORY_MIB} MiB, 4 KiB random reads and writes on a 16 MiB \
             qcow2 disk) in a `snapvmm run --seccomp={mode}` process: requests completed per \
             second of host time over a window of its console lines, one sample per round"
        )),
        Figure::new(
            &format!("seccomp.ckpt_save.{mode}"),
            FAMILY,
            &label("checkpoint save"),
            &tool,
            "ms",
        )
        .what(format!(
            "PUT /vm/checkpoint of the running io-bench guest ({MEMORY_MIB} MiB) of a \
             `snapvmm run --seccomp={mode}` process, request to answer"
        )),
        Figure::new(
            &format!("seccomp.restore.{mode}"),
            FAMILY,
            &label("whole-process restore"),
            &tool,
            "ms",
        )
        .what(format!(
            "exec of `snapvmm restore DIR --api-socket S --serial null --seccomp={mode}` of that \
             checkpoint until GET /vm answers"
        )),
    ]
}

/// One `snapvmm run` of io-bench in `mode` on an overlay of the shared disk: its I/O rate over
/// `window`, one checkpoint save (ms), and a whole-process restore of it (ms).
fn one_round(
    exe: &Path,
    shared: &Path,
    dir: &Path,
    mode: &str,
    window: Duration,
) -> Result<[f64; 3], String> {
    super::images::fresh_dir(dir)?;
    let disk = dir.join("vda.qcow2");
    let base = shared.join("base.qcow2");
    super::images::qcow2(&disk, DISK_SIZE, Some(&base.to_string_lossy()))?;
    let socket = dir.join("api.sock");
    let client = ApiClient::new(&socket).map_err(|e| format!("API client runtime: {e}"))?;
    let mut child = Process(
        Command::new(exe)
            .arg("run")
            .args(["--guest", "builtin:io-bench", "--memory"])
            .arg(MEMORY_MIB.to_string())
            .arg("--disk")
            .arg(format!("path={},format=qcow2", disk.display()))
            .args(["--serial", "stdout", "--seccomp", mode, "--api-socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {} run: {e}", exe.display()))?,
    );
    let lines = console_lines(&mut child)?;
    wait_api(&client, &mut child, Instant::now())?;
    let rate = io_rate(&lines, window)?;
    let target = dir.join("checkpoint");
    let request = serde_json::json!({ "dir": target });
    let start = Instant::now();
    let answer = client
        .raw("PUT", "/vm/checkpoint", request.to_string().as_bytes())
        .map_err(|e| format!("PUT /vm/checkpoint: {e}"))?;
    let save = start.elapsed().as_secs_f64() * 1e3;
    if !(200..300).contains(&answer.status) {
        return Err(format!(
            "PUT /vm/checkpoint answered {}: {}",
            answer.status, answer.body
        ));
    }
    drop(child);
    let restore = restore_until_api(
        exe,
        &target,
        &dir.join("restored.sock"),
        &["--seccomp", mode],
    )?;
    Ok([rate, save, restore])
}

/// A thread reading `child`'s stdout, sending each line with when it arrived.
fn console_lines(child: &mut Process) -> Result<Receiver<(Instant, String)>, String> {
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| "the console is not piped".to_string())?;
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Ok(received)
}

/// Requests per second the io-bench guest reports over at least `window` of its lines.
fn io_rate(lines: &Receiver<(Instant, String)>, window: Duration) -> Result<f64, String> {
    let mut first: Option<Instant> = None;
    let mut ops = 0u64;
    loop {
        let (at, text) = lines
            .recv_timeout(TIMEOUT)
            .map_err(|_| format!("the guest printed nothing for {TIMEOUT:?}"))?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let ["io-bench", "ops", count, "ticks", _, "max", _, "errors", errors] = words[..] else {
            if text.contains("io error") {
                return Err(format!("guest: {text}"));
            }
            continue;
        };
        if errors != "0" {
            return Err(format!("the guest saw I/O errors: {text}"));
        }
        let count: u64 = count
            .parse()
            .map_err(|_| format!("unexpected guest line {text:?}"))?;
        // The first line only starts the clock: its requests ran before it.
        let Some(start) = first else {
            first = Some(at);
            continue;
        };
        ops += count;
        let elapsed = at - start;
        if elapsed >= window {
            return Ok(ops as f64 / elapsed.as_secs_f64());
        }
    }
}
