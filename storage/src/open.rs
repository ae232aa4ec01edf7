//! Opening an image and its whole backing chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::ImageFormat;

/// Deepest backing chain opened by default; deeper chains are refused as likely loops or abuse.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 64;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse writes. Backing files are always opened read-only.
    pub read_only: bool,
    /// Use `O_DIRECT` (qemu's `-t none`); buffered otherwise.
    pub direct: bool,
    /// The top image's format; probed from its first bytes when `None`.
    pub format: Option<ImageFormat>,
    /// Open the backing chain (false: reads of unallocated clusters return zeroes).
    pub open_backing: bool,
    /// Bytes of L2 cache per qcow2 layer; `None` picks a cache covering 8 GiB of data.
    pub l2_cache_bytes: Option<usize>,
    /// Bytes of refcount cache per qcow2 layer; `None` picks a default.
    pub refcount_cache_bytes: Option<usize>,
    /// Deepest chain accepted.
    pub max_chain_depth: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            direct: false,
            format: None,
            open_backing: true,
            l2_cache_bytes: None,
            refcount_cache_bytes: None,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
        }
    }
}

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

pub(crate) fn open_layer(
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
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        ImageFormat::Raw => Ok(Arc::new(RawImage::open(path, read_only, options.direct)?)),
        ImageFormat::Qcow2 => {
            let image = Qcow2Image::open_with(path, read_only, options, |name, fmt| {
                let backing_path = resolve_backing_path(path, name);
                open_layer(&backing_path, fmt, options, true, depth + 1, seen)
            })?;
            Ok(Arc::new(image))
        }
    }
}
