//! `snapvmm` child processes as the benchmarks drive them: killed when dropped, timed from
//! exec until their API answers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapvmm_api::ApiClient;

/// How long a child's API may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `client`'s API answers GET /vm with 200; fails when `child` exits first or
/// nothing answers for [`ANSWER_TIMEOUT`] after `start`.
pub fn wait_api(client: &ApiClient, child: &mut Process, start: Instant) -> Result<(), String> {
    loop {
        if let Ok(answer) = client.raw("GET", "/vm", &[]) {
            if answer.status == 200 {
                return Ok(());
            }
            return Err(format!(
                "GET /vm answered {}: {}",
                answer.status, answer.body
            ));
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!("snapvmm exited early: {status}"));
        }
        if start.elapsed() > ANSWER_TIMEOUT {
            return Err(format!("the API did not answer in {ANSWER_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One whole-process restore: exec of `snapvmm restore TARGET --api-socket SOCKET --serial
/// null EXTRA...` until its API answers; ms. The process is killed afterwards.
pub fn restore_until_api(
    exe: &Path,
    target: &Path,
    socket: &Path,
    extra: &[&str],
) -> Result<f64, String> {
    let client = ApiClient::new(socket).map_err(|e| format!("API client runtime: {e}"))?;
    let start = Instant::now();
    let mut child = Process(
        Command::new(exe)
            .arg("restore")
            .arg(target)
            .arg("--api-socket")
            .arg(socket)
            .args(["--serial", "null"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {} restore: {e}", exe.display()))?,
    );
    wait_api(&client, &mut child, start)?;
    let took = start.elapsed().as_secs_f64() * 1e3;
    drop(child);
    let _ = std::fs::remove_file(socket);
    Ok(took)
}
