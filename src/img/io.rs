//! `snapvmm img io`: qemu-io's `read`, `write`, `discard` and `flush` commands, with
//! qemu-io's output, to exercise an image through snapvmm's engine.
//!
//! ```text
//! snapvmm img io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' disk.qcow2
//! wrote 65536/65536 bytes at offset 0
//! 64 KiB, 1 ops; 00.00 sec (162.866 MiB/sec and 2605.8616 ops/sec)
//! ...
//! ```
//!
//! A failed command prints why and the next command still runs; the exit status is 1 if
//! any command failed, as with qemu-io.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use storage::{BlockDevice, ImageFormat, OpenOptions};

use super::error::CliError;
use super::size::{cvtstr, parse_size, timestr, SizeError};
use super::{flush, open_image, parse_format, CacheMode};

/// Largest buffer one command uses; longer requests are issued in pieces so that a
/// `read 0 100G` does not try to allocate 100 GiB.
const CHUNK: u64 = 16 << 20;
/// qemu-io's default pattern for `write`.
const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

/// Arguments of `snapvmm img io`.
#[derive(Debug, Args)]
#[command(
    after_help = "Commands (qemu-io syntax; numbers take k/M/G/T suffixes):
  read [-P PATTERN] [-s OFF] [-l LEN] [-q] [-v] OFFSET LENGTH
      read, optionally checking every byte (or LEN bytes from OFF) is PATTERN
  write [-P PATTERN | -z] [-u] [-q] OFFSET LENGTH
      write PATTERN (default 0xcd), or zeroes with -z
  discard [-q] OFFSET LENGTH
  flush"
)]
pub struct IoArgs {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    pub format: Option<ImageFormat>,
    /// A command to run, e.g. 'write -P 0xab 0 64k'; repeat for several. Without -c,
    /// commands are read from standard input, one per line.
    #[arg(short = 'c', long = "cmd", value_name = "CMD")]
    pub commands: Vec<String>,
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Cache mode: none (O_DIRECT), writeback, writethrough, directsync, unsafe.
    #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
    pub cache: CacheMode,
    /// Same as -t none.
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// The image.
    pub file: PathBuf,
}

/// Splits a command line into words, honouring single and double quotes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// A command's options (letter and value, empty for flags) and positional arguments.
type ParsedArgs = (Vec<(char, String)>, Vec<String>);

/// Options and positional arguments of one command, parsed getopt-style: `spec` lists the
/// option letters, a `:` after a letter meaning it takes a value (`-P 0xab` or `-P0xab`).
fn getopt(words: &[String], spec: &str) -> Result<ParsedArgs, String> {
    let mut options = Vec::new();
    let mut positional = Vec::new();
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        if word == "--" {
            positional.extend(iter.by_ref().cloned());
            break;
        }
        let Some(flags) = word.strip_prefix('-').filter(|f| !f.is_empty()) else {
            positional.push(word.clone());
            continue;
        };
        for (i, letter) in flags.char_indices() {
            let Some(at) = spec.find(letter).filter(|_| letter != ':') else {
                return Err(format!("invalid option -- '{letter}'"));
            };
            if spec[at + 1..].starts_with(':') {
                let rest = &flags[i + letter.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_string()
                } else {
                    iter.next()
                        .cloned()
                        .ok_or_else(|| format!("option requires an argument -- '{letter}'"))?
                };
                options.push((letter, value));
                break;
            }
            options.push((letter, String::new()));
        }
    }
    Ok((options, positional))
}

/// qemu-io's `parse_pattern`: a byte in C notation (`0xcd`, `205`, `0315`).
fn parse_pattern(text: &str) -> Result<u8, String> {
    let value = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()
    } else if text.len() > 1 && text.starts_with('0') {
        i64::from_str_radix(&text[1..], 8).ok()
    } else {
        text.parse::<i64>().ok()
    };
    match value {
        Some(v @ 0..=255) => Ok(v as u8),
        _ => Err(format!("{text} is not a valid pattern byte")),
    }
}

/// qemu-io's `cvtnum` with its error messages.
fn parse_number(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| match e {
        SizeError::Invalid => format!(
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
        ),
        SizeError::TooLarge => format!("Parsing error: argument too large -- {text}"),
    })
}

/// The offset and length positional arguments of read/write/discard.
fn offset_and_length(positional: &[String], usage: &str) -> Result<(u64, u64), String> {
    match positional {
        [offset, length] => Ok((parse_number(offset)?, parse_number(length)?)),
        _ => Err(format!("bad argument count to {usage}")),
    }
}

/// qemu-io's two report lines after a read, write or discard.
fn report(op: &str, offset: u64, count: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    format!(
        "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(count as f64),
        timestr(elapsed),
        cvtstr(count as f64 / secs),
        1.0 / secs
    )
}

/// qemu-io's `read -v` hex dump.
fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + i as u64 * 16));
        for b in line {
            out.push_str(&format!("{b:02x} "));
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// An open image and how it was opened.
struct Session {
    device: Arc<dyn BlockDevice>,
    cache: CacheMode,
    wrote: bool,
}

impl Session {
    /// Rejects requests past the end before any piece of them runs.
    fn check_range(&self, op: &str, offset: u64, len: u64) -> Result<(), String> {
        storage::device::check_range(offset, len, self.device.size())
            .map_err(|e| format!("{op} failed: {e}"))
    }

    /// `read [-P pattern] [-s off] [-l len] [-q] [-v] offset length`.
    fn read(&self, words: &[String]) -> Result<String, String> {
        let (opts, positional) = getopt(words, "P:s:l:qv")?;
        let (offset, count) = offset_and_length(&positional, "read")?;
        let mut pattern = None;
        let (mut pattern_offset, mut pattern_count) = (0u64, None);
        let (mut quiet, mut verbose) = (false, false);
        for (letter, value) in opts {
            match letter {
                'P' => pattern = Some(parse_pattern(&value)?),
                's' => pattern_offset = parse_number(&value)?,
                'l' => pattern_count = Some(parse_number(&value)?),
                'q' => quiet = true,
                _ => verbose = true,
            }
        }
        let pattern_count = pattern_count.unwrap_or(count.saturating_sub(pattern_offset));
        if pattern_offset.saturating_add(pattern_count) > count {
            return Err("pattern verification range exceeds end of read data".into());
        }
        self.check_range("read", offset, count)?;
        let mut out = String::new();
        let mut mismatch: Option<(u64, u8)> = None;
        let (verify_start, verify_end) = (
            offset + pattern_offset,
            offset + pattern_offset + pattern_count,
        );
        let mut buf = vec![0u8; count.min(CHUNK) as usize];
        let started = Instant::now();
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(CHUNK) as usize;
            let at = offset + done;
            self.device
                .read_at(&mut buf[..n], at)
                .map_err(|e| format!("read failed: {e}"))?;
            if let (Some(p), None) = (pattern, mismatch) {
                let lo = verify_start.max(at);
                let hi = verify_end.min(at + n as u64);
                if lo < hi {
                    let slice = &buf[(lo - at) as usize..(hi - at) as usize];
                    if let Some(i) = slice.iter().position(|&b| b != p) {
                        mismatch = Some((lo + i as u64, slice[i]));
                    }
                }
            }
            if verbose {
                out.push_str(&dump_buffer(&buf[..n], at));
            }
            done += n as u64;
        }
        let elapsed = started.elapsed();
        let mut failed = None;
        if let (Some(p), Some((at, found))) = (pattern, mismatch) {
            failed = Some(format!(
                "Pattern verification failed at offset {verify_start}, {pattern_count} bytes\n"
            ));
            // qemu-io names only the range checked; the first differing byte helps more.
            eprintln!(
                "snapvmm img: first mismatch at offset {at}: expected {p:#04x}, found {found:#04x}"
            );
        }
        if !quiet {
            out.push_str(&report("read", offset, count, elapsed));
        }
        match failed {
            // qemu-io prints the report after the failure line, and still fails.
            Some(line) => Err(format!("{line}{}", out.trim_end_matches('\n'))),
            None => Ok(out),
        }
    }

    /// `write [-P pattern | -z] [-u] [-q] offset length`.
    fn write(&mut self, words: &[String]) -> Result<String, String> {
        let (opts, positional) = getopt(words, "P:zuq")?;
        let (offset, count) = offset_and_length(&positional, "write")?;
        let (mut pattern, mut zero, mut quiet) = (None, false, false);
        for (letter, value) in opts {
            match letter {
                'P' => pattern = Some(parse_pattern(&value)?),
                'z' => zero = true,
                'q' => quiet = true,
                // -u (may unmap): the engine always unmaps whole zeroed clusters.
                _ => {}
            }
        }
        if zero && pattern.is_some() {
            return Err("-z and -P cannot be specified at the same time".into());
        }
        self.check_range("write", offset, count)?;
        let started = Instant::now();
        if zero {
            self.device
                .write_zeroes(offset, count)
                .map_err(|e| format!("write failed: {e}"))?;
        } else {
            let buf = vec![pattern.unwrap_or(DEFAULT_WRITE_PATTERN); count.min(CHUNK) as usize];
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(CHUNK) as usize;
                self.device
                    .write_at(&buf[..n], offset + done)
                    .map_err(|e| format!("write failed: {e}"))?;
                done += n as u64;
            }
        }
        if self.cache.write_through() {
            self.device
                .flush()
                .map_err(|e| format!("write failed: {e}"))?;
        }
        let elapsed = started.elapsed();
        self.wrote = true;
        Ok(if quiet {
            String::new()
        } else {
            report("wrote", offset, count, elapsed)
        })
    }

    /// `discard [-q] offset length`.
    fn discard(&mut self, words: &[String]) -> Result<String, String> {
        let (opts, positional) = getopt(words, "q")?;
        let (offset, count) = offset_and_length(&positional, "discard")?;
        self.check_range("discard", offset, count)?;
        let started = Instant::now();
        self.device
            .discard(offset, count)
            .map_err(|e| format!("discard failed: {e}"))?;
        let elapsed = started.elapsed();
        self.wrote = true;
        Ok(if opts.is_empty() {
            report("discard", offset, count, elapsed)
        } else {
            String::new()
        })
    }

    /// Runs one command line; `Err` carries what to print for a failed command.
    fn execute(&mut self, line: &str) -> Result<String, String> {
        let words = split_words(line);
        let Some((name, rest)) = words.split_first() else {
            return Ok(String::new());
        };
        match name.as_str() {
            "read" | "r" => self.read(rest),
            "write" | "w" => self.write(rest),
            "discard" | "d" => self.discard(rest),
            "flush" | "f" => {
                if !rest.is_empty() {
                    return Err("bad argument count to flush".into());
                }
                self.device
                    .flush()
                    .map(|_| String::new())
                    .map_err(|e| format!("flush failed: {e}"))
            }
            other => Err(format!("command \"{other}\" not found")),
        }
    }
}

/// Runs `snapvmm img io`.
pub fn run(args: IoArgs) -> Result<u8, CliError> {
    let cache = if args.nocache {
        CacheMode::None
    } else {
        args.cache
    };
    let device = open_image(
        &args.file,
        args.format,
        OpenOptions {
            read_only: args.read_only,
            direct: cache.direct(),
            ..OpenOptions::default()
        },
    )?;
    let mut session = Session {
        device,
        cache,
        wrote: false,
    };
    let commands: Vec<String> = if args.commands.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !matches!(l.trim(), "quit" | "q"))
            .collect()
    } else {
        args.commands.clone()
    };
    let mut failed = false;
    for command in &commands {
        match session.execute(command) {
            Ok(text) => print!("{text}"),
            Err(text) => {
                failed = true;
                if text.starts_with("command \"") {
                    eprintln!("{text}");
                } else {
                    println!("{text}");
                }
            }
        }
    }
    if session.wrote && cache.flush_at_exit() {
        flush(&session.device)?;
    }
    Ok(u8::from(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getopt_handles_attached_and_separate_values() {
        let words: Vec<String> = ["-P0xab", "-q", "0", "-l", "4k", "64k"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (opts, pos) = getopt(&words, "P:ql:").unwrap();
        assert_eq!(
            opts,
            vec![
                ('P', "0xab".into()),
                ('q', String::new()),
                ('l', "4k".into())
            ]
        );
        assert_eq!(pos, vec!["0".to_string(), "64k".to_string()]);
        assert!(getopt(&["-x".to_string()], "q").is_err());
    }

    #[test]
    fn patterns_parse_like_qemu_io() {
        assert_eq!(parse_pattern("0xcd"), Ok(0xcd));
        assert_eq!(parse_pattern("205"), Ok(205));
        assert_eq!(parse_pattern("0315"), Ok(0o315));
        assert!(parse_pattern("0xzz").is_err());
        assert!(parse_pattern("256").is_err());
    }

    #[test]
    fn hex_dump_matches_qemu_io() {
        assert_eq!(
            dump_buffer(&[0u8; 16], 0),
            "00000000:  00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................\n"
        );
    }

    #[test]
    fn words_split_with_quotes() {
        assert_eq!(
            split_words("write  -P 1 'a b' \"c\""),
            ["write", "-P", "1", "a b", "c"]
        );
    }
}
