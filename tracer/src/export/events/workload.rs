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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use serde_json::Value;

    use crate::export::events::{EventFormat, EventSink};
    use crate::export::filter::Filter;
    use crate::host::cgroups::{Cgroup2Mount, CgroupResolver, ResolverConfig};
    use crate::host::workloads::WorkloadNames;
    use crate::kernel::clock::WallClock;
    use tracer_core::model::{Direction, TcpState};
    use tracer_core::observer::Observer;
    use tracer_core::record::Connection;
    use tracer_core::testkit::tuple;

    /// A directory tree standing in for the cgroup2 hierarchy (the walk reads only directories
    /// and their inode numbers).
    struct Tree(PathBuf);

    impl Tree {
        fn mkdir(&self, rel: &str) -> u64 {
            let dir = self.0.join(rel);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::metadata(&dir).expect("stat").ino()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn closed(sport: u16, cgroup: u64) -> Connection {
        use tracer_core::model::Event;
        use tracer_core::tracker::{Tracker, TrackerConfig};
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        let t = tuple(lo, sport, lo, 80);
        let sock = u64::from(sport);
        let task = tracer_core::testkit::task(9, "client");
        let events = [
            Event::StateChange {
                ts_ns: 1,
                sock,
                netns: 1,
                tuple: t,
                old: TcpState::Close,
                new: TcpState::SynSent,
                task,
            },
            Event::SocketInfo {
                ts_ns: 2,
                sock,
                cgroup,
                cost: None,
            },
            Event::StateChange {
                ts_ns: 3,
                sock,
                netns: 1,
                tuple: t,
                old: TcpState::SynSent,
                new: TcpState::Close,
                task,
            },
        ];
        struct Last(Option<Connection>);
        impl Observer for Last {
            fn closed(&mut self, conn: &Connection) {
                self.0 = Some(conn.clone());
            }
        }
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut last = Last(None);
        for e in &events {
            tracker.on_event(e, &mut last);
        }
        let conn = last.0.expect("closed");
        assert_eq!((conn.cgroup, conn.direction), (cgroup, Direction::Active));
        conn
    }

    fn lines(sink: &EventSink<Vec<u8>>) -> Vec<Value> {
        String::from_utf8_lossy(sink.get_ref())
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect()
    }

    #[test]
    fn records_wait_for_their_name_in_order_and_the_filter_applies() {
        let tree =
            Tree(std::env::temp_dir().join(format!("tracer-sink-wl-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&tree.0);
        let nginx = tree.mkdir("system.slice/nginx.service");
        let mount = Cgroup2Mount {
            mount_point: tree.0.clone(),
            root: "/".into(),
        };
        let config = ResolverConfig {
            rescan_interval: Duration::ZERO,
            ..ResolverConfig::default()
        };
        let names = WorkloadNames::with_resolver(Some(
            CgroupResolver::with_mount(mount, config).expect("walk"),
        ));
        let filter = Filter::parse(&["port=40001,40002,40003"]).expect("filter");
        let mut sink = EventSink::new(EventFormat::Json, Vec::new(), WallClock::with_offset(0))
            .with_workloads(Some(names.clone()), filter);
        // Known: written at once, named.
        sink.closed(&closed(40001, nginx));
        sink.flush().expect("flush");
        let first = lines(&sink);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0]["workload"], "nginx.service");
        assert_eq!(first[0]["cgroup"], nginx);
        // A container started since the last walk: held, and so is what follows it.
        let docker = tree.mkdir(&format!("docker/{}", "ab".repeat(32)));
        sink.closed(&closed(40002, docker));
        sink.closed(&closed(40003, nginx));
        sink.closed(&closed(50000, nginx)); // filtered out
        sink.flush().expect("flush");
        assert_eq!(lines(&sink).len(), 1, "held until the next walk");
        names.refresh();
        sink.flush().expect("flush");
        let all = lines(&sink);
        let got: Vec<(u64, &str)> = all
            .iter()
            .map(|e| {
                (
                    e["sport"].as_u64().unwrap(),
                    e["workload"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (40001, "nginx.service"),
                (40002, "docker/abababababab"),
                (40003, "nginx.service")
            ]
        );
        assert_eq!(all[1]["container_id"], "ab".repeat(32));
        assert_eq!(all[1]["runtime"], "docker");
        assert_eq!(all[1]["workload_kind"], "container");
    }
}
