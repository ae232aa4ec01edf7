//! The SIGSYS handler of [`SeccompMode::Kill`](super::SeccompMode::Kill): names the forbidden
//! syscall on stderr, then lets SIGSYS kill the process.

use std::sync::Once;

/// Names of the syscalls a compromised VMM would typically reach for; others are logged by
/// number only.
fn name(nr: libc::c_long) -> &'static str {
    match nr {
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_listen => "listen",
        libc::SYS_accept4 => "accept4",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_kill => "kill",
        libc::SYS_setuid => "setuid",
        libc::SYS_setgid => "setgid",
        libc::SYS_mount => "mount",
        libc::SYS_chroot => "chroot",
        libc::SYS_unshare => "unshare",
        libc::SYS_setns => "setns",
        libc::SYS_bpf => "bpf",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_mmap => "mmap",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_wait4 => "wait4",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_userfaultfd => "userfaultfd",
        libc::SYS_socketpair => "socketpair",
        libc::SYS_getsockopt => "getsockopt",
        libc::SYS_setsockopt => "setsockopt",
        libc::SYS_getsockname => "getsockname",
        libc::SYS_getpeername => "getpeername",
        libc::SYS_fchmod => "fchmod",
        libc::SYS_fchmodat => "fchmodat",
        libc::SYS_mknodat => "mknodat",
        libc::SYS_symlinkat => "symlinkat",
        libc::SYS_fchownat => "fchownat",
        libc::SYS_pipe2 => "pipe2",
        libc::SYS_dup3 => "dup3",
        libc::SYS_sched_setaffinity => "sched_setaffinity",
        libc::SYS_io_uring_setup => "io_uring_setup",
        libc::SYS_seccomp => "seccomp",
        _ => "?",
    }
}

/// Writes `bytes` to stderr with a raw `write`: the only output that is async-signal-safe.
fn write_stderr(bytes: &[u8]) {
    // SAFETY: writes from a valid buffer of the given length to fd 2; errors are ignored because
    // nothing can be done about them inside a signal handler.
    unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
}

/// Formats `value` in decimal into `buf`, returning the digits.
fn decimal(mut value: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buf[at..];
        }
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS with si_code SYS_SECCOMP the kernel stores the syscall number in `si_syscall`,
    // an int at byte offset 24 of siginfo_t on x86_64 and aarch64 (after si_addr).
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO); offset 24 lies inside its
    // 128 bytes and is int-aligned.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<libc::c_int>()) } as libc::c_long;
    let mut digits = [0u8; 20];
    write_stderr(b"snapvmm: seccomp: forbidden syscall ");
    write_stderr(name(nr).as_bytes());
    write_stderr(b" (");
    write_stderr(decimal(nr as u64, &mut digits));
    write_stderr(b"), killing the process with SIGSYS\n");
    // SAFETY: restores the default disposition and re-raises SIGSYS on this thread, which ends
    // the process with that signal; rt_sigaction and tgkill are in every allow-list.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

/// Installs the handler once per process.
pub(super) fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only calls async-signal-safe
        // functions (write, signal, tgkill).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_formats_numbers() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(41, &mut buf), b"41");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
        assert_eq!(name(libc::SYS_socket), "socket");
    }
}
