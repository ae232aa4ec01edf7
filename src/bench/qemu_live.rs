//! QEMU's own live external snapshot under a guest write load.

use super::model::{Figure, Status};
use super::Bench;

/// Measures the family.
pub fn run(bench: &mut Bench) {
    let fig = Figure::new(
        "switch.qemu.blockdev-snapshot-sync",
        "Live overlay switch",
        "QEMU blockdev-snapshot-sync",
        "QEMU (TCG)",
        "ms",
    );
    bench.unmeasured(fig, Status::Skipped, "not yet");
}
