//! `snapvmm jail`'s command line and its validation into a [`JailSpec`].
//!
//! Everything is checked here, before the jailer creates a directory or a namespace: a bad id,
//! uid or chroot base leaves nothing behind.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use clap::Args;
use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid};

/// Longest jail id accepted (Firecracker's limit).
const MAX_ID_LEN: usize = 64;

/// Firecracker's jailer default for `RLIMIT_NOFILE`.
const DEFAULT_NO_FILE: u64 = 2048;

/// Firecracker's jailer default for `RLIMIT_FSIZE`: unlimited (a VMM writes whole disk images).
const DEFAULT_FSIZE: u64 = libc::RLIM_INFINITY;

/// Arguments of `snapvmm jail`.
#[derive(Debug, Args)]
pub struct JailArgs {
    /// The jail's name, 1 to 64 of A-Z a-z 0-9 and '-'; the jail is CHROOT_BASE/snapvmm/ID/root.
    #[arg(long, value_name = "ID")]
    id: String,
    /// The user the VMM runs as (not 0).
    #[arg(long, value_name = "UID")]
    uid: u32,
    /// The group the VMM runs as (not 0).
    #[arg(long, value_name = "GID")]
    gid: u32,
    /// An existing directory the jail is made under.
    #[arg(long, value_name = "DIR")]
    chroot_base: PathBuf,
    /// Puts HOST_PATH into the jail at JAIL_PATH [default: /NAME]: a hard link when on the same
    /// filesystem, otherwise (and for directories) a bind mount; made owned by UID:GID.
    /// Repeatable.
    #[arg(long = "file", value_name = "HOST_PATH[:JAIL_PATH]")]
    files: Vec<String>,
    /// A cgroup v2 setting for the jail's cgroup snapvmm/ID, e.g. memory.max=512M or
    /// cpu.max="50000 100000". Repeatable.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    cgroups: Vec<String>,
    /// Join the network namespace at PATH (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH", conflicts_with = "new_netns")]
    netns: Option<PathBuf>,
    /// Give the VMM a new, empty network namespace.
    #[arg(long)]
    new_netns: bool,
    /// Detach: return once the VMM has started, its output going to /dev/null.
    #[arg(long)]
    daemonize: bool,
    /// A resource limit: fsize=BYTES or no-file=N [defaults: fsize unlimited, no-file 2048].
    /// Repeatable.
    #[arg(long = "resource-limit", value_name = "NAME=VALUE")]
    resource_limits: Vec<String>,
    /// The jailed command, after `--`: run, restore or vhost-user-blk and its arguments, with
    /// paths as seen inside the jail.
    #[arg(last = true, required = true, value_name = "COMMAND ARGS")]
    command: Vec<String>,
}

/// Which network namespace the VMM gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// The jailer's own.
    Inherit,
    /// A new, empty one.
    New,
    /// The one at this path.
    Join(PathBuf),
}

/// A host file or directory put into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Where it is on the host (canonical).
    pub host: PathBuf,
    /// Where the VMM sees it, an absolute path without `..`.
    pub jail: PathBuf,
}

/// A device node the VMM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// `/dev/kvm`: every VM.
    Kvm,
    /// `/dev/userfaultfd`: a lazy restore's pager, where `userfaultfd(2)` is refused.
    Userfaultfd,
}

impl Device {
    /// The node's path, on the host and in the jail.
    pub fn path(self) -> &'static str {
        match self {
            Device::Kvm => "/dev/kvm",
            Device::Userfaultfd => "/dev/userfaultfd",
        }
    }
}

/// A validated jail: what [`super::main`] builds.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The jail's id.
    pub id: String,
    /// The VMM's user.
    pub uid: Uid,
    /// The VMM's group.
    pub gid: Gid,
    /// `CHROOT_BASE/snapvmm/ID`.
    pub jail_dir: PathBuf,
    /// What goes into the jail.
    pub files: Vec<Placement>,
    /// Device nodes the command needs.
    pub devices: Vec<Device>,
    /// cgroup v2 settings, in order.
    pub cgroups: Vec<(String, String)>,
    /// The network namespace.
    pub netns: Netns,
    /// Whether to detach.
    pub daemonize: bool,
    /// Resource limits (soft = hard).
    pub limits: Vec<(Resource, u64)>,
    /// The snapvmm subcommand and its arguments.
    pub command: Vec<String>,
}

impl JailSpec {
    /// The directory that becomes the VMM's `/`.
    pub fn root(&self) -> PathBuf {
        self.jail_dir.join("root")
    }
}

/// Checks `args` and resolves them into a [`JailSpec`].
pub fn validate(args: JailArgs) -> Result<JailSpec, String> {
    validate_id(&args.id)?;
    if args.uid == 0 || args.gid == 0 {
        return Err(format!(
            "--uid {} --gid {}: the VMM never runs as root in a jail (uid and gid 0 refused)",
            args.uid, args.gid
        ));
    }
    let base = &args.chroot_base;
    match std::fs::metadata(base) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(format!("--chroot-base {}: not a directory", base.display())),
        Err(e) => return Err(format!("--chroot-base {}: {e}", base.display())),
    }
    let base = base
        .canonicalize()
        .map_err(|e| format!("--chroot-base {}: {e}", base.display()))?;
    let jail_dir = base.join("snapvmm").join(&args.id);
    if jail_dir.symlink_metadata().is_ok() {
        return Err(format!(
            "jail {} already exists ({}): remove it or pick another --id",
            args.id,
            jail_dir.display()
        ));
    }
    let files = placements(&args.files)?;
    let command = args.command;
    let devices = devices(&command)?;
    check_inputs_placed(&command, &files)?;
    let cgroups = args
        .cgroups
        .iter()
        .map(|spec| cgroup_setting(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let netns = match (args.netns, args.new_netns) {
        (Some(path), _) => {
            std::fs::metadata(&path).map_err(|e| format!("--netns {}: {e}", path.display()))?;
            Netns::Join(path)
        }
        (None, true) => Netns::New,
        (None, false) => Netns::Inherit,
    };
    Ok(JailSpec {
        id: args.id,
        uid: Uid::from_raw(args.uid),
        gid: Gid::from_raw(args.gid),
        jail_dir,
        files,
        devices,
        cgroups,
        netns,
        daemonize: args.daemonize,
        limits: resource_limits(&args.resource_limits)?,
        command,
    })
}

/// An id is 1 to 64 of `[A-Za-z0-9-]`: it names a directory and a cgroup, so no `/`, no `..`.
fn validate_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--id {id:?}: expected 1 to {MAX_ID_LEN} characters from A-Z a-z 0-9 and '-'"
        ))
    }
}

/// Paths inside the jail that the jailer itself fills.
const RESERVED: &[&str] = &["/snapvmm", "/dev", "/proc", "/lib", "/lib64", "/usr"];

/// Parses the `--file` flags.
fn placements(specs: &[String]) -> Result<Vec<Placement>, String> {
    let mut seen = HashSet::new();
    let mut placed = Vec::new();
    for spec in specs {
        let (host, jail) = match spec.split_once(':') {
            Some((host, jail)) => (PathBuf::from(host), PathBuf::from(jail)),
            None => {
                let host = PathBuf::from(spec);
                let name = host
                    .file_name()
                    .ok_or_else(|| format!("--file {spec:?}: no file name"))?;
                let jail = Path::new("/").join(name);
                (host, jail)
            }
        };
        let host = host
            .canonicalize()
            .map_err(|e| format!("--file {spec:?}: {}: {e}", host.display()))?;
        let normal = jail.is_absolute()
            && jail.components().count() > 1
            && jail
                .components()
                .skip(1)
                .all(|c| matches!(c, Component::Normal(_)));
        if !normal {
            return Err(format!(
                "--file {spec:?}: the jail path must be absolute, below / and without '..'"
            ));
        }
        if RESERVED
            .iter()
            .any(|r| jail.starts_with(r) || Path::new(r).starts_with(&jail))
        {
            return Err(format!(
                "--file {spec:?}: {} is the jailer's (reserved: {})",
                jail.display(),
                RESERVED.join(", ")
            ));
        }
        if !seen.insert(jail.clone()) {
            return Err(format!("--file {spec:?}: {} placed twice", jail.display()));
        }
        placed.push(Placement { host, jail });
    }
    Ok(placed)
}

/// The device nodes the jailed command needs; refuses commands the jailer does not run.
fn devices(command: &[String]) -> Result<Vec<Device>, String> {
    match command.first().map(String::as_str) {
        Some("run") => Ok(vec![Device::Kvm]),
        // A restore from a store pages guest memory in lazily through userfaultfd.
        Some("restore") if command.iter().any(|a| a.starts_with("s3://")) => {
            Ok(vec![Device::Kvm, Device::Userfaultfd])
        }
        Some("restore") => Ok(vec![Device::Kvm]),
        Some("vhost-user-blk") => Ok(Vec::new()),
        Some(other) => Err(format!(
            "cannot jail {other:?}: expected run, restore or vhost-user-blk after --"
        )),
        None => Err("give the command to jail after --: run, restore or vhost-user-blk".into()),
    }
}

/// The files the command reads at start (disk images, kernel, initrd, config file), as named
/// in its arguments.
fn inputs(command: &[String]) -> Vec<PathBuf> {
    let mut inputs = Vec::new();
    let mut args = command.iter().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        if !matches!(flag, "--disk" | "--kernel" | "--initrd" | "--config") {
            continue;
        }
        let Some(value) = inline.or_else(|| args.next().cloned()) else {
            continue;
        };
        if flag == "--disk" {
            let path = value
                .split(',')
                .find_map(|part| part.strip_prefix("path="))
                .map(PathBuf::from);
            inputs.extend(path);
        } else {
            inputs.push(PathBuf::from(value));
        }
    }
    inputs
}

/// Every input the command names must be a placed file or inside a placed directory: the
/// mistake is caught before any namespace exists, with the path named.
fn check_inputs_placed(command: &[String], files: &[Placement]) -> Result<(), String> {
    for input in inputs(command) {
        if input.is_relative() {
            return Err(format!(
                "{}: paths in a jailed command are absolute, as seen inside the jail",
                input.display()
            ));
        }
        if !files.iter().any(|p| input.starts_with(&p.jail)) {
            return Err(format!(
                "the jailed command names {} but no --file puts it into the jail",
                input.display()
            ));
        }
    }
    Ok(())
}

/// Parses a `--cgroup KEY=VALUE` flag: KEY is a cgroup interface file name.
fn cgroup_setting(spec: &str) -> Result<(String, String), String> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("--cgroup {spec:?}: expected KEY=VALUE"))?;
    let key_ok = key.contains('.')
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
    if !key_ok || key == "cgroup.procs" || key == "cgroup.threads" {
        return Err(format!(
            "--cgroup {spec:?}: {key:?} is not a cgroup v2 setting (such as memory.max)"
        ));
    }
    if value.is_empty() || value.contains('\n') {
        return Err(format!("--cgroup {spec:?}: empty or multi-line value"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses the `--resource-limit` flags over Firecracker's defaults.
fn resource_limits(specs: &[String]) -> Result<Vec<(Resource, u64)>, String> {
    let mut fsize = DEFAULT_FSIZE;
    let mut no_file = DEFAULT_NO_FILE;
    for spec in specs {
        let (name, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("--resource-limit {spec:?}: expected NAME=VALUE"))?;
        let value: u64 = value
            .parse()
            .map_err(|e| format!("--resource-limit {spec:?}: {e}"))?;
        match name {
            "fsize" => fsize = value,
            "no-file" => no_file = value,
            _ => {
                return Err(format!(
                    "--resource-limit {spec:?}: unknown limit {name:?} (fsize or no-file)"
                ))
            }
        }
    }
    Ok(vec![
        (Resource::RLIMIT_FSIZE, fsize),
        (Resource::RLIMIT_NOFILE, no_file),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids() {
        assert!(validate_id("vm-1").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", "a..b", "x y", "é", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_placements() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        std::fs::write(&disk, b"x").unwrap();
        let host = disk.to_str().unwrap();
        let placed = placements(&strings(&[host])).unwrap();
        assert_eq!(placed[0].jail, Path::new("/disk.qcow2"));
        let placed = placements(&[format!("{host}:/vm/a.qcow2")]).unwrap();
        assert_eq!(placed[0].jail, Path::new("/vm/a.qcow2"));
        for bad in ["relative", "/../x", "/", "/dev/kvm", "/lib/x.so", "/a/../b"] {
            assert!(placements(&[format!("{host}:{bad}")]).is_err(), "{bad}");
        }
        assert!(placements(&[format!("{host}:/a"), format!("{host}:/a")]).is_err());
        assert!(placements(&strings(&["/nonexistent/x"])).is_err());
    }

    #[test]
    fn devices_and_inputs() {
        let run = strings(&[
            "run",
            "--guest",
            "builtin:io-loop",
            "--disk",
            "path=/d.qcow2",
        ]);
        assert_eq!(devices(&run).unwrap(), vec![Device::Kvm]);
        assert_eq!(inputs(&run), vec![PathBuf::from("/d.qcow2")]);
        let linux = strings(&["run", "--kernel=/k", "--disk=id=x,path=/vm/d.raw"]);
        assert_eq!(
            inputs(&linux),
            vec![PathBuf::from("/k"), PathBuf::from("/vm/d.raw")]
        );
        let lazy = strings(&["restore", "s3://b/p/n", "--cache", "/c"]);
        assert!(devices(&lazy).unwrap().contains(&Device::Userfaultfd));
        assert!(devices(&strings(&["vhost-user-blk"])).unwrap().is_empty());
        assert!(devices(&strings(&["img", "info"])).is_err());
        let placed = [Placement {
            host: "/h".into(),
            jail: "/vm".into(),
        }];
        assert!(
            check_inputs_placed(&linux, &placed).is_err(),
            "/k is not placed"
        );
        let run = strings(&["run", "--disk", "path=/vm/d.qcow2"]);
        assert!(check_inputs_placed(&run, &placed).is_ok());
        let missing = strings(&["run", "--disk", "path=/other.qcow2"]);
        assert!(check_inputs_placed(&missing, &placed).is_err());
        let relative = strings(&["run", "--disk", "path=d.qcow2"]);
        assert!(check_inputs_placed(&relative, &placed).is_err());
    }

    #[test]
    fn cgroup_and_limits() {
        assert_eq!(
            cgroup_setting("cpu.max=50000 100000").unwrap(),
            ("cpu.max".into(), "50000 100000".into())
        );
        for bad in [
            "memory.max",
            "../x=1",
            "cgroup.procs=1",
            "max=1",
            "memory.max=",
        ] {
            assert!(cgroup_setting(bad).is_err(), "{bad}");
        }
        let limits = resource_limits(&strings(&["no-file=64"])).unwrap();
        assert!(limits.contains(&(Resource::RLIMIT_NOFILE, 64)));
        assert!(limits.contains(&(Resource::RLIMIT_FSIZE, DEFAULT_FSIZE)));
        assert!(resource_limits(&strings(&["nproc=1"])).is_err());
        assert!(resource_limits(&strings(&["fsize=big"])).is_err());
    }
}
