//! How an image is opened: the options every layer of a chain is opened with.

use crate::error::{Error, Result};
use crate::format::ImageFormat;
use crate::lock::LockMode;

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
    /// Claim every layer with QEMU-compatible OFD locks (see [`crate::lock`]): refuse a
    /// second writer, and a writer on an image another process reads as a backing file.
    pub locking: bool,
    /// Read-only opens share every permission (`qemu-img -U`): inspect an image another
    /// process is writing. Refused for a writable open.
    pub force_share: bool,
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
            locking: true,
            force_share: false,
        }
    }
}

impl OpenOptions {
    /// The lock a layer opened read-only (or not) with these options takes, if any.
    pub fn lock_mode(&self, read_only: bool) -> Result<Option<LockMode>> {
        if !self.locking {
            return Ok(None);
        }
        Ok(Some(match (read_only, self.force_share) {
            (false, true) => {
                return Err(Error::InvalidArgument(
                    "force-share can only be used with read-only images".into(),
                ))
            }
            (false, false) => LockMode::Write,
            (true, false) => LockMode::Read,
            (true, true) => LockMode::SharedRead,
        }))
    }
}
