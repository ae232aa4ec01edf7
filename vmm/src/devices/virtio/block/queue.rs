//! Draining one virtio-blk queue: pop every available chain, run it, return it to the used
//! ring. Shared by the in-VMM device's queue workers and the vhost-user backend, which differ
//! only in how they are woken and how they interrupt the driver.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use super::backend::DiskBackend;
use super::request::{DescriptorInfo, DiskLimits, RequestProcessor};

/// Serves every request available on `queue`, with notifications suppressed meanwhile (the
/// EVENT_IDX dance: re-enable, and go round again if requests slipped in). Returns whether the
/// driver wants an interrupt for the requests completed; `name` prefixes log lines.
///
/// A ring the driver corrupted (an avail index far ahead, a descriptor table outside memory)
/// yields errors or no chains; both end the pass without spinning.
pub fn serve_queue<M: GuestMemoryBackend, D: DiskBackend + ?Sized>(
    name: &str,
    queue: &mut Queue,
    memory: &M,
    processor: &mut RequestProcessor,
    disk: &D,
    limits: DiskLimits<'_>,
) -> bool {
    let mut completed = 0usize;
    loop {
        if let Err(e) = queue.disable_notification(memory) {
            tracing::warn!("{name}: {e}");
            break;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            popped += 1;
            let head = chain.head_index();
            let completion =
                processor.process(chain.map(DescriptorInfo::from), memory, disk, limits);
            if let Err(e) = queue.add_used(memory, head, completion.used_len) {
                tracing::warn!("{name}: returning descriptor {head}: {e}");
                break;
            }
        }
        completed += popped;
        match queue.enable_notification(memory) {
            Ok(true) if popped > 0 => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!("{name}: {e}");
                break;
            }
        }
    }
    completed > 0 && queue.needs_notification(memory).unwrap_or(true)
}
