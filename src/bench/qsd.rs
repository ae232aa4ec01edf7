//! qemu-storage-daemon's block jobs: `block-stream` and `block-commit` (active, completed
//! once ready) over QMP, on the same chains as snapvmm's live jobs (`jobs`), so QEMU's live
//! block layer and snapvmm's are compared job for job. Timed from the QMP command to the
//! `BLOCK_JOB_COMPLETED` event; the daemon's start is not timed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::images;
use super::model::{Figure, Status};
use super::qmp::Qmp;
use super::tools::sync;
use super::Bench;

/// How long QMP may stay silent (a whole job included).
const TIMEOUT: Duration = Duration::from_secs(600);

/// Measures both jobs on `data` (a `mib` MiB data image), `rounds` times each.
pub fn run(bench: &mut Bench, made: Result<(), String>, data: &Path, mib: u64, rounds: usize) {
    for (kind, label) in [
        ("stream", "live stream job"),
        ("commit", "live active commit job"),
    ] {
        let fig = Figure::new(
            &format!("jobs.{kind}.live.qsd"),
            "Stream and commit",
            &format!("{label} (qemu-storage-daemon)"),
            "qemu-storage-daemon",
            "MiB/s",
        )
        .what(format!(
            "qemu-storage-daemon's {} over QMP on the same {mib} MiB chain as snapvmm's {label}; \
             {mib} MiB / time from the command to BLOCK_JOB_COMPLETED",
            if kind == "stream" {
                "block-stream"
            } else {
                "block-commit (active, block-job-complete once ready)"
            }
        ))
        .higher_is_better();
        let Some(qsd) = bench.tools.qsd.clone() else {
            bench.unmeasured(
                fig,
                Status::NotInstalled,
                "qemu-storage-daemon not installed",
            );
            continue;
        };
        if let Err(e) = &made {
            bench.record(fig, Err(e.clone()));
            continue;
        }
        bench.step(format!("qemu-storage-daemon {kind}"));
        let case = bench.dir.join("jobs").join("qsd");
        let result = (0..rounds)
            .map(|_| {
                let top = if kind == "stream" {
                    images::stream_case(data, &case, mib << 20)?
                } else {
                    images::commit_case(data, &case, mib << 20)?
                };
                let took = one(&qsd, &case, &top, kind == "commit");
                let _ = std::fs::remove_dir_all(&case);
                let took = took?;
                Ok(mib as f64 / took.as_secs_f64())
            })
            .collect();
        bench.record(fig, result);
    }
}

/// A child daemon, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One job on `top` in a fresh daemon; its time.
fn one(qsd: &Path, dir: &Path, top: &Path, commit: bool) -> Result<Duration, String> {
    let socket = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(qsd)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            qemu_escape(&top.to_string_lossy())
        ))
        .args(["--blockdev", "driver=qcow2,node-name=top,file=file0"])
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qemu_escape(&socket.to_string_lossy())
        ))
        .args(["--monitor", "chardev=qmp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qsd.display()))?;
    let mut daemon = Daemon(child);
    let mut qmp = match Qmp::connect(&socket, TIMEOUT) {
        Ok(qmp) => qmp,
        Err(e) => {
            let _ = daemon.0.kill();
            let mut said = String::new();
            if let Some(mut stderr) = daemon.0.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut said);
            }
            return Err(format!("{e}; qemu-storage-daemon said: {}", said.trim()));
        }
    };
    sync();
    let completed = |m: &Value| m["event"] == "BLOCK_JOB_COMPLETED";
    let start = Instant::now();
    if commit {
        qmp.execute("block-commit", json!({ "job-id": "job", "device": "top" }))?;
        let event = qmp.wait_event(|m| m["event"] == "BLOCK_JOB_READY" || completed(m))?;
        if event["event"] == "BLOCK_JOB_READY" {
            qmp.execute("block-job-complete", json!({ "device": "job" }))?;
            qmp.wait_event(completed)?
        } else {
            event
        }
    } else {
        qmp.execute("block-stream", json!({ "job-id": "job", "device": "top" }))?;
        qmp.wait_event(completed)?
    };
    let took = start.elapsed();
    let _ = qmp.execute("quit", json!({}));
    Ok(took)
}

/// QEMU's option syntax doubles a comma inside a value.
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}
