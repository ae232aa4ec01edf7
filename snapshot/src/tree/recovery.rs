//! What the tree does when it opens after a crash: finish or undo the operation whose
//! [`Intent`] is still in the metadata, refuse a disk opened writable on a frozen image, and
//! find the files that use an image as their backing file before one is deleted.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use storage::device::Allocation;

use super::internal::open_alone;
use super::metadata::{Intent, IntentOp};
use super::*;

/// Most directory entries looked at for files built on an image; a larger directory keeps
/// the image rather than spend unbounded time (or guess).
const MAX_SCANNED_ENTRIES: usize = 4096;

/// Bytes of a file read to find its qcow2 backing file name (the name lies in the first
/// cluster; headers written by snapvmm and QEMU keep it in the first 64 KiB).
const HEADER_BYTES: u64 = 64 << 10;

/// Removes a file or (a checkpoint) directory; a missing one is no error.
pub(super) fn remove_path(path: &Path) {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => tracing::info!(path = %path.display(), "removed a file no snapshot uses"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing a file failed"),
    }
}

/// Whether the fresh overlay at `path` holds anything written after it was made, which means
/// the disk had switched to it. A file that does not open as qcow2 was cut short while it
/// was created: nothing used it.
fn overlay_has_data(path: &Path) -> bool {
    let Ok(image) = open_alone(path, true) else {
        return false;
    };
    let size = image.size();
    let mut offset = 0;
    while offset < size {
        match image.block_status(offset, size - offset) {
            Ok(status) if status.depth == 0 && status.allocation != Allocation::Unallocated => {
                return true
            }
            Ok(status) => offset += status.len.max(1),
            // Unreadable but an image: keep it rather than guess.
            Err(_) => return true,
        }
    }
    false
}

/// Finishes or undoes the operation `meta.pending` records, given each disk's top
/// (absolute) as the VM opened it. Returns what was done, for [`SnapshotTree::problems`].
///
/// A create or revert *had switched* when a disk runs on one of its new files, or one of
/// its fresh overlays holds data (the guest wrote to it): it is completed, so that the
/// metadata names every file holding guest writes. Otherwise its files are removed: nothing
/// but the operation used them.
pub(super) fn resolve(meta: &mut TreeFile, tops: &[PathBuf]) -> Vec<String> {
    let Some(intent) = meta.pending.take() else {
        return Vec::new();
    };
    match intent.op {
        IntentOp::Remove => {
            finish_removal(meta, &intent, tops);
            Vec::new()
        }
        IntentOp::Create | IntentOp::Revert => {
            if intent.files.is_empty() {
                return Vec::new();
            }
            if switched(&intent, tops) {
                complete(meta, intent)
            } else {
                undo(meta, intent)
            }
        }
    }
}

/// Whether the interrupted create or revert `intent` had switched the disks (see
/// [`resolve`]).
fn switched(intent: &Intent, tops: &[PathBuf]) -> bool {
    tops.iter().any(|t| intent.files.contains(t))
        || (intent.fresh_overlays && intent.files.iter().any(|f| overlay_has_data(f)))
}

/// [`resolve`] without touching any file: only `meta.active` changes, to the new images of
/// an operation that had switched.
pub(super) fn resolve_dry(meta: &mut TreeFile, tops: &[PathBuf]) {
    if let Some(intent) = meta.pending.take() {
        let creates = matches!(intent.op, IntentOp::Create | IntentOp::Revert);
        if creates && !intent.files.is_empty() && !intent.tops.is_empty() && switched(&intent, tops)
        {
            meta.active = intent.tops;
        }
    }
}

fn complete(meta: &mut TreeFile, intent: Intent) -> Vec<String> {
    for record in intent.records {
        meta.images.retain(|r| r.path != record.path);
        meta.images.push(record);
    }
    if let Some(info) = intent.info {
        if !meta.snapshots.iter().any(|s| s.name == info.name) {
            meta.snapshots.push(info);
        }
    }
    if meta.snapshots.iter().any(|s| s.name == intent.snapshot) {
        meta.current = Some(intent.snapshot.clone());
    }
    if !intent.tops.is_empty() {
        meta.active = intent.tops.clone();
    }
    vec![format!(
        "an interrupted {} of snapshot {:?} had switched the disks to {}: completed",
        op_name(intent.op),
        intent.snapshot,
        show(&intent.tops)
    )]
}

fn undo(meta: &mut TreeFile, intent: Intent) -> Vec<String> {
    let mut removed = intent.files.clone();
    if let Some(dir) = intent.info.as_ref().and_then(|i| i.checkpoint.clone()) {
        removed.push(dir);
    }
    removed.iter().for_each(|p| remove_path(p));
    // Nothing of it stays named (a record may exist if it was written before the crash).
    meta.images.retain(|r| !intent.files.contains(&r.path));
    vec![format!(
        "an interrupted {} of snapshot {:?} had not switched the disks: rolled back, removing {}",
        op_name(intent.op),
        intent.snapshot,
        show(&removed)
    )]
}

/// Removes what an interrupted removal had not yet removed, unless something uses it now.
fn finish_removal(meta: &TreeFile, intent: &Intent, tops: &[PathBuf]) {
    let mut used: HashSet<&Path> = tops.iter().map(PathBuf::as_path).collect();
    for r in &meta.images {
        used.insert(&r.path);
        if let Some(b) = &r.backing {
            used.insert(b);
        }
    }
    for s in &meta.snapshots {
        used.extend(s.disks.iter().map(|d| d.image.as_path()));
        used.extend(s.checkpoint.as_deref());
    }
    for file in &intent.files {
        if !used.contains(file.as_path()) {
            remove_path(file);
        }
    }
}

fn op_name(op: IntentOp) -> &'static str {
    match op {
        IntentOp::Create => "create",
        IntentOp::Revert => "revert",
        IntentOp::Remove => "removal",
    }
}

fn show(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// Refuses a disk opened writable on an image a snapshot froze or reads through: the guest
/// would change the snapshot. The error names the disk's current top.
pub(super) fn refuse_frozen(
    metadata: &Path,
    meta: &TreeFile,
    disks: &[Arc<LiveDisk>],
) -> Result<()> {
    // A snapshot's external image is frozen, and so is every image below it (or below an
    // image holding internal snapshots): the snapshot reads through them.
    let backing: HashMap<&Path, &Path> = meta
        .images
        .iter()
        .filter_map(|r| Some((r.path.as_path(), r.backing.as_deref()?)))
        .collect();
    let mut frozen: HashMap<&Path, String> = HashMap::new();
    for s in &meta.snapshots {
        for d in &s.disks {
            let mut at = if s.kind == SnapshotKind::Internal {
                backing.get(d.image.as_path()).copied()
            } else {
                Some(d.image.as_path())
            };
            // Each image is entered once, so a looping record cannot hold this up.
            while let Some(image) = at {
                if frozen.contains_key(image) {
                    break;
                }
                let why = if image == d.image {
                    format!("snapshot {:?} froze it", s.name)
                } else {
                    format!("snapshot {:?} reads through it", s.name)
                };
                frozen.insert(image, why);
                at = backing.get(image).copied();
            }
        }
    }
    for (i, disk) in disks.iter().enumerate() {
        let top = disk.top();
        if top.read_only() {
            continue;
        }
        let image = abs(top.path());
        if let Some(why) = frozen.get(image.as_path()) {
            return Err(Error::Frozen {
                disk: disk.name().to_string(),
                image: image.clone(),
                why: why.clone(),
                metadata: metadata.to_path_buf(),
                current: meta.active.get(i).cloned().unwrap_or_default(),
            });
        }
    }
    Ok(())
}

/// The backing file a qcow2 file names, resolved against its directory; `None` for files
/// that are not qcow2 or name none.
fn backing_named_by(path: &Path) -> Option<PathBuf> {
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut buf = Vec::new();
    file.take(HEADER_BYTES).read_to_end(&mut buf).ok()?;
    if !buf.starts_with(&storage::qcow2::header::MAGIC.to_be_bytes()) {
        return None;
    }
    let header = storage::qcow2::header::Header::parse(path, &buf, len).ok()?;
    let name = header.backing_file?;
    Some(abs(&storage::open::resolve_backing_path(path, &name)))
}

/// Files in `dirs` other than `image` whose header names `image` as their backing file
/// (whatever the metadata says: a file a crash left, or one the user made). `Err` when a
/// directory cannot be read or is too large to look through.
pub(super) fn users_on_disk(
    image: &Path,
    dirs: &[PathBuf],
) -> std::result::Result<Vec<PathBuf>, String> {
    let mut users = Vec::new();
    let mut seen = HashSet::new();
    for dir in dirs {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (n, entry) in entries.enumerate() {
            if n >= MAX_SCANNED_ENTRIES {
                return Err(format!(
                    "{}: more than {MAX_SCANNED_ENTRIES} entries to look through",
                    dir.display()
                ));
            }
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_file()) || abs(&path) == image {
                continue;
            }
            if backing_named_by(&path).as_deref() == Some(image) {
                users.push(path);
            }
        }
    }
    Ok(users)
}
