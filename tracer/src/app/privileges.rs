//! Least privilege: once the programs are loaded and attached and the start-up seeding is done,
//! the agent gives up every capability it will not use again, from its effective, permitted,
//! inheritable, ambient and bounding sets, and sets `no_new_privs` so that nothing it could
//! execute would get them back.
//!
//! What is kept, and why (each was checked by running without it, see the README):
//! - `CAP_SYS_ADMIN`: `setns` into other network namespaces, for the TIME_WAIT re-check two
//!   seconds after start, the re-reads after lost events and owner lookups in other namespaces.
//! - `CAP_SYS_PTRACE`: `/proc/PID/ns/net` and `/proc/PID/fd` links of other users' processes
//!   (finding namespaces and the owners of leaked sockets).
//! - `CAP_DAC_READ_SEARCH`: listing other users' `/proc/PID/fd` directories (mode 0500).
//!
//! Everything else goes, including `CAP_BPF`, `CAP_PERFMON` and `CAP_SYSLOG`: reading the ring
//! buffer and the lost-event map through descriptors already open, detaching at exit (closing
//! the link descriptors) and sock_diag dumps of this namespace need no capability.
//!
//! Capabilities belong to a thread: this runs before the agent starts any other thread, so the
//! threads started later (the owner lookups, the namespace dumps) inherit the reduced sets.
use std::fmt::Write as _;

use anyhow::Context as _;
use caps::{CapSet, Capability, CapsHashSet};
use log::{info, warn};

/// The capabilities the agent keeps after start-up, with what each is for.
pub const KEPT: &[(Capability, &str)] = &[
    (
        Capability::CAP_SYS_ADMIN,
        "entering other network namespaces (setns) to list their sockets",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "reading other users' /proc/PID/ns/net and /proc/PID/fd links",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "listing other users' /proc/PID/fd directories",
    ),
];

/// What [`drop_unneeded`] did, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Capabilities removed from the permitted set.
    pub permitted: Vec<Capability>,
    /// Whether the bounding set was reduced (needs `CAP_SETPCAP`, which a service started with
    /// a capability bounding set of its own usually lacks: then that set already bounds it).
    pub bounding: bool,
}

/// Drops every capability but [`KEPT`] from the calling thread's sets. Call it once the programs
/// are attached and the tracker seeded, before any other thread is started.
pub fn drop_unneeded() -> anyhow::Result<Dropped> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(1);
    if threads > 1 {
        warn!(
            "dropping capabilities with {threads} threads running: only this thread and those it \
             starts lose them"
        );
    }
    let kept: CapsHashSet = KEPT.iter().map(|(cap, _)| *cap).collect();
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    let effective = caps::read(None, CapSet::Effective).context("reading capabilities")?;

    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let bounding = if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).context("reading the bounding set")? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        }
        true
    } else {
        false
    };
    // Ambient before permitted (the kernel clears ambient capabilities leaving permitted anyway).
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    }
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable set")?;
    let keep: CapsHashSet = permitted.intersection(&kept).copied().collect();
    // Effective must stay within permitted: shrink it first.
    caps::set(None, CapSet::Effective, &keep).context("setting the effective set")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting the permitted set")?;
    set_no_new_privs()?;

    let mut dropped: Vec<Capability> = permitted.difference(&keep).copied().collect();
    dropped.sort_by_key(|cap| cap.index());
    let result = Dropped {
        permitted: dropped,
        bounding,
    };
    info!("{}", describe(&result, &keep));
    Ok(result)
}

/// The log line: what went, what stays and for what.
fn describe(dropped: &Dropped, keep: &CapsHashSet) -> String {
    let mut line = format!(
        "dropped {} capabilities no longer needed",
        dropped.permitted.len()
    );
    if !dropped.bounding {
        line.push_str(" (bounding set left as started: CAP_SETPCAP is not held)");
    }
    let kept: Vec<String> = KEPT
        .iter()
        .filter(|(cap, _)| keep.contains(cap))
        .map(|(cap, why)| format!("{cap} ({why})"))
        .collect();
    if kept.is_empty() {
        line.push_str("; kept none");
    } else {
        let _ = write!(line, "; kept {}", kept.join(", "));
    }
    line
}

/// `PR_SET_NO_NEW_PRIVS`: no `execve` may grant privileges again (setuid bits, file
/// capabilities). Inherited by every thread started later.
fn set_no_new_privs() -> anyhow::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_names_what_is_kept_and_why() {
        let keep: CapsHashSet = [Capability::CAP_SYS_PTRACE].into_iter().collect();
        let line = describe(
            &Dropped {
                permitted: vec![Capability::CAP_BPF, Capability::CAP_PERFMON],
                bounding: false,
            },
            &keep,
        );
        assert_eq!(
            line,
            "dropped 2 capabilities no longer needed (bounding set left as started: \
             CAP_SETPCAP is not held); kept CAP_SYS_PTRACE (reading other users' /proc/PID/ns/net and \
             /proc/PID/fd links)"
        );
    }

    #[test]
    fn kept_capabilities_are_distinct() {
        let set: CapsHashSet = KEPT.iter().map(|(cap, _)| *cap).collect();
        assert_eq!(set.len(), KEPT.len());
    }
}
