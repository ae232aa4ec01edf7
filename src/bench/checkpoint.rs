//! Checkpoints of micro-guest VMs in this process, per guest memory size:
//!
//! - save, idle (the counter guest, which touches few pages) and fully dirtied (every page
//!   written non-zero by the host first), full checkpoint of the paused VM with fsync; beside
//!   it a plain sequential write + fsync of the same number of bytes, the bandwidth a dirty
//!   save competes with;
//! - the vCPU pause of a live checkpoint of the counter guest (small working set);
//! - restore in process: `Vmm::restore` until its vCPU threads are started (the next thing
//!   they do is enter the guest); cold, and into a ready VM shell from a `ShellPool` (the
//!   pool's refill finished before each timed restore, the shell's build cost in the note);
//! - restore as a whole process: exec of `snapvmm restore DIR --api-socket S` until the API
//!   answers `GET /vm`;
//! - revert in place of a running guest, pause to resume.
//!
//! The methods of `cargo bench --bench checkpoint`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::{CheckpointOptions, RestoreOptions, ShellPool, ShellShape, ShellSource, Vmm};

use super::counter_guest::{counter_vm, dirty_all, live_checkpoint};
use super::model::{Figure, Status};
use super::process::restore_until_api;
use super::Bench;

const FAMILY: &str = "Checkpoints";

/// Measures the family for every memory size.
pub fn run(bench: &mut Bench) {
    let sizes = bench.memory_mib.clone();
    let kvm = vmm::check_kvm();
    for mib in sizes {
        let figures = figures(mib);
        if let Err(reason) = &kvm {
            for fig in figures {
                bench.unmeasured(fig, Status::Skipped, format!("KVM unusable: {reason}"));
            }
            continue;
        }
        let dir = bench.dir.join(format!("ckpt-{mib}"));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            for fig in figures {
                bench.record(fig, Err(format!("creating {}: {e}", dir.display())));
            }
            continue;
        }
        let [idle, dirty, plain, pause, restore, shell, process, revert] = figures;
        bench.step(format!("checkpoint save, {mib} MiB guest"));
        let saves = bench.samples(3, 10);
        let r = save(&dir, mib, false, saves).map(|(saves, _)| saves);
        bench.record(idle, r);
        // The dirty saves and the plain writes alternate, so that a disk or a neighbour
        // changing speed during the run weighs on both sides alike.
        match save(&dir, mib, true, saves) {
            Ok((saves, plains)) => {
                bench.record(dirty, Ok(saves));
                bench.record(plain, Ok(plains));
            }
            Err(e) => {
                bench.record(dirty, Err(e.clone()));
                bench.record(plain, Err(e));
            }
        }
        bench.step(format!("live checkpoint pause, {mib} MiB guest"));
        let r = live_pause(&dir, mib, bench.samples(10, 100));
        bench.record(pause, r);
        bench.step(format!("restore and revert, {mib} MiB guest"));
        let restores = bench.samples(5, 20);
        let target = dir.join("restore-me");
        match prepare_restore(&target, mib) {
            Ok(()) => {
                let r = restore_in_process(&target, restores);
                bench.record(restore, r);
                match restore_from_shell(&target, mib, restores) {
                    Ok((samples, note)) => bench.record(shell.note(note), Ok(samples)),
                    Err(e) => bench.record(shell, Err(e)),
                }
                let r = restore_process(&bench.exe, &dir, &target, restores);
                bench.record(process, r);
            }
            Err(e) => {
                bench.record(restore, Err(e.clone()));
                bench.record(shell, Err(e.clone()));
                bench.record(process, Err(e));
            }
        }
        let r = revert_in_place(&dir, mib, restores);
        bench.record(revert, r);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Figures of one memory size, in the order `run` records them.
fn figures(mib: u64) -> [Figure; 8] {
    let m = mib as f64;
    let new = |id: &str, label: &str, tool: &str, unit: &str, what: String| {
        Figure::new(
            &format!("ckpt.{id}.{mib}"),
            FAMILY,
            &format!("{label}, {mib} MiB"),
            tool,
            unit,
        )
        .what(what)
        .param(m)
    };
    [
        new(
            "save.idle",
            "save, idle guest",
            "snapvmm",
            "ms",
            format!(
                "Full checkpoint of a paused {mib} MiB counter micro-guest (few pages \
                 touched), fsync included"
            ),
        ),
        new(
            "save.dirty",
            "save, fully dirtied guest",
            "snapvmm",
            "ms",
            format!(
                "Full checkpoint of a paused {mib} MiB micro-guest whose every page the host \
                 wrote non-zero first, fsync included"
            ),
        ),
        new(
            "plain",
            "plain write + fsync",
            "plain write",
            "ms",
            format!(
                "Create a file, write {mib} MiB sequentially in 8 MiB pieces, fsync, rename: \
                 the bandwidth a dirty save competes with"
            ),
        ),
        new(
            "live_pause",
            "live checkpoint pause",
            "snapvmm",
            "us",
            format!(
                "vCPU stop of a live checkpoint of a running {mib} MiB counter micro-guest \
                 (small working set), measured by the checkpointer from pause to resume"
            ),
        ),
        new(
            "restore",
            "restore in process",
            "snapvmm",
            "ms",
            format!(
                "Vmm::restore of a full {mib} MiB checkpoint (memory mapped lazily) until its \
                 vCPU threads are started, about to enter the guest"
            ),
        ),
        new(
            "restore_shell",
            "restore in process, from a ready VM shell",
            "snapvmm",
            "ms",
            format!(
                "Vmm::restore_with of a full {mib} MiB checkpoint into a VM shell taken from a \
                 ShellPool (KVM VM, memory slot over reserved RAM, irqchip, PIT and vCPU fds \
                 built ahead), until its vCPU threads are started; the pool's refill is done \
                 before each timed restore"
            ),
        ),
        new(
            "restore_process",
            "restore, whole process",
            "snapvmm",
            "ms",
            format!(
                "exec of `snapvmm restore DIR --api-socket S --serial null` of a {mib} MiB \
                 micro-guest checkpoint until the API answers GET /vm"
            ),
        ),
        new(
            "revert",
            "revert in place",
            "snapvmm",
            "ms",
            format!(
                "Checkpointer::revert of a running {mib} MiB counter micro-guest to its \
                 checkpoint, pause to resume"
            ),
        ),
    ]
}

/// Stops `vm` whatever happened, keeping the first error.
fn with_vm<T>(vm: Vmm, result: Result<T, String>) -> Result<T, String> {
    let stopped = vm.stop().map_err(|e| format!("stopping the VM: {e}"));
    let value = result?;
    stopped?;
    Ok(value)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `count` full checkpoints of a paused counter guest, ms each; with `dirty`, of a fully
/// dirtied one, each followed by a plain write of as many bytes (ms each, second list).
fn save(dir: &Path, mib: u64, dirty: bool, count: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    let vm = counter_vm(mib)?;
    let result = (|| {
        vm.pause_gate()
            .pause(Duration::from_secs(10))
            .map_err(|e| format!("pausing: {e}"))?;
        // The plain writer's bytes: as many as the guest's RAM and, like them, not in cache.
        let mut plain_bytes = Vec::new();
        if dirty {
            dirty_all(&vm)?;
            plain_bytes = (0..(mib << 20) as usize)
                .map(|i| (i >> 12) as u8 | 1)
                .collect();
        }
        let target = dir.join("save");
        let mut samples = Vec::with_capacity(count);
        let mut plains = Vec::with_capacity(count);
        for _ in 0..count {
            // A checkpoint never overwrites one: clear the last (untimed).
            let _ = std::fs::remove_dir_all(&target);
            let start = Instant::now();
            vm.checkpointer()
                .checkpoint(&target, CheckpointOptions::default())
                .map_err(|e| format!("checkpoint to {}: {e}", target.display()))?;
            samples.push(ms(start.elapsed()));
            if dirty {
                plains.push(plain_write(dir, &plain_bytes)?);
            }
        }
        let _ = std::fs::remove_dir_all(&target);
        vm.pause_gate().resume();
        Ok((samples, plains))
    })();
    with_vm(vm, result)
}

/// Create, write `bytes` in 8 MiB pieces, fsync, rename; ms.
fn plain_write(dir: &Path, bytes: &[u8]) -> Result<f64, String> {
    let tmp = dir.join("plain.tmp");
    let path = dir.join("plain");
    let _ = std::fs::remove_file(&path);
    let start = Instant::now();
    let mut file =
        std::fs::File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    for piece in bytes.chunks(8 << 20) {
        file.write_all(piece)
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("fsync {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    let took = ms(start.elapsed());
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

/// `count` live checkpoints of a running counter guest; the pause of each in µs.
fn live_pause(dir: &Path, mib: u64, count: usize) -> Result<Vec<f64>, String> {
    let vm = counter_vm(mib)?;
    let target = dir.join("live");
    let result = (0..count)
        .map(|_| Ok(live_checkpoint(&vm, &target)? as f64))
        .collect();
    let _ = std::fs::remove_dir_all(&target);
    with_vm(vm, result)
}

/// A full checkpoint of a running counter guest in `target`, for the restores.
fn prepare_restore(target: &Path, mib: u64) -> Result<(), String> {
    let vm = counter_vm(mib)?;
    let result = vm
        .checkpointer()
        .checkpoint(target, CheckpointOptions::default())
        .map(|_| ())
        .map_err(|e| format!("checkpoint to {}: {e}", target.display()));
    with_vm(vm, result)
}

/// `count` in-process restores of `target`; ms each, to vCPU threads started.
fn restore_in_process(target: &Path, count: usize) -> Result<Vec<f64>, String> {
    (0..count)
        .map(|_| {
            let start = Instant::now();
            let vm = Vmm::restore(target, Box::new(std::io::sink()), false)
                .map_err(|e| format!("restoring {}: {e}", target.display()))?;
            let took = ms(start.elapsed());
            vm.stop()
                .map_err(|e| format!("stopping the restored VM: {e}"))?;
            Ok(took)
        })
        .collect()
}

/// `count` in-process restores of `target` (a counter guest of `mib` MiB, one vCPU), each
/// into a shell from a pool of one; ms each, to vCPU threads started. The shell is taken
/// and the pool's refill finished before the clock starts: what an embedder with a warm pool
/// waits for. Also returns a note with what a shell costs to build.
fn restore_from_shell(target: &Path, mib: u64, count: usize) -> Result<(Vec<f64>, String), String> {
    let shape = ShellShape {
        memory_mib: mib,
        vcpus: 1,
    };
    let pool = ShellPool::new(&[(shape, 1)]).map_err(|e| format!("VM shell pool: {e}"))?;
    let ready = |pool: &ShellPool| {
        if pool.wait_full(Duration::from_secs(30)) {
            Ok(())
        } else {
            Err(format!(
                "the VM shell pool did not fill: {}",
                pool.stats().last_error.unwrap_or_default()
            ))
        }
    };
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        ready(&pool)?;
        let shell = pool
            .take(shape)
            .ok_or_else(|| "the full VM shell pool had no shell".to_string())?;
        // The refill this take started ends before the clock does.
        ready(&pool)?;
        let options = RestoreOptions {
            shell: ShellSource::Shell(shell),
            ..Default::default()
        };
        let start = Instant::now();
        let vm = Vmm::restore_with(target, Box::new(std::io::sink()), false, options)
            .map_err(|e| format!("restoring {} into a shell: {e}", target.display()))?;
        let took = ms(start.elapsed());
        vm.stop()
            .map_err(|e| format!("stopping the restored VM: {e}"))?;
        samples.push(took);
    }
    let stats = pool.stats();
    let build = stats.build_time.as_secs_f64() * 1e3 / stats.built.max(1) as f64;
    let note = format!(
        "a shell took {build:.2} ms to build on the pool's thread (mean of {}), outside the \
         timed region",
        stats.built
    );
    Ok((samples, note))
}

/// `count` whole-process restores: exec to the API's first answer; ms each.
fn restore_process(
    exe: &Path,
    dir: &Path,
    target: &Path,
    count: usize,
) -> Result<Vec<f64>, String> {
    (0..count)
        .map(|n| restore_until_api(exe, target, &dir.join(format!("api{n}.sock")), &[]))
        .collect()
}

/// `count` reverts in place of a running counter guest; ms each.
fn revert_in_place(dir: &Path, mib: u64, count: usize) -> Result<Vec<f64>, String> {
    let vm = counter_vm(mib)?;
    let target = dir.join("revert");
    let result = vm
        .checkpointer()
        .checkpoint(&target, CheckpointOptions::default())
        .map_err(|e| format!("checkpoint to {}: {e}", target.display()))
        .and_then(|_| {
            (0..count)
                .map(|_| {
                    vm.checkpointer()
                        .revert(&target)
                        .map(ms)
                        .map_err(|e| format!("revert to {}: {e}", target.display()))
                })
                .collect()
        });
    with_vm(vm, result)
}
