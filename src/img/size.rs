//! Numbers as qemu-img and qemu-io read and print them: sizes with `k`/`M`/`G`... suffixes,
//! qemu's "1.5 GiB" human sizes, and qemu-io's throughput and time strings.

/// Largest size qemu accepts for an image or an offset (`INT64_MAX`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// Why a size argument was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown suffix or trailing characters.
    Invalid,
    /// Above [`MAX_SIZE`].
    TooLarge,
}

fn suffix_multiplier(c: u8) -> Option<u64> {
    let shift = match c {
        b'b' | b'B' => 0,
        b'k' | b'K' => 10,
        b'm' | b'M' => 20,
        b'g' | b'G' => 30,
        b't' | b'T' => 40,
        b'p' | b'P' => 50,
        b'e' | b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parses a size the way qemu's `qemu_strtosz` does (qemu-img's `SIZE`, qemu-io's offsets):
/// a decimal or `0x` hexadecimal number, an optional decimal fraction (only with a suffix),
/// and an optional suffix `b`, `k`, `M`, `G`, `T`, `P`, `E` (powers of 1024, any case).
///
/// `"1.5G"` is 1610612736, `"0x1000"` is 4096, `"0.1k"` is 102 (fractions of a byte are
/// dropped, as qemu drops them).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim_start().as_bytes();
    let mut pos = 0;
    let hex = s.len() > 2 && s[0] == b'0' && (s[1] == b'x' || s[1] == b'X');
    let mut value: u64 = 0;
    let mut digits = 0;
    if hex {
        pos = 2;
        while pos < s.len() && s[pos].is_ascii_hexdigit() {
            let d = (s[pos] as char).to_digit(16).unwrap_or(0) as u64;
            value = value
                .checked_mul(16)
                .and_then(|v| v.checked_add(d))
                .ok_or(SizeError::TooLarge)?;
            pos += 1;
            digits += 1;
        }
    } else {
        while pos < s.len() && s[pos].is_ascii_digit() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add((s[pos] - b'0') as u64))
                .ok_or(SizeError::TooLarge)?;
            pos += 1;
            digits += 1;
        }
    }
    let mut fraction = 0.0f64;
    let mut has_fraction_digits = false;
    if pos < s.len() && s[pos] == b'.' {
        if hex {
            return Err(SizeError::Invalid);
        }
        let start = pos;
        pos += 1;
        while pos < s.len() && s[pos].is_ascii_digit() {
            pos += 1;
            has_fraction_digits = true;
        }
        let text = std::str::from_utf8(&s[start..pos]).map_err(|_| SizeError::Invalid)?;
        fraction = format!("0{text}").parse::<f64>().unwrap_or(0.0);
    }
    if digits == 0 && !has_fraction_digits {
        return Err(SizeError::Invalid);
    }
    let multiplier = match s.get(pos).copied().and_then(suffix_multiplier) {
        Some(m) => {
            pos += 1;
            m
        }
        None => 1,
    };
    if pos != s.len() {
        return Err(SizeError::Invalid);
    }
    // A fraction needs a unit to mean anything: "1.5" bytes is refused, as qemu does.
    if multiplier == 1 && fraction != 0.0 {
        return Err(SizeError::Invalid);
    }
    let extra = (fraction * multiplier as f64) as u64;
    let total = value
        .checked_mul(multiplier)
        .and_then(|v| v.checked_add(extra))
        .ok_or(SizeError::TooLarge)?;
    if total > MAX_SIZE {
        return Err(SizeError::TooLarge);
    }
    Ok(total)
}

/// qemu's `%0.3g`: three significant digits, trailing zeros dropped.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let sci = format!("{:.2e}", x);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..3).contains(&exponent) {
        let mantissa = trim_fraction(mantissa);
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let decimals = (2 - exponent).max(0) as usize;
    trim_fraction(&format!("{:.*}", decimals, x)).to_string()
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A size the way qemu-img prints it for people ("196 KiB", "1.5 GiB", "0 B"): qemu's
/// `size_to_str`, which switches unit once the number would reach 1000.
pub fn size_to_str(value: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp(value / (1000/1024)) gives exponent e with 2^(e-1) <= x < 2^e; qemu then
    // uses (e - 1) / 10, truncating toward zero.
    let scaled = value as f64 / (1000.0 / 1024.0);
    let exponent = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let index = ((exponent - 1) / 10).clamp(0, 6) as usize;
    let divisor = (1u64 << (index * 10)) as f64;
    format!("{} {}B", format_g3(value as f64 / divisor), SUFFIXES[index])
}

/// qemu-io's `cvtstr`: "64 KiB", "1.500 MiB", "512 bytes", "134.516577 bytes".
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let (mut text, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= (1u64 << shift) as f64)
        .map(|(shift, suffix)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix))
        .unwrap_or_else(|| (format!("{:.6}", value), " bytes"));
    // qemu cuts the string at the first ".000" and appends the unit there.
    if let Some(at) = text.find(".000") {
        text.truncate(at);
    }
    text.push_str(suffix);
    text
}

/// qemu-io's `timestr` for a duration: "00.02 sec" under a second, "0:00:01.50" above.
pub fn timestr(elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs();
    let frac = elapsed.subsec_nanos() as f64 / 1e9;
    if secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{:05.2} sec", frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        // Each value checked against `qemu-img create -f raw x SIZE` (qemu 10.0).
        let cases = [
            ("1.5k", 1536),
            ("0.1k", 102),
            ("0x1000", 4096),
            ("1b", 1),
            ("2K", 2048),
            ("1m", 1 << 20),
            ("1G", 1 << 30),
            ("1t", 1 << 40),
            (" 1k", 1024),
            ("1.k", 1024),
            (".5k", 512),
            ("1000", 1000),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["1e3", "1.5", "1kk", "1i", "", "k", "-1", "0x1.5k"] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge));
    }

    #[test]
    fn human_sizes_match_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1610612736), "1.5 GiB");
        assert_eq!(size_to_str(10485760), "10 MiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(328192), "320 KiB");
    }

    #[test]
    fn qemu_io_strings() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1572864.0), "1.500 MiB");
        assert_eq!(cvtstr(513.0), "513 bytes");
        assert_eq!(cvtstr(1.0), "1 bytes");
        assert_eq!(cvtstr(134.516577), "134.516577 bytes");
        assert_eq!(timestr(std::time::Duration::from_millis(20)), "00.02 sec");
        assert_eq!(
            timestr(std::time::Duration::from_millis(61500)),
            "0:01:01.50"
        );
    }
}
