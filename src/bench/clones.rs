//! Clones of a snapshot with memory, as a user starts them: a `snapvmm run` process (this
//! binary) running the counter micro-guest, one tree snapshot with memory, then
//! `PUT /snapshots/{name}/clone` for N clones, timed from the request to its answer (the
//! answer comes once every clone runs). Each round's clones are destroyed before the next.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapvmm_api::ApiClient;

use super::model::{Figure, Status};
use super::Bench;

const FAMILY: &str = "Clones";
/// How long the parent VM may take to serve its API.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Measures the time to N running clones for N = 1 and 8 (1 and 4 with `--quick`).
pub fn run(bench: &mut Bench) {
    let counts: &[u32] = if bench.quick { &[1, 4] } else { &[1, 8] };
    let mib = bench.memory_mib.first().copied().unwrap_or(128);
    let figures: Vec<Figure> = counts.iter().map(|&n| figure(n, mib)).collect();
    if let Err(reason) = vmm::check_kvm() {
        for fig in figures {
            bench.unmeasured(fig, Status::Skipped, format!("KVM unusable: {reason}"));
        }
        return;
    }
    bench.step(format!("clones of a {mib} MiB guest"));
    let dir = bench.dir.join("clones");
    let rounds = bench.samples(2, 5);
    let mut parent =
        super::images::fresh_dir(&dir).and_then(|()| Parent::start(&bench.exe, &dir, mib));
    for (fig, &count) in figures.into_iter().zip(counts) {
        let result = match &mut parent {
            Ok(parent) => (0..rounds)
                .map(|round| parent.clone_round(&dir.join(format!("c{count}-{round}")), count))
                .collect(),
            Err(e) => Err(e.clone()),
        };
        bench.record(fig, result);
    }
    drop(parent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The figure of `count` clones.
fn figure(count: u32, mib: u64) -> Figure {
    Figure::new(
        &format!("clone.create.{count}"),
        FAMILY,
        &format!("{count} clone(s), {mib} MiB guest"),
        "snapvmm",
        "ms",
    )
    .what(format!(
        "PUT /snapshots/s1/clone with count {count} on a running {mib} MiB counter \
         micro-guest's snapshot with memory, until the answer (every clone running)"
    ))
    .param(f64::from(count))
}

/// The parent VM: a `snapvmm run` process with one snapshot `s1`; killed when dropped.
struct Parent {
    child: Child,
    api: ApiClient,
    /// The parent's stderr: its last lines explain a failed request.
    log: PathBuf,
}

impl Parent {
    /// Starts the counter guest on a fresh disk in `dir` and takes snapshot `s1`.
    fn start(exe: &Path, dir: &Path, mib: u64) -> Result<Parent, String> {
        let disk = dir.join("base.qcow2");
        super::images::qcow2(&disk, 1 << 20, None)?;
        let socket = dir.join("api.sock");
        let log = dir.join("parent.log");
        let stderr =
            std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let child = Command::new(exe)
            .arg("run")
            .args(["--guest", "builtin:counter", "--memory", &mib.to_string()])
            .arg("--disk")
            .arg(format!("path={},format=qcow2", disk.display()))
            .args(["--serial", "null", "--api-socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting {} run: {e}", exe.display()))?;
        let api = ApiClient::new(&socket).map_err(|e| format!("API client runtime: {e}"))?;
        let mut parent = Parent { child, api, log };
        let start = Instant::now();
        while parent.api.raw("GET", "/vm", &[]).is_err() {
            if let Ok(Some(status)) = parent.child.try_wait() {
                return Err(format!("snapvmm run exited early: {status}"));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!("the VM's API did not answer in {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        parent.put("/snapshots", &serde_json::json!({ "name": "s1" }))?;
        Ok(parent)
    }

    /// `PUT path` with a JSON body; returns the answer's body, or the error it carried.
    fn put(&mut self, path: &str, body: &serde_json::Value) -> Result<String, String> {
        let answer = self
            .api
            .raw("PUT", path, body.to_string().as_bytes())
            .map_err(|e| format!("PUT {path}: {e}{}", self.last_words()))?;
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(format!(
                "PUT {path} answered {}: {}",
                answer.status, answer.body
            ))
        }
    }

    /// How the parent ended, if it did, and the end of its stderr, for an error message.
    fn last_words(&mut self) -> String {
        // A moment for a dying parent to be reaped.
        std::thread::sleep(Duration::from_millis(100));
        let ended = match self.child.try_wait() {
            Ok(Some(status)) => format!(" (snapvmm run ended: {status})"),
            _ => String::new(),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            ended
        } else {
            format!("{ended} (snapvmm run said: {tail})")
        }
    }

    /// Starts `count` clones of `s1` in `dir`, then destroys them; ms to the answer.
    fn clone_round(&mut self, dir: &Path, count: u32) -> Result<f64, String> {
        let request = serde_json::json!({ "count": count, "dir": dir });
        let start = Instant::now();
        let answer = self.put("/snapshots/s1/clone", &request)?;
        let took = start.elapsed().as_secs_f64() * 1e3;
        let clones: Vec<serde_json::Value> = serde_json::from_str(&answer)
            .map_err(|e| format!("the clone answer is not a list: {e}: {answer}"))?;
        for clone in &clones {
            let dir = clone
                .get("dir")
                .and_then(|d| d.as_str())
                .map(PathBuf::from)
                .ok_or_else(|| format!("a clone without a dir: {clone}"))?;
            self.put("/clones/destroy", &serde_json::json!({ "dir": dir }))?;
        }
        Ok(took)
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
