//! Fuzz target: an arbitrary file opened as a disk image.
//!
//! The input bytes are written to a scratch file and opened with `storage::open`. When the
//! open succeeds, a few sectors are read and their block status asked (start, middle, end of
//! the disk, and across a cluster boundary); then the image is opened read-write and written,
//! zeroed, discarded and flushed. Any panic, abort, hang or out-of-memory is a bug: a
//! malformed image must only ever produce an `Err`.
//!
//! Backing files are not opened: a fuzzed backing name can point at any host file (a FIFO
//! would block the fuzzer); the chain logic is covered by tests/storage_malformed.rs.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use storage::{BlockDevice, OpenOptions};

/// One scratch file per fuzzing process (libFuzzer runs one input at a time per process).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("snapvmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        dir.join("image")
    })
}

/// Guest offsets worth touching on a disk of `size` bytes.
fn probe_offsets(size: u64) -> [u64; 5] {
    [
        0,
        512,
        size / 2 / 512 * 512,
        size.saturating_sub(512),
        // Straddles a 64 KiB cluster boundary (and smaller ones).
        65536 - 1024,
    ]
}

fn read_and_status(disk: &dyn BlockDevice) {
    let size = disk.size();
    let mut buf = vec![0u8; 2048];
    for offset in probe_offsets(size) {
        if offset >= size {
            continue;
        }
        let len = (size - offset).min(buf.len() as u64);
        let _ = disk.read_at(&mut buf[..len as usize], offset);
        if let Ok(status) = disk.block_status(offset, len) {
            assert!(
                status.len >= 1 && status.len <= len,
                "block_status length {status:?}"
            );
        }
    }
    // Walk the first runs of the disk.
    let mut at = 0;
    for _ in 0..16 {
        if at >= size {
            break;
        }
        let len = (size - at).min(1 << 20);
        match disk.block_status(at, len) {
            Ok(status) => {
                assert!(
                    status.len >= 1 && status.len <= len,
                    "block_status length {status:?}"
                );
                at += status.len;
            }
            Err(_) => break,
        }
    }
    let _ = disk.info();
}

fn write_paths(disk: &dyn BlockDevice) {
    let size = disk.size();
    let data = vec![0x5au8; 1536];
    for offset in probe_offsets(size) {
        if offset >= size {
            continue;
        }
        let len = (size - offset).min(data.len() as u64) as usize;
        let _ = disk.write_at(&data[..len], offset);
    }
    let _ = disk.write_zeroes(0, size.min(1 << 17));
    let _ = disk.discard(
        size / 2 / 512 * 512,
        (size - size / 2 / 512 * 512).min(1 << 17),
    );
    let _ = disk.flush();
    let mut buf = vec![0u8; 1536];
    for offset in probe_offsets(size) {
        if offset >= size {
            continue;
        }
        let len = (size - offset).min(buf.len() as u64) as usize;
        let _ = disk.read_at(&mut buf[..len], offset);
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let read_only = OpenOptions {
        read_only: true,
        open_backing: false,
        l2_cache_bytes: Some(64 << 10),
        ..OpenOptions::default()
    };
    let Ok(disk) = storage::open(path, &read_only) else {
        return;
    };
    read_and_status(&*disk);
    drop(disk);

    let read_write = OpenOptions {
        read_only: false,
        ..read_only
    };
    if let Ok(disk) = storage::open(path, &read_write) {
        write_paths(&*disk);
        read_and_status(&*disk);
    }
});
