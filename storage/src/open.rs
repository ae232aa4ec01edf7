//! Opening an image and its whole backing chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::ImageFormat;
pub use crate::options::{OpenOptions, DEFAULT_MAX_CHAIN_DEPTH};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;

/// Reads the first bytes of `path` and names its format: qcow2 by magic, raw otherwise.
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::io(path, "read magic", e)),
        }
    }
    if got == 4 && magic == crate::qcow2::header::MAGIC.to_be_bytes() {
        Ok(ImageFormat::Qcow2)
    } else {
        Ok(ImageFormat::Raw)
    }
}

/// Opens the image at `path` with its backing chain.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
    let mut seen = HashSet::new();
    open_layer(path, options.format, options, false, 0, &mut seen)
}

/// Resolves a backing file name the way QEMU does: relative names are relative to the
/// directory of the image that names them.
pub fn resolve_backing_path(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(backing),
        None => backing.to_path_buf(),
    }
}

fn open_layer(
    path: &Path,
    format: Option<ImageFormat>,
    options: &OpenOptions,
    is_backing: bool,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    if depth > options.max_chain_depth {
        return Err(Error::Chain(format!(
            "{} is deeper than {} layers",
            path.display(),
            options.max_chain_depth
        )));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, "open", e))?;
    if !seen.insert(canonical.clone()) {
        return Err(Error::Chain(format!(
            "{} appears twice: the chain loops",
            path.display()
        )));
    }
    let read_only = options.read_only || is_backing;
    let probed = format.is_none();
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        ImageFormat::Raw => {
            let mut image = RawImage::open(path, read_only, options.direct)?;
            if let Some(mode) = options.lock_mode(read_only)? {
                image.lock(mode)?;
            }
            if probed {
                image.set_format_probed();
            }
            Ok(Arc::new(image))
        }
        ImageFormat::Qcow2 => {
            let mut image = Qcow2Image::open_with(path, read_only, options, |name, fmt| {
                let backing_path = resolve_backing_path(path, name);
                open_layer(&backing_path, fmt, options, true, depth + 1, seen)
            })?;
            if probed {
                image.set_format_probed();
            }
            Ok(Arc::new(image))
        }
    }
}

impl Qcow2Image {
    /// Opens a qcow2 image with its backing chain, as [`open`] does, as a qcow2 layer
    /// (for the operations only qcow2 has: internal snapshots, backing pointer changes).
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        let mut seen = HashSet::new();
        if let Ok(c) = std::fs::canonicalize(path) {
            seen.insert(c);
        }
        Qcow2Image::open_with(path, options.read_only, options, |name, fmt| {
            let backing = resolve_backing_path(path, name);
            open_layer(&backing, fmt, options, true, 1, &mut seen)
        })
    }
}
