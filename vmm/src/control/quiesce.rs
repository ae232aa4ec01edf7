//! Quiesced snapshots: the guest's filesystems frozen through its agent around a snapshot,
//! thawed on every way out (the snapshot failing, a panic: [`FrozenGuest`] thaws when
//! dropped), and the frozen time reported.

use std::time::Duration;

use crate::agent::{AgentFailure, FrozenGuest, GuestAgent};

use super::error::{ControlError, Result};
use super::types::QuiesceReport;

/// What a caller asked for.
#[derive(Debug, Clone, Copy)]
pub struct QuiesceRequest<'a> {
    /// The snapshot's name, for the report and the messages.
    pub snapshot: &'a str,
    /// Freeze around the snapshot.
    pub quiesce: bool,
    /// Snapshot unquiesced rather than fail when the agent cannot freeze.
    pub best_effort: bool,
}

/// An agent failure as a control error: an agent that is missing or does not answer is the
/// guest's state (409, as libvirt's "guest agent is not responding"), one answering garbage
/// or an error failed (500).
pub fn agent_error(agent: &GuestAgent, what: &str, failure: AgentFailure) -> ControlError {
    let message = format!("guest agent {}: {what}: {failure}", agent.endpoint());
    if failure.is_unavailable() {
        ControlError::Conflict(message)
    } else {
        ControlError::Failed(message)
    }
}

/// Runs `take` with the guest frozen as `request` asks; answers its result and, when
/// quiescing was asked for, the report.
pub fn around<T>(
    agent: Option<&GuestAgent>,
    request: QuiesceRequest<'_>,
    take: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<QuiesceReport>)> {
    if !request.quiesce {
        if request.best_effort {
            return Err(ControlError::InvalidArgument(
                "quiesce_best_effort needs quiesce".into(),
            ));
        }
        return Ok((take()?, None));
    }
    let skipped = |why: String| {
        tracing::warn!(
            "snapshot {}: taken unquiesced (best effort): {why}",
            request.snapshot
        );
        QuiesceReport {
            snapshot: request.snapshot.to_string(),
            frozen_us: None,
            filesystems: 0,
            skipped: Some(why),
        }
    };
    let Some(agent) = agent else {
        if request.best_effort {
            return Ok((take()?, Some(skipped("no guest agent configured".into()))));
        }
        return Err(ControlError::Conflict(format!(
            "snapshot {}: quiesce asked for, but no guest agent is configured (--guest-agent)",
            request.snapshot
        )));
    };
    let frozen: FrozenGuest<'_> = match agent.freeze() {
        Ok(frozen) => frozen,
        Err(failure) if request.best_effort => {
            let why = format!("guest agent {}: freeze: {failure}", agent.endpoint());
            return Ok((take()?, Some(skipped(why))));
        }
        Err(failure) => {
            return Err(agent_error(
                agent,
                "freezing the guest's filesystems",
                failure,
            ))
        }
    };
    let filesystems = frozen.filesystems();
    // `frozen` thaws when dropped should `take` panic.
    let taken = take();
    let thawed = frozen.thaw();
    match (taken, thawed) {
        (Ok(value), Ok(frozen_for)) => {
            tracing::info!(
                "snapshot {}: {filesystems} filesystem(s) frozen for {frozen_for:?}",
                request.snapshot
            );
            Ok((
                value,
                Some(QuiesceReport {
                    snapshot: request.snapshot.to_string(),
                    frozen_us: Some(micros(frozen_for)),
                    filesystems,
                    skipped: None,
                }),
            ))
        }
        (Ok(_), Err(failure)) => Err(ControlError::Failed(format!(
            "snapshot {} was taken, but thawing the guest failed (it may still be frozen): {}",
            request.snapshot,
            agent_error(agent, "thaw", failure)
        ))),
        (Err(error), Ok(_)) => Err(error),
        (Err(error), Err(failure)) => Err(ControlError::Failed(format!(
            "{error}; and thawing the guest failed (it may still be frozen): {}",
            agent_error(agent, "thaw", failure)
        ))),
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
