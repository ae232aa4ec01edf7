//! Decompression of compressed clusters (raw deflate or zstd).

use super::header::CompressionType;

/// Inflates `input` into exactly `out.len()` bytes. Returns false when the stream is corrupt
/// or too short; trailing bytes after the stream are ignored (the stored length is an upper
/// bound rounded to sectors).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> bool {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) => d.total_out() as usize == out.len(),
                Err(_) => false,
            }
        }
        CompressionType::Zstd => {
            // QEMU writes one frame per cluster; decode streaming so padding after the frame
            // does not count as an error.
            use std::io::Read;
            let Ok(decoder) = zstd::stream::read::Decoder::with_buffer(input) else {
                return false;
            };
            let mut decoder = decoder.single_frame();
            let mut done = 0;
            while done < out.len() {
                match decoder.read(&mut out[done..]) {
                    Ok(0) => return false,
                    Ok(n) => done += n,
                    Err(_) => return false,
                }
            }
            true
        }
    }
}

/// Compresses one cluster; `None` when it does not shrink (the caller stores it plainly).
pub fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Zlib => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                _ => return None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() < input.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_kinds() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut packed = compress(kind, &data).unwrap();
            packed.extend_from_slice(&[0u8; 300]);
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &packed, &mut out));
            assert_eq!(out, data);
        }
    }

    #[test]
    fn corrupt_stream_refused() {
        let mut out = vec![0u8; 4096];
        assert!(!decompress(CompressionType::Zlib, &[0xff; 64], &mut out));
        assert!(!decompress(CompressionType::Zstd, &[0xff; 64], &mut out));
    }
}
