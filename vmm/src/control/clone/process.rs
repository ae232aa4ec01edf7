//! Clone processes: each clone is a `snapvmm restore` of the snapshot's checkpoint with its
//! disks on its own overlays, its own API socket, console log and snapshot tree. Started,
//! waited for (its API socket appears once it runs), and stopped here.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::error::{ControlError, Result};
use super::super::types::CloneInfo;

/// How often a start or a stop is polled.
const POLL: Duration = Duration::from_millis(5);
/// How long a stopped clone may take to go after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes of a failed clone's log quoted in the error.
const LOG_TAIL: usize = 2000;

/// How clone processes are started: the `snapvmm` binary to run and how long a clone may
/// take to serve its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneLauncher {
    /// The `snapvmm` executable (its `restore` subcommand runs each clone).
    pub binary: PathBuf,
    /// How long a clone may take from spawn to serving its API socket.
    pub startup_timeout: Duration,
}

impl Default for CloneLauncher {
    /// This process's own executable: right for the `snapvmm` binary; a program embedding
    /// the VMM sets [`CloneLauncher::binary`] to a `snapvmm` it ships.
    fn default() -> Self {
        CloneLauncher {
            binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("snapvmm")),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// One clone process being started.
pub(super) struct Starting {
    pub info: CloneInfo,
    pub child: Child,
    log: PathBuf,
}

impl CloneLauncher {
    /// Spawns one clone: `snapvmm restore CHECKPOINT` in `dir`, with `disk_tops` (disk name,
    /// overlay) and its socket, console and tree in `dir`. Its own process group, so a
    /// signal to the caller's terminal does not reach it; output in `dir/snapvmm.log`.
    pub(super) fn spawn(
        &self,
        id: &str,
        dir: &Path,
        checkpoint: &Path,
        disk_tops: &[(String, PathBuf)],
    ) -> Result<Starting> {
        let api_socket = dir.join("api.sock");
        let serial = dir.join("serial.log");
        let log = dir.join("snapvmm.log");
        let failed = |what: &str, e: std::io::Error| {
            ControlError::Failed(format!("clone {}: {what}: {e}", dir.display()))
        };
        let out = std::fs::File::create(&log).map_err(|e| failed("creating its log", e))?;
        let err = out
            .try_clone()
            .map_err(|e| failed("duplicating its log", e))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("restore")
            .arg(checkpoint)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--serial")
            .arg(&serial)
            .arg("--snapshot-metadata")
            .arg(dir.join(crate::sandbox::DEFAULT_METADATA));
        for (name, path) in disk_tops {
            let mut spec = std::ffi::OsString::from(format!("{name}="));
            spec.push(path);
            command.arg("--disk-top").arg(spec);
        }
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .current_dir(dir)
            .process_group(0);
        let child = crate::confine::spawn(command)
            .map_err(|e| failed(&format!("starting {}", self.binary.display()), e))?;
        Ok(Starting {
            info: CloneInfo {
                id: id.to_string(),
                api_socket,
                serial,
                pid: child.id(),
                dir: dir.to_path_buf(),
            },
            child,
            log,
        })
    }

    /// Waits until every clone serves its API (the socket is renamed into place once it
    /// listens), one deadline for all.
    pub(super) fn wait_ready(&self, starting: &mut [Starting]) -> Result<()> {
        let deadline = Instant::now() + self.startup_timeout;
        for clone in starting.iter_mut() {
            loop {
                if clone.info.api_socket.exists() {
                    break;
                }
                if let Ok(Some(status)) = clone.child.try_wait() {
                    return Err(ControlError::Failed(format!(
                        "clone {} exited ({status}) before serving its API: {}",
                        clone.info.dir.display(),
                        log_tail(&clone.log)
                    )));
                }
                if Instant::now() > deadline {
                    return Err(ControlError::Failed(format!(
                        "clone {} did not serve its API within {:?}: {}",
                        clone.info.dir.display(),
                        self.startup_timeout,
                        log_tail(&clone.log)
                    )));
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }
}

impl Starting {
    /// Kills a clone that failed to start with the others, and reaps it.
    pub(super) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Leaves the running clone to itself; a thread reaps it when it ends, so it never
    /// lingers as a zombie of this process.
    pub(super) fn detach(mut self) {
        let spawned = std::thread::Builder::new()
            .name(format!("reap-{}", self.info.pid))
            .spawn(move || {
                let _ = self.child.wait();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to reap a clone: it stays a zombie when it ends");
        }
    }
}

/// The end of a clone's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let start = text.len().saturating_sub(LOG_TAIL);
    let tail = String::from_utf8_lossy(&text[start..]).trim().to_string();
    if tail.is_empty() {
        "(its log is empty)".into()
    } else {
        tail
    }
}

/// Whether `clone.pid` is alive and is that clone (its command line names its socket): a
/// recycled pid is never taken for the clone.
pub fn is_clone_process(clone: &CloneInfo) -> bool {
    if !is_running(clone.pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", clone.pid)) else {
        return false;
    };
    let socket = clone.api_socket.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == socket)
}

/// Whether `clone.pid` now names a process that is not the clone: its command line is there
/// and does not name the clone's socket (the clone ended and the pid was reused). An empty
/// command line is a process on its way out, still the clone.
fn is_another_process(clone: &CloneInfo) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", clone.pid)) else {
        return false;
    };
    let socket = clone.api_socket.as_os_str().as_encoded_bytes();
    !cmdline.is_empty() && !cmdline.split(|b| *b == 0).any(|arg| arg == socket)
}

/// Whether process `pid` exists and has not ended (a zombie, state Z or X, has).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// Stops a clone's process if it still runs: SIGTERM, then SIGKILL after a grace period;
/// returns once it is gone.
pub fn stop(clone: &CloneInfo) -> Result<()> {
    let Ok(pid) = libc::pid_t::try_from(clone.pid) else {
        return Ok(());
    };
    // The identity is checked once, before the first signal: a process on its way out
    // loses its command line before it turns into a zombie, so from then on only its state
    // is watched (the pid cannot be reused before the zombie is reaped).
    if !is_clone_process(clone) {
        return Ok(());
    }
    let mut signal = libc::SIGTERM;
    let mut deadline = Instant::now() + STOP_GRACE;
    while is_running(clone.pid) && !is_another_process(clone) {
        // SAFETY: kill(2) with a pid checked above to be the clone's process, not reaped
        // since (it is still running).
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(ControlError::Failed(format!(
                    "stopping clone {} (pid {pid}): {e}",
                    clone.dir.display()
                )));
            }
        }
        if Instant::now() > deadline {
            if signal == libc::SIGKILL {
                return Err(ControlError::Failed(format!(
                    "clone {} (pid {pid}) did not end after SIGKILL",
                    clone.dir.display()
                )));
            }
            signal = libc::SIGKILL;
            deadline = Instant::now() + STOP_GRACE;
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}
