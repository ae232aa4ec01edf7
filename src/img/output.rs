//! Output formats shared by the verbs, and a JSON writer that prints exactly what qemu-img
//! prints.
//!
//! qemu-img builds its JSON from QEMU's `QDict`, a hash table: keys come out in bucket order
//! of QEMU's `tdb_hash`, not in insertion or alphabetical order. Reproducing that order (and
//! QEMU's pretty-printer layout) makes `snapvmm img info --output json` diff cleanly against
//! `qemu-img info --output json`, which is how users and our tests compare the two tools.

use std::fmt::Write as _;

use clap::ValueEnum;

/// `--output human|json`, as qemu-img spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// The layout qemu-img prints for people.
    #[default]
    Human,
    /// qemu-img's JSON.
    Json,
}

/// A JSON value in the shape QEMU's `QObject` has.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// A signed integer (QEMU prints `%PRId64`).
    Int(i64),
    /// An unsigned integer (`%PRIu64`).
    Uint(u64),
    /// `true` or `false`.
    Bool(bool),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<QValue>),
    /// A dictionary.
    Dict(QDict),
}

/// A dictionary that remembers insertion order, printed in QEMU's `QDict` iteration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

/// Buckets in QEMU's `QDict` (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` (qobject/qdict.c), which picks a key's bucket.
fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

impl QDict {
    /// An empty dictionary.
    pub fn new() -> Self {
        QDict::default()
    }

    /// Adds `key`. Callers insert in the order QEMU's QAPI visitor would, because that
    /// order decides ties between keys sharing a bucket.
    pub fn insert(&mut self, key: &str, value: QValue) {
        self.entries.push((key.to_string(), value));
    }

    /// The entries in the order QEMU's `qdict_first`/`qdict_next` visit them: ascending
    /// bucket, and within a bucket the most recently inserted first.
    pub fn iter_qemu_order(&self) -> impl Iterator<Item = (&str, &QValue)> {
        let mut order: Vec<(u32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (tdb_hash(k) % QDICT_BUCKETS, i))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        order.into_iter().map(move |(_, i)| {
            let (k, v) = &self.entries[i];
            (k.as_str(), v)
        })
    }
}

impl From<QDict> for QValue {
    fn from(d: QDict) -> Self {
        QValue::Dict(d)
    }
}

impl From<bool> for QValue {
    fn from(b: bool) -> Self {
        QValue::Bool(b)
    }
}

impl From<u64> for QValue {
    fn from(n: u64) -> Self {
        QValue::Uint(n)
    }
}

impl From<i64> for QValue {
    fn from(n: i64) -> Self {
        QValue::Int(n)
    }
}

impl From<&str> for QValue {
    fn from(s: &str) -> Self {
        QValue::Str(s.to_string())
    }
}

impl From<String> for QValue {
    fn from(s: String) -> Self {
        QValue::Str(s)
    }
}

/// Pretty-prints `value` as `qobject_to_json_pretty` does (4-space indent, `"key": value`),
/// without the trailing newline qemu-img adds.
pub fn to_json_pretty(value: &QValue) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &QValue, indent: usize) {
    match value {
        QValue::Int(n) => {
            let _ = write!(out, "{n}");
        }
        QValue::Uint(n) => {
            let _ = write!(out, "{n}");
        }
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::Str(s) => write_string(out, s),
        QValue::List(items) => {
            out.push('[');
            let mut sep = "";
            for item in items {
                out.push_str(sep);
                newline(out, indent + 1);
                write_value(out, item, indent + 1);
                sep = ",";
            }
            newline(out, indent);
            out.push(']');
        }
        QValue::Dict(dict) => {
            out.push('{');
            let mut sep = "";
            for (key, item) in dict.iter_qemu_order() {
                out.push_str(sep);
                newline(out, indent + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, indent + 1);
                sep = ",";
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// QEMU's string escaping: the usual backslash escapes, and `\uXXXX` (upper-case hex,
/// surrogate pairs above U+FFFF) for control characters and everything outside ASCII.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_keys_come_out_in_qemu_order() {
        // The order `qemu-img check --output json` prints for a clean image.
        let mut d = QDict::new();
        for k in [
            "filename",
            "format",
            "check-errors",
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
        ] {
            d.insert(k, QValue::Int(0));
        }
        let keys: Vec<&str> = d.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "allocated-clusters",
                "filename",
                "format"
            ]
        );
    }

    #[test]
    fn empty_containers_and_escapes_match_qemu() {
        let mut d = QDict::new();
        d.insert("children", QValue::List(vec![]));
        d.insert("data", QDict::new().into());
        d.insert("s", "a\"b/c\u{e9}".into());
        let text = to_json_pretty(&d.into());
        assert!(text.contains("\"children\": [\n    ]"), "{text}");
        assert!(text.contains("\"data\": {\n    }"), "{text}");
        assert!(text.contains("\"a\\\"b/c\\u00E9\""), "{text}");
    }
}
