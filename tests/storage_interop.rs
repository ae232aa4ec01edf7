//! Interoperability with QEMU in both directions.
//!
//! - Images QEMU makes (every cluster size, refcount width and compat level, raw and qcow2
//!   backing files, zlib and zstd compressed clusters, zero clusters, internal snapshots) read
//!   through snapvmm exactly as `qemu-img convert -O raw` reads them.
//! - Images snapvmm writes (on top of QEMU's images and of its own) pass `qemu-img check`
//!   with no error and no leak, and `qemu-img compare` finds them equal to a raw reference
//!   written with the same operations.
//! - Writes through snapvmm never damage an internal snapshot: `qemu-img snapshot -a` brings
//!   back the old data.

use std::path::Path;

use storage::{Allocation, ImageFormat};
use test_support::image::{open_ro, open_rw, read_all, snapvmm_create, write_raw};
use test_support::pattern::{assert_same, compressible, pattern};
use test_support::qemu::{
    assert_check_clean, assert_qemu_compare_equal, qemu_create, qemu_img, qemu_io, qemu_read_all,
};
use test_support::reference::{mixed_ops, Model, Op};
use test_support::require::have_qemu;

const MIB: u64 = 1 << 20;

/// Guest data with random, compressible and zero regions, `size` bytes.
fn source_data(size: u64, cluster_size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let chunk = (cluster_size * 3).max(64 << 10) as usize;
    for (i, piece) in data.chunks_mut(chunk).enumerate() {
        match (i as u64 + seed) % 4 {
            0 => piece.copy_from_slice(&pattern(seed * 100 + i as u64, piece.len())),
            1 => piece.copy_from_slice(&compressible(seed * 100 + i as u64, piece.len())),
            2 => {}
            _ => {
                // Half random, half zero: partly allocated clusters.
                let half = piece.len() / 2;
                piece[..half].copy_from_slice(&pattern(seed * 100 + i as u64, half));
            }
        }
    }
    data
}

/// `qemu-img convert` of `data` into a qcow2 image with `options` (and `-c` if `compress`).
fn qemu_image_from(
    dir: &Path,
    name: &str,
    data: &[u8],
    options: &str,
    compress: bool,
) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    write_raw(&raw, data);
    let image = dir.join(name);
    let mut args: Vec<String> = vec![
        "convert".into(),
        "-q".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "qcow2".into(),
    ];
    if compress {
        args.push("-c".into());
    }
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.into());
    }
    args.push(raw.display().to_string());
    args.push(image.display().to_string());
    qemu_img(&args);
    std::fs::remove_file(&raw).expect("remove source");
    image
}

/// qemu-io commands that write patterns across cluster and L2-table boundaries, zero
/// allocated and unallocated ranges and discard, on a disk of `size` bytes.
fn qemu_io_commands(size: u64, cluster_size: u64) -> Vec<String> {
    let cs = cluster_size;
    let l2_span = cs * (cs / 8);
    let mut cmds = vec![
        format!("write -P 0x11 0 {}", 3 * 512),
        format!("write -P 0x22 {} {}", cs - 512, 1024),
        format!("write -P 0x33 {} {}", size / 2 + 512, cs + 1536),
        format!("write -P 0x44 {} {}", size - cs, cs),
        // Zeroes over allocated data, on whole clusters and on parts.
        format!("write -z {} {}", size / 2 + cs, cs),
        format!("write -z {} {}", 512, 512),
        // Zeroes over unallocated space, and with unmapping.
        format!("write -z {} {}", size / 4, 2 * cs),
        format!("write -z -u {} {}", size - cs, cs),
        format!("discard {} {}", 0, cs),
    ];
    if l2_span + cs < size {
        cmds.push(format!("write -P 0x55 {} {}", l2_span - 1024, 2048));
    }
    cmds
}

/// The checks every writable image goes through: snapvmm writes `ops` to `image`; the raw
/// reference `model` gets the same; then snapvmm, `qemu-img convert`, `qemu-img compare`
/// and `qemu-img check` must all agree.
fn write_through_snapvmm_and_judge(image: &Path, model: &mut Model, ops: &[Op], what: &str) {
    let mut disk = open_rw(image);
    for op in ops {
        test_support::reference::apply(&mut disk, image, op);
        model.apply(op);
    }
    assert_same(
        &read_all(&*disk),
        &model.data,
        &format!("{what}: snapvmm read after writes"),
    );
    drop(disk);
    assert_check_clean(image);
    let reference = image.with_extension("reference.raw");
    write_raw(&reference, &model.data);
    assert_qemu_compare_equal(image, &reference);
    assert_same(
        &qemu_read_all(image),
        &model.data,
        &format!("{what}: qemu read after snapvmm writes"),
    );
    assert_same(
        &read_all(&*open_ro(image)),
        &model.data,
        &format!("{what}: snapvmm read after reopen"),
    );
    std::fs::remove_file(&reference).expect("remove reference");
}

/// One QEMU-made image without backing file: QEMU writes, snapvmm reads; snapvmm writes,
/// QEMU judges.
fn qemu_made_round_trip(options: &str, size: u64, cluster_size: u64, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = source_data(size, cluster_size, seed);
    let image = qemu_image_from(dir.path(), "image.qcow2", &data, options, false);
    let cmds = qemu_io_commands(size, cluster_size);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&image, "qcow2", &cmds);
    let expected = qemu_read_all(&image);
    let what = format!("qemu image -o {options}");
    assert_same(
        &read_all(&*open_ro(&image)),
        &expected,
        &format!("{what}: snapvmm read"),
    );
    let mut model = Model::new(vec![0; size as usize], cluster_size, true);
    model.data = expected;
    let ops = mixed_ops(size, cluster_size, seed, 60);
    write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
}

#[test]
fn qemu_images_of_every_cluster_size_and_compat() {
    if !have_qemu("qemu_images_of_every_cluster_size_and_compat") {
        return;
    }
    for (i, &cs) in [512u64, 4096, 65536, 2 * MIB].iter().enumerate() {
        for compat in ["0.10", "1.1"] {
            let size = match cs {
                512 => 4 * MIB,
                c if c == 2 * MIB => 16 * MIB,
                _ => 8 * MIB,
            };
            let options = format!("cluster_size={cs},compat={compat}");
            qemu_made_round_trip(&options, size, cs, 10 + i as u64);
        }
    }
}

#[test]
fn qemu_images_of_every_refcount_width() {
    if !have_qemu("qemu_images_of_every_refcount_width") {
        return;
    }
    for (i, bits) in [1u32, 2, 4, 8, 16, 32, 64].into_iter().enumerate() {
        let options = format!("cluster_size=4096,compat=1.1,refcount_bits={bits}");
        qemu_made_round_trip(&options, 8 * MIB, 4096, 20 + i as u64);
    }
}

#[test]
fn qemu_images_with_odd_sizes_and_options() {
    if !have_qemu("qemu_images_with_odd_sizes_and_options") {
        return;
    }
    // A disk that ends in the middle of a cluster, one with lazy refcounts (clean), and
    // preallocated metadata (v3: every cluster allocated and zero-flagged; v2: allocated).
    qemu_made_round_trip("cluster_size=65536", 5 * MIB + 3 * 512, 65536, 30);
    qemu_made_round_trip("cluster_size=4096,lazy_refcounts=on", 3 * MIB, 4096, 31);
    qemu_made_round_trip(
        "cluster_size=65536,preallocation=metadata",
        4 * MIB,
        65536,
        32,
    );
    qemu_made_round_trip(
        "cluster_size=4096,compat=0.10,preallocation=metadata",
        2 * MIB,
        4096,
        33,
    );
    for (options, cs) in [
        ("cluster_size=4096,preallocation=metadata", 4096u64),
        ("cluster_size=65536,preallocation=falloc", 65536),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("prealloc.qcow2");
        let size = 3 * MIB;
        qemu_create(&image, options, Some(size));
        let what = format!("qemu-img create -o {options}");
        assert_same(&read_all(&*open_ro(&image)), &vec![0; size as usize], &what);
        let mut model = Model::new(vec![0; size as usize], cs, true);
        let ops = mixed_ops(size, cs, 34, 40);
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
    }
    // Grown by qemu-img resize: a larger L1 table, moved by QEMU.
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("resized.qcow2");
    qemu_create(&image, "cluster_size=4096", Some(MIB));
    qemu_io(&image, "qcow2", &["write -P 0x45 0 1M"]);
    qemu_img(&[
        "resize".as_ref(),
        "-q".as_ref(),
        image.as_os_str(),
        "9M".as_ref(),
    ]);
    qemu_io(&image, "qcow2", &["write -P 0x46 8M 512k"]);
    let expected = qemu_read_all(&image);
    assert_same(
        &read_all(&*open_ro(&image)),
        &expected,
        "resized image: snapvmm read",
    );
    let mut model = Model::new(vec![0; 9 * MIB as usize], 4096, true);
    model.data = expected;
    let ops = mixed_ops(9 * MIB, 4096, 35, 40);
    write_through_snapvmm_and_judge(&image, &mut model, &ops, "resized image");
}

/// A backing file (raw or qcow2) and an overlay QEMU made and wrote to.
fn backed_round_trip(
    base_format: &str,
    cluster_size: u64,
    compat: &str,
    overlay_size: u64,
    seed: u64,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_size = 4 * MIB;
    let base_data = source_data(base_size, cluster_size, seed);
    let base = match base_format {
        "raw" => {
            let p = dir.path().join("base.raw");
            write_raw(&p, &base_data);
            p
        }
        _ => qemu_image_from(
            dir.path(),
            "base.qcow2",
            &base_data,
            &format!("cluster_size={},compat={compat}", cluster_size * 2),
            false,
        ),
    };
    let base_before = std::fs::read(&base).expect("read base");
    let overlay = dir.path().join("overlay.qcow2");
    let base_name = base
        .file_name()
        .expect("name")
        .to_str()
        .expect("utf-8")
        .to_string();
    qemu_create(
        &overlay,
        &format!("cluster_size={cluster_size},compat={compat},backing_file={base_name},backing_fmt={base_format}"),
        Some(overlay_size),
    );
    let cmds = qemu_io_commands(overlay_size, cluster_size);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&overlay, "qcow2", &cmds);
    let expected = qemu_read_all(&overlay);
    let what = format!("{base_format} base, overlay cluster {cluster_size} compat {compat}");
    let disk = open_ro(&overlay);
    assert_eq!(
        disk.backing().map(|b| b.info().format),
        Some(Some(base_format.parse::<ImageFormat>().expect("format")))
    );
    assert_same(
        &read_all(&*disk),
        &expected,
        &format!("{what}: snapvmm read"),
    );
    drop(disk);

    let mut below = base_data.clone();
    below.resize(overlay_size as usize, 0);
    let mut model = Model::new(below, cluster_size, compat == "1.1");
    model.data = expected;
    // Partial writes on clusters that are unallocated over the backing file copy the rest of
    // the cluster from it.
    let mut ops = vec![
        Op::Write {
            offset: cluster_size * 7 + 512,
            len: 1024,
            seed: 1,
        },
        Op::Write {
            offset: cluster_size * 9 + 3,
            len: 17,
            seed: 2,
        },
        Op::Discard {
            offset: cluster_size * 7,
            len: cluster_size,
        },
        Op::Zeroes {
            offset: cluster_size * 11,
            len: cluster_size * 2,
        },
        Op::Zeroes {
            offset: cluster_size * 14 + 512,
            len: 512,
        },
    ];
    ops.extend(mixed_ops(overlay_size, cluster_size, seed, 50));
    write_through_snapvmm_and_judge(&overlay, &mut model, &ops, &what);
    assert_eq!(
        std::fs::read(&base).expect("read base"),
        base_before,
        "{what}: base file changed"
    );
}

#[test]
fn qemu_overlays_over_raw_and_qcow2_backing_files() {
    if !have_qemu("qemu_overlays_over_raw_and_qcow2_backing_files") {
        return;
    }
    let mut seed = 40;
    for base_format in ["raw", "qcow2"] {
        for compat in ["0.10", "1.1"] {
            for cs in [4096u64, 65536] {
                backed_round_trip(base_format, cs, compat, 4 * MIB, seed);
                seed += 1;
            }
        }
    }
    // An overlay larger than its backing file: the tail reads zeroes.
    backed_round_trip("raw", 4096, "1.1", 6 * MIB, seed);
    backed_round_trip("qcow2", 65536, "0.10", 6 * MIB + 512, seed + 1);
}

#[test]
fn compressed_images_zlib_and_zstd() {
    if !have_qemu("compressed_images_zlib_and_zstd") {
        return;
    }
    let cases = [
        ("cluster_size=65536", 65536u64),
        ("cluster_size=4096", 4096),
        ("cluster_size=65536,compression_type=zstd", 65536),
        ("cluster_size=4096,compression_type=zstd", 4096),
        ("cluster_size=512,compression_type=zstd", 512),
        ("cluster_size=2097152", 2 * MIB),
        ("cluster_size=65536,compat=0.10", 65536),
    ];
    for (i, (options, cs)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = if cs == 2 * MIB { 16 * MIB } else { 4 * MIB };
        let data = source_data(size, cs, 50 + i as u64);
        let image = qemu_image_from(dir.path(), "compressed.qcow2", &data, options, true);
        let what = format!("compressed -o {options}");
        let disk = open_ro(&image);
        assert_same(&read_all(&*disk), &data, &format!("{what}: snapvmm read"));
        // The compressible parts must really be stored compressed, and reported so.
        let mut compressed = 0u64;
        let mut at = 0;
        while at < size {
            let status = disk.block_status(at, size - at).expect("block_status");
            if status.compressed {
                compressed += status.len;
                assert_eq!(status.allocation, Allocation::Data, "{what}: {status:?}");
            }
            at += status.len;
        }
        assert!(compressed > 0, "{what}: no cluster reported compressed");
        drop(disk);
        // Partial writes over compressed clusters decompress and copy; whole-cluster
        // overwrites, zeroes and discards drop the compressed extent's references.
        let mut model = Model::new(vec![0; size as usize], cs, true);
        model.data = data;
        let mut ops = Vec::new();
        for k in 0..8u64 {
            let c = k * 5 % (size / cs);
            ops.push(match k % 4 {
                0 => Op::Write {
                    offset: c * cs + 512,
                    len: 512,
                    seed: k,
                },
                1 => Op::Write {
                    offset: c * cs,
                    len: cs,
                    seed: k,
                },
                2 => Op::Zeroes {
                    offset: c * cs,
                    len: cs,
                },
                _ => Op::Discard {
                    offset: c * cs,
                    len: cs,
                },
            });
        }
        ops.extend(mixed_ops(size, cs, 60 + i as u64, 40));
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
    }
}

#[test]
fn qemu_zero_clusters() {
    if !have_qemu("qemu_zero_clusters") {
        return;
    }
    for (compat, backed) in [
        ("1.1", false),
        ("1.1", true),
        ("0.10", false),
        ("0.10", true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = 65536u64;
        let size = 2 * MIB;
        let base_data = pattern(70, size as usize);
        let image = dir.path().join("zeroes.qcow2");
        let mut options = format!("cluster_size={cs},compat={compat}");
        if backed {
            write_raw(&dir.path().join("base.raw"), &base_data);
            options.push_str(",backing_file=base.raw,backing_fmt=raw");
        }
        qemu_create(&image, &options, Some(size));
        qemu_io(
            &image,
            "qcow2",
            &[
                "write -P 0x61 0 1M",
                // Preallocated zero clusters (allocation kept) and unmapped ones.
                "write -z 0 128k",
                "write -z -u 128k 128k",
                // Zeroes over unallocated clusters (over the backing file if any).
                "write -z 1M 256k",
                // A partial-cluster zero write.
                "write -z 1536k 1k",
            ],
        );
        let expected = qemu_read_all(&image);
        let what = format!("zero clusters compat {compat} backed {backed}");
        let disk = open_ro(&image);
        assert_same(
            &read_all(&*disk),
            &expected,
            &format!("{what}: snapvmm read"),
        );
        if compat == "1.1" {
            let status = disk.block_status(0, cs).expect("block_status");
            assert_eq!(status.allocation, Allocation::Zero, "{what}: {status:?}");
        }
        drop(disk);
        let mut below = if backed {
            base_data
        } else {
            vec![0; size as usize]
        };
        below.resize(size as usize, 0);
        let mut model = Model::new(below, cs, !backed || compat == "1.1");
        model.data = expected;
        // Writes into preallocated zero clusters (whole and partial) reuse or replace them.
        let ops = [
            Op::Write {
                offset: 512,
                len: 512,
                seed: 1,
            },
            Op::Write {
                offset: cs,
                len: cs,
                seed: 2,
            },
            Op::Write {
                offset: 2 * cs + 100,
                len: 100,
                seed: 3,
            },
            Op::Discard {
                offset: 1024 * 1024,
                len: cs,
            },
            Op::Zeroes {
                offset: 3 * cs,
                len: 3 * cs,
            },
            Op::Reopen,
            Op::Write {
                offset: 1024 * 1024 + cs + 7,
                len: 9,
                seed: 4,
            },
        ];
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
    }
}

/// snapvmm writes to an image holding internal snapshots; every snapshot must still hold
/// its data afterwards.
fn snapshot_round_trip(compat: &str, cs: u64, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * MIB;
    let data = source_data(size, cs, seed);
    let image = qemu_image_from(
        dir.path(),
        "snap.qcow2",
        &data,
        &format!("cluster_size={cs},compat={compat}"),
        false,
    );
    let image_arg = image.display().to_string();
    qemu_io(
        &image,
        "qcow2",
        &["write -P 0x71 0 64k", "write -z 1M 128k"],
    );
    qemu_img(&["snapshot", "-c", "first", &image_arg]);
    let first = qemu_read_all(&image);
    qemu_io(
        &image,
        "qcow2",
        &["write -P 0x72 32k 64k", "discard 2M 256k"],
    );
    qemu_img(&["snapshot", "-c", "second", &image_arg]);
    let second = qemu_read_all(&image);
    let what = format!("snapshots compat {compat} cluster {cs}");
    assert_eq!(open_ro(&image).info().snapshot_count, 2, "{what}");

    let mut model = Model::new(vec![0; size as usize], cs, true);
    model.data = second.clone();
    let mut ops = vec![
        // In place over clusters shared with both snapshots: must be copied, not overwritten.
        Op::Write {
            offset: 0,
            len: 512,
            seed: 1,
        },
        Op::Write {
            offset: cs,
            len: cs,
            seed: 2,
        },
        Op::Write {
            offset: 40 * 1024 + 5,
            len: 3000,
            seed: 3,
        },
        Op::Zeroes {
            offset: 4 * cs,
            len: 2 * cs,
        },
        Op::Discard {
            offset: 8 * cs,
            len: 2 * cs,
        },
        Op::Flush,
        Op::Write {
            offset: size - cs - 512,
            len: 1024,
            seed: 4,
        },
        Op::Reopen,
        Op::Write {
            offset: 0,
            len: 512,
            seed: 5,
        },
    ];
    ops.extend(mixed_ops(size, cs, seed, 40));
    write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
    let list = qemu_img(&["snapshot", "-l", &image_arg]);
    assert!(
        list.contains("first") && list.contains("second"),
        "{what}: snapshots lost:\n{list}"
    );

    // Each snapshot still reads its old data, through QEMU and through snapvmm.
    qemu_img(&["snapshot", "-a", "first", &image_arg]);
    assert_same(
        &qemu_read_all(&image),
        &first,
        &format!("{what}: snapshot 'first' via qemu"),
    );
    assert_same(
        &read_all(&*open_ro(&image)),
        &first,
        &format!("{what}: snapshot 'first' via snapvmm"),
    );
    assert_check_clean(&image);
    qemu_img(&["snapshot", "-a", "second", &image_arg]);
    assert_same(
        &qemu_read_all(&image),
        &second,
        &format!("{what}: snapshot 'second' via qemu"),
    );
    // Deleting snapshots walks and decrements every refcount snapvmm maintained.
    qemu_img(&["snapshot", "-d", "first", &image_arg]);
    assert_check_clean(&image);
    // Write again through snapvmm on the reverted image, then drop the last snapshot.
    model.data = second;
    let ops = mixed_ops(size, cs, seed + 1, 30);
    write_through_snapvmm_and_judge(&image, &mut model, &ops, &format!("{what} after revert"));
    qemu_img(&["snapshot", "-d", "second", &image_arg]);
    assert_check_clean(&image);
    assert_same(
        &qemu_read_all(&image),
        &model.data,
        &format!("{what}: after deleting all snapshots"),
    );
}

#[test]
fn writes_never_damage_internal_snapshots() {
    if !have_qemu("writes_never_damage_internal_snapshots") {
        return;
    }
    snapshot_round_trip("1.1", 65536, 80);
    snapshot_round_trip("1.1", 4096, 81);
    snapshot_round_trip("0.10", 65536, 82);
    snapshot_round_trip("1.1", 512, 83);
}

#[test]
fn refcount_table_growth() {
    if !have_qemu("refcount_table_growth") {
        return;
    }
    // 512-byte clusters: one refcount table cluster covers 64 refcount blocks, i.e. 8 MiB of
    // file at 16 bits and 2 MiB at 64 bits, so filling the disk moves the table (and the
    // header must keep naming the snapshot table).
    for (bits, snapshot) in [(16u32, false), (64, true), (1, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 12 * MIB;
        let image = dir.path().join("grow.qcow2");
        qemu_create(
            &image,
            &format!("cluster_size=512,refcount_bits={bits}"),
            Some(size),
        );
        let what = format!("refcount table growth, {bits}-bit refcounts, snapshot {snapshot}");
        let mut model = Model::new(vec![0; size as usize], 512, true);
        if snapshot {
            qemu_io(&image, "qcow2", &["write -P 0x7a 0 256k"]);
            qemu_img(&["snapshot", "-c", "before", &image.display().to_string()]);
            model.data[..256 << 10].fill(0x7a);
        }
        let disk = open_rw(&image);
        let chunk = 192 * 1024;
        for (i, at) in (0..size).step_by(chunk).enumerate() {
            let len = (chunk as u64).min(size - at);
            let data = pattern(90 + i as u64, len as usize);
            disk.write_at(&data, at).expect("write");
            model.write(&data, at);
        }
        drop(disk);
        let ops = mixed_ops(size, 512, 91, 20);
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
        if snapshot {
            let arg = image.display().to_string();
            qemu_img(&["snapshot", "-a", "before", &arg]);
            let mut old = vec![0u8; size as usize];
            old[..256 << 10].fill(0x7a);
            assert_same(&qemu_read_all(&image), &old, &format!("{what}: snapshot"));
            assert_check_clean(&image);
        }
    }
}

#[test]
fn snapvmm_created_images_pass_qemu_check() {
    if !have_qemu("snapvmm_created_images_pass_qemu_check") {
        return;
    }
    let mut configs: Vec<(u64, u32, u32)> = Vec::new();
    for cs in [512u64, 4096, 65536, 2 * MIB] {
        for version in [2u32, 3] {
            configs.push((cs, version, 16));
        }
    }
    for bits in [1u32, 2, 4, 8, 32, 64] {
        configs.push((4096, 3, bits));
    }
    for (i, (cs, version, bits)) in configs.into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = if cs == 512 { 4 * MIB } else { 8 * MIB + 4096 };
        let image = dir.path().join("made.qcow2");
        snapvmm_create(&image, Some(size), cs, version, bits, None);
        let what = format!("snapvmm image cluster {cs} v{version} refcount_bits {bits}");
        // The fresh image is clean and QEMU reads its options back.
        assert_check_clean(&image);
        let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
            "info".as_ref(),
            "--output=json".as_ref(),
            image.as_os_str(),
        ]))
        .expect("qemu-img info json");
        assert_eq!(info["cluster-size"], cs, "{what}: {info}");
        assert_eq!(info["virtual-size"], size, "{what}: {info}");
        let data = &info["format-specific"]["data"];
        assert_eq!(
            data["compat"],
            if version == 3 { "1.1" } else { "0.10" },
            "{what}: {info}"
        );
        assert_eq!(data["refcount-bits"], bits, "{what}: {info}");
        let mut model = Model::new(vec![0; size as usize], cs, true);
        let mut ops = mixed_ops(size, cs, 100 + i as u64, 50);
        ops.insert(20, Op::Reopen);
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
    }
}

#[test]
fn snapvmm_created_overlays_over_raw_and_qcow2() {
    if !have_qemu("snapvmm_created_overlays_over_raw_and_qcow2") {
        return;
    }
    for (i, (base_format, version, cs)) in [
        (ImageFormat::Raw, 3u32, 65536u64),
        (ImageFormat::Raw, 2, 4096),
        (ImageFormat::Qcow2, 3, 4096),
        (ImageFormat::Qcow2, 2, 65536),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * MIB;
        let base_data = source_data(size, cs, 110 + i as u64);
        let base_name = match base_format {
            ImageFormat::Raw => {
                write_raw(&dir.path().join("base.raw"), &base_data);
                "base.raw"
            }
            ImageFormat::Qcow2 => {
                qemu_image_from(
                    dir.path(),
                    "base.qcow2",
                    &base_data,
                    "cluster_size=65536",
                    false,
                );
                "base.qcow2"
            }
        };
        let overlay = dir.path().join("overlay.qcow2");
        // No size: taken from the backing file.
        snapvmm_create(
            &overlay,
            None,
            cs,
            version,
            16,
            Some((base_name, base_format)),
        );
        assert_check_clean(&overlay);
        let what = format!("snapvmm overlay v{version} cluster {cs} over {base_format}");
        assert_same(
            &qemu_read_all(&overlay),
            &base_data,
            &format!("{what}: qemu reads the backing file"),
        );
        let info = qemu_img(&["info".as_ref(), overlay.as_os_str()]);
        assert!(info.contains(base_name), "{what}: {info}");
        let mut model = Model::new(base_data, cs, version == 3);
        let ops = mixed_ops(size, cs, 120 + i as u64, 60);
        write_through_snapvmm_and_judge(&overlay, &mut model, &ops, &what);
    }
}

/// Runs qemu-io with `commands` ending in `sigraise 9`: QEMU dies with its lazy refcounts
/// unwritten and the dirty bit set.
fn qemu_io_then_die(image: &Path, commands: &[&str]) {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for c in commands.iter().chain(std::iter::once(&"sigraise 9")) {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(image.display().to_string());
    let out = test_support::qemu::run("qemu-io", &args);
    assert!(!out.status.success(), "qemu-io survived sigraise 9");
}

fn incompatible_features(image: &Path) -> u64 {
    let header = std::fs::read(image).expect("read image");
    u64::from_be_bytes(header[72..80].try_into().expect("8 bytes"))
}

/// An image left dirty by QEMU with lazy refcounts (refcounts stale, dirty bit set) reads
/// correctly, and opening it for writing rebuilds the refcounts from every L1 table (the
/// active one and each snapshot's) and clears the dirty bit.
#[test]
fn lazy_refcounts_dirty_image_is_rebuilt() {
    if !have_qemu("lazy_refcounts_dirty_image_is_rebuilt") {
        return;
    }
    for (cs, with_snapshot) in [(4096u64, false), (65536, true), (512, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * MIB;
        let image = dir.path().join("lazy.qcow2");
        let arg = image.display().to_string();
        qemu_create(
            &image,
            &format!("cluster_size={cs},lazy_refcounts=on"),
            Some(size),
        );
        qemu_io(
            &image,
            "qcow2",
            &["write -P 0x31 0 192k", "write -P 0x32 2M 64k"],
        );
        let before = qemu_read_all(&image);
        if with_snapshot {
            qemu_img(&["snapshot", "-c", "before", &arg]);
        }
        qemu_io_then_die(
            &image,
            &[
                "write -P 0x33 64k 64k",
                "write -P 0x34 1M 128k",
                "discard 2M 64k",
                "flush",
                "write -P 0x35 3M 4k",
            ],
        );
        let what = format!("dirty lazy-refcounts image, cluster {cs}, snapshot {with_snapshot}");
        assert_eq!(
            incompatible_features(&image) & 1,
            1,
            "{what}: QEMU left no dirty bit"
        );
        assert!(
            !test_support::qemu::qemu_check(&image).clean(),
            "{what}: QEMU's refcounts are not stale, nothing to rebuild"
        );
        let expected = qemu_read_all(&image);
        assert_same(
            &read_all(&*open_ro(&image)),
            &expected,
            &format!("{what}: snapvmm read-only"),
        );
        let mut model = Model::new(vec![0; size as usize], cs, true);
        model.data = expected;
        let ops = mixed_ops(size, cs, 140, 30);
        write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
        assert_eq!(
            incompatible_features(&image) & 1,
            0,
            "{what}: dirty bit still set"
        );
        if with_snapshot {
            qemu_img(&["snapshot", "-a", "before", &arg]);
            assert_same(
                &qemu_read_all(&image),
                &before,
                &format!("{what}: snapshot"),
            );
            assert_check_clean(&image);
        }
    }
}

/// An image with a persistent dirty bitmap, written by QEMU, then by snapvmm.
fn bitmap_image(dir: &Path) -> (std::path::PathBuf, Model) {
    let size = 4 * MIB;
    let image = dir.join("bitmap.qcow2");
    let arg = image.display().to_string();
    qemu_create(&image, "cluster_size=65536", Some(size));
    qemu_img(&["bitmap", "--add", &arg, "b0"]);
    qemu_io(&image, "qcow2", &["write -P 0x21 0 256k"]);
    let mut model = Model::new(vec![0; size as usize], 65536, true);
    model.data = qemu_read_all(&image);
    let mut disk = open_rw(&image);
    for op in mixed_ops(size, 65536, 150, 30) {
        test_support::reference::apply(&mut disk, &image, &op);
        model.apply(&op);
    }
    drop(disk);
    (image, model)
}

/// snapvmm does not maintain persistent bitmaps and clears their autoclear bit: QEMU must
/// still find the image free of corruption, with the data snapvmm wrote.
#[test]
fn images_with_persistent_bitmaps_stay_consistent() {
    if !have_qemu("images_with_persistent_bitmaps_stay_consistent") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, model) = bitmap_image(dir.path());
    test_support::qemu::assert_check_consistent(&image);
    assert_same(
        &qemu_read_all(&image),
        &model.data,
        "bitmap image: qemu read",
    );
    assert_same(
        &read_all(&*open_ro(&image)),
        &model.data,
        "bitmap image: snapvmm read",
    );
}

/// The same, without leaks: clearing the bitmaps autoclear bit makes QEMU ignore the
/// bitmaps extension ("a program lacking bitmap support modified this file"), so the
/// bitmap directory, table and data clusters (3 here) become leaked clusters. The engine
/// would need to drop the extension and free those clusters, or keep the bit and mark the
/// bitmaps in-use, to leave no leak.
#[test]
fn images_with_persistent_bitmaps_leave_no_leak() {
    if !have_qemu("images_with_persistent_bitmaps_leave_no_leak") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, _) = bitmap_image(dir.path());
    assert_check_clean(&image);
}

/// QEMU and snapvmm take turns writing the same image (snapvmm's allocations must be ones
/// QEMU builds on, and the other way round); after every turn both read the same data and
/// the image checks clean.
#[test]
fn qemu_and_snapvmm_take_turns() {
    if !have_qemu("qemu_and_snapvmm_take_turns") {
        return;
    }
    for (compat, cs) in [("1.1", 65536u64), ("0.10", 4096), ("1.1", 512)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * MIB;
        let image = dir.path().join("turns.qcow2");
        qemu_create(
            &image,
            &format!("cluster_size={cs},compat={compat}"),
            Some(size),
        );
        let mut model = Model::new(vec![0; size as usize], cs, true);
        for round in 0..4u64 {
            let at = round * MIB + cs / 2;
            qemu_io(
                &image,
                "qcow2",
                &[
                    &format!("write -P {} {at} {}", 0x10 + round, 3 * cs),
                    &format!("write -z {} {cs}", at + 4 * cs),
                    &format!("discard {} {}", (round * MIB + 8 * cs) % size, 2 * cs),
                ],
            );
            model.data = qemu_read_all(&image);
            let what = format!("turns compat {compat} cluster {cs} round {round}");
            let ops = mixed_ops(size, cs, 160 + round, 20);
            write_through_snapvmm_and_judge(&image, &mut model, &ops, &what);
        }
    }
}
