//! The internal snapshot table: entry format, parsing and serialisation.
//!
//! Each entry (qcow2 spec, "Snapshots"): L1 table offset and size, id and name strings,
//! creation date, guest clock, VM state size, and extra data (64-bit VM state size, disk size,
//! instruction count), padded to 8 bytes.

use std::path::Path;

use super::header::{be16, be32, be64};
use crate::error::{Error, Result};

/// Fixed part of a table entry.
const ENTRY_FIXED: usize = 40;
/// Extra data QEMU writes: vm_state_size_large, disk_size, icount.
const EXTRA_DATA_LEN: usize = 24;
/// Longest id or name accepted (QEMU's limit for names is 65535; refuse silly sizes).
const MAX_STRING: usize = 65535;
/// Most snapshots QEMU allows in one image.
pub const MAX_SNAPSHOTS: usize = 65536;
/// Largest snapshot table QEMU accepts.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id (QEMU uses decimal numbers: "1", "2", ...).
    pub id: String,
    /// The tag the user gave.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with the snapshot (0 for disk-only).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count (record/replay), -1 when not recorded.
    pub icount: i64,
    /// Extra data bytes past the ones known here, preserved.
    pub extra_unknown: Vec<u8>,
}

/// Parses `count` entries from `buf` (the table as read from the file). `disk_size` fills in
/// entries without the extra field; `version` 3 requires at least 16 bytes of extra data.
pub fn parse_table(
    path: &Path,
    buf: &[u8],
    count: u32,
    disk_size: u64,
    cluster_size: u64,
) -> Result<(Vec<SnapshotEntry>, usize)> {
    let bad = |i: usize, what: String| Error::invalid(path, format!("snapshot {i}: {what}"));
    let mut entries = Vec::with_capacity((count as usize).min(MAX_SNAPSHOTS));
    let mut at = 0usize;
    for i in 0..count as usize {
        if at + ENTRY_FIXED > buf.len() {
            return Err(bad(i, "entry runs past the snapshot table".into()));
        }
        let l1_table_offset = be64(buf, at);
        let l1_size = be32(buf, at + 8);
        let id_len = be16(buf, at + 12) as usize;
        let name_len = be16(buf, at + 14) as usize;
        let extra_len = be32(buf, at + 36) as usize;
        if extra_len > 1024 {
            return Err(bad(i, format!("extra_data_size {extra_len} too large")));
        }
        let extra_at = at + ENTRY_FIXED;
        let strings_at = extra_at + extra_len;
        let end = strings_at + id_len + name_len;
        if end > buf.len() {
            return Err(bad(i, "entry runs past the snapshot table".into()));
        }
        if l1_table_offset % cluster_size != 0 {
            return Err(bad(
                i,
                format!("L1 table offset {l1_table_offset:#x} is not cluster aligned"),
            ));
        }
        if l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(bad(
                i,
                format!("l1_size {l1_size} exceeds the 32 MiB limit"),
            ));
        }
        let extra = &buf[extra_at..strings_at];
        let mut vm_state_size = be32(buf, at + 32) as u64;
        let mut entry_disk_size = disk_size;
        let mut icount = -1i64;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            entry_disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            icount = be64(extra, 16) as i64;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        entries.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id: text(&buf[strings_at..strings_at + id_len]),
            name: text(&buf[strings_at + id_len..end]),
            date_sec: be32(buf, at + 16),
            date_nsec: be32(buf, at + 20),
            vm_clock_nsec: be64(buf, at + 24),
            vm_state_size,
            disk_size: entry_disk_size,
            icount,
            extra_unknown: extra.get(EXTRA_DATA_LEN..).unwrap_or(&[]).to_vec(),
        });
        at = end.div_ceil(8) * 8;
    }
    Ok((entries, at))
}

/// Serialises a snapshot table as QEMU writes it.
pub fn serialize_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        if e.id.len() > MAX_STRING || e.name.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!(
                "snapshot name or id of '{}' is too long",
                e.name
            )));
        }
        let start = out.len();
        out.extend_from_slice(&e.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&e.l1_size.to_be_bytes());
        out.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&e.date_sec.to_be_bytes());
        out.extend_from_slice(&e.date_nsec.to_be_bytes());
        out.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
        // The 32-bit field holds the size when it fits, as QEMU does.
        let small = u32::try_from(e.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        let extra_len = EXTRA_DATA_LEN + e.extra_unknown.len();
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&e.vm_state_size.to_be_bytes());
        out.extend_from_slice(&e.disk_size.to_be_bytes());
        out.extend_from_slice(&(e.icount as u64).to_be_bytes());
        out.extend_from_slice(&e.extra_unknown);
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(e.name.as_bytes());
        let padded = start + (out.len() - start).div_ceil(8) * 8;
        out.resize(padded, 0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entries = vec![
            SnapshotEntry {
                l1_table_offset: 0x50000,
                l1_size: 16,
                id: "1".into(),
                name: "first".into(),
                date_sec: 1_700_000_000,
                date_nsec: 5,
                vm_clock_nsec: 123,
                vm_state_size: 5 << 30,
                disk_size: 1 << 30,
                icount: -1,
                extra_unknown: vec![],
            },
            SnapshotEntry {
                l1_table_offset: 0x90000,
                l1_size: 16,
                id: "2".into(),
                name: "second one".into(),
                date_sec: 1,
                date_nsec: 2,
                vm_clock_nsec: 3,
                vm_state_size: 0,
                disk_size: 1 << 30,
                icount: 7,
                extra_unknown: vec![],
            },
        ];
        let raw = serialize_table(&entries).unwrap();
        let (parsed, len) = parse_table(Path::new("x"), &raw, 2, 0, 65536).unwrap();
        assert_eq!(parsed, entries);
        assert_eq!(len, raw.len());
    }

    #[test]
    fn truncated_table_refused() {
        let raw = vec![0u8; 30];
        let err = parse_table(Path::new("x"), &raw, 1, 0, 65536).unwrap_err();
        assert!(err.to_string().contains("past the snapshot table"), "{err}");
    }
}
