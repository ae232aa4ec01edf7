//! Images through snapvmm's own storage crate: creating qcow2 images, opening chains,
//! reading every guest byte, writing raw files. Failures panic naming the file.

use std::path::Path;
use std::sync::Arc;

use storage::qcow2::CreateOptions;
use storage::{BlockDevice, ImageFormat, OpenOptions};

/// Creates a qcow2 image with snapvmm's `create` and `options`: the one place the tests'
/// qcow2 creators call it.
pub fn create_qcow2(path: &Path, options: &CreateOptions) {
    storage::qcow2::create(path, options)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Creates a qcow2 image of `size` bytes with the default layout (64 KiB clusters, v3,
/// 16-bit refcounts), on the qcow2 image `backing` if given.
pub fn qcow2(path: &Path, size: u64, backing: Option<&Path>) {
    create_qcow2(
        path,
        &CreateOptions {
            size: Some(size),
            backing_file: backing.map(|b| b.display().to_string()),
            backing_format: backing.map(|_| ImageFormat::Qcow2),
            ..CreateOptions::default()
        },
    );
}

/// Creates a qcow2 image with every layout choice spelled out: `size` may be None over a
/// backing file (which then sets it); `backing` is the backing file's name as recorded in
/// the header, and its format.
pub fn snapvmm_create(
    path: &Path,
    size: Option<u64>,
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    backing: Option<(&str, ImageFormat)>,
) {
    create_qcow2(
        path,
        &CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits,
            backing_file: backing.map(|(name, _)| name.to_string()),
            backing_format: backing.map(|(_, format)| format),
            ..CreateOptions::default()
        },
    );
}

/// Opens an image read-write with its backing chain.
pub fn open_rw(path: &Path) -> Arc<dyn BlockDevice> {
    storage::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Opens an image read-only with its backing chain.
pub fn open_ro(path: &Path) -> Arc<dyn BlockDevice> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    storage::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Every guest byte of `disk`, read through snapvmm in 1 MiB requests.
pub fn read_all(disk: &dyn BlockDevice) -> Vec<u8> {
    let size = usize::try_from(disk.size()).expect("disk size fits in memory");
    let mut out = vec![0u8; size];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, (i << 20) as u64)
            .unwrap_or_else(|e| panic!("read at {:#x}: {e}", i << 20));
    }
    out
}

/// A raw file of `data`.
pub fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
