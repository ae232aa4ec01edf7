//! The peer tools (qemu-img, qemu-storage-daemon, qemu-system-x86_64, Firecracker) and
//! running commands with a clock on them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The peers a run can compare against, each found on `PATH` or not.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `qemu-img`.
    pub qemu_img: Option<PathBuf>,
    /// `qemu-storage-daemon`.
    pub qsd: Option<PathBuf>,
    /// `qemu-system-x86_64`.
    pub qemu_system: Option<PathBuf>,
}

impl Tools {
    /// Looks every peer up on `PATH`.
    pub fn find() -> Tools {
        Tools {
            qemu_img: which("qemu-img"),
            qsd: which("qemu-storage-daemon"),
            qemu_system: which("qemu-system-x86_64"),
        }
    }

    /// Each peer's name and version line (or `not installed`), for the machine description.
    pub fn versions(&self, firecracker: Option<&Path>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = [
            ("qemu-img", &self.qemu_img),
            ("qemu-storage-daemon", &self.qsd),
            ("qemu-system-x86_64", &self.qemu_system),
        ]
        .into_iter()
        .map(|(name, path)| {
            let text = path
                .as_deref()
                .map_or_else(|| "not installed".to_string(), version);
            (name.to_string(), text)
        })
        .collect();
        if let Some(path) = firecracker {
            out.push(("firecracker".into(), version(path)));
        }
        out
    }
}

/// The first executable file called `name` in a directory of `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// First line of `TOOL --version`, or why there is none.
pub fn version(tool: &Path) -> String {
    match Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("unknown version")
            .trim()
            .to_string(),
        Err(e) => format!("{}: {e}", tool.display()),
    }
}

/// Runs `command` to its end and returns its wall time; a failure (it could not start, or
/// exited non-zero) names the command and carries its stderr.
pub fn timed(command: &mut Command) -> Result<Duration, String> {
    let what = describe(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let out = command.output().map_err(|e| format!("{what}: {e}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(took)
}

/// Runs `command` to its end and returns its stdout; a failure is explained as by [`timed`].
pub fn output(command: &mut Command) -> Result<String, String> {
    let what = describe(command);
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program arg arg...`, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Writes back the page cache, so one run does not pay for the previous one's dirty pages.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_a_made_up_tool() {
        assert!(which("sh").is_some());
        assert!(which("no-such-tool-snapvmm-bench").is_none());
    }

    #[test]
    fn timed_reports_failures() {
        assert!(timed(&mut Command::new("true")).is_ok());
        let err = timed(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        assert!(err.contains("boom") && err.contains("sh -c"), "{err}");
    }
}
