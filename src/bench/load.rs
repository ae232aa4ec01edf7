//! The write load the live-switch figures run under, shared with the criterion bench
//! `benches/live.rs` (which includes this file by path), so both measure the same thing.
//! Self-contained: it uses no other module of the binary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use storage::LiveDisk;

/// 4 KiB writes at xorshift-random aligned offsets, round-robin over `disks`, until `stop`.
pub fn write_load(
    disks: &[Arc<LiveDisk>],
    stop: &AtomicBool,
    error: &Mutex<Option<String>>,
    seed: u64,
) {
    let buf = vec![0xa5u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let disk = &disks[n % disks.len()];
        let offset = (x % (disk.size() / 4096).max(1)) * 4096;
        if let Err(e) = disk.write_at(&buf, offset) {
            if let Ok(mut slot) = error.lock() {
                slot.get_or_insert_with(|| format!("write at {offset} on {}: {e}", disk.name()));
            }
            return;
        }
        n += 1;
    }
}
