//! Draining one virtio-blk queue: pop every available chain, run it, return it to the used
//! ring. Shared by the in-VMM device's queue workers and the vhost-user backend, which differ
//! only in how they are woken and how they interrupt the driver.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use super::backend::DiskBackend;
use super::request::{DescriptorInfo, DiskLimits, RequestProcessor};
use crate::error::{Error, Result};

/// Serves every request available on `queue`, with notifications suppressed meanwhile (the
/// EVENT_IDX dance: re-enable, and go round again if requests slipped in). Returns whether the
/// driver wants an interrupt for the requests completed; `name` prefixes log lines and
/// names the queue in errors.
///
/// A driver that publishes an available index more than the queue size ahead of the
/// device's position, or announces entries none of which can be taken, has broken its
/// ring: this returns [`Error::BrokenRing`] at once, and the caller must stop serving the
/// queue (the in-VMM device sets DEVICE_NEEDS_RESET; a vhost-user backend disconnects),
/// because the index stays ahead and would make a caller that polls the ring spin for
/// ever. A ring outside memory (its index unreadable) ends the pass with a log line.
pub fn serve_queue<M: GuestMemoryBackend + Sync, D: DiskBackend + ?Sized>(
    name: &str,
    queue: &mut Queue,
    memory: &M,
    processor: &mut RequestProcessor,
    disk: &D,
    limits: DiskLimits<'_>,
) -> Result<bool> {
    let mut completed = 0usize;
    loop {
        if let Err(e) = queue.disable_notification(memory) {
            tracing::warn!("{name}: {e}");
            break;
        }
        let avail = match queue.avail_idx(memory, Ordering::Acquire) {
            Ok(avail) => avail.0,
            Err(e) => {
                tracing::warn!("{name}: reading the available index: {e}");
                break;
            }
        };
        let next = queue.next_avail();
        let announced = avail.wrapping_sub(next);
        let size = queue.size();
        let broken = || Error::BrokenRing {
            queue: name.to_string(),
            avail,
            next,
            size,
        };
        if announced > size {
            return Err(broken());
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
        if popped == 0 && announced > 0 {
            // Entries were announced before the pass, yet none could be taken.
            return Err(broken());
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
    Ok(completed > 0 && queue.needs_notification(memory).unwrap_or(true))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::block::{MemoryDisk, ID_BYTES};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 16;

    fn ring(memory: &crate::memory::GuestMemoryMmap) -> Queue {
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(memory));
        queue
    }

    fn serve(queue: &mut Queue, memory: &crate::memory::GuestMemoryMmap) -> Result<bool> {
        let id = [0u8; ID_BYTES];
        serve_queue(
            "vda-q0",
            queue,
            memory,
            &mut RequestProcessor::new(),
            &MemoryDisk::new(4096),
            DiskLimits {
                read_only: false,
                id: &id,
            },
        )
    }

    /// Finding 11 (issue 13): an available index more than the queue size ahead is a
    /// broken ring, reported at once (a poller would otherwise spin on it for ever).
    #[test]
    fn an_index_far_ahead_is_a_broken_ring() {
        let memory = crate::memory::create(2 << 20).unwrap();
        let mut queue = ring(&memory);
        memory.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        match serve(&mut queue, &memory) {
            Err(Error::BrokenRing {
                queue: name,
                avail: 100,
                next: 0,
                size: SIZE,
            }) => assert_eq!(name, "vda-q0"),
            other => panic!("expected a broken ring, got {other:?}"),
        }
        // Nothing was taken: the device's position is unchanged.
        assert_eq!(queue.next_avail(), 0);
    }

    /// A well-formed ring with a request (a FLUSH) is served, and an empty one is no error.
    #[test]
    fn a_sane_ring_is_served() {
        let memory = crate::memory::create(2 << 20).unwrap();
        let mut queue = ring(&memory);
        assert!(!serve(&mut queue, &memory).unwrap());
        // Descriptor 0: the 16-byte FLUSH header, chained to descriptor 1: the status byte.
        let header = 0x4000u64;
        memory.write_obj(4u32, GuestAddress(header)).unwrap();
        let descriptors: [(u64, u32, u16, u16); 2] = [(header, 16, 1, 1), (0x5000, 1, 2, 0)];
        for (i, (addr, len, flags, next)) in descriptors.into_iter().enumerate() {
            let at = DESC + 16 * i as u64;
            memory.write_obj(addr, GuestAddress(at)).unwrap();
            memory.write_obj(len, GuestAddress(at + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
            memory.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        memory.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        memory.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(serve(&mut queue, &memory).unwrap());
        assert_eq!(queue.next_avail(), 1);
        let used: u16 = memory.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1);
        let status: u8 = memory.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(status, 0);
    }
}
