//! The workload of each event: its `cgroup` id and the fields the cgroup's path names, looked
//! up in the cgroup cache. A record whose cgroup the cache does not know yet (a container that
//! started since the last walk) is held until the next walk (the event loop walks at most once a
//! second) and then written, so events come out in order, a second late at most, with their
//! names. `--filter` is applied here too.
use std::collections::VecDeque;
use std::sync::Arc;

use serde::ser::SerializeStruct;

use crate::export::filter::{Filter, Subject};
use crate::host::cgroups::Cgroup;
use crate::host::workloads::WorkloadNames;
use tracer_core::model::Tuple;
use tracer_core::record::{CloseWaitLeak, Connection, TimeWaitRecord};

/// Records held at most; past it the oldest is written with what is known.
const MAX_HELD: usize = 65_536;

/// A record waiting for its cgroup's name.
pub(super) enum Held {
    Closed(Box<Connection>),
    NagleReport(Box<Connection>),
    Leak(CloseWaitLeak),
    TimeWait(Box<TimeWaitRecord>),
}

impl Held {
    fn cgroup(&self) -> u64 {
        match self {
            Held::Closed(c) | Held::NagleReport(c) => c.cgroup,
            Held::Leak(l) => l.cgroup,
            Held::TimeWait(r) => r.cgroup,
        }
    }
}

/// Names, filter and held records of an event sink.
#[derive(Default)]
pub(super) struct SinkWorkloads {
    pub(super) names: Option<WorkloadNames>,
    pub(super) filter: Filter,
    /// Held records, each with the walk count when it was held.
    held: VecDeque<(u64, Held)>,
}

impl SinkWorkloads {
    /// The cgroup `id` names, if known.
    pub(super) fn cgroup(&self, id: u64) -> Option<Arc<Cgroup>> {
        self.names.as_ref().and_then(|n| n.cached(id))
    }

    /// Whether a record of cgroup `id` must wait: its name may come with the next walk, or
    /// records before it wait (order is kept).
    pub(super) fn must_hold(&self, id: u64) -> bool {
        let Some(names) = &self.names else {
            return false;
        };
        !self.held.is_empty() || names.unresolved(id)
    }

    /// Holds `record`; hands back the oldest when the queue is full.
    pub(super) fn hold(&mut self, record: Held) -> Option<Held> {
        let walks = self.names.as_ref().map_or(0, WorkloadNames::walks);
        self.held.push_back((walks, record));
        if self.held.len() > MAX_HELD {
            return self.held.pop_front().map(|(_, r)| r);
        }
        None
    }

    /// The held records now due, in order: named since, or a walk ran since they were held;
    /// all of them with `all`.
    pub(super) fn due(&mut self, all: bool) -> Vec<Held> {
        let walks = self.names.as_ref().map_or(0, WorkloadNames::walks);
        let mut out = Vec::new();
        while let Some((held_at, record)) = self.held.front() {
            let ready = all
                || walks > *held_at
                || self
                    .names
                    .as_ref()
                    .is_none_or(|n| !n.unresolved(record.cgroup()));
            if !ready {
                break;
            }
            if let Some((_, record)) = self.held.pop_front() {
                out.push(record);
            }
        }
        out
    }

    /// Whether `--filter` lets a record through.
    pub(super) fn passes(&self, tuple: &Tuple, cgroup: Option<&Cgroup>) -> bool {
        self.filter.is_empty() || self.filter.matches(&Subject { tuple, cgroup })
    }
}

/// Writes `cgroup` and the workload fields into an event object: all present, `null` when
/// unknown.
pub(super) fn write_fields<S: SerializeStruct>(
    s: &mut S,
    id: u64,
    cgroup: Option<&Cgroup>,
) -> Result<(), S::Error> {
    let w = cgroup.map(|c| &c.workload);
    s.serialize_field("cgroup", &(id != 0).then_some(id))?;
    s.serialize_field("workload", &w.map(|w| w.name.as_str()))?;
    let kind: Option<&'static str> = w.map(|w| w.kind.into());
    s.serialize_field("workload_kind", &kind)?;
    s.serialize_field("unit", &w.and_then(|w| w.unit.as_deref()))?;
    s.serialize_field("uid", &w.and_then(|w| w.uid))?;
    s.serialize_field("container_id", &w.and_then(|w| w.container_id.as_deref()))?;
    let runtime: Option<&'static str> = w.and_then(|w| w.runtime).map(Into::into);
    s.serialize_field("runtime", &runtime)?;
    s.serialize_field("pod_uid", &w.and_then(|w| w.pod_uid.as_deref()))?;
    let qos: Option<&'static str> = w.and_then(|w| w.qos).map(Into::into);
    s.serialize_field("qos", &qos)
}

/// The fields of [`write_fields`] for `#[serde(flatten)]` in derived event structs.
pub(super) struct WorkloadFields<'a> {
    pub(super) id: u64,
    pub(super) cgroup: Option<&'a Cgroup>,
}

impl serde::Serialize for WorkloadFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Workload", 9)?;
        write_fields(&mut s, self.id, self.cgroup)?;
        s.end()
    }
}
