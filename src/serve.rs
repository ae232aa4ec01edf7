//! What every VM-running subcommand shares: logging set-up and serving the REST API for a
//! running sandbox. It depends on no other subcommand, so `run`, `restore`, `snapshot restore`
//! and the rest can all use it without pointing at each other.

use std::path::Path;

use snapvmm_api::server::PendingApiServer;
use snapvmm_api::ApiServer;
use vmm::{ExitReason, Sandbox};

/// Serves the REST API for `sandbox` on `socket` until its VM ends. Problems found in the
/// snapshot metadata are printed as warnings first. Callers install whatever snapshot exporter
/// the VM should have (see `crate::store::install_exporter`) before calling this.
pub(crate) fn serve_api(sandbox: Sandbox, socket: &Path) -> Result<ExitReason, String> {
    match ApiServer::bind(socket) {
        Ok(pending) => serve_api_on(sandbox, pending),
        Err(e) => {
            let _ = sandbox.stop();
            Err(e.to_string())
        }
    }
}

/// As [`serve_api`], on a socket bound before the VM was built ([`ApiServer::bind`]): the
/// server's start-up then overlaps the VM's, and clients that connected meanwhile are answered
/// now.
pub(crate) fn serve_api_on(
    sandbox: Sandbox,
    pending: PendingApiServer,
) -> Result<ExitReason, String> {
    for problem in sandbox.warnings() {
        eprintln!("snapvmm: warning: snapshot metadata: {problem}");
    }
    let server = match pending.serve(sandbox.control().clone()) {
        Ok(server) => server,
        Err(e) => {
            let _ = sandbox.stop();
            return Err(e.to_string());
        }
    };
    tracing::debug!(target: "vmm::restore", "API serving");
    crate::confine::trigger();
    // Stop the server, and with it any block job, before the VM's disks are flushed.
    sandbox.exit_handle().wait();
    server.stop();
    sandbox.wait().map_err(|e| e.to_string())
}

/// Logs to stderr, filtered by `SNAPVMM_LOG` (e.g. `debug`, `vmm=trace`; default `warn`).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPVMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
