//! qemu-storage-daemon's block jobs: `block-stream` and `block-commit` over QMP on the same
//! chains as snapvmm's live jobs (see `jobs`), so QEMU's live block layer and snapvmm's are
//! compared job for job.

use super::model::{Figure, Status};
use super::Bench;

/// Measures the family.
pub fn run(bench: &mut Bench) {
    for (kind, label) in [("stream", "live stream job"), ("commit", "live active commit job")] {
        let fig = Figure::new(
            &format!("jobs.{kind}.live.qsd"),
            "Stream and commit",
            &format!("{label} (qemu-storage-daemon)"),
            "qemu-storage-daemon",
            "MiB/s",
        )
        .higher_is_better();
        bench.unmeasured(fig, Status::Skipped, "not yet");
    }
}
