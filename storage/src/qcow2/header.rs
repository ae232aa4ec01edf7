//! The qcow2 header and its extensions: parsing, validation and serialisation.
//!
//! Layout per QEMU's `docs/interop/qcow2.rst`; every field is big-endian.

use std::path::Path;

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the version 3 header snapvmm writes (with the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest cluster size (2^9).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size (2^21).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU refuses L1 tables larger than this.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses refcount tables larger than this.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature: the refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image was found corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, no zlib header.
    Zlib,
    /// zstd frames.
    Zstd,
}

/// One header extension kept verbatim so that a rewrite preserves what snapvmm does not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension payload (unpadded).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header proper (v3).
    pub header_length: u32,
    /// Compression type (v3 with header_length > 104).
    pub compression_type: CompressionType,
    /// Extra bytes of the header proper past the fields known here, preserved on rewrite.
    pub unknown_header_bytes: Vec<u8>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format from its extension, if any.
    pub backing_format: Option<String>,
    /// Every other extension, in file order.
    pub other_extensions: Vec<Extension>,
}

/// Big-endian `u16` at byte `at` of `b`.
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Big-endian `u32` at byte `at` of `b`.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Big-endian `u64` at byte `at` of `b`.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the bytes a header parse needs: the first cluster (or the whole file when shorter),
/// found by peeking at `cluster_bits` first.
pub fn read_first_cluster(file: &crate::file::ImageFile) -> Result<Vec<u8>> {
    let file_len = file.len()?;
    let mut first = vec![0u8; 4096.min(file_len as usize).max(V2_HEADER_LEN as usize)];
    file.read_at(&mut first, 0)?;
    let cluster_bits = be32(&first, 20);
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
        && (1u64 << cluster_bits) > first.len() as u64
    {
        let want = (1u64 << cluster_bits).min(file_len.max(first.len() as u64));
        first.resize(want as usize, 0);
        file.read_at(&mut first, 0)?;
    }
    Ok(first)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Parses and validates a header from the first bytes of the image (at least one
    /// cluster, or the whole file when it is shorter) and the file's length.
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header> {
        let bad = |reason: String| Error::invalid(path, reason);
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(bad(format!(
                "file is {} bytes, shorter than a qcow2 header",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(bad("bad magic: not a qcow2 image".into()));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(path, format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_header_bytes: Vec::new(),
            backing_file: None,
            backing_format: None,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("version 3 header truncated".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 {
                return Err(bad(format!(
                    "header_length {} must be a multiple of 8 and at least 104",
                    h.header_length
                )));
            }
            if h.header_length as u64 > cluster_size || h.header_length as usize > buf.len() {
                return Err(bad(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(Error::unsupported(path, format!("compression type {t}"))),
                };
                // Bytes 105..112 are padding; anything past 112 belongs to a newer QEMU.
                if h.header_length > V3_HEADER_LEN {
                    h.unknown_header_bytes =
                        buf[V3_HEADER_LEN as usize..h.header_length as usize].to_vec();
                }
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} above 6", h.refcount_order)));
        }
        h.validate_features(path)?;
        if h.crypt_method != 0 {
            return Err(Error::unsupported(
                path,
                format!("encryption (crypt_method {})", h.crypt_method),
            ));
        }
        h.parse_extensions(path, buf)?;
        // An empty name means no backing file, as in QEMU (whose check of the name length
        // is the same with or without it); taken as a name it would resolve to the image's
        // own directory.
        if h.backing_file_offset != 0 && h.backing_file_size != 0 {
            let limit = cluster_size.min(buf.len() as u64);
            let end = h
                .backing_file_offset
                .checked_add(h.backing_file_size as u64)
                .filter(|&end| end <= limit && h.backing_file_size <= MAX_BACKING_NAME);
            let Some(end) = end else {
                return Err(bad(format!(
                    "backing file name at {:#x} length {} lies outside the first cluster",
                    h.backing_file_offset, h.backing_file_size
                )));
            };
            let name = &buf[h.backing_file_offset as usize..end as usize];
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            h.backing_file = Some(name);
        }
        h.validate_tables(path, file_len)?;
        Ok(h)
    }

    fn validate_features(&self, path: &Path) -> Result<()> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible_features & !known;
        if unknown != 0 {
            return Err(Error::unsupported(
                path,
                format!("unknown incompatible feature bits {unknown:#x}"),
            ));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(path, "external data file"));
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(Error::unsupported(
                path,
                "extended L2 entries (subclusters)",
            ));
        }
        let zstd = self.compression_type == CompressionType::Zstd;
        if zstd != (self.incompatible_features & INCOMPAT_COMPRESSION != 0) {
            return Err(Error::invalid(
                path,
                "compression_type and the compression incompatible bit disagree",
            ));
        }
        Ok(())
    }

    fn parse_extensions(&mut self, path: &Path, buf: &[u8]) -> Result<()> {
        let limit = buf.len().min(self.cluster_size() as usize);
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > limit {
                return Err(Error::invalid(
                    path,
                    format!("header extension at {at:#x} runs past the first cluster"),
                ));
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or_else(|| {
                    Error::invalid(
                        path,
                        format!("header extension {kind:#x} at {at:#x} length {len} runs past the first cluster"),
                    )
                })?;
            let data = &buf[data_start..data_end];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = String::from_utf8(data.to_vec()).map_err(|_| {
                        Error::invalid(path, "backing format extension is not UTF-8")
                    })?;
                    self.backing_format = Some(name);
                }
                EXT_CRYPTO => return Err(Error::unsupported(path, "encryption header")),
                EXT_DATA_FILE => return Err(Error::unsupported(path, "external data file")),
                _ => self.other_extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at = data_start + len.div_ceil(8) * 8;
        }
    }

    fn validate_tables(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bad = |reason: String| Error::invalid(path, reason);
        // The L1 table must map the whole disk and stay under QEMU's limit.
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "l1_size {} ({} bytes) exceeds the 32 MiB limit",
                self.l1_size, l1_bytes
            )));
        }
        let bytes_per_l1 = cs * self.l2_entries();
        let needed = self.size.div_ceil(bytes_per_l1);
        if (self.l1_size as u64) < needed {
            return Err(bad(format!(
                "l1_size {} too small for disk size {} (needs {needed})",
                self.l1_size, self.size
            )));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(bad(format!(
                "refcount_table_clusters {} ({} bytes) exceeds the 8 MiB limit",
                self.refcount_table_clusters, rt_bytes
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("refcount_table_clusters is 0".into()));
        }
        let regions = [
            ("l1_table_offset", self.l1_table_offset, l1_bytes),
            (
                "refcount_table_offset",
                self.refcount_table_offset,
                rt_bytes,
            ),
        ];
        for (name, offset, len) in regions {
            if offset % cs != 0 {
                return Err(bad(format!("{name} {offset:#x} is not cluster aligned")));
            }
            if len > 0 && offset == 0 {
                return Err(bad(format!("{name} is 0: the table overlaps the header")));
            }
            match offset.checked_add(len) {
                Some(end) if end <= file_len || len == 0 => {}
                _ => {
                    return Err(bad(format!(
                        "{name} {offset:#x} + {len} bytes lies past the end of the file ({file_len} bytes)"
                    )))
                }
            }
        }
        if l1_bytes > 0 {
            let (l1s, l1e) = (self.l1_table_offset, self.l1_table_offset + l1_bytes);
            let (rts, rte) = (
                self.refcount_table_offset,
                self.refcount_table_offset + rt_bytes,
            );
            if l1s < rte && rts < l1e {
                return Err(bad("L1 table and refcount table overlap".into()));
            }
        }
        if self.nb_snapshots > 0 {
            if self.snapshots_offset % cs != 0 || self.snapshots_offset == 0 {
                return Err(bad(format!(
                    "snapshots_offset {:#x} is not a cluster-aligned table",
                    self.snapshots_offset
                )));
            }
            if self.snapshots_offset >= file_len {
                return Err(bad(format!(
                    "snapshots_offset {:#x} lies past the end of the file",
                    self.snapshots_offset
                )));
            }
            if self.nb_snapshots > 65536 {
                return Err(bad(format!("nb_snapshots {} too large", self.nb_snapshots)));
            }
        }
        Ok(())
    }

    /// Serialises the header, its extensions and the backing file name into one buffer of
    /// `cluster_size` bytes, to be written at offset 0. Updates `backing_file_offset` and
    /// `backing_file_size` to where the name lands.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        let mut body: Vec<u8> = Vec::with_capacity(512);
        let header_len = if self.version == 3 {
            self.header_length.max(V3_HEADER_LEN) as usize
        } else {
            V2_HEADER_LEN as usize
        };
        body.resize(header_len, 0);
        // Extensions follow the header proper.
        let mut ext: Vec<u8> = Vec::new();
        let mut push_ext = |kind: u32, data: &[u8]| {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
            ext.extend_from_slice(data);
            ext.resize(ext.len().div_ceil(8) * 8, 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for e in &self.other_extensions {
            push_ext(e.kind, &e.data);
        }
        if self.version == 3
            && !self
                .other_extensions
                .iter()
                .any(|e| e.kind == EXT_FEATURE_TABLE)
        {
            push_ext(EXT_FEATURE_TABLE, &feature_table());
        }
        push_ext(EXT_END, &[]);
        let name_at = header_len + ext.len();
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = name_at as u64;
                self.backing_file_size = name.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        let total = name_at + self.backing_file.as_ref().map_or(0, |n| n.len());
        if total > cs {
            return Err(Error::InvalidArgument(format!(
                "header, extensions and backing file name need {total} bytes, more than one {cs}-byte cluster"
            )));
        }
        let w32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let w64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        w32(&mut body, 0, MAGIC);
        w32(&mut body, 4, self.version);
        w64(&mut body, 8, self.backing_file_offset);
        w32(&mut body, 16, self.backing_file_size);
        w32(&mut body, 20, self.cluster_bits);
        w64(&mut body, 24, self.size);
        w32(&mut body, 32, self.crypt_method);
        w32(&mut body, 36, self.l1_size);
        w64(&mut body, 40, self.l1_table_offset);
        w64(&mut body, 48, self.refcount_table_offset);
        w32(&mut body, 56, self.refcount_table_clusters);
        w32(&mut body, 60, self.nb_snapshots);
        w64(&mut body, 64, self.snapshots_offset);
        if self.version == 3 {
            self.header_length = header_len as u32;
            w64(&mut body, 72, self.incompatible_features);
            w64(&mut body, 80, self.compatible_features);
            w64(&mut body, 88, self.autoclear_features);
            w32(&mut body, 96, self.refcount_order);
            w32(&mut body, 100, self.header_length);
            body[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            let extra = &self.unknown_header_bytes;
            let n = extra.len().min(header_len - V3_HEADER_LEN as usize);
            body[V3_HEADER_LEN as usize..V3_HEADER_LEN as usize + n].copy_from_slice(&extra[..n]);
        }
        buf[..header_len].copy_from_slice(&body);
        buf[header_len..name_at].copy_from_slice(&ext);
        if let Some(name) = &self.backing_file {
            buf[name_at..name_at + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(buf)
    }
}

/// The feature name table QEMU writes, so `qemu-img info` can name our bits.
fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut out = Vec::with_capacity(entries.len() * 48);
    for (kind, bit, name) in entries {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&entry);
    }
    out
}

/// Writes the header (with its extensions and backing name) into the first cluster.
pub fn write_header(file: &crate::file::ImageFile, header: &mut Header) -> Result<()> {
    let buf = header.serialize()?;
    let used = buf.iter().rposition(|&b| b != 0).map_or(512, |p| p + 1);
    let len = used.div_ceil(512) * 512;
    file.write_at(&buf[..len.min(buf.len())], 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_header_bytes: vec![],
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            other_extensions: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let mut h = sample();
        let buf = h.serialize().unwrap();
        let mut parsed = Header::parse(Path::new("x"), &buf, 0x40000).unwrap();
        parsed.other_extensions.clear();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(parsed, h);
    }

    #[test]
    fn refuses_unknown_incompatible_bits() {
        let mut h = sample();
        h.incompatible_features = 1 << 20;
        let buf = h.serialize().unwrap();
        let err = Header::parse(Path::new("x"), &buf, 0x40000).unwrap_err();
        assert!(err.to_string().contains("unknown incompatible"), "{err}");
    }

    #[test]
    fn an_empty_backing_name_means_no_backing_file() {
        let mut h = sample();
        let mut buf = h.serialize().unwrap();
        // Keep the offset, make the name empty (QEMU: no backing file).
        buf[16..20].copy_from_slice(&0u32.to_be_bytes());
        let parsed = Header::parse(Path::new("x"), &buf, 0x40000).unwrap();
        assert_eq!(parsed.backing_file, None);
    }

    #[test]
    fn refuses_tables_past_end() {
        let mut h = sample();
        let buf = h.serialize().unwrap();
        let err = Header::parse(Path::new("x"), &buf, 0x20000).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}
