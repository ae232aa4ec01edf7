//! `snapvmm img bench`: qemu-img bench's request loop, with threads for queue depth.
//!
//! qemu-img bench keeps DEPTH asynchronous requests in flight from one thread. snapvmm's
//! engine is synchronous and thread-safe, so DEPTH worker threads share the one open image
//! and each issues its next request as soon as the previous one completes: the same number
//! of requests in flight, exercising the engine's locking the way a multi-queue device does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use storage::{BlockDevice, ImageFormat, OpenOptions};

use super::error::CliError;
use super::{flush, open_image, parse_format, parse_size_arg, CacheMode};

/// Arguments of `snapvmm img bench` (qemu-img bench's flags and defaults).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    pub count: u64,
    /// Requests in flight at once (worker threads).
    #[arg(short = 'd', long = "depth", default_value_t = 64)]
    pub depth: u64,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// Guest offset of the first request.
    #[arg(short = 'o', long = "offset", value_parser = parse_size_arg, default_value = "0")]
    pub offset: u64,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", value_parser = parse_size_arg, default_value = "4096")]
    pub size: u64,
    /// Distance between consecutive requests' offsets (default: the request size).
    #[arg(short = 'S', long = "step-size", value_parser = parse_size_arg)]
    pub step: Option<u64>,
    /// Cache mode: none (O_DIRECT), writeback, writethrough, directsync, unsafe.
    #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
    pub cache: CacheMode,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Byte written by -w (default 0).
    #[arg(long = "pattern", default_value = "0", value_parser = parse_pattern_arg)]
    pub pattern: u8,
    /// With -w, flush after every INTERVAL completed requests.
    #[arg(long = "flush-interval", value_name = "INTERVAL", default_value_t = 0)]
    pub flush_interval: u64,
    /// Accepted for qemu-img compatibility; workers never wait for each other to flush.
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Print nothing.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image.
    pub file: PathBuf,
}

/// `--pattern`: a byte, decimal or 0x hexadecimal.
fn parse_pattern_arg(text: &str) -> Result<u8, String> {
    let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16).ok(),
        None => text.parse::<u8>().ok(),
    };
    value.ok_or_else(|| format!("invalid pattern byte '{text}' (0 to 255)"))
}

/// Largest value qemu-img accepts for counts and sizes (`INT_MAX`).
const INT_MAX: u64 = i32::MAX as u64;

/// Guest offset of request number `index`: the first at `start`, then `step` further each
/// time, wrapping at the image end (qemu-img's `offset = (offset + step) % image_size`).
fn request_offset(start: u64, step: u64, index: u64, image_size: u64) -> u64 {
    if index == 0 {
        return start;
    }
    if image_size == 0 {
        return 0;
    }
    ((start as u128 + index as u128 * step as u128) % image_size as u128) as u64
}

/// Runs `snapvmm img bench`.
pub fn run(args: BenchArgs) -> Result<u8, CliError> {
    if args.count > INT_MAX {
        return Err(CliError::new("invalid request count specified (-c)"));
    }
    if args.depth == 0 || args.depth > INT_MAX {
        return Err(CliError::new("invalid queue depth specified (-d)"));
    }
    if args.size == 0 || args.size > INT_MAX {
        return Err(CliError::new("invalid buffer size specified (-s)"));
    }
    if args.step.unwrap_or(0) > INT_MAX {
        return Err(CliError::new("invalid step size specified (-S)"));
    }
    if !args.write && args.flush_interval != 0 {
        return Err(CliError::new(
            "--flush-interval is only available in write tests",
        ));
    }
    if args.flush_interval != 0 && args.flush_interval < args.depth {
        return Err(CliError::new("flush interval can't be smaller than depth"));
    }
    let device = open_image(
        &args.file,
        args.format,
        OpenOptions {
            read_only: !args.write,
            direct: args.cache.direct(),
            ..OpenOptions::default()
        },
    )?;
    let image_size = device.size();
    let step = args.step.filter(|&s| s != 0).unwrap_or(args.size);
    if !args.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            args.count,
            if args.write { "write" } else { "read" },
            args.size,
            args.depth,
            args.offset,
            step
        );
        if args.flush_interval != 0 {
            println!("Sending flush every {} requests", args.flush_interval);
        }
    }

    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let workers = args.depth.min(args.count.max(1));
    let fail = |message: String| {
        stop.store(true, Ordering::Relaxed);
        let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(message);
    };
    let worker = |device: &Arc<dyn BlockDevice>| {
        // Aligned like QEMU's request buffers, so `-t none` needs no bounce copy.
        let mut aligned = storage::file::AlignedBuf::new(args.size as usize);
        aligned.fill(args.pattern);
        let buf = &mut aligned[..args.size as usize];
        while !stop.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= args.count {
                break;
            }
            let offset = request_offset(args.offset, step, index, image_size);
            let result = if args.write {
                device.write_at(buf, offset).and_then(|()| {
                    if args.cache.write_through() {
                        device.flush()
                    } else {
                        Ok(())
                    }
                })
            } else {
                device.read_at(buf, offset)
            };
            if let Err(e) = result {
                fail(format!("failed request at offset {offset}: {e}"));
                break;
            }
            let done = completed.fetch_add(1, Ordering::Relaxed) + 1;
            if args.flush_interval != 0 && done % args.flush_interval == 0 {
                if let Err(e) = device.flush() {
                    fail(format!("failed flush: {e}"));
                    break;
                }
            }
        }
    };
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let device = &device;
            let worker = &worker;
            scope.spawn(move || worker(device));
        }
    });
    let elapsed = started.elapsed();
    if let Some(message) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(CliError::new(message));
    }
    if !args.quiet {
        println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    }
    // qemu-img bench stops its clock before closing (and so flushing) the image; so does
    // this, but the flush still happens and its failure is reported.
    if args.write && args.cache.flush_at_exit() {
        flush(&device)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_like_qemu_img_bench() {
        assert_eq!(request_offset(0, 4096, 0, 8192), 0);
        assert_eq!(request_offset(0, 4096, 1, 8192), 4096);
        assert_eq!(request_offset(0, 4096, 2, 8192), 0);
        // The first request keeps its offset even past the end, as in qemu-img.
        assert_eq!(request_offset(10000, 4096, 0, 8192), 10000);
        assert_eq!(request_offset(10000, 4096, 1, 8192), (10000 + 4096) % 8192);
    }
}
