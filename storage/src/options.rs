//! How an image is opened: the options every layer of a chain is opened with.

use crate::format::ImageFormat;

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
