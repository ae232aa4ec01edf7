//! The images the job and copy-on-write figures start from: a template made once per run,
//! then fresh copies, so every tool and every round works on identical files.

use std::path::{Path, PathBuf};

use storage::qcow2::{create, CreateOptions};
use storage::{ImageFormat, OpenOptions};

/// Creates a qcow2 image of `size` bytes (64 KiB clusters), over `backing` when given
/// (a name relative to the image's directory).
pub fn qcow2(path: &Path, size: u64, backing: Option<&str>) -> Result<(), String> {
    create(
        path,
        &CreateOptions {
            size: Some(size),
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| ImageFormat::Qcow2),
            ..CreateOptions::default()
        },
    )
    .map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Creates `path`, a qcow2 image of `bytes` whose every byte is written (non-zero pattern,
/// so no tool may skip it as zero), and flushes it.
pub fn data(path: &Path, bytes: u64) -> Result<(), String> {
    qcow2(path, bytes, None)?;
    let dev = storage::open(path, &OpenOptions::default())
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    let mut at = 0;
    while at < bytes {
        let len = chunk.len().min((bytes - at) as usize);
        dev.write_at(&chunk[..len], at)
            .map_err(|e| format!("filling {} at {at}: {e}", path.display()))?;
        at += len as u64;
    }
    dev.flush()
        .map_err(|e| format!("flushing {}: {e}", path.display()))
}

/// Empties `dir` (made if missing).
pub fn fresh_dir(dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// A stream case in `dir`: `top.qcow2`, empty, over a copy of `data` named `data.qcow2`.
/// Returns the top.
pub fn stream_case(data: &Path, dir: &Path, size: u64) -> Result<PathBuf, String> {
    fresh_dir(dir)?;
    std::fs::copy(data, dir.join("data.qcow2"))
        .map_err(|e| format!("copying {}: {e}", data.display()))?;
    let top = dir.join("top.qcow2");
    qcow2(&top, size, Some("data.qcow2"))?;
    Ok(top)
}

/// A commit case in `dir`: `top.qcow2`, a copy of `data`, over an empty `base.qcow2`.
/// Returns the top.
pub fn commit_case(data: &Path, dir: &Path, size: u64) -> Result<PathBuf, String> {
    fresh_dir(dir)?;
    qcow2(&dir.join("base.qcow2"), size, None)?;
    let top = dir.join("top.qcow2");
    std::fs::copy(data, &top).map_err(|e| format!("copying {}: {e}", data.display()))?;
    // Point the data layer at the empty base (header only: both read the same).
    snapshot::offline::rebase(
        &top,
        Some("base.qcow2"),
        Some(ImageFormat::Qcow2),
        true,
        &mut |_, _| {},
    )
    .map_err(|e| format!("rebase -u {}: {e}", top.display()))?;
    Ok(top)
}
