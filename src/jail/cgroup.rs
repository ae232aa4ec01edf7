//! The jail's cgroup v2: `<cgroup2 mount>/snapvmm/ID` with the `--cgroup` settings written.
//!
//! Only cgroup v2 is supported. When settings are asked for and the host has no cgroup2
//! mount, or its hierarchy lacks a controller a setting needs (a host that keeps `memory` on
//! cgroup v1, say), the jail is refused: running without the limits asked for would be a
//! silent failure.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Where this jail's cgroup is, below the cgroup2 mount.
const PARENT: &str = "snapvmm";

/// A cgroup the jailer made.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

/// The first cgroup2 mount point in `mountinfo` (`/proc/self/mountinfo`'s format).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, rest) = line.split_once(" - ")?;
        if rest.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let point = mount.split_whitespace().nth(4)?;
        // Spaces and the like are octal-escaped (`\040`).
        Some(PathBuf::from(unescape(point)))
    })
}

fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Cgroup {
    /// Makes the cgroup for jail `id` and writes `settings` into it; `None` when there are no
    /// settings.
    pub fn create(id: &str, settings: &[(String, String)]) -> Result<Option<Cgroup>, String> {
        if settings.is_empty() {
            return Ok(None);
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo).ok_or(
            "--cgroup: this host has no cgroup v2 hierarchy (no cgroup2 mount); cgroup v1 is \
             not supported",
        )?;
        let offered = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(|e| format!("reading {}/cgroup.controllers: {e}", mount.display()))?;
        let mut controllers: Vec<&str> = Vec::new();
        for (key, _) in settings {
            let controller = key.split('.').next().unwrap_or_default();
            if controller == "cgroup" || controllers.contains(&controller) {
                continue;
            }
            if !offered.split_whitespace().any(|c| c == controller) {
                return Err(format!(
                    "--cgroup {key}: the cgroup v2 hierarchy at {} has no {controller} \
                     controller (it offers: {}); the host may keep {controller} on cgroup v1",
                    mount.display(),
                    offered.trim()
                ));
            }
            controllers.push(controller);
        }
        let parent = mount.join(PARENT);
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating {}: {e}", parent.display())),
        }
        for controller in &controllers {
            // Controllers are handed down level by level.
            write(
                &mount.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            )?;
            write(
                &parent.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            )?;
        }
        let path = parent.join(id);
        std::fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let cgroup = Cgroup { path };
        for (key, value) in settings {
            if let Err(e) = write(&cgroup.path.join(key), value) {
                cgroup.remove();
                return Err(format!("--cgroup {key}={value}: {e}"));
            }
        }
        Ok(Some(cgroup))
    }

    /// Moves the calling process into the cgroup (before it execs, so every thread of the VMM
    /// is accounted there).
    pub fn join(&self) -> Result<(), String> {
        write(&self.path.join("cgroup.procs"), "0")
    }

    /// Removes the cgroup once its processes are gone.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!(
                "snapvmm jail: warning: removing cgroup {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mountinfo = "\
30 24 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 24 0:31 / /sys/fs/cgroup/my\\040unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/my unified"))
        );
        assert_eq!(
            cgroup2_mount("30 24 0:26 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
