//! The micro-guest: a freestanding 64-bit C program (`vmm/guest/`) built by `build.rs`,
//! loaded at 1 MiB and entered on every vCPU in long mode.
//!
//! The VMM hands it a boot info page at [`BOOT_INFO_ADDR`] (layout below, mirrored by
//! `struct boot_info` in `guest.c`): the workload, the vCPU count, the pattern seed and the
//! virtio-mmio devices' windows and GSIs (the disks in order, then the vsock device if
//! any; the guest tells them apart by their device ID). One word, `control`, stays a mailbox from the host
//! to the running guest ([`request_finish`]).
//!
//! ```text
//! 0x00 u64 magic "SNAPVMM1"   0x08 u32 workload   0x0c u32 vCPUs
//! 0x10 u64 seed               0x18 u32 devices    0x1c u32 control (host -> guest)
//! 0x20 devices[16]: { u64 mmio_base; u32 gsi; u32 reserved; }
//! 0x120 u64 vmgenid_addr (the VM generation ID, see crate::devices::vmgenid)
//! ```

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{BOOT_INFO_ADDR, KERNEL_LOAD_ADDR, VMGENID_ADDR};
use crate::config::Workload;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// The flat micro-guest image (empty when the build found no C compiler).
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/micro-guest.bin"));
/// vCPUs the micro-guest gives a stack to (`GUEST_MAX_CPUS` in build.rs); others park.
pub const MAX_CPUS: u8 = 32;
/// Devices the boot info can list.
pub const MAX_DEVICES: usize = 16;
/// "SNAPVMM1" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SNAPVMM1");
/// Guest RAM the micro-guest needs: image, stacks and buffers above 1 MiB.
pub const MIN_MEMORY: u64 = 8 << 20;
/// The vsock port the micro-guest's agent (workload `agent`) listens on, as qemu-ga would
/// with `--method vsock-listen` (`AGENT_PORT` in guest.c).
pub const AGENT_PORT: u32 = 52;
/// Offset of the `control` word in the boot info page.
const CONTROL_OFFSET: u64 = 0x1c;
/// Offset of `vmgenid_addr` in the boot info page: after the device table.
const VMGENID_OFFSET: u64 = 0x20 + MAX_DEVICES as u64 * 16;
/// `control` value asking the workload to finish (`CONTROL_FINISH` in guest.c).
const CONTROL_FINISH: u32 = 1;

/// A virtio-mmio device as the micro-guest finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestDevice {
    /// Base of the register window.
    pub mmio_base: u64,
    /// The device's interrupt.
    pub gsi: u32,
}

/// Loads the micro-guest and its boot info; returns the entry point.
pub fn load(
    memory: &GuestMemoryMmap,
    workload: Workload,
    seed: u64,
    vcpus: u8,
    devices: &[GuestDevice],
) -> Result<u64> {
    if IMAGE.is_empty() {
        return Err(Error::Load(
            "the micro-guest was not built (no gcc/objcopy when snapvmm was compiled)".into(),
        ));
    }
    if devices.len() > MAX_DEVICES {
        return Err(Error::Config(format!(
            "the micro-guest handles at most {MAX_DEVICES} devices"
        )));
    }
    memory
        .write_slice(IMAGE, GuestAddress(KERNEL_LOAD_ADDR))
        .map_err(|e| Error::Load(format!("micro-guest image: {e}")))?;

    let mut info = Vec::with_capacity(0x20 + MAX_DEVICES * 16);
    info.extend_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    info.extend_from_slice(&workload.code().to_le_bytes());
    info.extend_from_slice(&u32::from(vcpus).to_le_bytes());
    info.extend_from_slice(&seed.to_le_bytes());
    info.extend_from_slice(&(devices.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    for device in devices {
        info.extend_from_slice(&device.mmio_base.to_le_bytes());
        info.extend_from_slice(&device.gsi.to_le_bytes());
        info.extend_from_slice(&0u32.to_le_bytes());
    }
    info.resize(VMGENID_OFFSET as usize, 0);
    info.extend_from_slice(&VMGENID_ADDR.to_le_bytes());
    memory
        .write_slice(&info, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|e| Error::Load(format!("micro-guest boot info: {e}")))?;
    Ok(KERNEL_LOAD_ADDR)
}

/// Asks a running micro-guest to finish its workload: `io-loop` reads back and checks every
/// chunk it wrote, prints `io-loop verify ok chunks N` (or `io-loop verify failed ...`) and
/// resets the VM; `io-bench` resets at once. The guest polls the word between requests.
pub fn request_finish(memory: &GuestMemoryMmap) -> Result<()> {
    memory
        .write_obj(
            CONTROL_FINISH,
            GuestAddress(BOOT_INFO_ADDR + CONTROL_OFFSET),
        )
        .map_err(|e| Error::Load(format!("micro-guest control word: {e}")))
}

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8-byte word the micro-guest writes at byte `offset` of disk `disk` for `generation`
/// (write-verify uses generation 1): lets a test check the disk from the host.
///
/// ```
/// let word = vmm::guest::pattern_word(42, 0, 1, 4096);
/// assert_ne!(word, vmm::guest::pattern_word(42, 0, 1, 4104));
/// ```
pub fn pattern_word(seed: u64, disk: u64, generation: u64, offset: u64) -> u64 {
    mix64(seed ^ (disk << 56) ^ (generation << 32) ^ (offset >> 3))
}

/// Bytes of each chunk the `io-loop` and `agent` workloads write (`LOOP_CHUNK` in guest.c).
pub const IO_LOOP_CHUNK: u64 = 16 * 1024;

/// The term chunk `chunk` of disk `disk`, last written with `generation`, adds to the digest
/// the `agent` workload prints at a freeze (`agent frozen writes W chunks C digest D`; the
/// digest is the wrapping sum over written chunks): a test recomputes it from the frozen
/// image to show the image holds exactly what the guest had written when it froze.
pub fn agent_digest_term(disk: u64, chunk: u64, generation: u64) -> u64 {
    mix64((disk << 56) ^ (chunk << 24) ^ generation)
}

/// Fills `buf` (whose first byte is disk offset `offset`, 8-byte aligned) with the pattern.
pub fn fill_pattern(buf: &mut [u8], seed: u64, disk: u64, generation: u64, offset: u64) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let value = pattern_word(seed, disk, generation, offset + i as u64 * 8);
        word.copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_built_and_boot_info_written() {
        assert!(
            !IMAGE.is_empty(),
            "build.rs should have built the micro-guest"
        );
        let memory = crate::memory::create(MIN_MEMORY).unwrap();
        let devices = [GuestDevice {
            mmio_base: 0xd000_0000,
            gsi: 5,
        }];
        let entry = load(&memory, Workload::WriteVerify, 7, 2, &devices).unwrap();
        assert_eq!(entry, KERNEL_LOAD_ADDR);
        let magic: u64 = memory.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!(magic, BOOT_INFO_MAGIC);
        let base: u64 = memory
            .read_obj(GuestAddress(BOOT_INFO_ADDR + 0x20))
            .unwrap();
        assert_eq!(base, 0xd000_0000);
        let control: u32 = memory
            .read_obj(GuestAddress(BOOT_INFO_ADDR + CONTROL_OFFSET))
            .unwrap();
        assert_eq!(control, 0);
        request_finish(&memory).unwrap();
        let control: u32 = memory
            .read_obj(GuestAddress(BOOT_INFO_ADDR + CONTROL_OFFSET))
            .unwrap();
        assert_eq!(control, CONTROL_FINISH);
        let mut first = [0u8; 16];
        memory
            .read_slice(&mut first, GuestAddress(KERNEL_LOAD_ADDR))
            .unwrap();
        assert_eq!(&first, &IMAGE[..16]);
    }

    #[test]
    fn fill_pattern_places_words_by_offset() {
        assert_eq!(pattern_word(1, 0, 1, 0), mix64(1 ^ (1 << 32)));
        let mut buf = [0u8; 16];
        fill_pattern(&mut buf, 5, 1, 2, 8);
        assert_eq!(
            u64::from_le_bytes(buf[8..].try_into().unwrap()),
            pattern_word(5, 1, 2, 16)
        );
    }
}
