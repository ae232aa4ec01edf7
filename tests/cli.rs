//! `snapvmm img` side by side with qemu-img and qemu-io.
//!
//! Every test builds its images in a fresh temporary directory and runs both tools there with
//! relative file names, so that their outputs can be compared byte for byte. Without
//! qemu-img/qemu-io the tests print why and pass, unless `SNAPVMM_REQUIRE_QEMU=1` asks for
//! them to fail instead (CI machines with QEMU installed set it).

use std::path::Path;
use std::process::Output;

use test_support::qemu::{ok_in, qemu_img_major, run_in};
use test_support::require::have_qemu;

const SNAPVMM: &str = env!("CARGO_BIN_EXE_snapvmm");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn snapvmm(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["img"];
    all.extend_from_slice(args);
    ok_in(dir, SNAPVMM, &all)
}

fn snapvmm_raw(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["img"];
    all.extend_from_slice(args);
    run_in(dir, SNAPVMM, &all)
}

/// Both tools' stdout for the same verb and arguments (`qemu-img VERB ...` against
/// `snapvmm img VERB ...`).
fn both(dir: &Path, args: &[&str]) -> (String, String) {
    (ok_in(dir, "qemu-img", args), snapvmm(dir, args))
}

/// Asserts that the two tools print the same thing.
fn assert_same(dir: &Path, args: &[&str]) {
    let (qemu, ours) = both(dir, args);
    assert_output_matches(&qemu, &ours, &format!("snapvmm img {args:?}"));
}

/// Keys newer qemu-img versions print and older ones do not: `children` (info, 8.0) and
/// `compressed` (map, 8.2).
const NEWER_KEYS: [&str; 2] = ["children", "compressed"];

/// Removes from `ours` the [`NEWER_KEYS`] that `qemu`'s matching object lacks.
fn drop_newer_keys(qemu: &serde_json::Value, ours: &mut serde_json::Value) {
    use serde_json::Value;
    match (qemu, ours) {
        (Value::Object(q), Value::Object(o)) => {
            o.retain(|k, _| q.contains_key(k) || !NEWER_KEYS.contains(&k.as_str()));
            for (k, v) in o.iter_mut() {
                if let Some(qv) = q.get(k) {
                    drop_newer_keys(qv, v);
                }
            }
        }
        (Value::Array(q), Value::Array(o)) => {
            for (qv, v) in q.iter().zip(o.iter_mut()) {
                drop_newer_keys(qv, v);
            }
        }
        _ => {}
    }
}

/// Removes the "Child node '/file':" blocks qemu-img info prints since 8.0.
fn drop_child_nodes(human: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in human.lines() {
        if line.starts_with("Child node '") {
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("    ") {
            continue;
        }
        skipping = false;
        out.push(line);
    }
    out.join("\n")
}

/// Byte-for-byte equality against qemu-img 10 (what snapvmm imitates); against an older
/// qemu-img, equality once the fields it predates are set aside.
fn assert_output_matches(qemu: &str, ours: &str, what: &str) {
    if qemu == ours || qemu_img_major() >= 10 {
        assert_eq!(ours, qemu, "{what} differs from qemu-img");
        return;
    }
    let json = |t: &str| {
        // qemu-img map --output json prints one object per line inside [ ].
        serde_json::from_str::<serde_json::Value>(t).ok()
    };
    match (json(qemu), json(ours)) {
        (Some(q), Some(mut o)) => {
            drop_newer_keys(&q, &mut o);
            assert_eq!(o, q, "{what} differs from qemu-img {}", qemu_img_major());
        }
        _ => assert_eq!(
            drop_child_nodes(ours),
            drop_child_nodes(qemu),
            "{what} differs from qemu-img {}",
            qemu_img_major()
        ),
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// qemu-io lines without the timing line, which differs run to run.
fn without_timing(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(str::to_string)
        .collect()
}

/// A two-layer chain with data, zero clusters and holes in both layers, written by qemu-io:
/// base.qcow2 (4 MiB) ← top.qcow2.
fn qemu_chain(dir: &Path) {
    ok_in(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    ok_in(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0xaa 0 128k",
            "-c",
            "write -z 256k 64k",
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "write -P 0x22 3M 64k",
            "base.qcow2",
        ],
    );
    ok_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    ok_in(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0xbb 64k 64k",
            "-c",
            "write -z -u 1M 64k",
            "-c",
            "write -P 0xcc 2M 4k",
            "-c",
            "discard 3M 64k",
            "top.qcow2",
        ],
    );
}

#[test]
fn created_images_agree_with_qemu_img() {
    if !have_qemu("created_images_agree_with_qemu_img") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "a.qcow2", "1G"],
        &["-f", "qcow2", "-o", "compat=0.10", "b.qcow2", "100M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compression_type=zstd",
            "c.qcow2",
            "1.5G",
        ],
        &["-f", "qcow2", "-o", "cluster_size=2M", "d.qcow2", "10G"],
        &["-f", "raw", "e.raw", "10M"],
    ];
    for args in cases {
        let mut create = vec!["create"];
        create.extend_from_slice(args);
        let line = snapvmm(d, &create);
        let file = args[args.len() - 2];
        // The same "Formatting ..." line as qemu-img, which runs second so the file it
        // leaves is compared against what snapvmm wrote before.
        let ours_info = snapvmm(d, &["info", "--output", "json", file]);
        let qemu_info = ok_in(d, "qemu-img", &["info", "--output", "json", file]);
        assert_output_matches(&qemu_info, &ours_info, &format!("info of {file}"));
        if file.ends_with(".qcow2") {
            ok_in(d, "qemu-img", &["check", file]);
        }
        let qemu_line = ok_in(d, "qemu-img", &create);
        assert_eq!(line, qemu_line, "Formatting line for {args:?}");
    }

    // An overlay: size taken from the backing file, backing name and format recorded.
    snapvmm(
        d,
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&ok_in(
        d,
        "qemu-img",
        &["info", "--output", "json", "o.qcow2"],
    ))
    .expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 1u64 << 30);
    assert_eq!(info["backing-filename"], "a.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    ok_in(d, "qemu-img", &["check", "o.qcow2"]);
    assert_same(d, &["info", "--backing-chain", "o.qcow2"]);
    assert_same(
        d,
        &["info", "--backing-chain", "--output", "json", "o.qcow2"],
    );
}

#[test]
fn info_matches_qemu_img_on_qemu_images() {
    if !have_qemu("info_matches_qemu_img_on_qemu_images") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_chain(d);
    ok_in(d, "qemu-img", &["snapshot", "-c", "first", "base.qcow2"]);
    ok_in(
        d,
        "qemu-img",
        &["snapshot", "-c", "second one", "base.qcow2"],
    );
    for output in ["human", "json"] {
        assert_same(d, &["info", "--output", output, "top.qcow2"]);
        assert_same(d, &["info", "--output", output, "base.qcow2"]);
        assert_same(
            d,
            &["info", "--backing-chain", "--output", output, "top.qcow2"],
        );
    }
}

#[test]
fn snapvmm_writes_are_read_back_by_qemu_io() {
    if !have_qemu("snapvmm_writes_are_read_back_by_qemu_io") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    snapvmm(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    let out = snapvmm(
        d,
        &[
            "io",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x07 3000k 5000",
            "-c",
            "write 2M 4k",
            "-c",
            "write -z 512k 128k",
            "base.qcow2",
        ],
    );
    assert_eq!(
        without_timing(&out),
        [
            "wrote 1048576/1048576 bytes at offset 0",
            "wrote 5000/5000 bytes at offset 3072000",
            "wrote 4096/4096 bytes at offset 2097152",
            "wrote 131072/131072 bytes at offset 524288",
        ]
    );
    snapvmm(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    snapvmm(
        d,
        &[
            "io",
            "-c",
            "write -P 0x77 100k 10k",
            "-c",
            "flush",
            "top.qcow2",
        ],
    );
    let read = ok_in(
        d,
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 0x5a 0 100k",
            "-c",
            "read -P 0x77 100k 10k",
            "-c",
            "read -P 0x5a 110k 402k",
            "-c",
            "read -P 0 512k 128k",
            "-c",
            "read -P 0x5a 640k 384k",
            "-c",
            "read -P 0xcd 2M 4k",
            "-c",
            "read -P 0x07 3000k 5000",
            "-c",
            "read -P 0 4M 4M",
            "top.qcow2",
        ],
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");
    ok_in(d, "qemu-img", &["check", "base.qcow2"]);
    ok_in(d, "qemu-img", &["check", "top.qcow2"]);
}

#[test]
fn qemu_io_writes_are_read_back_by_snapvmm() {
    if !have_qemu("qemu_io_writes_are_read_back_by_snapvmm") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_chain(d);
    let out = snapvmm(
        d,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0xaa 0 64k",
            "-c",
            "read -P 0xbb 64k 64k",
            "-c",
            "read -P 0 128k 896k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0xcc 2M 4k",
            "-c",
            "read -P 0 3M 1M",
            "top.qcow2",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(without_timing(&out).len(), 6, "{out}");

    // A read that finds other data fails and says where, as qemu-io does.
    let bad = snapvmm_raw(d, &["io", "-r", "-c", "read -P 0x11 1M 64k", "top.qcow2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stdout)
            .starts_with("Pattern verification failed at offset 1048576, 65536 bytes\n"),
        "{}",
        text(&bad.stdout)
    );
    assert!(text(&bad.stderr).contains("first mismatch at offset 1048576"));
    // qemu-io agrees on both.
    let qemu_bad = run_in(
        d,
        "qemu-io",
        &["-r", "-c", "read -P 0x11 1M 64k", "top.qcow2"],
    );
    assert_eq!(
        without_timing(&text(&qemu_bad.stdout)),
        without_timing(&text(&bad.stdout))
    );
}

#[test]
fn map_matches_qemu_img() {
    if !have_qemu("map_matches_qemu_img") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_chain(d);
    // A raw image with holes under a larger qcow2 overlay.
    ok_in(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "4M"]);
    ok_in(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -P 2 1M 4k",
            "r.raw",
        ],
    );
    ok_in(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "rt.qcow2", "8M",
        ],
    );
    ok_in(d, "qemu-io", &["-c", "write -P 3 0 64k", "rt.qcow2"]);
    ok_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "empty.raw", "0"],
    );
    for file in ["base.qcow2", "top.qcow2", "r.raw", "rt.qcow2", "empty.raw"] {
        for output in ["human", "json"] {
            assert_same(d, &["map", "--output", output, file]);
        }
    }
    assert_same(
        d,
        &[
            "map",
            "--output",
            "json",
            "--start-offset",
            "64k",
            "--max-length",
            "2M",
            "top.qcow2",
        ],
    );
}

/// Bumps the refcount of the cluster just past the end of a 16-bit-refcount qcow2 image and
/// extends the file over it: a leaked cluster, as a crash between allocation and use leaves.
fn leak_a_cluster(path: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut header = [0u8; 104];
    file.read_exact_at(&mut header, 0).expect("read header");
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap());
    let cluster_size = 1u64 << be32(20);
    assert_eq!(be32(96), 4, "test expects 16-bit refcounts");
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, be64(48))
        .expect("read refcount table");
    let block = u64::from_be_bytes(entry);
    let clusters = file.metadata().unwrap().len().div_ceil(cluster_size);
    file.write_all_at(&1u16.to_be_bytes(), block + 2 * clusters)
        .expect("write refcount");
    file.write_all_at(&vec![0u8; cluster_size as usize], clusters * cluster_size)
        .expect("extend file");
}

/// Sets the refcount of a referenced cluster to zero: a corruption.
fn corrupt_a_refcount(path: &Path, cluster: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut header = [0u8; 56];
    file.read_exact_at(&mut header, 0).expect("read header");
    let table = u64::from_be_bytes(header[48..56].try_into().unwrap());
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, table)
        .expect("read refcount table");
    let block = u64::from_be_bytes(entry);
    file.write_all_at(&0u16.to_be_bytes(), block + 2 * cluster)
        .expect("write refcount");
}

/// `check` on clean, leaky, corrupt and raw images: the same reports and exit codes as
/// qemu-img (this exercises `storage::qcow2::check` end to end).
#[test]
fn check_exit_codes_and_repair_match_qemu_img() {
    if !have_qemu("check_exit_codes_and_repair_match_qemu_img") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_chain(d);
    let code = |args: &[&str]| snapvmm_raw(d, args).status.code();

    // Clean.
    assert_eq!(code(&["check", "top.qcow2"]), Some(0));
    assert_same(d, &["check", "top.qcow2"]);
    assert_same(d, &["check", "--output", "json", "base.qcow2"]);

    // Leaks: exit 3, the same report as qemu-img; -r leaks fixes them (exit 0).
    std::fs::copy(d.join("base.qcow2"), d.join("leak.qcow2")).unwrap();
    leak_a_cluster(&d.join("leak.qcow2"));
    for output in ["human", "json"] {
        let ours = snapvmm_raw(d, &["check", "--output", output, "leak.qcow2"]);
        let qemu = run_in(d, "qemu-img", &["check", "--output", output, "leak.qcow2"]);
        assert_eq!(ours.status.code(), Some(3));
        assert_eq!(qemu.status.code(), Some(3));
        assert_output_matches(
            &text(&qemu.stdout),
            &text(&ours.stdout),
            "check of leak.qcow2",
        );
    }
    std::fs::copy(d.join("leak.qcow2"), d.join("leak2.qcow2")).unwrap();
    let repaired = snapvmm_raw(d, &["check", "-r", "leaks", "leak.qcow2"]);
    let qemu_repaired = run_in(d, "qemu-img", &["check", "-r", "leaks", "leak2.qcow2"]);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}",
        text(&repaired.stderr)
    );
    assert_eq!(qemu_repaired.status.code(), Some(0));
    assert_eq!(text(&repaired.stdout), text(&qemu_repaired.stdout));
    assert!(text(&repaired.stdout).contains("1 leaked clusters\n"));
    assert_eq!(code(&["check", "leak.qcow2"]), Some(0));
    ok_in(d, "qemu-img", &["check", "leak.qcow2"]);

    // Corruption (a referenced data cluster with refcount 0): exit 2 until -r all.
    std::fs::copy(d.join("base.qcow2"), d.join("bad.qcow2")).unwrap();
    corrupt_a_refcount(&d.join("bad.qcow2"), 5);
    let ours = snapvmm_raw(d, &["check", "bad.qcow2"]);
    let qemu = run_in(d, "qemu-img", &["check", "bad.qcow2"]);
    assert_eq!(ours.status.code(), Some(2));
    assert_eq!(qemu.status.code(), Some(2));
    assert_eq!(text(&ours.stdout), text(&qemu.stdout));
    assert_eq!(code(&["check", "-r", "all", "bad.qcow2"]), Some(0));
    ok_in(d, "qemu-img", &["check", "bad.qcow2"]);

    // Raw images have no checks: qemu-img's exit code 63.
    ok_in(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    assert_eq!(code(&["check", "r.raw"]), Some(63));
    assert_eq!(
        run_in(d, "qemu-img", &["check", "r.raw"]).status.code(),
        Some(63)
    );
}

#[test]
fn convert_flattens_a_chain() {
    if !have_qemu("convert_flattens_a_chain") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    qemu_chain(d);
    snapvmm(d, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    snapvmm(d, &["convert", "-p", "-O", "raw", "top.qcow2", "flat.raw"]);
    snapvmm(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            "top.qcow2",
            "small.qcow2",
        ],
    );
    for (file, format) in [
        ("flat.qcow2", "qcow2"),
        ("flat.raw", "raw"),
        ("small.qcow2", "qcow2"),
    ] {
        let cmp = ok_in(
            d,
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", format, "top.qcow2", file],
        );
        assert!(cmp.contains("Images are identical."), "{file}: {cmp}");
        let info: serde_json::Value =
            serde_json::from_str(&ok_in(d, "qemu-img", &["info", "--output", "json", file]))
                .expect("qemu-img info JSON");
        assert!(
            info.get("backing-filename").is_none(),
            "{file} is standalone"
        );
        assert_eq!(info["virtual-size"], 4u64 << 20);
        if format == "qcow2" {
            ok_in(d, "qemu-img", &["check", file]);
        }
    }
    // Zero and unallocated ranges are not written: the qcow2 output is as compact as
    // qemu-img convert's.
    ok_in(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "top.qcow2", "qemu.qcow2"],
    );
    let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    assert_eq!(len("flat.qcow2"), len("qemu.qcow2"));
    assert_same(d, &["map", "--output", "json", "flat.qcow2"]);

    // Refuses to overwrite its own source.
    let out = snapvmm_raw(d, &["convert", "-O", "qcow2", "top.qcow2", "base.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    ok_in(d, "qemu-img", &["check", "base.qcow2"]);
}

#[test]
fn bench_writes_what_it_says() {
    if !have_qemu("bench_writes_what_it_says") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    snapvmm(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    // 300 requests over a 1 MiB image: offsets wrap after 256.
    let out = snapvmm(
        d,
        &[
            "bench",
            "-w",
            "-c",
            "300",
            "-d",
            "8",
            "--pattern",
            "0xab",
            "--flush-interval",
            "50",
            "b.qcow2",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 300 write requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 4096)"
    );
    assert_eq!(lines[1], "Sending flush every 50 requests");
    assert!(lines[2].starts_with("Run completed in ") && lines[2].ends_with(" seconds."));
    let read = ok_in(d, "qemu-io", &["-r", "-c", "read -P 0xab 0 1M", "b.qcow2"]);
    assert!(!read.contains("Pattern verification failed"), "{read}");
    ok_in(d, "qemu-img", &["check", "b.qcow2"]);
    // Reads with O_DIRECT and a spreading step.
    let out = snapvmm(
        d,
        &[
            "bench", "-t", "none", "-c", "100", "-S", "64k", "-o", "4k", "b.qcow2",
        ],
    );
    assert!(out.starts_with(
        "Sending 100 read requests, 4096 bytes each, 64 in parallel (starting at offset 4096, step size 65536)\n"
    ));
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("garbage"), b"not an image").unwrap();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "x.qcow2", "12Q"],
        &["create", "-f", "qcow2", "x.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
        &["create", "-f", "vmdk", "x.vmdk", "1M"],
        &["info", "missing.qcow2"],
        &["info", "-f", "qcow2", "garbage"],
        &["map", "-f", "qcow2", "garbage"],
        &["check", "missing.qcow2"],
        &["convert", "missing.qcow2", "out.raw"],
        &["io", "-c", "read 0 1M", "garbage"],
        &["io", "-c", "write -P 0x1ff 0 1", "garbage"],
        &["bench", "-d", "0", "garbage"],
        &["bogus"],
        &["check"],
    ];
    for args in cases {
        let out = snapvmm_raw(d, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let said_why = stderr.contains("snapvmm img: error: ") || !text(&out.stdout).is_empty();
        assert!(said_why, "{args:?} gave no reason");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The unknown-file error names the file.
    let out = snapvmm_raw(d, &["info", "missing.qcow2"]);
    assert!(text(&out.stderr).contains("missing.qcow2"));
}

#[test]
fn older_qemu_outputs_compare_without_newer_fields() {
    // What qemu-img 7.2 prints lacks `children` and `compressed`; the rest must match.
    let qemu = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}]"#;
    let ours = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680}]"#;
    let q: serde_json::Value = serde_json::from_str(qemu).unwrap();
    let mut o: serde_json::Value = serde_json::from_str(ours).unwrap();
    drop_newer_keys(&q, &mut o);
    assert_eq!(o, q);
    let human = "image: a\nfile format: raw\nChild node '/file':\n    filename: a\n    disk size: 4 KiB\n\nimage: b\n";
    assert_eq!(
        drop_child_nodes(human),
        "image: a\nfile format: raw\n\nimage: b"
    );
}
