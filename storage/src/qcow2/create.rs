//! Creating new qcow2 images, laid out as qemu-img lays them out.

use std::path::Path;

use super::header::write_header;
use super::header::{
    CompressionType, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::refcount::write_entry;
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::format::ImageFormat;

/// Options of `snapvmm img create -f qcow2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// qcow2 version: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 (version 2: 16 only).
    pub refcount_bits: u32,
    /// The lazy_refcounts compatible feature (version 3 only).
    pub lazy_refcounts: bool,
    /// Backing file name stored in the header (relative names are relative to the image).
    pub backing_file: Option<String>,
    /// Backing format recorded in the backing-format extension.
    pub backing_format: Option<ImageFormat>,
    /// Compression type for compressed clusters (zstd needs version 3).
    pub compression_type: CompressionType,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Zlib,
        }
    }
}

/// Creates a qcow2 image at `path` (truncating any file there).
///
/// ```no_run
/// use storage::qcow2::{create, CreateOptions};
/// create("disk.qcow2".as_ref(), &CreateOptions { size: Some(1 << 30), ..Default::default() })?;
/// # Ok::<(), storage::Error>(())
/// ```
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    let arg = |m: String| Error::InvalidArgument(m);
    let cs = options.cluster_size;
    if !cs.is_power_of_two() || !(1 << MIN_CLUSTER_BITS..=1 << MAX_CLUSTER_BITS).contains(&cs) {
        return Err(arg(format!(
            "cluster_size {cs}: must be a power of two between 512 and 2097152"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if !matches!(options.version, 2 | 3) {
        return Err(arg(format!(
            "compat: unsupported version {}",
            options.version
        )));
    }
    let rb = options.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(arg(format!(
            "refcount_bits {rb}: must be a power of two up to 64"
        )));
    }
    if options.version == 2 && rb != 16 {
        return Err(arg(
            "refcount_bits: different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
        ));
    }
    if options.version == 2 && options.lazy_refcounts {
        return Err(arg(
            "lazy_refcounts: lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
        ));
    }
    if options.version == 2 && options.compression_type == CompressionType::Zstd {
        return Err(arg(
            "compression_type: zstd requires compatibility level 1.1 or above".into(),
        ));
    }
    if options.backing_format.is_some() && options.backing_file.is_none() {
        return Err(arg("backing format given without a backing file".into()));
    }
    let size = match options.size {
        Some(s) => s,
        None => {
            let Some(name) = &options.backing_file else {
                return Err(arg(
                    "size: an image size is needed when there is no backing file".into(),
                ));
            };
            let backing = crate::open::resolve_backing_path(path, name);
            let opts = crate::OpenOptions {
                read_only: true,
                format: options.backing_format,
                ..Default::default()
            };
            crate::open(&backing, &opts)?.size()
        }
    };
    // QEMU sees whole 512-byte sectors only; a tail would be invisible to it.
    let size = size.div_ceil(512) * 512;
    let refcount_order = rb.trailing_zeros();
    let l2_entries = cs / 8;
    let l1_size = size.div_ceil(cs * l2_entries);
    if l1_size * 8 > super::header::MAX_L1_BYTES {
        return Err(arg(format!(
            "size {size}: the L1 table would exceed 32 MiB; use a larger cluster_size"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // Header, refcount table, refcount blocks, L1 table: grow the table and block counts
    // until the blocks cover all of them.
    let per_block = (cs * 8) >> refcount_order;
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    let table_at = 1;
    let blocks_at = table_at + table_clusters;
    let l1_at = blocks_at + blocks;
    let end = l1_at + l1_clusters;

    let mut header = Header {
        version: options.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_at * cs,
        refcount_table_offset: table_at * cs,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if options.compression_type == CompressionType::Zstd {
            INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible_features: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order,
        header_length: if options.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: options.compression_type,
        unknown_header_bytes: Vec::new(),
        backing_file: options.backing_file.clone(),
        backing_format: options.backing_format.map(|f| f.name().to_string()),
        other_extensions: Vec::new(),
    };

    let layout = Layout {
        cs,
        table_at,
        table_clusters,
        blocks_at,
        blocks,
        l1_at,
        l1_clusters,
        end,
        refcount_order,
    };
    // A new image appears whole or not at all: it is written under a temporary name and
    // renamed into place, so a crash never leaves a header-less file that probing would
    // take for a raw image. Symlinks and devices are written in place (renaming would
    // replace the link or fail).
    let in_place = path
        .symlink_metadata()
        .is_ok_and(|m| !m.file_type().is_file());
    if in_place {
        return write_image(path, &mut header, &layout);
    }
    let temp = temporary_name(path);
    let written = write_image(&temp, &mut header, &layout).and_then(|()| {
        crate::file::rename(&temp, path)
            .map_err(|e| Error::io(path, "rename new image into place", e))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    if let Err(e) = crate::file::sync_parent_dir(path) {
        tracing::warn!(path = %path.display(), error = %e, "fsync of the image's directory failed");
    }
    Ok(())
}

/// Where each table of a new image goes, in clusters.
struct Layout {
    cs: u64,
    table_at: u64,
    table_clusters: u64,
    blocks_at: u64,
    blocks: u64,
    l1_at: u64,
    l1_clusters: u64,
    end: u64,
    refcount_order: u32,
}

/// A name beside `path` for the image while it is written.
fn temporary_name(path: &Path) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.creating-{}-{n}", std::process::id()))
}

/// Writes a new, empty image with `header` and `layout` to `path`, and syncs it.
fn write_image(path: &Path, header: &mut Header, layout: &Layout) -> Result<()> {
    let Layout {
        cs,
        table_at,
        table_clusters,
        blocks_at,
        blocks,
        l1_at,
        l1_clusters,
        end,
        refcount_order,
    } = *layout;
    let file = ImageFile::create(path)?;
    // Refcount table.
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let at = (blocks_at + b) * cs;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
    }
    file.write_at(&table, table_at * cs)?;
    // Refcount blocks: every metadata cluster has refcount 1.
    let mut block_data = vec![0u8; (blocks * cs) as usize];
    for cluster in 0..end {
        write_entry(refcount_order, &mut block_data, cluster, 1);
    }
    file.write_at(&block_data, blocks_at * cs)?;
    // Zeroed L1 table, written so the file covers it.
    file.write_at(&vec![0u8; (l1_clusters * cs) as usize], l1_at * cs)?;
    write_header(&file, header)?;
    file.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> CreateOptions {
        CreateOptions {
            size: Some(1 << 20),
            ..CreateOptions::default()
        }
    }

    #[test]
    fn a_new_image_leaves_no_temporary_file_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        create(&path, &options()).unwrap();
        // Creating again replaces the image, as qemu-img create does.
        create(&path, &options()).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk.qcow2"]);
        assert!(crate::qcow2::Qcow2Image::open(&path, &crate::OpenOptions::default()).is_ok());
    }

    #[test]
    fn a_symlinked_image_is_written_through_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.qcow2");
        std::fs::write(&target, b"old contents").unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        create(&link, &options()).unwrap();
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        let header = std::fs::read(&target).unwrap();
        assert_eq!(&header[..4], b"QFI\xfb");
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let bad = CreateOptions {
            backing_file: Some("missing.qcow2".into()),
            size: None,
            ..CreateOptions::default()
        };
        assert!(create(&path, &bad).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
