//! Running qemu-img and qemu-io, and judging images with them: `qemu-img check`, `compare`,
//! `convert` and `info --backing-chain`. Callers check [`crate::require::have_qemu`] first;
//! everything here panics with the command and its output when a tool fails.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `program` with `args`, returning its output whatever the exit status.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// The command line, exit status and both streams of a finished command, for messages.
pub fn describe<S: AsRef<OsStr>>(program: &str, args: &[S], out: &Output) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    format!(
        "{program} {} exited with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `program args` in `dir` (tests that compare outputs use relative file names),
/// returning its output whatever the exit status.
pub fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// [`run_in`] a command that must succeed; returns its stdout.
pub fn ok_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run_in(dir, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} in {} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        dir.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-img and panics unless it succeeds; returns its stdout.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = run("qemu-img", args);
    assert!(out.status.success(), "{}", describe("qemu-img", args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-img's major version (Debian 12 ships 7.2; this project's machines 10.0); 0 when it
/// cannot be told.
pub fn qemu_img_major() -> u32 {
    let out = Command::new("qemu-img").arg("--version").output();
    let version = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs each of `commands` through `qemu-io -f format` on `path`, panicking on any failure
/// (a failed write, a pattern verification that does not match); returns its stdout.
pub fn qemu_io(path: &Path, format: &str, commands: &[&str]) -> String {
    let mut args: Vec<String> = vec!["-f".into(), format.into()];
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(path.display().to_string());
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // Older qemu-io versions exit 0 after a failed command; read the output too.
    let failed = !out.status.success()
        || stdout.contains("verification failed")
        || stdout.contains(" failed: ")
        || stdout.contains("failed:");
    assert!(!failed, "{}", describe("qemu-io", &args, &out));
    stdout
}

/// `qemu-img create -f qcow2 -o OPTIONS path size` (size may be left out with a backing file).
pub fn qemu_create(path: &Path, options: &str, size: Option<u64>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.into());
    }
    args.push(path.display().to_string());
    if let Some(size) = size {
        args.push(size.to_string());
    }
    qemu_img(&args);
}

/// What `qemu-img check` said about an image.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// qemu-img's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub exit: i32,
    /// Corruptions (refcount too low, COPIED mismatches, bad entries).
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// Errors while checking.
    pub check_errors: u64,
    /// The full output, for messages.
    pub output: String,
}

impl CheckResult {
    /// No corruption and no check error (leaks allowed: a crash may leak clusters but never
    /// corrupt).
    pub fn consistent(&self) -> bool {
        matches!(self.exit, 0 | 3) && self.corruptions == 0 && self.check_errors == 0
    }

    /// Nothing at all to report.
    pub fn clean(&self) -> bool {
        self.exit == 0 && self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

fn json_u64(output: &str, key: &str) -> u64 {
    let json: serde_json::Value = match serde_json::from_str(output) {
        Ok(v) => v,
        Err(_) => return 0,
    };
    json.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// The `qemu-img check` arguments for `path`; `-U` because a live test may still hold the
/// image open.
fn check_args(path: &Path, json: bool) -> Vec<&OsStr> {
    let mut args: Vec<&OsStr> = vec!["check".as_ref(), "-U".as_ref()];
    if json {
        args.push("--output=json".as_ref());
    }
    args.extend(["-f".as_ref(), "qcow2".as_ref(), path.as_os_str()]);
    args
}

/// Runs `qemu-img check --output=json` on a qcow2 image.
pub fn qemu_check(path: &Path) -> CheckResult {
    let out = run("qemu-img", &check_args(path, true));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    CheckResult {
        exit: out.status.code().unwrap_or(-1),
        corruptions: json_u64(&stdout, "corruptions"),
        leaks: json_u64(&stdout, "leaks"),
        check_errors: json_u64(&stdout, "check-errors"),
        output,
    }
}

/// qemu-img check's human-readable report, for a failure message.
fn human_check(path: &Path) -> String {
    let out = run("qemu-img", &check_args(path, false));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics unless `qemu-img check` finds the qcow2 image free of corruption and leaks.
pub fn assert_check_clean(path: &Path) {
    let result = qemu_check(path);
    if !result.clean() {
        panic!(
            "qemu-img check {} is not clean: {result:?}\n{}",
            path.display(),
            human_check(path)
        );
    }
}

/// Whether a qcow2 image's header has the dirty bit: its refcounts and COPIED flags are to be
/// rebuilt at the next writable open (QEMU's lazy-refcounts contract; what a crash or failure
/// after an internal snapshot operation's commit point leaves).
pub fn dirty_bit(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    // The header's big-endian incompatible-features field; a file too short to hold it has none.
    const INCOMPATIBLE_FEATURES: u64 = 72;
    let file = std::fs::File::open(path).expect("open image");
    let mut field = [0u8; 8];
    file.read_exact_at(&mut field, INCOMPATIBLE_FEATURES)
        .is_ok_and(|()| u64::from_be_bytes(field) & storage::qcow2::header::INCOMPAT_DIRTY != 0)
}

/// Panics unless the qcow2 image, as its next writable open leaves it, has no corruption
/// (leaks allowed): a dirty image (see [`dirty_bit`]) is opened writable on a copy (it may be
/// a frozen backing file) and the copy is checked; a clean one is checked as it is.
pub fn assert_consistent_as_next_open_leaves(what: &str, path: &Path) {
    let mut checked = path.to_path_buf();
    if dirty_bit(path) {
        checked = path.with_extension("repaired");
        std::fs::copy(path, &checked).expect("copy dirty image");
        let options = storage::OpenOptions {
            open_backing: false,
            format: Some(storage::ImageFormat::Qcow2),
            ..Default::default()
        };
        drop(storage::open(&checked, &options).expect("open a dirty image writable"));
        assert!(
            !dirty_bit(&checked),
            "{what}: opening {} left it dirty",
            path.display()
        );
    }
    let result = qemu_check(&checked);
    assert!(
        result.consistent(),
        "{what}: qemu-img check {} (dirty bit {}): {}",
        path.display(),
        checked != path,
        result.output
    );
    if checked != path {
        let _ = std::fs::remove_file(&checked);
    }
}

/// Panics unless `qemu-img check` finds no corruption in the qcow2 image (leaks allowed).
pub fn assert_check_consistent(path: &Path) -> CheckResult {
    let result = qemu_check(path);
    if !result.consistent() {
        panic!(
            "qemu-img check {} found corruption: {result:?}\n{}",
            path.display(),
            human_check(path)
        );
    }
    result
}

/// [`assert_check_clean`] where QEMU's tools are available; otherwise the check is skipped
/// by [`crate::require::have_qemu`]'s rule (a note, or a failure under
/// `SNAPVMM_REQUIRE_QEMU=1`). For tests whose subject is not QEMU interoperability.
pub fn assert_check_clean_if_available(path: &Path) {
    if crate::require::have_qemu(&format!("qemu-img check of {}", path.display())) {
        assert_check_clean(path);
    }
}

/// The guest contents of an image as QEMU reads them (`qemu-img convert -O raw`).
pub fn qemu_read_all(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("converted.raw");
    qemu_img(&[
        "convert".as_ref(),
        // -U: the test process may hold the image open itself (image locking).
        "-U".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        path.as_os_str(),
        raw.as_os_str(),
    ]);
    std::fs::read(&raw).expect("read converted image")
}

/// `qemu-img compare` of a qcow2 image against a raw file: panics unless equal.
pub fn assert_qemu_compare_equal(qcow2: &Path, raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            qcow2.as_os_str(),
            raw.as_os_str(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} differ:\n{}{}",
        qcow2.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files of `path`'s backing chain as `qemu-img info --backing-chain` sees them, top
/// first, canonicalised where they exist.
pub fn qemu_chain(path: &Path) -> Vec<PathBuf> {
    let stdout = qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--backing-chain".as_ref(),
        "--output=json".as_ref(),
        path.as_os_str(),
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("qemu-img info {}: not JSON: {e}", path.display()));
    json.as_array()
        .unwrap_or_else(|| panic!("qemu-img info {}: not an array", path.display()))
        .iter()
        .map(|layer| {
            let name = layer["filename"].as_str().unwrap_or_else(|| {
                panic!("qemu-img info {}: a layer without filename", path.display())
            });
            std::fs::canonicalize(name).unwrap_or_else(|_| PathBuf::from(name))
        })
        .collect()
}

/// Asserts that `qemu-img info --backing-chain` lists exactly `expected`, top first.
pub fn assert_qemu_chain(top: &Path, expected: &[&Path]) {
    let want: Vec<PathBuf> = expected
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .collect();
    assert_eq!(qemu_chain(top), want, "backing chain of {}", top.display());
}
