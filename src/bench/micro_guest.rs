//! The built-in micro-guest running `io-bench`, as the benchmarks drive it: a filled qcow2
//! disk, the VM, and its console parsed into per-64-request windows.

use std::path::Path;
use std::time::{Duration, Instant};

use storage::qcow2::{create, CreateOptions};
use storage::OpenOptions;
use vmm::config::{BootSource, DiskConfig, VmConfig, Workload};
use vmm::console::Console;
use vmm::Vmm;

/// How long the guest may stay silent.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The host's TSC ticks per second, against the monotonic clock over 100 ms.
pub fn tsc_hz() -> f64 {
    use std::arch::x86_64::_rdtsc;
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    let (t0, c0) = (Instant::now(), unsafe { _rdtsc() });
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let (c1, t1) = (unsafe { _rdtsc() }, Instant::now());
    c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64()
}

/// One `io-bench ops N ticks T max M errors E` line: when it arrived and its longest request.
pub struct Window {
    /// When the line reached the host.
    pub at: Instant,
    /// The longest request of the window, in TSC ticks.
    pub max: u64,
}

/// The guest and its console.
pub struct Guest {
    /// The VM, until dropped.
    pub vm: Option<Vmm>,
    /// Its console.
    pub console: Console,
}

impl Guest {
    /// The next window the guest reports.
    pub fn next_window(&mut self) -> Result<Window, String> {
        loop {
            let line = self
                .console
                .next_line(TIMEOUT)
                .ok_or_else(|| format!("the guest printed nothing for {TIMEOUT:?}"))?;
            let words: Vec<&str> = line.text.split_whitespace().collect();
            if let ["io-bench", "ops", _, "ticks", _, "max", max, "errors", errors] = words[..] {
                if errors != "0" {
                    return Err(format!("the guest saw I/O errors: {}", line.text));
                }
                let max = max
                    .parse()
                    .map_err(|_| format!("unexpected guest line {:?}", line.text))?;
                return Ok(Window { at: line.at, max });
            }
            if line.text.contains("io error") {
                return Err(format!("guest: {}", line.text));
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            let _ = vmm::guest::request_finish(vm.memory());
            let _ = vm.stop();
        }
    }
}

/// Boots an `io-bench` micro-guest (32 MiB) on a new filled qcow2 disk `base` of `size`
/// bytes; returns once the workload has started.
pub fn start_io_bench(base: &Path, size: u64) -> Result<Guest, String> {
    filled_disk(base, size)?;
    let mut config = VmConfig::new(BootSource::MicroGuest {
        workload: Workload::IoBench,
        seed: 7,
    });
    config.memory_mib = 32;
    config.disks.push(DiskConfig::new(base));
    let (sink, console) = vmm::console::channel();
    let vm = Vmm::start_with_serial(&config, Box::new(sink)).map_err(|e| e.to_string())?;
    let mut guest = Guest {
        vm: Some(vm),
        console,
    };
    guest
        .console
        .wait_for(TIMEOUT, |l| l == "io-bench start")
        .ok_or("the micro-guest's io-bench did not start")?;
    Ok(guest)
}

impl Guest {
    /// The running VM.
    pub fn vm(&self) -> Result<&Vmm, String> {
        self.vm
            .as_ref()
            .ok_or_else(|| "the VM has stopped".to_string())
    }

    /// The VM's first disk.
    pub fn disk(&self) -> Result<std::sync::Arc<storage::LiveDisk>, String> {
        self.vm()?
            .disks()
            .first()
            .map(|d| d.disk.clone())
            .ok_or_else(|| "the VM has no disk".to_string())
    }
}

/// A qcow2 disk of `size` bytes with every cluster allocated.
pub fn filled_disk(path: &Path, size: u64) -> Result<(), String> {
    create(
        path,
        &CreateOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let disk = storage::open(path, &OpenOptions::default())
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let data = vec![0xa5u8; 1 << 20];
    for offset in (0..size).step_by(data.len()) {
        disk.write_at(&data, offset)
            .map_err(|e| format!("filling {} at {offset}: {e}", path.display()))?;
    }
    disk.flush()
        .map_err(|e| format!("flushing {}: {e}", path.display()))
}
