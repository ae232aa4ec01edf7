//! The state file's framing: magic, version, length, JSON payload, CRC-32.
//!
//! ```text
//! 0   8  magic "SNAPVMCK"
//! 8   2  major version (LE)     10  2  minor version (LE)
//! 12  4  reserved (0)
//! 16  8  payload length (LE)
//! 24  n  payload: the Manifest as JSON
//! 24+n 4 CRC-32 (IEEE) of bytes 0..24+n (LE)
//! ```
//!
//! A reader refuses another major version (the payload's meaning changed) and accepts any
//! minor version of its own major (fields were only added).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::error::{CheckpointError, CheckpointResult};
use super::manifest::Manifest;
use serde::de::DeserializeOwned;
use storage::fault;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SNAPVMCK";
/// The major version written and read.
pub const MAJOR_VERSION: u16 = 1;
/// The minor version written (1: the manifest's `data` digest).
pub const MINOR_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 24;
/// Largest payload accepted (a hostile length must not make us allocate without bound).
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Frames `manifest` as state-file bytes.
pub fn encode(manifest: &Manifest) -> CheckpointResult<Vec<u8>> {
    let payload = serde_json::to_vec(manifest).map_err(|e| CheckpointError::StateFile {
        path: Default::default(),
        message: format!("encoding: {e}"),
    })?;
    encode_payload(&payload, MAJOR_VERSION, MINOR_VERSION)
}

/// Frames raw payload bytes with the given version (tests write other versions with it).
pub fn encode_payload(payload: &[u8], major: u16, minor: u16) -> CheckpointResult<Vec<u8>> {
    let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len() + 4);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&major.to_le_bytes());
    bytes.extend_from_slice(&minor.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

fn bad(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::StateFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Checks a header; returns the payload length.
fn parse_header(header: &[u8; HEADER_SIZE], path: &Path) -> CheckpointResult<u64> {
    if header[..8] != MAGIC {
        return Err(bad(
            path,
            format!(
                "not a snapvmm checkpoint state file (magic {:02x?}, expected \"SNAPVMCK\")",
                &header[..8]
            ),
        ));
    }
    let major = u16::from_le_bytes([header[8], header[9]]);
    let minor = u16::from_le_bytes([header[10], header[11]]);
    if major != MAJOR_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found_major: major,
            found_minor: minor,
            supported: MAJOR_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(bad(
            path,
            format!("payload length {len} exceeds the {MAX_PAYLOAD}-byte limit"),
        ));
    }
    Ok(len)
}

fn parse_payload<M: DeserializeOwned>(framed: &[u8], path: &Path) -> CheckpointResult<Manifest<M>> {
    let (body, crc) = framed.split_at(framed.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(bad(
            path,
            format!(
                "CRC mismatch (stored {stored:08x}, computed {computed:08x}): the file is corrupt"
            ),
        ));
    }
    let manifest: Manifest<M> = serde_json::from_slice(&body[HEADER_SIZE..])
        .map_err(|e| bad(path, format!("payload: {e}")))?;
    manifest.validate().map_err(|message| bad(path, message))?;
    Ok(manifest)
}

/// Decodes state-file bytes; `path` names the source in errors.
pub fn decode(bytes: &[u8], path: &Path) -> CheckpointResult<Manifest> {
    decode_as(bytes, path)
}

/// As [`decode`], with the machine state parsed as `M` ([`Manifest`]).
pub fn decode_as<M: DeserializeOwned>(bytes: &[u8], path: &Path) -> CheckpointResult<Manifest<M>> {
    let header: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            bad(
                path,
                format!(
                    "{} bytes, shorter than the {HEADER_SIZE}-byte header",
                    bytes.len()
                ),
            )
        })?;
    let len = parse_header(header, path)?;
    let expected = HEADER_SIZE as u64 + len + 4;
    if bytes.len() as u64 != expected {
        return Err(bad(
            path,
            format!(
                "{} bytes, but the header announces a {len}-byte payload ({expected} bytes in all): truncated or padded",
                bytes.len()
            ),
        ));
    }
    parse_payload(bytes, path)
}

/// Reads one framed state from a stream (a qcow2 VM-state area); `source` names it in errors.
pub fn read_from(input: &mut dyn Read, source: &Path) -> CheckpointResult<Manifest> {
    read_from_as(input, source)
}

/// As [`read_from`], with the machine state parsed as `M` ([`Manifest`]).
pub fn read_from_as<M: DeserializeOwned>(
    input: &mut dyn Read,
    source: &Path,
) -> CheckpointResult<Manifest<M>> {
    let mut header = [0u8; HEADER_SIZE];
    input
        .read_exact(&mut header)
        .map_err(|e| bad(source, format!("reading the header: {e}")))?;
    let len = parse_header(&header, source)?;
    let mut framed = header.to_vec();
    // `len` is bounded by MAX_PAYLOAD above.
    framed.resize(HEADER_SIZE + len as usize + 4, 0);
    input
        .read_exact(&mut framed[HEADER_SIZE..])
        .map_err(|e| bad(source, format!("reading the {len}-byte payload: {e}")))?;
    parse_payload(&framed, source)
}

/// Reads and checks the state file at `path`.
pub fn read(path: &Path) -> CheckpointResult<Manifest> {
    read_as(path)
}

/// As [`read`], with the machine state parsed as `M` ([`Manifest`]): what a restore uses.
pub fn read_as<M: DeserializeOwned>(path: &Path) -> CheckpointResult<Manifest<M>> {
    let mut file = File::open(path).map_err(CheckpointError::io(path))?;
    let size = file.metadata().map_err(CheckpointError::io(path))?.len();
    if size > MAX_PAYLOAD + HEADER_SIZE as u64 + 4 {
        return Err(bad(
            path,
            format!("{size} bytes: too large for a state file"),
        ));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.read_to_end(&mut bytes)
        .map_err(CheckpointError::io(path))?;
    decode_as(&bytes, path)
}

/// Writes `manifest` to `path` durably: a temporary file, fsync, rename.
pub fn write(path: &Path, manifest: &Manifest) -> CheckpointResult<()> {
    write_bytes(path, &encode(manifest)?)
}

/// Writes framed bytes to `path` durably: a temporary file, fsync, rename.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> CheckpointResult<()> {
    let tmp = path.with_extension("tmp");
    // Owner-only whatever the umask: the state holds device and vCPU registers.
    fault::check(fault::Op::Create, &tmp).map_err(CheckpointError::io(&tmp))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(CheckpointError::io(&tmp))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(CheckpointError::io(&tmp))?;
    fault::check(fault::Op::Write, &tmp)
        .and_then(|()| file.write_all(bytes))
        .map_err(CheckpointError::io(&tmp))?;
    fault::check(fault::Op::Sync, &tmp)
        .and_then(|()| file.sync_all())
        .map_err(CheckpointError::io(&tmp))?;
    storage::file::rename(&tmp, path).map_err(CheckpointError::io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{MemoryLayout, MemoryRegion};

    fn manifest() -> Manifest {
        Manifest::new_full(
            MemoryLayout::new(vec![MemoryRegion {
                guest_addr: 0,
                size: 8 << 20,
            }]),
            serde_json::json!({"vcpus": [1, 2]}),
        )
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let bytes = encode(&manifest()).unwrap();
        let path = Path::new("state");
        assert_eq!(decode(&bytes, path).unwrap(), manifest_with_id(&bytes));
        // Every single-byte flip in the payload or CRC is caught.
        for i in [HEADER_SIZE, HEADER_SIZE + 5, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            let err = decode(&damaged, path).unwrap_err().to_string();
            assert!(err.contains("CRC mismatch"), "{err}");
        }
        let err = decode(&bytes[..bytes.len() - 3], path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = decode(b"hello, world, this is not it", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a snapvmm checkpoint"), "{err}");
        let mut reader = &bytes[..];
        assert!(read_from(&mut reader, path).is_ok());
    }

    fn manifest_with_id(bytes: &[u8]) -> Manifest {
        serde_json::from_slice(&bytes[HEADER_SIZE..bytes.len() - 4]).unwrap()
    }

    #[test]
    fn refuses_another_major_version() {
        let payload = serde_json::to_vec(&manifest()).unwrap();
        let bytes = encode_payload(&payload, 2, 3).unwrap();
        let err = decode(&bytes, Path::new("s")).unwrap_err().to_string();
        assert!(
            err.contains("format version 2.3; this snapvmm reads 1.x"),
            "{err}"
        );
        // A newer minor version of the same major is read.
        let bytes = encode_payload(&payload, 1, 7).unwrap();
        assert!(decode(&bytes, Path::new("s")).is_ok());
    }

    #[test]
    fn refuses_an_inconsistent_manifest() {
        let mut m = manifest();
        m.memory.regions[0].size = 4097;
        let bytes = encode(&m).unwrap();
        let err = decode(&bytes, Path::new("s")).unwrap_err().to_string();
        assert!(err.contains("not page aligned"), "{err}");
    }
}
