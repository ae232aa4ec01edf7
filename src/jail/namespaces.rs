//! The jail's namespaces and its root: run by the jail's first process (PID 1 of the new PID
//! namespace), as root, before privileges are dropped.

use std::fs::File;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{chdir, pivot_root, sethostname};

use super::args::{JailSpec, Netns};
use super::layout::{host_path, Layout};

/// Enters new mount, IPC and UTS namespaces and the network namespace `spec` asks for. (The
/// PID namespace was made by the jailer before it forked this process.)
pub fn enter(spec: &JailSpec) -> Result<(), String> {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    if spec.netns == Netns::New {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare({flags:?}): {e}"))?;
    if let Netns::Join(path) = &spec.netns {
        let file = File::open(path).map_err(|e| format!("--netns {}: {e}", path.display()))?;
        setns(file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("--netns {}: setns: {e}", path.display()))?;
    }
    sethostname(&spec.id).map_err(|e| format!("sethostname: {e}"))?;
    // Nothing mounted from here on propagates back to the host, and the host's later mounts
    // do not appear in the jail.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))
}

/// Bind-mounts `source` on `target`, never with devices or set-user-ID files.
fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    let describe = |e| {
        format!(
            "bind-mounting {} on {}: {e}",
            source.display(),
            target.display()
        )
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(describe)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    // The flags of a bind mount change only through a remount.
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(describe)
}

/// Makes the planned bind mounts and the jail's procfs, then pivots into the jail root and
/// detaches the host's tree: afterwards nothing outside the jail is reachable by path.
pub fn pivot(root: &Path, layout: &Layout) -> Result<(), String> {
    // pivot_root needs the new root to be a mount point. (No remount with MS_NODEV: the
    // jail's device nodes live on it.)
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting {} on itself: {e}", root.display()))?;
    for planned in &layout.mounts {
        bind(
            &planned.source,
            &host_path(root, &planned.target),
            planned.read_only,
        )?;
    }
    // A procfs of the jail's PID namespace: it shows the jail's processes only. The VMM reads
    // /proc/self/pagemap to find the pages a checkpoint saves.
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc in the jail: {e}"))?;
    chdir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one, then is detached,
    // with no directory for it inside the jail.
    pivot_root(".", ".").map_err(|e| format!("pivot_root into {}: {e}", root.display()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the host's root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}
