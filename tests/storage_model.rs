//! Property test: random write / write-zeroes / discard / flush / reopen sequences on a
//! qcow2 overlay over a raw or qcow2 base (or none), checked against an in-memory model.
//!
//! After every operation the touched range reads back as the model says; after every reopen
//! and at the end of each sequence the whole disk does, through snapvmm and through
//! `qemu-img convert`; `qemu-img check` is clean; block status agrees with the contents; the
//! base file is never modified.
//!
//! `PROPTEST_CASES` overrides the number of cases (32 by default, to keep CI fast).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use storage::{Allocation, BlockDevice, ImageFormat};
use test_support::image::{open_rw, read_all, snapvmm_create, write_raw};
use test_support::pattern::{assert_same, pattern};
use test_support::qemu::{assert_check_clean, qemu_create, qemu_img, qemu_read_all};
use test_support::reference::{Model, Op};
use test_support::require::have_qemu;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    None,
    Raw,
    Qcow2 { cluster_size: u64, version: u32 },
}

#[derive(Debug, Clone)]
struct Chain {
    base: Base,
    /// Virtual size of the base (may be smaller than the overlay's).
    base_size: u64,
    /// The overlay.
    size: u64,
    cluster_size: u64,
    version: u32,
    /// Who creates the overlay: snapvmm or qemu-img.
    created_by_qemu: bool,
    /// A small L2 cache forces evictions and writebacks in the middle of a sequence.
    small_cache: bool,
}

/// An operation in units independent of the chain's geometry; mapped by `concrete`.
#[derive(Debug, Clone)]
enum AbstractOp {
    Write { at: Where, seed: u64 },
    Zeroes { at: Where },
    Discard { at: Where },
    Flush,
    Reopen,
}

#[derive(Debug, Clone)]
struct Where {
    /// Which cluster (modulo the disk's clusters).
    cluster: u64,
    /// Where in the cluster: 0 start, 1 last sector, 2 random sector, 3 random byte.
    anchor: u8,
    position: u64,
    /// Length class: 0 one sector, 1 sub-cluster bytes, 2 one cluster, 3 several clusters.
    length_class: u8,
    length: u64,
}

fn where_strategy() -> impl Strategy<Value = Where> {
    (any::<u64>(), 0u8..4, any::<u64>(), 0u8..4, any::<u64>()).prop_map(
        |(cluster, anchor, position, length_class, length)| Where {
            cluster,
            anchor,
            position,
            length_class,
            length,
        },
    )
}

fn op_strategy() -> impl Strategy<Value = AbstractOp> {
    prop_oneof![
        8 => (where_strategy(), any::<u64>()).prop_map(|(at, seed)| AbstractOp::Write { at, seed }),
        3 => where_strategy().prop_map(|at| AbstractOp::Zeroes { at }),
        3 => where_strategy().prop_map(|at| AbstractOp::Discard { at }),
        1 => Just(AbstractOp::Flush),
        1 => Just(AbstractOp::Reopen),
    ]
}

fn chain_strategy() -> impl Strategy<Value = Chain> {
    let base = prop_oneof![
        Just(Base::None),
        Just(Base::Raw),
        (prop_oneof![Just(4 * KIB), Just(64 * KIB)], 2u32..=3).prop_map(
            |(cluster_size, version)| Base::Qcow2 {
                cluster_size,
                version
            }
        ),
    ];
    (
        base,
        prop_oneof![Just(512u64), Just(4 * KIB), Just(64 * KIB)],
        2u32..=3,
        prop_oneof![Just(4 * MIB), Just(4 * MIB + 1536), Just(8 * MIB)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(base, cluster_size, version, size, smaller_base, created_by_qemu, small_cache)| {
                Chain {
                    base,
                    base_size: if smaller_base && base != Base::None {
                        size / 2 + 512
                    } else {
                        size
                    },
                    size,
                    cluster_size,
                    version,
                    created_by_qemu,
                    small_cache,
                }
            },
        )
}

impl Where {
    fn range(&self, size: u64, cs: u64) -> (u64, u64) {
        let clusters = size.div_ceil(cs);
        let start = (self.cluster % clusters) * cs;
        let in_cluster = match self.anchor {
            0 => 0,
            1 => cs - 512,
            2 => self.position % (cs / 512) * 512,
            _ => self.position % cs,
        };
        let offset = (start + in_cluster).min(size - 1);
        let len = match self.length_class {
            0 => 512,
            1 => 1 + self.length % cs,
            2 => cs,
            _ => cs + self.length % (4 * cs).min(512 * KIB),
        };
        (offset, len.min(size - offset).max(1))
    }
}

fn concrete(op: &AbstractOp, chain: &Chain) -> Op {
    let (size, cs) = (chain.size, chain.cluster_size);
    match op {
        AbstractOp::Write { at, seed } => {
            let (offset, len) = at.range(size, cs);
            Op::Write {
                offset,
                len,
                seed: *seed,
            }
        }
        AbstractOp::Zeroes { at } => {
            let (offset, len) = at.range(size, cs);
            Op::Zeroes { offset, len }
        }
        AbstractOp::Discard { at } => {
            let (offset, len) = at.range(size, cs);
            Op::Discard { offset, len }
        }
        AbstractOp::Flush => Op::Flush,
        AbstractOp::Reopen => Op::Reopen,
    }
}

/// Builds the chain in `dir`; returns the overlay's path, the base's path and the base's
/// contents padded to the overlay's size.
fn build_chain(dir: &Path, chain: &Chain, seed: u64) -> (PathBuf, Option<PathBuf>, Vec<u8>) {
    let mut below = vec![0u8; chain.size as usize];
    let base_data = {
        // Half data, half holes, so unallocated base clusters are exercised too.
        let mut d = pattern(seed, chain.base_size as usize);
        for (i, piece) in d.chunks_mut(192 * 1024).enumerate() {
            if i % 2 == 1 {
                piece.fill(0);
            }
        }
        d
    };
    let base = match chain.base {
        Base::None => None,
        Base::Raw => {
            let p = dir.join("base.raw");
            write_raw(&p, &base_data);
            Some((p, ImageFormat::Raw))
        }
        Base::Qcow2 {
            cluster_size,
            version,
        } => {
            let raw = dir.join("base.src");
            write_raw(&raw, &base_data);
            let p = dir.join("base.qcow2");
            let compat = if version == 3 { "1.1" } else { "0.10" };
            qemu_img(&[
                "convert".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                "-o".as_ref(),
                format!("cluster_size={cluster_size},compat={compat}").as_ref(),
                raw.as_os_str(),
                p.as_os_str(),
            ]);
            std::fs::remove_file(raw).expect("remove");
            Some((p, ImageFormat::Qcow2))
        }
    };
    if base.is_some() {
        below[..chain.base_size as usize].copy_from_slice(&base_data);
    }
    let overlay = dir.join("overlay.qcow2");
    let backing = base.as_ref().map(|(p, f)| {
        (
            p.file_name()
                .expect("name")
                .to_str()
                .expect("utf-8")
                .to_string(),
            *f,
        )
    });
    if chain.created_by_qemu {
        let compat = if chain.version == 3 { "1.1" } else { "0.10" };
        let mut options = format!("cluster_size={},compat={compat}", chain.cluster_size);
        if let Some((name, format)) = &backing {
            options.push_str(&format!(",backing_file={name},backing_fmt={format}"));
        }
        qemu_create(&overlay, &options, Some(chain.size));
    } else {
        snapvmm_create(
            &overlay,
            Some(chain.size),
            chain.cluster_size,
            chain.version,
            16,
            backing.as_ref().map(|(n, f)| (n.as_str(), *f)),
        );
    }
    (overlay, base.map(|(p, _)| p), below)
}

fn open_chain(path: &Path, chain: &Chain) -> Arc<dyn BlockDevice> {
    if !chain.small_cache {
        return open_rw(path);
    }
    let options = storage::OpenOptions {
        l2_cache_bytes: Some(16 * 1024),
        refcount_cache_bytes: Some(16 * 1024),
        ..storage::OpenOptions::default()
    };
    storage::open(path, &options).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Walks block status over the disk and checks it against the contents.
fn check_block_status(disk: &dyn BlockDevice, model: &Model, has_backing: bool) {
    let size = disk.size();
    let mut at = 0;
    while at < size {
        let status = disk.block_status(at, size - at).expect("block_status");
        assert!(
            status.len >= 1 && status.len <= size - at,
            "{status:?} at {at:#x}"
        );
        let range = at as usize..(at + status.len) as usize;
        match status.allocation {
            Allocation::Zero | Allocation::Unallocated => assert!(
                model.data[range].iter().all(|&b| b == 0),
                "block_status says {status:?} at {at:#x} but the data is not zero"
            ),
            Allocation::Data => {
                if status.depth > 0 {
                    assert!(has_backing, "{status:?} at {at:#x} without a backing file");
                    assert_same(
                        &model.data[range.clone()],
                        &model.below[range],
                        &format!(
                            "block_status {status:?} at {at:#x} says the backing file holds it"
                        ),
                    );
                }
            }
        }
        at += status.len;
    }
}

fn run_case(chain: &Chain, ops: &[AbstractOp], seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (overlay, base, below) = build_chain(dir.path(), chain, seed);
    let base_before = base.as_ref().map(|p| std::fs::read(p).expect("read base"));
    let has_backing = base.is_some();
    let mut model = Model::new(
        below,
        chain.cluster_size,
        !has_backing || chain.version >= 3,
    );
    let mut disk = open_chain(&overlay, chain);
    for abstract_op in ops {
        let op = concrete(abstract_op, chain);
        model.apply(&op);
        match &op {
            Op::Reopen => {
                drop(std::mem::replace(
                    &mut disk,
                    Arc::new(test_support::reference::NullDevice),
                ));
                disk = open_chain(&overlay, chain);
                assert_same(&read_all(&*disk), &model.data, &format!("after {op:?}"));
            }
            _ => test_support::reference::apply(&mut disk, &overlay, &op),
        }
        if let Op::Write { offset, len, .. }
        | Op::Zeroes { offset, len }
        | Op::Discard { offset, len } = op
        {
            // Read a little around the range too.
            let start = offset.saturating_sub(700);
            let end = (offset + len + 700).min(chain.size);
            let mut buf = vec![0u8; (end - start) as usize];
            disk.read_at(&mut buf, start).expect("read back");
            assert_same(
                &buf,
                &model.data[start as usize..end as usize],
                &format!("read back after {op:?}"),
            );
        }
    }
    assert_same(&read_all(&*disk), &model.data, "snapvmm read at the end");
    check_block_status(&*disk, &model, has_backing);
    drop(disk);
    assert_check_clean(&overlay);
    assert_same(
        &qemu_read_all(&overlay),
        &model.data,
        "qemu read at the end",
    );
    if let (Some(base), Some(before)) = (base, base_before) {
        assert!(
            std::fs::read(&base).expect("read base") == before,
            "the base file was modified"
        );
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn chain_matches_model(
        chain in chain_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..48),
        seed in any::<u64>(),
    ) {
        if !have_qemu("chain_matches_model") {
            return Ok(());
        }
        run_case(&chain, &ops, seed);
    }
}

/// Fixed sequences for corner cases the random search may take long to hit.
#[test]
fn corner_cases() {
    if !have_qemu("corner_cases") {
        return;
    }
    let at = |cluster: u64, anchor: u8, length_class: u8, length: u64| Where {
        cluster,
        anchor,
        position: 0,
        length_class,
        length,
    };
    let chains = [
        Chain {
            base: Base::Raw,
            base_size: 2 * MIB + 512,
            size: 4 * MIB + 1536,
            cluster_size: 64 * KIB,
            version: 2,
            created_by_qemu: false,
            small_cache: true,
        },
        Chain {
            base: Base::Qcow2 {
                cluster_size: 4 * KIB,
                version: 3,
            },
            base_size: 4 * MIB,
            size: 4 * MIB,
            cluster_size: 512,
            version: 3,
            created_by_qemu: true,
            small_cache: false,
        },
    ];
    for chain in &chains {
        let last = chain.size.div_ceil(chain.cluster_size) - 1;
        let ops = vec![
            // The partial last cluster of the disk: whole-cluster unmapping ends at the disk end.
            AbstractOp::Write {
                at: at(last, 0, 2, 0),
                seed: 1,
            },
            AbstractOp::Discard {
                at: at(last, 0, 2, 0),
            },
            AbstractOp::Write {
                at: at(last, 3, 1, 100),
                seed: 2,
            },
            AbstractOp::Zeroes {
                at: at(last, 0, 2, 0),
            },
            // The cluster where the smaller base ends.
            AbstractOp::Write {
                at: at(chain.base_size / chain.cluster_size, 3, 1, 77),
                seed: 3,
            },
            AbstractOp::Discard {
                at: at(chain.base_size / chain.cluster_size, 0, 3, 0),
            },
            AbstractOp::Flush,
            AbstractOp::Zeroes {
                at: at(3, 1, 3, 5000),
            },
            AbstractOp::Reopen,
            AbstractOp::Write {
                at: at(3, 2, 3, 9000),
                seed: 4,
            },
            AbstractOp::Discard {
                at: at(2, 2, 3, 90000),
            },
            AbstractOp::Reopen,
        ];
        run_case(chain, &ops, 7);
    }
}
