//! The jail's directory tree, made on the host before any namespace exists.
//!
//! ```text
//! CHROOT_BASE/snapvmm/ID/          root:root 0755
//!   root/                          UID:GID 0700: the VMM's `/`, where it writes (API socket,
//!                                  snapshot overlays, checkpoints)
//!     snapvmm                      the binary (hard link, or read-only bind mount)
//!     <--file placements>          hard links, or bind mounts (directories, other filesystems)
//!     lib64/…, usr/lib/…           read-only bind mounts of the ELF interpreter and libraries
//!     dev/{null,urandom,kvm,…}     device nodes with the host's numbers, owned UID:GID, 0600
//!     proc/                        a procfs of the jail's PID namespace (the VMM reads
//!                                  /proc/self/pagemap for checkpoints)
//! ```
//!
//! Hard links and device nodes are made here, in the host's mount namespace; bind mounts are
//! only *planned* here (their empty mount points created) and made by the jail's first process
//! in its own mount namespace, so they vanish with it and a cleanup from the host never reaches
//! through one.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::AtFlags;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, fchownat, Gid, Uid};

use super::args::{JailSpec, Placement};

/// Where the binary is inside the jail.
pub const JAILED_BINARY: &str = "/snapvmm";

/// Device nodes every jail gets.
const ALWAYS_DEVICES: &[&str] = &["/dev/null", "/dev/urandom"];

/// A bind mount the jail's first process makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// The host path.
    pub source: PathBuf,
    /// The mount point, an absolute path inside the jail.
    pub target: PathBuf,
    /// Read-only (libraries, the binary) or read-write (disks, checkpoint directories).
    pub read_only: bool,
}

/// What [`prepare`] made: the bind mounts still to do.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Bind mounts, in the order to make them.
    pub mounts: Vec<BindMount>,
}

/// Errors name the path they are about.
fn error(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// `root` joined with the absolute jail path `inside`.
pub fn host_path(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// Makes the jail directory (refusing an existing one) and everything in it that lives on the
/// host's filesystem. On error the caller removes `spec.jail_dir`.
pub fn prepare(spec: &JailSpec, binary: &Path, libraries: &[PathBuf]) -> Result<Layout, String> {
    let base = spec.jail_dir.parent().expect("the jail dir has a parent");
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(base)
        .map_err(|e| error("creating", base, e))?;
    // Not recursive: a jail dir made meanwhile by another jailer is refused.
    DirBuilder::new()
        .mode(0o755)
        .create(&spec.jail_dir)
        .map_err(|e| error("creating the jail", &spec.jail_dir, e))?;
    let root = spec.root();
    DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .map_err(|e| error("creating", &root, e))?;

    let mut layout = Layout::default();
    place(&root, binary, Path::new(JAILED_BINARY), true, &mut layout)?;
    for placement in &spec.files {
        place_owned(&root, placement, spec.uid, spec.gid, &mut layout)?;
    }
    for library in libraries {
        let source = library
            .canonicalize()
            .map_err(|e| error("resolving", library, e))?;
        let target = host_path(&root, library);
        make_parents(&root, &target, None)?;
        empty_file(&target)?;
        layout.mounts.push(BindMount {
            source,
            target: library.clone(),
            read_only: true,
        });
    }
    let dev = root.join("dev");
    make_dir(&dev, 0o755)?;
    let devices = ALWAYS_DEVICES
        .iter()
        .copied()
        .chain(spec.devices.iter().map(|d| d.path()));
    for device in devices {
        device_node(&root, Path::new(device), spec.uid, spec.gid)?;
    }
    make_dir(&root.join("proc"), 0o555)?;
    // Given to the VMM's user last: until now no process of that user on the host could
    // swap a directory of the jail for a symbolic link under the jailer's mknod and links.
    chown(&root, Some(spec.uid), Some(spec.gid)).map_err(|e| error("chown", &root, e))?;
    Ok(layout)
}

/// Puts `placement` into the jail and gives it to `uid`:`gid` (the VMM opens disks read-write
/// and writes snapshot files beside them).
fn place_owned(
    root: &Path,
    placement: &Placement,
    uid: Uid,
    gid: Gid,
    layout: &mut Layout,
) -> Result<(), String> {
    make_parents(root, &host_path(root, &placement.jail), Some((uid, gid)))?;
    place(root, &placement.host, &placement.jail, false, layout)?;
    chown_tree(&placement.host, uid, gid)
}

/// Hard-links the file `host` at `inside`, or plans a bind mount (a directory, a file on
/// another filesystem).
fn place(
    root: &Path,
    host: &Path,
    inside: &Path,
    read_only: bool,
    layout: &mut Layout,
) -> Result<(), String> {
    let target = host_path(root, inside);
    let meta = std::fs::metadata(host).map_err(|e| error("reading", host, e))?;
    let bind = if meta.is_dir() {
        make_dir(&target, 0o700)?;
        true
    } else {
        match std::fs::hard_link(host, &target) {
            Ok(()) => false,
            // Another filesystem, or a filesystem without hard links.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM)) => {
                empty_file(&target)?;
                true
            }
            Err(e) => return Err(error("linking", host, e)),
        }
    };
    if bind {
        layout.mounts.push(BindMount {
            source: host.to_path_buf(),
            target: inside.to_path_buf(),
            read_only,
        });
    }
    Ok(())
}

/// Gives `path` (and, for a directory, everything in it) to `uid`:`gid`, never following a
/// symbolic link out of it.
fn chown_tree(path: &Path, uid: Uid, gid: Gid) -> Result<(), String> {
    fchownat(
        None,
        path,
        Some(uid),
        Some(gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| error("chown", path, e))?;
    let meta = path
        .symlink_metadata()
        .map_err(|e| error("reading", path, e))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| error("reading", path, e))? {
            let entry = entry.map_err(|e| error("reading", path, e))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Makes the missing parents of `target` (below `root`), owned by `owner` when given.
fn make_parents(root: &Path, target: &Path, owner: Option<(Uid, Gid)>) -> Result<(), String> {
    let parent = target.parent().unwrap_or(root);
    let missing: Vec<_> = parent
        .ancestors()
        .take_while(|p| *p != root && !p.exists())
        .map(Path::to_path_buf)
        .collect();
    for dir in missing.iter().rev() {
        make_dir(dir, if owner.is_some() { 0o700 } else { 0o755 })?;
        if let Some((uid, gid)) = owner {
            chown(dir, Some(uid), Some(gid)).map_err(|e| error("chown", dir, e))?;
        }
    }
    Ok(())
}

fn make_dir(path: &Path, mode: u32) -> Result<(), String> {
    DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| error("creating", path, e))
}

/// An empty file: a mount point for a file bind mount.
fn empty_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|e| error("creating", path, e))
}

/// A character device node at `device` in the jail with the host node's numbers, owned by
/// `uid`:`gid` and readable and writable by it alone.
fn device_node(root: &Path, device: &Path, uid: Uid, gid: Gid) -> Result<(), String> {
    let meta = std::fs::metadata(device).map_err(|e| error("the host's", device, e))?;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let target = host_path(root, device);
    mknod(
        &target,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major.into(), minor.into()),
    )
    .map_err(|e| error("mknod", &target, e))?;
    chown(&target, Some(uid), Some(gid)).map_err(|e| error("chown", &target, e))
}

/// The shared objects the running binary uses: its ELF interpreter (`PT_INTERP`, as named,
/// since the kernel looks it up by that path) and every library mapped into this process
/// (the jailer is the binary it jails, so its mappings are exactly what the VMM loads).
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let mut libraries = Vec::new();
    if let Some(interpreter) = interpreter(binary)? {
        libraries.push(interpreter);
    }
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("reading /proc/self/maps: {e}"))?;
    let binary = binary.canonicalize().unwrap_or_else(|_| binary.into());
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let Some(path) = line.split_whitespace().nth(5).map(PathBuf::from) else {
            continue;
        };
        let shared_object = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(".so"));
        if shared_object && path.is_file() && path != binary && !libraries.contains(&path) {
            libraries.push(path);
        }
    }
    Ok(libraries)
}

/// The binary's `PT_INTERP`, if it has one (a static binary does not).
fn interpreter(binary: &Path) -> Result<Option<PathBuf>, String> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    use std::os::unix::ffi::OsStrExt;

    // Read on demand: only the headers are needed, not the whole (debug-sized) binary.
    let file = File::open(binary).map_err(|e| error("reading", binary, e))?;
    let data = object::ReadCache::new(file);
    let elf = ElfFile64::<object::Endianness, _>::parse(&data)
        .map_err(|e| error("parsing", binary, e))?;
    let endian = elf.endian();
    for header in elf.elf_program_headers() {
        if header.p_type(endian) != object::elf::PT_INTERP {
            continue;
        }
        let bytes = header
            .data(endian, &data)
            .map_err(|_| error("parsing", binary, "bad PT_INTERP"))?;
        let bytes = bytes.split(|b| *b == 0).next().unwrap_or_default();
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(bytes));
        return Ok(Some(path));
    }
    Ok(None)
}

/// Removes a jail dir the jailer made and could not finish. Only called from the host's mount
/// namespace, where the jail holds no mount, so nothing outside the jail dir is touched (hard
/// links go, their files stay).
pub fn remove(jail_dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(jail_dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!(
                "snapvmm jail: warning: removing {}: {e}",
                jail_dir.display()
            );
        }
    }
    // CHROOT_BASE/snapvmm, if this was its only jail.
    if let Some(parent) = jail_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let libraries = libraries(&exe).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
        assert!(!libraries.contains(&exe));
    }

    #[test]
    fn host_paths_stay_below_the_root() {
        assert_eq!(
            host_path(Path::new("/j/root"), Path::new("/a/b")),
            Path::new("/j/root/a/b")
        );
    }
}
