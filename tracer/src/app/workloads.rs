//! Where workload names fit in the event loop: once a second, on the refresh tick, the cgroup
//! ids looked up since the last tick are resolved (one walk at most, rate limited by the
//! resolver) and the metrics by workload are folded and exported. The event path itself only
//! reads the resolver's cache.
use std::collections::{HashMap, VecDeque};

use crate::export::filter::{Filter, Subject};
use crate::export::metrics::{Metrics, WorkloadLabel};
use crate::host::workloads::WorkloadNames;
use tracer_core::model::{Direction, ResetDirection, RetransmitKind, TcpState, Tuple};
use tracer_core::observer::Observer;
use tracer_core::record::{CloseWaitLeak, Connection, TimeWaitRecord};
use tracer_core::tracker::Tracker;

/// The refresh tick's part: resolve, then export the metrics by workload if enabled.
pub fn refresh(names: &WorkloadNames, tracker: &Tracker, metrics: &Metrics) {
    let mut active: HashMap<u64, usize> = tracker
        .connections_by_cgroup()
        .iter()
        .map(|(&cgroup, &count)| (cgroup, count))
        .collect();
    let tracked = tracker.tracked();
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

/// `--filter` in front of an observer that has none of its own (the diagnosis): passes on only
/// what concerns matching connections. What concerns a connection whose cgroup is not named yet
/// is held until the next walk ([`Filtered::release`], on the refresh tick), so a workload
/// filter sees a new container's first connections too. Retransmits and resets are passed on
/// for tracked connections only (from `retransmit_on` / `reset_on`), and opened connections
/// once their cgroup is known.
pub struct Filtered<O> {
    pub inner: O,
    filter: Filter,
    names: WorkloadNames,
    /// Held callbacks, each with the walk count when held.
    held: VecDeque<(u64, Held)>,
}

/// Callbacks held at most; past it the oldest is decided with what is known.
const MAX_HELD: usize = 65_536;

enum Held {
    Opened(Box<Connection>),
    Closed(Box<Connection>),
    Leak(CloseWaitLeak),
    TimeWait(Box<TimeWaitRecord>),
    DelayedAck(Box<Connection>, Option<u64>, bool),
    Nagle(Box<Connection>, u64),
    Retransmit(Box<Connection>, RetransmitKind, u32),
    Reset(Box<Connection>, ResetDirection, Option<u16>),
}

impl Held {
    fn about(&self) -> (&Tuple, u64) {
        match self {
            Held::Opened(c)
            | Held::Closed(c)
            | Held::DelayedAck(c, ..)
            | Held::Nagle(c, _)
            | Held::Retransmit(c, ..)
            | Held::Reset(c, ..) => (&c.tuple, c.cgroup),
            Held::Leak(l) => (&l.tuple, l.cgroup),
            Held::TimeWait(r) => (&r.tuple, r.cgroup),
        }
    }
}

impl<O: Observer> Filtered<O> {
    pub fn new(inner: O, filter: Filter, names: WorkloadNames) -> Filtered<O> {
        Filtered {
            inner,
            filter,
            names,
            held: VecDeque::new(),
        }
    }

    fn passes(&self, tuple: &Tuple, cgroup: u64) -> bool {
        let named = self.names.cached(cgroup);
        self.filter.matches(&Subject {
            tuple,
            cgroup: named.as_deref(),
        })
    }

    fn offer(&mut self, held: Held) {
        let (_, cgroup) = held.about();
        let wait =
            self.filter.has_workload() && (!self.held.is_empty() || self.names.unresolved(cgroup));
        if !wait {
            return self.decide(held);
        }
        self.held.push_back((self.names.walks(), held));
        if self.held.len() > MAX_HELD
            && let Some((_, oldest)) = self.held.pop_front()
        {
            self.decide(oldest);
        }
    }

    fn decide(&mut self, held: Held) {
        let (tuple, cgroup) = held.about();
        if self.passes(tuple, cgroup) {
            self.dispatch(held);
        }
    }

    fn dispatch(&mut self, held: Held) {
        let inner = &mut self.inner;
        match held {
            Held::Opened(c) => inner.opened(c.direction),
            Held::Closed(c) => inner.closed(&c),
            Held::Leak(l) => inner.close_wait_leak(&l),
            Held::TimeWait(r) => inner.time_wait_exited(&r),
            Held::DelayedAck(c, held_ns, pingpong) => inner.delayed_ack(&c, held_ns, pingpong),
            Held::Nagle(c, lost_ns) => inner.nagle_stall(&c, lost_ns),
            Held::Retransmit(c, kind, segs) => {
                inner.retransmit(&c.tuple, kind, segs);
                inner.retransmit_on(&c, kind, segs);
            }
            Held::Reset(c, direction, reason) => {
                inner.reset(&c.tuple, direction, reason);
                inner.reset_on(&c, direction, reason);
            }
        }
    }

    /// Passes on or drops what was held and can be decided now (a walk ran since, or the name
    /// is known); everything with `all` (at the end of a run, after a last walk).
    pub fn release(&mut self, all: bool) {
        let walks = self.names.walks();
        while let Some((held_at, held)) = self.held.front() {
            let ready = all || walks > *held_at || !self.names.unresolved(held.about().1);
            if !ready {
                break;
            }
            if let Some((_, held)) = self.held.pop_front() {
                self.decide(held);
            }
        }
    }
}

impl<O: Observer> Observer for Filtered<O> {
    fn transition(&mut self, from: TcpState, to: TcpState) {
        self.inner.transition(from, to);
    }
    fn opened(&mut self, direction: Direction) {
        if self.filter.is_empty() {
            self.inner.opened(direction);
        }
    }
    fn cgroup_known(&mut self, conn: &Connection) {
        if self.filter.is_empty() {
            self.inner.cgroup_known(conn);
        } else if conn.opened_ns.is_some() {
            self.offer(Held::Opened(Box::new(conn.clone())));
        }
    }
    fn established(&mut self, conn: &Connection) {
        if self.filter.is_empty() || self.passes(&conn.tuple, conn.cgroup) {
            self.inner.established(conn);
        }
    }
    fn closed(&mut self, conn: &Connection) {
        if self.filter.is_empty() {
            self.inner.closed(conn);
        } else {
            self.offer(Held::Closed(Box::new(conn.clone())));
        }
    }
    fn retransmit(&mut self, tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        if self.filter.is_empty() {
            self.inner.retransmit(tuple, kind, segs);
        }
    }
    fn retransmit_on(&mut self, conn: &Connection, kind: RetransmitKind, segs: u32) {
        if self.filter.is_empty() {
            self.inner.retransmit_on(conn, kind, segs);
        } else {
            self.offer(Held::Retransmit(Box::new(conn.clone()), kind, segs));
        }
    }
    fn reset(&mut self, tuple: &Tuple, direction: ResetDirection, reason: Option<u16>) {
        if self.filter.is_empty() {
            self.inner.reset(tuple, direction, reason);
        }
    }
    fn reset_on(&mut self, conn: &Connection, direction: ResetDirection, reason: Option<u16>) {
        if self.filter.is_empty() {
            self.inner.reset_on(conn, direction, reason);
        } else {
            self.offer(Held::Reset(Box::new(conn.clone()), direction, reason));
        }
    }
    fn evicted(&mut self, conn: &Connection) {
        if self.filter.is_empty() || self.passes(&conn.tuple, conn.cgroup) {
            self.inner.evicted(conn);
        }
    }
    fn time_wait_entered(&mut self, netns: u32, tuple: &Tuple) {
        // Which connection it came from is known only when it ends.
        if self.filter.is_empty() || (!self.filter.has_workload() && self.passes(tuple, 0)) {
            self.inner.time_wait_entered(netns, tuple);
        }
    }
    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        if self.filter.is_empty() {
            self.inner.time_wait_exited(record);
        } else {
            self.offer(Held::TimeWait(Box::new(record.clone())));
        }
    }
    fn delayed_ack(&mut self, conn: &Connection, held_ns: Option<u64>, pingpong: bool) {
        if self.filter.is_empty() {
            self.inner.delayed_ack(conn, held_ns, pingpong);
        } else {
            self.offer(Held::DelayedAck(Box::new(conn.clone()), held_ns, pingpong));
        }
    }
    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        if self.filter.is_empty() {
            self.inner.nagle_stall(conn, lost_ns);
        } else {
            self.offer(Held::Nagle(Box::new(conn.clone()), lost_ns));
        }
    }
    fn nagle_stall_report(&mut self, conn: &Connection) {
        if self.filter.is_empty() || self.passes(&conn.tuple, conn.cgroup) {
            self.inner.nagle_stall_report(conn);
        }
    }
    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        if self.filter.is_empty() {
            self.inner.close_wait_leak(leak);
        } else {
            self.offer(Held::Leak(*leak));
        }
    }
}
