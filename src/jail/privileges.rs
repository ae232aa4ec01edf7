//! Dropping to the jail's user: resource limits, no supplementary groups, UID:GID, no
//! capabilities in any set, no new privileges.

use caps::CapSet;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

/// Applies `limits` (soft and hard: the VMM cannot raise them back).
pub fn limit(limits: &[(Resource, u64)]) -> Result<(), String> {
    for &(resource, value) in limits {
        setrlimit(resource, value, value).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
    }
    Ok(())
}

/// Becomes `uid`:`gid` for good, with no capabilities left and `PR_SET_NO_NEW_PRIVS` set, so
/// no exec can give any back.
pub fn drop_to(uid: Uid, gid: Gid) -> Result<(), String> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, gone after setuid.
    caps::clear(None, CapSet::Bounding).map_err(|e| format!("clearing the bounding set: {e}"))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clearing the ambient set: {e}"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| format!("clearing the inheritable set: {e}"))?;
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid {gid}: {e}"))?;
    // Leaving uid 0 empties the permitted and effective sets (no SECBIT_KEEP_CAPS).
    setresuid(uid, uid, uid).map_err(|e| format!("setresuid {uid}: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    // Fail closed if the kernel left anything.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Bounding] {
        let left = caps::read(None, set).map_err(|e| format!("reading {set:?}: {e}"))?;
        if !left.is_empty() {
            return Err(format!("capabilities left in the {set:?} set: {left:?}"));
        }
    }
    Ok(())
}
