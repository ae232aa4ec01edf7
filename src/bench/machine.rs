//! The machine a run measured: CPU, cores, memory, kernel, KVM kind, the filesystem of the
//! benchmark directory and the peer tools' versions. Every figure is only meaningful with it.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where a run took place.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// Host RAM in MiB (`MemTotal`).
    pub memory_mib: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// `hardware (vmx)`, `hardware (svm)` or `software (no vmx/svm flag)`, and whether
    /// /dev/kvm is usable.
    pub kvm: String,
    /// The benchmark directory.
    pub dir: String,
    /// Its filesystem type and the device behind it (`ext4 on /dev/vda`).
    pub filesystem: String,
    /// First line of each peer tool's `--version`, or `not installed`.
    pub tools: Vec<(String, String)>,
}

impl Machine {
    /// One line for figure captions.
    pub fn one_line(&self) -> String {
        format!(
            "{}, {} cores, {} MiB RAM, Linux {}, KVM {}, {} ({})",
            self.cpu, self.cores, self.memory_mib, self.kernel, self.kvm, self.dir, self.filesystem
        )
    }
}

/// Describes this machine, for a run in `dir`; `tools` are the peers' version lines.
pub fn describe(dir: &Path, tools: Vec<(String, String)>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let kind = if flags.contains(&"vmx") {
        "hardware (vmx)"
    } else if flags.contains(&"svm") {
        "hardware (svm)"
    } else {
        "software (no vmx/svm flag in /proc/cpuinfo)"
    };
    let usable = match vmm::check_kvm() {
        Ok(()) => "/dev/kvm usable".to_string(),
        Err(reason) => format!("/dev/kvm unusable: {reason}"),
    };
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_mib,
        kernel,
        kvm: format!("{kind}, {usable}"),
        dir: dir.display().to_string(),
        filesystem: filesystem_of(dir),
        tools,
    }
}

/// `TYPE on DEVICE` of the mount holding `dir` (the longest mount point that contains it).
fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let device = words.next()?;
            let point = unescape_mount(words.next()?);
            let kind = words.next()?;
            dir.starts_with(&point)
                .then(|| (point.len(), format!("{kind} on {device}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, text)| text)
        .unwrap_or_else(|| "unknown filesystem".into())
}

/// /proc/mounts writes a space in a path as `\040` (and tab, newline, backslash alike).
fn unescape_mount(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_this_machine() {
        let m = describe(Path::new("/"), vec![]);
        assert!(m.cores >= 1);
        assert!(!m.kvm.is_empty());
        assert_ne!(m.filesystem, "unknown filesystem", "/ is always mounted");
        assert!(m.one_line().contains(&m.kernel));
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
