//! Crash trials: a child process writes through a live disk while it switches overlays,
//! streams or commits, and is killed with SIGKILL at a random moment. The chain it leaves
//! must open and hold every write acknowledged before the child's last completed flush.
//!
//! The child journals each write *before* issuing it ("W block gen") and each completed
//! flush ("F"), plus the file that holds the disk's top whenever that changes ("T path",
//! written before the change where a crash could otherwise lose it). Journal lines are
//! single `write(2)` calls, which survive SIGKILL. A block must then hold the generation of
//! its last write before the last "F", or of a later write; never anything else.

mod live_util;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use live_util::*;
use rand::{Rng, SeedableRng};
use snapshot::commit::{commit, CommitOptions};
use snapshot::live_snapshot::{external_snapshot, DiskOverlay};
use snapshot::stream::{stream, StreamOptions};
use snapshot::JobStatus;
use storage::LiveDisk;

const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / BLOCK;
const CHILD_ENV: &str = "SNAPVMM_LIVE_CRASH_CHILD";

struct Journal(std::fs::File);

impl Journal {
    fn line(&mut self, text: String) {
        self.0
            .write_all(format!("{text}\n").as_bytes())
            .expect("journal write");
    }
}

/// Chain depth accepted when reopening after a crash: the switch scenario adds a layer per
/// switch.
const DEEP_CHAIN: usize = 100_000;

/// The child's side: runs until killed.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // Only ever run as a child of the trials below.
    };
    let (scenario, dir) = spec.split_once(':').expect("scenario:dir");
    let dir = Path::new(dir);
    let mut journal = Journal(
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("journal"))
            .expect("journal"),
    );
    let top = dir.join("top.qcow2");
    let live = LiveDisk::new("vda", open(&top));
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let mut gen = 100;
    let mut job = match scenario {
        "stream" => Some(
            stream(
                &live,
                StreamOptions {
                    speed: 8 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "commit" => Some(
            commit(
                &live,
                CommitOptions {
                    speed: 16 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        _ => None,
    };
    let mut snapshots = 0;
    loop {
        for _ in 0..16 {
            let b = rng.random_range(0..BLOCKS);
            gen += 1;
            journal.line(format!("W {b} {gen}"));
            live.write_at(&block_data(0, b, gen), b * BLOCK).unwrap();
        }
        live.flush().unwrap();
        journal.line("F".into());
        match scenario {
            "switch" => {
                snapshots += 1;
                let overlay = dir.join(format!("snap{snapshots}.qcow2"));
                // Named before the switch: the overlay reads through to the old top, so it
                // is the right file to open whether or not the switch happened.
                journal.line(format!("T {}", overlay.display()));
                external_snapshot(&[DiskOverlay::new(&live, &overlay)]).unwrap();
            }
            "commit" => {
                if let Some(j) = job.as_ref().filter(|j| j.status() == JobStatus::Ready) {
                    // No write runs between the pivot and this line: either file is right.
                    let base = dir.join("base.qcow2");
                    j.complete().unwrap();
                    j.wait().unwrap();
                    journal.line(format!("T {}", base.display()));
                    job = None;
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Replays the journal: the top file, and for each block the generations it may hold.
fn replay(dir: &Path) -> (PathBuf, HashMap<u64, Vec<u64>>) {
    let text = std::fs::read_to_string(dir.join("journal")).unwrap();
    let mut top = dir.join("top.qcow2");
    let mut tops = vec![top.clone()];
    // Per block: every generation written, in order, and how many were before the last F.
    let mut writes: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut flushed: HashMap<u64, usize> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        match parts.next() {
            Some("W") => {
                let b: u64 = parts.next().unwrap().parse().unwrap();
                let g: u64 = parts.next().unwrap().parse().unwrap();
                writes.entry(b).or_default().push(g);
            }
            Some("F") => {
                for (b, gens) in &writes {
                    flushed.insert(*b, gens.len());
                }
            }
            Some("T") => {
                top = PathBuf::from(parts.collect::<Vec<_>>().join(" "));
                tops.push(top.clone());
            }
            _ => {} // A line cut short by the kill.
        }
    }
    // A switch killed while creating its overlay leaves a file that is not an image.
    while storage::open(
        &top,
        &storage::OpenOptions {
            read_only: true,
            max_chain_depth: DEEP_CHAIN,
            // Every top is qcow2: an overlay cut short before its header was written has no
            // magic and must not be probed as a (valid) raw image.
            format: Some(storage::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .is_err()
    {
        tops.pop();
        top = tops.last().expect("no openable top").clone();
    }
    let allowed = writes
        .into_iter()
        .map(|(b, gens)| {
            let n = flushed.get(&b).copied().unwrap_or(0);
            // The last flushed generation and anything later (not yet flushed).
            let from = n.saturating_sub(1);
            let mut ok: Vec<u64> = gens[from..].to_vec();
            if n == 0 {
                ok.push(1); // The base's initial data (or zeroes) until a flushed write.
                ok.push(0);
            }
            (b, ok)
        })
        .collect();
    (top, allowed)
}

fn trial(scenario: &str, kill_after: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let model = Model::default();
    qcow2(&base, SIZE, 64 << 10, None);
    qcow2(&top, SIZE, 64 << 10, Some(Path::new("base.qcow2")));
    // Every block starts as generation 1 in base (stream) or in top (commit).
    let seeded = if scenario == "stream" { &base } else { &top };
    fill(seeded, 0, BLOCKS, 0, 1, 1, &model);
    std::fs::write(dir.path().join("journal"), "").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{scenario}:{}", dir.path().display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(kill_after);
    if let Ok(Some(status)) = child.try_wait() {
        panic!("{scenario}: child exited early with {status}");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (top, allowed) = replay(dir.path());
    // A long-running child stacks one overlay per switch: open past the default depth limit
    // (falling back to an older top would read stale data and fail for the wrong reason).
    let dev = storage::open(
        &top,
        &storage::OpenOptions {
            max_chain_depth: DEEP_CHAIN,
            format: Some(storage::ImageFormat::Qcow2),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", top.display()));
    let mut buf = vec![0u8; BLOCK as usize];
    let mut checked = 0;
    for b in 0..BLOCKS {
        dev.read_at(&mut buf, b * BLOCK).unwrap();
        let got = generation_of(0, b, &buf)
            .unwrap_or_else(|| panic!("{scenario}: block {b} holds garbage"));
        match allowed.get(&b) {
            Some(ok) => {
                assert!(
                    ok.contains(&got),
                    "{scenario}: block {b} holds gen {got}, allowed {ok:?}"
                );
                checked += 1;
            }
            None => assert_eq!(got, 1, "{scenario}: untouched block {b}"),
        }
    }
    assert!(
        checked > 0,
        "{scenario}: the child wrote nothing before the kill"
    );
    let layers: Vec<PathBuf> = snapshot::chain::layers(&dev)
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    drop(dev);
    if have_qemu("live_crash") {
        for layer in &layers {
            assert_qemu_check_consistent(layer);
        }
    }
}

#[test]
fn sigkill_during_overlay_switches_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("switch", Duration::from_millis(rng.random_range(150..500)));
    }
}

#[test]
fn sigkill_during_stream_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("stream", Duration::from_millis(rng.random_range(150..700)));
    }
}

#[test]
fn sigkill_during_active_commit_loses_no_flushed_write() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        trial("commit", Duration::from_millis(rng.random_range(150..1200)));
    }
}
