//! Stream and commit jobs on live disks with writer threads running, and the job verbs:
//! pause, resume, set-speed, cancel, complete.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use snapshot::chain::BackingPath;
use snapshot::commit::{commit, CommitOptions};
use snapshot::stream::{stream, StreamOptions};
use snapshot::{Error, JobOutcome, JobStatus};
use storage::{ImageFormat, LiveDisk};
use test_support::image::{open_rw, qcow2, snapvmm_create};
use test_support::model::{fill, verify, Model, Writers};
use test_support::pattern::BLOCK;
use test_support::qemu::{assert_check_clean, assert_qemu_chain};
use test_support::require::have_qemu;

const SIZE: u64 = 16 << 20;
const BLOCKS: u64 = SIZE / BLOCK;
const WAIT: Duration = Duration::from_secs(60);

/// base (every 3rd block) <- mid (every 5th, 16 KiB clusters) <- top, all in `dir`.
fn three_layers(dir: &Path, model: &Model) -> [std::path::PathBuf; 3] {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qcow2(&base, SIZE, None);
    fill(&base, 0, BLOCKS, 0, 3, 1, model);
    snapvmm_create(
        &mid,
        Some(SIZE),
        16 << 10,
        3,
        16,
        Some(("base.qcow2", ImageFormat::Qcow2)),
    );
    fill(&mid, 0, BLOCKS, 1, 5, 2, model);
    qcow2(&top, SIZE, Some(Path::new("mid.qcow2")));
    [base, mid, top]
}

fn check_files(test: &str, chain: &[&Path]) {
    if have_qemu(test) {
        assert_qemu_chain(chain[0], chain);
        for layer in chain {
            assert_check_clean(layer);
        }
    }
}

fn verify_live(live: &LiveDisk, model: &Model, what: &str) {
    verify(
        0,
        BLOCKS,
        model,
        |buf, at| live.read_at(buf, at).unwrap(),
        what,
    );
}

fn verify_file(top: &Path, model: &Model, what: &str) {
    let dev = open_rw(top);
    verify(
        0,
        BLOCKS,
        model,
        |buf, at| dev.read_at(buf, at).unwrap(),
        what,
    );
}

#[test]
fn stream_with_base_then_without_under_writers() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::default());
    let [base, mid, top] = three_layers(dir.path(), &model);
    let live = LiveDisk::new("vda", open_rw(&top));
    let writers = Writers::start(&live, 0, BLOCKS, &model, 2, Duration::ZERO);

    // Stream mid into top, keep base, with guest reads copying up too.
    let job = stream(
        &live,
        StreamOptions {
            base: Some(base.clone()),
            backing_path: BackingPath::Relative,
            copy_on_read: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    let progress = job.progress();
    assert_eq!(progress.current, progress.total);
    assert_eq!(live.top().backing().unwrap().path(), base);
    let header = live.top().as_qcow2().unwrap().header();
    assert_eq!(header.backing_file.as_deref(), Some("base.qcow2"));
    verify_live(&live, &model, "after stream with base");

    // Then everything: the top becomes standalone.
    let job = stream(&live, StreamOptions::default()).unwrap();
    job.wait().unwrap();
    assert!(live.top().backing().is_none());
    writers.stop();
    verify_live(&live, &model, "after full stream");
    drop(live);
    verify_file(&top, &model, "reopened standalone top");
    check_files("stream", &[&top]);
    check_files("stream", &[&mid, &base]);
}

#[test]
fn intermediate_commit_drops_the_middle_layer_under_writers() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::default());
    let [base, mid, top] = three_layers(dir.path(), &model);
    let live = LiveDisk::new("vda", open_rw(&top));
    let writers = Writers::start(&live, 0, BLOCKS, &model, 2, Duration::ZERO);
    let job = commit(
        &live,
        CommitOptions {
            top: Some(mid.clone()),
            base: Some(base.clone()),
            backing_path: BackingPath::Relative,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    verify_live(&live, &model, "after intermediate commit");
    assert_eq!(live.top().backing().unwrap().path(), base);
    writers.stop();
    verify_live(&live, &model, "after intermediate commit, writers stopped");
    drop(live);
    verify_file(&top, &model, "reopened after intermediate commit");
    check_files("intermediate_commit", &[&top, &base]);
}

#[test]
fn active_commit_converges_under_writes_at_half_its_speed_and_pivots() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::default());
    let [base, _mid, top] = three_layers(dir.path(), &model);
    let live = LiveDisk::new("vda", open_rw(&top));
    // Give the top plenty to commit first.
    fill(&top, 0, BLOCKS, 2, 2, 3, &model);
    let live = {
        drop(live);
        LiveDisk::new("vda", open_rw(&top))
    };
    // The job copies at 8 MiB/s; one writer at ~1 ms per 4 KiB is at most 4 MiB/s.
    let writers = Writers::start(&live, 0, BLOCKS, &model, 1, Duration::from_millis(1));
    let job = commit(
        &live,
        CommitOptions {
            base: Some(base.clone()),
            speed: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        matches!(job.complete(), Err(Error::JobState { .. })),
        "complete before ready"
    );
    assert!(matches!(
        stream(&live, StreamOptions::default()),
        Err(Error::Busy(_))
    ));
    assert!(
        job.wait_for(WAIT, |s| s == JobStatus::Ready),
        "never ready: {:?}",
        job.info()
    );
    // Guest writes keep being mirrored while ready.
    std::thread::sleep(Duration::from_millis(50));
    job.complete().unwrap();
    assert_eq!(job.wait().unwrap(), JobOutcome::Completed);
    assert_eq!(live.top().path(), base, "pivoted onto base");
    assert!(!live.top().read_only());
    let written = writers.stop();
    assert!(written > 20, "writers stalled: {written}");
    verify_live(&live, &model, "after pivot");
    drop(live);
    verify_file(&base, &model, "reopened base after pivot");
    check_files("active_commit", &[&base]);
}

#[test]
fn jobs_pause_throttle_resume_and_cancel_leaving_valid_chains() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::default());
    let [base, mid, top] = three_layers(dir.path(), &model);
    let live = LiveDisk::new("vda", open_rw(&top));
    let writers = Writers::start(&live, 0, BLOCKS, &model, 1, Duration::from_micros(200));

    // 2 MiB/s over a 16 MiB disk with data in every 3rd and 5th block: seconds of work.
    let job = stream(
        &live,
        StreamOptions {
            speed: 2 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(job.wait_for(WAIT, |s| s == JobStatus::Running));
    assert!(matches!(job.complete(), Err(Error::JobState { .. })));
    job.pause().unwrap();
    assert!(job.wait_for(WAIT, |s| s == JobStatus::Paused));
    let paused_at = job.progress();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(job.progress(), paused_at, "a paused job made progress");
    job.resume().unwrap();
    assert!(job.wait_for(WAIT, |s| s == JobStatus::Running));
    std::thread::sleep(Duration::from_millis(100));
    let throttled = job.progress();
    assert!(
        throttled.current < throttled.total,
        "finished despite the speed limit"
    );
    job.cancel();
    assert!(matches!(job.wait(), Err(Error::Cancelled { .. })));
    assert_eq!(job.outcome(), Some(JobOutcome::Cancelled));
    assert_eq!(job.status(), JobStatus::Concluded);
    // Cancelled: same chain, same contents, and the disk is free again.
    assert_eq!(live.top().backing().unwrap().path(), mid);
    verify_live(&live, &model, "after cancelled stream");

    // An unthrottled stream finishes once its speed is lifted.
    let job = stream(
        &live,
        StreamOptions {
            speed: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    job.set_speed(0);
    assert_eq!(job.info().speed, 0);
    job.wait().unwrap();
    assert!(live.top().backing().is_none());

    // Active commit cancelled while ready stays on its top.
    writers.stop();
    let snap = dir.path().join("snap.qcow2");
    snapshot::live_snapshot::external_snapshot(&[snapshot::live_snapshot::DiskOverlay::new(
        &live, &snap,
    )])
    .unwrap();
    let writers = Writers::start(&live, 0, BLOCKS, &model, 1, Duration::from_micros(500));
    let job = commit(&live, CommitOptions::default()).unwrap();
    assert!(job.wait_for(WAIT, |s| s == JobStatus::Ready));
    job.pause().unwrap();
    assert!(job.wait_for(WAIT, |s| s == JobStatus::Standby));
    job.resume().unwrap();
    job.cancel();
    assert!(matches!(job.wait(), Err(Error::Cancelled { .. })));
    assert_eq!(live.top().path(), snap);
    writers.stop();
    verify_live(&live, &model, "after cancelled active commit");
    drop(live);
    verify_file(&snap, &model, "reopened after cancelled active commit");
    check_files("job_verbs", &[&snap, &top]);
    check_files("job_verbs", &[&mid, &base]);
}

#[test]
fn job_errors_stay_on_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::default());
    let [base, _mid, top] = three_layers(dir.path(), &model);
    let live = LiveDisk::new("vda", open_rw(&top));
    // Not in the chain.
    let other = dir.path().join("other.qcow2");
    qcow2(&other, SIZE, None);
    assert!(matches!(
        stream(
            &live,
            StreamOptions {
                base: Some(other),
                ..Default::default()
            }
        ),
        Err(Error::NotInChain { .. })
    ));
    // A commit whose base cannot be written fails on the job, not in the caller.
    let original = std::fs::metadata(&base).unwrap().permissions();
    let mut read_only = original.clone();
    read_only.set_readonly(true);
    std::fs::set_permissions(&base, read_only).unwrap();
    let started = commit(
        &live,
        CommitOptions {
            top: Some(dir.path().join("mid.qcow2")),
            base: Some(base.clone()),
            ..Default::default()
        },
    );
    std::fs::set_permissions(&base, original).unwrap();
    if let Ok(job) = started {
        // Running as root: the file was writable after all.
        job.wait().unwrap();
        return;
    }
    assert!(matches!(started, Err(Error::Storage(_))));
    // The disk is free again after the failed start.
    stream(&live, StreamOptions::default())
        .unwrap()
        .wait()
        .unwrap();
    verify_live(&live, &model, "after stream");
}
