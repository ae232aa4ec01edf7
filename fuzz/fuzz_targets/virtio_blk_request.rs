//! Fuzzes the virtio-blk request parser with hostile descriptor chains over guest memory the
//! fuzzer also controls. The processor must never panic, and must report a known status.
//!
//! Input: a count byte, then that many 13-byte descriptors (address u64 LE, length u32 LE,
//! flags u8: bit 0 device-writable, bit 1 read-only disk), then the first bytes of guest
//! memory. Addresses are folded near guest memory (2 MiB) so most chains reach real buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::request::DiskLimits;
use vmm::devices::virtio::block::{DescriptorInfo, MemoryDisk, RequestProcessor};
use vmm::vm_memory::{Bytes, GuestAddress};

const MEMORY: u64 = 2 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 32);
    if rest.len() < count * 13 {
        return;
    }
    let (raw, contents) = rest.split_at(count * 13);
    let mut read_only = false;
    let chain: Vec<DescriptorInfo> = raw
        .chunks_exact(13)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            read_only |= d[12] & 2 != 0;
            DescriptorInfo {
                // Mostly inside memory, sometimes straddling its end, sometimes anywhere.
                addr: if addr >> 63 == 1 {
                    addr
                } else {
                    addr % (MEMORY + 4096)
                },
                len: if len >> 31 == 1 { len } else { len % 4096 },
                device_writes: d[12] & 1 != 0,
            }
        })
        .collect();
    let memory = vmm::memory::create(MEMORY).expect("guest memory");
    let n = contents.len().min(MEMORY as usize);
    memory
        .write_slice(&contents[..n], GuestAddress(0))
        .expect("in range");
    let disk = MemoryDisk::new(64 * 1024);
    let id = [b'x'; 20];
    let done =
        RequestProcessor::new().process(chain, &memory, &disk, DiskLimits { read_only, id: &id });
    if let Some(status) = done.status {
        assert!(status <= 2);
    }
});
