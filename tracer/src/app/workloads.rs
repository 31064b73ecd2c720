//! Where workload names fit in the event loop: once a second, on the refresh tick, the cgroup
//! ids looked up since the last tick are resolved (one walk at most, rate limited by the
//! resolver) and the metrics by workload are folded and exported. The event path itself only
//! reads the resolver's cache.
use std::collections::HashMap;

use crate::export::metrics::{Metrics, WorkloadLabel};
use crate::host::workloads::WorkloadNames;
use tracer_core::tracker::Tracker;

/// The refresh tick's part: resolve, then export the metrics by workload if enabled.
pub fn refresh(names: &WorkloadNames, tracker: &Tracker, metrics: &Metrics) {
    let mut active: HashMap<u64, usize> = HashMap::new();
    let mut tracked = 0;
    for conn in tracker.connections() {
        *active.entry(conn.cgroup).or_default() += 1;
        tracked += 1;
    }
    // Name the cgroups of open connections while they exist: a container stopped before its
    // connections close is still named then (the resolver keeps removed cgroups' last name).
    for id in active.keys() {
        let _ = names.cached(*id);
    }
    names.refresh();
    let Some(by_workload) = metrics.workloads.get() else {
        return;
    };
    // Connections open before the agent started and not seen since have no cgroup yet.
    let seeded = tracker.active().saturating_sub(tracked);
    if seeded > 0 {
        *active.entry(0).or_default() += seeded;
    }
    let time_wait: HashMap<u64, usize> = tracker.time_wait().by_cgroup().into_iter().collect();
    // Both from the same table state: the breakdown adds up to the host gauge.
    metrics.time_wait.set_sockets(tracker.time_wait().count());
    by_workload.update(
        |id| match names.cached(id) {
            Some(cgroup) => WorkloadLabel::Named(cgroup.workload.name.clone()),
            None if names.unresolved(id) => WorkloadLabel::Wait,
            None => WorkloadLabel::Unknown,
        },
        &active,
        &time_wait,
    );
}
