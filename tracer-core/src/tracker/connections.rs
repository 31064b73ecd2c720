//! Rebuilds each connection's lifecycle from kernel events. Pure: no I/O, no clock (time comes
//! from the events), so it is tested with synthetic event sequences.
//!
//! A connection is keyed by its kernel socket address while it lives. Its record starts at the
//! opening transition (CLOSE -> SYN_SENT for `connect()`, LISTEN -> SYN_RECV for an accepted
//! child) and is finished at the transition to CLOSE. Events for sockets that are not in the
//! table (open before the agent started, or evicted) start a partial record, matched by 4-tuple
//! against the sockets seeded from sock_diag.
use std::collections::VecDeque;

mod lifecycle;
mod resync;
pub use resync::{JOURNAL_MAX, Known, ResyncOutcome, Snapshot};

// A fast seeded hash: these tables are touched on every kernel event, and their keys (ports,
// addresses) come from the network, so a per-process random seed keeps them flood-resistant.
use foldhash::{HashMap, HashSet};

use crate::model::{CloseCause, Direction, Event, ResetDirection, SockId, Task, TcpState, Tuple};
use crate::observer::Observer;
use crate::record::{CloseWaitLeak, Connection, MAX_STATES, Seed, StateStamp};
use crate::tracker::time_wait::{TimeWaitConfig, TimeWaitTable};
use crate::tracker::{SockIndex, shrink_map, shrink_queue};
use lifecycle::{close_cause, count_cgroup, finish, owner, process_context};

/// States of a connection's whole life, from its opening state to CLOSE, in the usual case.
const LIFECYCLE_STATES: usize = 6;

#[derive(Clone, Copy, Debug)]
pub struct TrackerConfig {
    /// Live connections kept at most; past it the least recently active one is evicted.
    pub max_connections: usize,
    pub time_wait: TimeWaitConfig,
    /// CLOSE_WAIT for longer than this is reported as a leak.
    pub close_wait_threshold_ns: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            max_connections: 262_144,
            time_wait: TimeWaitConfig::default(),
            close_wait_threshold_ns: 60_000_000_000,
        }
    }
}

/// The connection table.
pub struct Tracker {
    config: TrackerConfig,
    /// Boxed: the table's buckets then hold a pointer, not a whole record, so the empty
    /// quarter of a hash table costs 16 bytes a slot instead of a connection's size.
    conns: HashMap<SockId, Box<Connection>>,
    /// Seeded connections not yet matched to a kernel socket, by (netns, tuple).
    seeds: HashMap<(u32, Tuple), Seed>,
    evictions: u64,
    /// Connections in the order they were queued for eviction: (when, socket). One entry per
    /// insertion, none per event; see [`Tracker::make_room`].
    activity: VecDeque<(u64, SockId)>,
    time_wait: TimeWaitTable,
    /// Live connections by 4-tuple, to find the sender a delayed ACK was holding up.
    by_tuple: SockIndex<Tuple>,
    /// Connections that entered CLOSE_WAIT, in arrival order, checked against the threshold.
    /// Kept apart from the seeds' (a socket's entry is a quarter of the size of a seed's key),
    /// since a burst of closes puts one here per connection.
    close_wait_queue: VecDeque<(u64, SockId)>,
    /// The same for seeds found in CLOSE_WAIT by a dump.
    close_wait_seeds: VecDeque<(u64, (u32, Tuple))>,
    close_wait: usize,
    close_wait_leaked: usize,
    /// Seeded connections in CLOSE_WAIT already reported as leaks.
    leaked_seeds: HashSet<(u32, Tuple)>,
    /// Listening sockets seen opening, with their namespace and port.
    listeners: HashMap<SockId, (u32, u16)>,
    /// While a sock_diag dump is under way: the keys events touched (see `resync`).
    journal: Option<resync::Journal>,
    /// Runs the kernel still keeps for connections a resync closed out (see `resync`).
    dead_runs: resync::DeadRuns,
    /// The most connections the table held since `freed_many` last said so.
    peak: usize,
    /// Live connections by cgroup (0: not known yet), kept as they come, go and learn their
    /// cgroup: the per-workload gauges read it every second, and a walk of every connection
    /// costs a cache miss each.
    by_cgroup: HashMap<u64, usize>,
    /// Connections this host aborted (closed with no FIN and no RST received), held back until
    /// the RST the kernel sends for them, traced just after the CLOSE, names its reason; given
    /// out at the next `tick` (after each ring buffer drain) at the latest.
    aborted: Vec<Connection>,
}

/// How far the table must shrink before the allocator is asked to give the memory back (about
/// 1.2 MiB of records): freed records stay resident otherwise, while the same burst of closes
/// fills the TIME_WAIT table. A give-back took 8 µs to 14 ms during a close of 100 000
/// sockets. Under churn the table does not shrink (each close makes room for the next open),
/// and the records freed are reused at once: nothing to give back.
const FREED_WORTH_TRIMMING: usize = 4_096;

/// Aborted connections held back at most, so that a storm of aborts stays bounded.
const MAX_HELD_ABORTS: usize = 1024;

impl Tracker {
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            conns: HashMap::default(),
            seeds: HashMap::default(),
            evictions: 0,
            activity: VecDeque::new(),
            time_wait: TimeWaitTable::new(config.time_wait),
            by_tuple: SockIndex::new(),
            close_wait_queue: VecDeque::new(),
            close_wait_seeds: VecDeque::new(),
            close_wait: 0,
            close_wait_leaked: 0,
            leaked_seeds: HashSet::default(),
            listeners: HashMap::default(),
            journal: None,
            dead_runs: resync::DeadRuns::default(),
            peak: 0,
            by_cgroup: HashMap::default(),
            aborted: Vec::new(),
        }
    }

    /// Gives out the aborted connections held back for their RST (see `aborted`).
    pub fn flush_closed(&mut self, obs: &mut impl Observer) {
        for conn in self.aborted.drain(..) {
            obs.closed(&conn);
        }
    }

    /// Connections in CLOSE_WAIT now, and those among them past the leak threshold.
    pub fn close_wait(&self) -> (usize, usize) {
        (self.close_wait, self.close_wait_leaked)
    }

    /// Live connections (for reports at the end of a run).
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values().map(|conn| &**conn)
    }

    pub fn time_wait(&self) -> &TimeWaitTable {
        &self.time_wait
    }

    pub fn time_wait_mut(&mut self) -> &mut TimeWaitTable {
        &mut self.time_wait
    }

    /// Whether the table shrank by many connections since the last time it said so: their
    /// memory is worth asking the allocator to return to the system.
    pub fn freed_many(&mut self) -> bool {
        let live = self.conns.len();
        if self.peak < live + FREED_WORTH_TRIMMING {
            return false;
        }
        self.peak = live;
        true
    }

    /// Gives back the memory of tables left sparse by a burst that has closed: a hash table
    /// keeps its peak capacity otherwise. Returns whether anything shrank (worth asking the
    /// allocator to return memory to the system). Cheap when nothing is sparse.
    pub fn shrink(&mut self) -> bool {
        let mut shrank = shrink_map(&mut self.conns);
        shrank |= self.by_tuple.shrink();
        shrank |= shrink_map(&mut self.seeds);
        shrank |= shrink_map(&mut self.listeners);
        self.compact_activity();
        shrank |= shrink_queue(&mut self.activity);
        self.compact_close_wait_queue();
        shrank |= shrink_queue(&mut self.close_wait_queue);
        shrank |= shrink_queue(&mut self.close_wait_seeds);
        shrank | self.time_wait.shrink()
    }

    /// Drops the entries of connections that left CLOSE_WAIT once they outnumber the rest: a
    /// burst of closes passing through CLOSE_WAIT would otherwise hold one each until the
    /// threshold.
    fn compact_close_wait_queue(&mut self) {
        if self.close_wait_queue.len() <= 4 * self.close_wait + 4096 {
            return;
        }
        let conns = &self.conns;
        self.close_wait_queue.retain(|&(since, sock)| {
            conns
                .get(&sock)
                .is_some_and(|conn| conn.close_wait_since == Some(since))
        });
    }

    /// Settles what only the passing of time decides (TIME_WAIT exits), as of `now_ns`
    /// (CLOCK_MONOTONIC, the events' clock).
    pub fn tick(&mut self, now_ns: u64, obs: &mut impl Observer) {
        self.flush_closed(obs);
        self.time_wait.tick(now_ns, obs);
        let threshold = self.config.close_wait_threshold_ns;
        while let Some(&(since, sock)) = self.close_wait_queue.front() {
            if since.saturating_add(threshold) > now_ns {
                break;
            }
            self.close_wait_queue.pop_front();
            let leak = match self.conns.get_mut(&sock) {
                Some(conn) if conn.close_wait_since == Some(since) && !conn.close_wait_leaked => {
                    conn.close_wait_leaked = true;
                    CloseWaitLeak {
                        netns: conn.netns,
                        tuple: conn.tuple,
                        since_ns: since,
                        detected_ns: now_ns,
                        direction: conn.direction,
                        owner: conn.owner,
                        seeded: conn.seeded,
                        cgroup: conn.cgroup,
                    }
                }
                _ => continue,
            };
            self.close_wait_leaked += 1;
            obs.close_wait_leak(&leak);
        }
        while let Some(&(since, key)) = self.close_wait_seeds.front() {
            if since.saturating_add(threshold) > now_ns {
                break;
            }
            self.close_wait_seeds.pop_front();
            let leak = match self.seeds.get(&key) {
                Some(seed) if self.leaked_seeds.insert(key) => CloseWaitLeak {
                    netns: key.0,
                    tuple: key.1,
                    since_ns: since,
                    detected_ns: now_ns,
                    direction: seed.direction,
                    owner: None,
                    seeded: true,
                    cgroup: 0,
                },
                _ => continue,
            };
            self.close_wait_leaked += 1;
            obs.close_wait_leak(&leak);
        }
    }

    /// The last state seen of a tracked socket.
    pub fn state_of(&self, sock: SockId) -> Option<TcpState> {
        self.conns.get(&sock).and_then(|conn| conn.state())
    }

    /// When the tracked connection of `sock` entered its latest state: a state change of that
    /// socket no later than this was handed over already (a socket's changes come in order).
    pub fn last_state_ns(&self, sock: SockId) -> Option<u64> {
        self.conns
            .get(&sock)
            .and_then(|conn| conn.states.last())
            .map(|stamp| stamp.ts_ns)
    }

    /// Tracked connections by cgroup (0: not known yet); seeded ones not seen in an event since
    /// are not among them (see `active`).
    pub fn connections_by_cgroup(&self) -> &HashMap<u64, usize> {
        &self.by_cgroup
    }

    /// Tracked connections (see `active`).
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Connections open right now: tracked ones plus seeded ones not yet seen in an event.
    pub fn active(&self) -> usize {
        self.conns.len() + self.seeds.len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Records the connections that were open when the agent started. Listeners, TIME_WAIT and
    /// request sockets are not connections and are ignored.
    /// `now_ns` stands for the time connections found in CLOSE_WAIT entered it.
    pub fn seed(&mut self, seeds: impl IntoIterator<Item = Seed>, now_ns: u64) {
        for seed in seeds {
            if matches!(
                seed.state,
                TcpState::Listen | TcpState::TimeWait | TcpState::NewSynRecv | TcpState::Close
            ) || !seed.tuple.is_complete()
            {
                continue;
            }
            if self.seeds.len() >= self.config.max_connections {
                self.evictions += 1;
                continue;
            }
            if seed.state == TcpState::CloseWait
                && !self.seeds.contains_key(&(seed.netns, seed.tuple))
            {
                self.close_wait += 1;
                self.close_wait_seeds
                    .push_back((now_ns, (seed.netns, seed.tuple)));
            }
            self.seeds.insert((seed.netns, seed.tuple), seed);
        }
    }

    pub fn on_event(&mut self, event: &Event, obs: &mut impl Observer) {
        if let Some(journal) = &mut self.journal {
            journal.record(event);
        }
        match *event {
            Event::StateChange {
                ts_ns,
                sock,
                netns,
                tuple,
                old,
                new,
                task,
            } => {
                obs.transition(old, new);
                self.on_state(ts_ns, sock, netns, tuple, old, new, task, obs);
            }
            Event::Retransmit {
                ts_ns,
                sock,
                netns,
                tuple,
                state,
                kind,
                segs,
            } => {
                obs.retransmit(&tuple, kind, segs);
                if let Some(conn) = self.lookup(ts_ns, sock, netns, tuple, state, obs) {
                    conn.retransmits = conn.retransmits.saturating_add(segs);
                    let by_kind = &mut conn.retransmit_kinds[kind as usize];
                    *by_kind = by_kind.saturating_add(segs);
                    obs.retransmit_on(conn, kind, segs);
                }
            }
            Event::Reset {
                ts_ns,
                sock,
                netns,
                tuple,
                state,
                direction,
                reason,
                task: _,
            } => {
                obs.reset(&tuple, direction, reason);
                if direction == ResetDirection::Sent
                    && state == TcpState::Close
                    && let Some(at) = self.aborted.iter().position(|c| c.sock == sock)
                {
                    // The RST of an abort: traced after its CLOSE, it completes the record.
                    let mut conn = self.aborted.swap_remove(at);
                    conn.resets_sent += 1;
                    conn.reset_sent_reason = reason;
                    obs.closed(&conn);
                } else if let Some(conn) = self.lookup(ts_ns, sock, netns, tuple, state, obs) {
                    match direction {
                        ResetDirection::Sent => {
                            conn.resets_sent += 1;
                            conn.reset_sent_reason = reason;
                        }
                        ResetDirection::Received => conn.resets_received += 1,
                    }
                    obs.reset_on(conn, direction, reason);
                }
            }
            Event::TimeWait {
                ts_ns,
                tw,
                netns,
                tuple,
                substate,
                timer,
            } => {
                self.time_wait
                    .on_timer(ts_ns, tw, netns, tuple, substate, timer, obs);
            }
            Event::DelayedAck {
                ts_ns,
                sock,
                netns,
                tuple,
                held_ns,
                pingpong,
            } => {
                let state = TcpState::Established;
                if let Some(conn) = self.lookup(ts_ns, sock, netns, tuple, state, obs) {
                    conn.acks.delayed_ack(held_ns);
                    obs.delayed_ack(conn, held_ns, pingpong);
                }
                // The sender this ACK was holding up, when it is on this host.
                let reverse = Tuple {
                    src: tuple.dst,
                    sport: tuple.dport,
                    dst: tuple.src,
                    dport: tuple.sport,
                };
                if let Some(sender) = self.by_tuple.get(&reverse)
                    && let Some(conn) = self.conns.get_mut(&sender)
                    && conn.tuple == reverse
                    && let Some(lost) = conn.acks.peer_delayed_ack(ts_ns, held_ns)
                {
                    obs.nagle_stall(conn, lost);
                    if conn.acks.report_due(ts_ns, false) {
                        obs.nagle_stall_report(conn);
                    }
                }
            }
            Event::SocketInfo {
                ts_ns: _,
                sock,
                cgroup,
                cost,
            } => {
                // Only for a connection already known: this never opens a record.
                if let Some(conn) = self.conns.get_mut(&sock) {
                    if cgroup != 0 && conn.cgroup != cgroup {
                        count_cgroup(&mut self.by_cgroup, conn.cgroup, false);
                        count_cgroup(&mut self.by_cgroup, cgroup, true);
                        conn.cgroup = cgroup;
                        obs.cgroup_known(conn);
                    }
                    if let Some(cost) = cost {
                        conn.cost = Some(Box::new(cost));
                    }
                }
            }
            Event::NagleHeld {
                ts_ns,
                sock,
                netns,
                tuple,
                bytes: _,
                task,
            } => {
                let state = TcpState::Established;
                if let Some(conn) = self.lookup(ts_ns, sock, netns, tuple, state, obs) {
                    conn.acks.held_write(ts_ns, owner(task));
                }
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of one StateChange event"
    )]
    fn on_state(
        &mut self,
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        old: TcpState,
        new: TcpState,
        task: Task,
        obs: &mut impl Observer,
    ) {
        // Listeners are not connections; their children show up with their own socket.
        if (old == TcpState::Close && new == TcpState::Listen)
            || (old == TcpState::Listen && new == TcpState::Close)
        {
            // The kernel releases the port before the CLOSE is traced: remember it by socket.
            if new == TcpState::Listen {
                if self.listeners.len() < self.config.max_connections {
                    self.listeners.insert(sock, (netns, tuple.sport));
                    self.time_wait.listener(netns, tuple.sport, true);
                }
            } else if let Some((netns, port)) = self.listeners.remove(&sock) {
                self.time_wait.listener(netns, port, false);
            }
            return;
        }
        let opening = match (old, new) {
            (TcpState::Close, TcpState::SynSent) => Some(Direction::Active),
            (TcpState::Listen, TcpState::SynRecv) => Some(Direction::Passive),
            _ => None,
        };
        if let Some(direction) = opening {
            if let Some(mut stale) = self.conns.remove(&sock) {
                self.forget(&stale);
                // The socket address was reused and we missed its CLOSE: finish the old record.
                stale.complete = false;
                let last_seen_ns = stale.last_seen_ns;
                finish(&mut stale, last_seen_ns, CloseCause::Unknown);
                obs.closed(&stale);
            }
            self.make_room(obs);
            let mut conn = Connection::new(sock, netns, tuple, direction, ts_ns);
            conn.opened_ns = Some(ts_ns);
            conn.complete = true;
            conn.states.push(StateStamp { state: new, ts_ns });
            if process_context(old, new) {
                conn.owner = Some(owner(task));
            }
            self.insert(conn);
            self.match_tuple_of(sock, obs);
            obs.opened(direction);
            return;
        }

        if !self.touch(ts_ns, sock, netns, tuple, old, obs) {
            return;
        }
        // Borrow only the table, so the counters beside it stay usable.
        let Some(conn) = self.conns.get_mut(&sock) else {
            return;
        };
        if conn.state() != Some(old) {
            // A transition between the last state we saw and this one was lost.
            conn.complete = false;
        }
        if conn.states.len() < MAX_STATES {
            if conn.states.len() == conn.states.inline_size() {
                // Leaving the inline room: a whole lifecycle's states in one allocation
                // rather than two (open, established, two closing states and CLOSE).
                conn.states
                    .reserve_exact(LIFECYCLE_STATES.saturating_sub(conn.states.len()));
            }
            conn.states.push(StateStamp { state: new, ts_ns });
        } else {
            conn.complete = false;
        }
        if process_context(old, new) {
            conn.owner = Some(owner(task));
        }
        if new == TcpState::CloseWait && conn.close_wait_since.is_none() {
            conn.close_wait_since = Some(ts_ns);
            self.close_wait += 1;
            self.close_wait_queue.push_back((ts_ns, sock));
        } else if old == TcpState::CloseWait && conn.close_wait_since.take().is_some() {
            self.close_wait = self.close_wait.saturating_sub(1);
            if std::mem::take(&mut conn.close_wait_leaked) {
                self.close_wait_leaked = self.close_wait_leaked.saturating_sub(1);
            }
        }
        match new {
            TcpState::Established if conn.established_ns.is_none() => {
                conn.established_ns = Some(ts_ns);
            }
            TcpState::FinWait1 if conn.first_fin.is_none() => {
                conn.first_fin = Some(CloseCause::Local);
            }
            TcpState::CloseWait if conn.first_fin.is_none() => {
                conn.first_fin = Some(CloseCause::Remote);
            }
            _ => {}
        }
        let established_now = new == TcpState::Established && old != TcpState::Established;
        if new == TcpState::Close {
            let cause = close_cause(conn, old);
            if let Some(mut conn) = self.conns.remove(&sock) {
                self.forget(&conn);
                finish(&mut conn, ts_ns, cause);
                // The timewait socket that replaces it was created just before this CLOSE.
                conn.time_wait = self.time_wait.adopt(&conn);
                if conn.acks.report_due(ts_ns, true) {
                    obs.nagle_stall_report(&conn);
                }
                if cause == CloseCause::Aborted && conn.resets_sent == 0 {
                    if self.aborted.len() >= MAX_HELD_ABORTS {
                        self.flush_closed(obs);
                    }
                    self.aborted.push(*conn);
                } else {
                    obs.closed(&conn);
                }
            }
        } else if established_now {
            let conn = &*conn;
            obs.established(conn);
        }
    }

    /// The live record of `sock`, creating a partial one (matched against the seeds) when the
    /// agent never saw it open. `state` is the state the socket was in before this event.
    fn lookup(
        &mut self,
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        state: TcpState,
        obs: &mut impl Observer,
    ) -> Option<&mut Connection> {
        if !self.touch(ts_ns, sock, netns, tuple, state, obs) {
            return None;
        }
        self.conns.get_mut(&sock).map(|conn| &mut **conn)
    }

    /// [`Tracker::lookup`] without the reference: whether `sock` is tracked now. One lookup in
    /// the table for a connection already known and indexed, as most events' are.
    fn touch(
        &mut self,
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        state: TcpState,
        obs: &mut impl Observer,
    ) -> bool {
        let unmatched = match self.conns.get_mut(&sock) {
            Some(conn) => {
                conn.last_seen_ns = ts_ns;
                if tuple.is_complete() && conn.tuple != tuple {
                    // The socket's memory was reused for another connection whose opening was
                    // lost: drop the old 4-tuple's index entry, or each reuse would leave one
                    // behind.
                    if conn.tuple_matched {
                        self.by_tuple.remove_if(&conn.tuple, sock);
                    }
                    conn.tuple = tuple;
                    conn.tuple_matched = false;
                }
                !conn.tuple_matched
            }
            None => {
                // Mini sockets (TIME_WAIT, request socks) and listeners are not connections.
                if matches!(
                    state,
                    TcpState::TimeWait | TcpState::NewSynRecv | TcpState::Listen | TcpState::Close
                ) {
                    return false;
                }
                self.make_room(obs);
                let mut conn = Connection::new(sock, netns, tuple, Direction::Unknown, ts_ns);
                conn.states.push(StateStamp { state, ts_ns });
                self.insert(conn);
                true
            }
        };
        if unmatched {
            self.match_tuple_of(sock, obs);
        }
        true
    }

    /// Once a connection's 4-tuple is known: index it, merge it with its sock_diag seed, and
    /// tell the TIME_WAIT table, which counts a 4-tuple taken over from a timewait socket as a
    /// reuse.
    fn match_tuple_of(&mut self, sock: SockId, obs: &mut impl Observer) {
        let Some(conn) = self.conns.get_mut(&sock) else {
            return;
        };
        if conn.tuple_matched || !conn.tuple.is_complete() {
            return;
        }
        conn.tuple_matched = true;
        self.by_tuple.insert(&conn.tuple, sock);
        self.time_wait
            .connection_seen(conn.netns, &conn.tuple, conn.last_seen_ns, obs);
        let key = (conn.netns, conn.tuple);
        // Opened before the agent: adopt what sock_diag knew. A connection we saw open that
        // also appears in the seed dump (it opened between attach and dump) is the same
        // connection; dropping the seed keeps it from being counted twice.
        if let Some(seed) = self.seeds.remove(&key) {
            if conn.opened_ns.is_none() {
                conn.seeded = true;
                conn.direction = seed.direction;
            }
            if seed.state == TcpState::CloseWait {
                // Its CLOSE_WAIT is now followed through the connection's own events.
                self.close_wait = self.close_wait.saturating_sub(1);
                if self.leaked_seeds.remove(&key) {
                    self.close_wait_leaked = self.close_wait_leaked.saturating_sub(1);
                }
            }
        }
    }

    /// Drops the indexes and counts that refer to a connection leaving the table.
    fn forget(&mut self, conn: &Connection) {
        count_cgroup(&mut self.by_cgroup, conn.cgroup, false);
        self.by_tuple.remove_if(&conn.tuple, conn.sock);
        if conn.close_wait_since.is_some() {
            self.close_wait = self.close_wait.saturating_sub(1);
            if conn.close_wait_leaked {
                self.close_wait_leaked = self.close_wait_leaked.saturating_sub(1);
            }
        }
    }

    /// Adds a connection and queues it for eviction. Stale queue entries (closed connections)
    /// are dropped once they outnumber the live ones, so the queue stays within twice the table.
    fn insert(&mut self, mut conn: Connection) {
        conn.queued_ns = conn.last_seen_ns;
        self.activity.push_back((conn.queued_ns, conn.sock));
        count_cgroup(&mut self.by_cgroup, conn.cgroup, true);
        if let Some(replaced) = self.conns.insert(conn.sock, Box::new(conn)) {
            count_cgroup(&mut self.by_cgroup, replaced.cgroup, false);
        }
        self.peak = self.peak.max(self.conns.len());
        self.compact_activity();
    }

    /// Drops the queue entries of closed (or re-queued) connections once they outnumber the
    /// live ones.
    fn compact_activity(&mut self) {
        if self.activity.len() > 2 * self.conns.len() + 1024 {
            let conns = &self.conns;
            self.activity
                .retain(|(queued, sock)| conns.get(sock).is_some_and(|c| c.queued_ns == *queued));
        }
    }

    /// Evicts a least recently active connection when the table is full, in amortised O(1):
    /// the queue's front is the oldest queued; one touched since it was queued goes to the back
    /// (second chance: its touch paid for the move), a stale entry is skipped, and the first
    /// untouched one is evicted. The scan that this replaces ran over the whole table exactly
    /// when the host was busiest.
    fn make_room(&mut self, obs: &mut impl Observer) {
        if self.conns.len() < self.config.max_connections {
            return;
        }
        while let Some((queued, sock)) = self.activity.pop_front() {
            let Some(conn) = self.conns.get_mut(&sock) else {
                continue;
            };
            if conn.queued_ns != queued {
                continue;
            }
            if conn.last_seen_ns > queued {
                conn.queued_ns = conn.last_seen_ns;
                self.activity.push_back((conn.queued_ns, sock));
                continue;
            }
            if let Some(conn) = self.conns.remove(&sock) {
                self.forget(&conn);
                self.evictions += 1;
                obs.evicted(&conn);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TcpState::*;
    use crate::model::{Comm, RetransmitKind};
    use crate::testkit::{Recorder, loopback, state, task};

    const NS: u32 = 4_026_531_840;

    fn run(events: &[Event]) -> (Tracker, Recorder) {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        for e in events {
            tracker.on_event(e, &mut rec);
        }
        tracker.flush_closed(&mut rec);
        (tracker, rec)
    }

    fn path(conn: &Connection) -> Vec<TcpState> {
        conn.states.iter().map(|s| s.state).collect()
    }

    const CLIENT: SockId = 0x1000;
    const SERVER: SockId = 0x2000;

    #[test]
    fn socket_info_names_the_cgroup_and_cost_of_a_known_connection_only() {
        let curl = task(42, "curl");
        let t = loopback(40000, 8080);
        let info = |sock, cgroup, cost| Event::SocketInfo {
            ts_ns: 1_600,
            sock,
            cgroup,
            cost,
        };
        let cost = crate::model::ConnectionCost {
            bytes_sent: 512,
            ..Default::default()
        };
        let (tracker, rec) = run(&[
            // Nothing known of this socket yet: no record is opened for it.
            info(SERVER, 9, None),
            state(1_000, CLIENT, t, Close, SynSent, curl),
            state(1_500, CLIENT, t, SynSent, Established, curl),
            info(CLIENT, 386, None),
            state(9_000, CLIENT, t, Established, FinWait1, curl),
            state(9_100, CLIENT, t, FinWait1, FinWait2, curl),
            info(CLIENT, 0, Some(cost)),
            state(9_200, CLIENT, t, FinWait2, Close, curl),
        ]);
        assert_eq!(tracker.active(), 0);
        assert_eq!(rec.closed.len(), 1, "only the client's record");
        let c = &rec.closed[0];
        assert_eq!(
            c.cgroup, 386,
            "an unknown cgroup (0) does not erase a known one"
        );
        assert_eq!(c.cost.as_deref().map(|c| c.bytes_sent), Some(512));
    }

    #[test]
    fn active_open_and_local_close_gives_one_complete_record() {
        let curl = task(42, "curl");
        let softirq = task(7, "nginx");
        let unbound = loopback(0, 8080);
        let t = loopback(40000, 8080);
        let (tracker, rec) = run(&[
            state(1_000, CLIENT, unbound, Close, SynSent, curl),
            state(1_500, CLIENT, t, SynSent, Established, softirq),
            state(9_000, CLIENT, t, Established, FinWait1, curl),
            state(9_100, CLIENT, t, FinWait1, FinWait2, softirq),
            state(9_200, CLIENT, t, FinWait2, Close, softirq),
        ]);
        assert_eq!(rec.opened, vec![Direction::Active]);
        assert_eq!(rec.closed.len(), 1);
        let c = &rec.closed[0];
        assert_eq!(
            c.tuple, t,
            "the tuple is learnt after connect() binds the port"
        );
        assert_eq!(c.direction, Direction::Active);
        assert_eq!(c.close, Some(CloseCause::Local));
        assert_eq!(
            path(c),
            vec![SynSent, Established, FinWait1, FinWait2, Close]
        );
        assert_eq!(c.duration_ns(), Some(8_200));
        assert_eq!(c.handshake_ns(), Some(500));
        assert_eq!(
            c.owner.map(|o| (o.pid, o.comm)),
            Some((42, Comm::from("curl")))
        );
        assert!(c.complete && !c.seeded);
        assert_eq!(rec.established.len(), 1);
        assert_eq!(rec.transitions.len(), 5);
        assert_eq!(tracker.active(), 0);
    }

    #[test]
    fn passive_open_closed_by_peer_has_owner_only_from_its_own_close() {
        let client = task(42, "curl");
        let server = task(77, "nginx");
        let t = loopback(8080, 40000);
        let (_, rec) = run(&[
            state(1_000, SERVER, loopback(8080, 0), Listen, SynRecv, client),
            state(1_001, SERVER, t, SynRecv, Established, client),
            state(5_000, SERVER, t, Established, CloseWait, client),
            state(5_100, SERVER, t, CloseWait, LastAck, server),
            state(5_200, SERVER, t, LastAck, Close, client),
        ]);
        let c = &rec.closed[0];
        assert_eq!(c.direction, Direction::Passive);
        assert_eq!(c.close, Some(CloseCause::Remote));
        assert_eq!(
            c.owner.map(|o| o.pid),
            Some(77),
            "softirq tasks are never the owner"
        );
        assert_eq!(c.handshake_ns(), None, "passive handshakes are not timed");
        assert_eq!(c.tuple, t);
    }

    #[test]
    fn passive_open_without_own_close_has_unknown_owner() {
        let client = task(42, "curl");
        let t = loopback(8080, 40000);
        let (_, rec) = run(&[
            state(1, SERVER, t, Listen, SynRecv, client),
            state(2, SERVER, t, SynRecv, Established, client),
            state(3, SERVER, t, Established, Close, client),
        ]);
        assert_eq!(rec.closed[0].owner, None);
    }

    #[test]
    fn listeners_are_not_connections() {
        let (tracker, rec) = run(&[
            state(1, SERVER, loopback(8080, 0), Close, Listen, task(1, "srv")),
            state(2, SERVER, loopback(8080, 0), Listen, Close, task(1, "srv")),
        ]);
        assert!(rec.opened.is_empty() && rec.closed.is_empty());
        assert_eq!(rec.transitions.len(), 2, "still counted as transitions");
        assert_eq!(tracker.active(), 0);
    }

    fn reset(ts_ns: u64, sock: SockId, t: Tuple, st: TcpState, dir: ResetDirection) -> Event {
        Event::Reset {
            ts_ns,
            sock,
            netns: NS,
            tuple: t,
            state: st,
            direction: dir,
            reason: None,
            task: task(0, "swapper/0"),
        }
    }

    #[test]
    fn refused_connect_is_syn_sent_then_reset_then_close() {
        let t = loopback(40000, 9);
        let (_, rec) = run(&[
            state(1, CLIENT, loopback(0, 9), Close, SynSent, task(5, "nc")),
            reset(2, CLIENT, t, SynSent, ResetDirection::Received),
            state(3, CLIENT, t, SynSent, Close, task(5, "nc")),
        ]);
        let c = &rec.closed[0];
        assert_eq!(c.close, Some(CloseCause::Refused));
        assert_eq!(c.resets_received, 1);
        assert_eq!(path(c), vec![SynSent, Close]);
        assert_eq!(rec.resets, vec![ResetDirection::Received]);
    }

    #[test]
    fn connect_that_times_out_failed() {
        let (_, rec) = run(&[
            state(1, CLIENT, loopback(0, 9), Close, SynSent, task(5, "nc")),
            state(3, CLIENT, loopback(40000, 9), SynSent, Close, task(5, "nc")),
        ]);
        assert_eq!(rec.closed[0].close, Some(CloseCause::Failed));
    }

    #[test]
    fn reset_on_established_connection() {
        let t = loopback(40000, 80);
        let (_, rec) = run(&[
            state(1, CLIENT, t, Close, SynSent, task(5, "nc")),
            state(2, CLIENT, t, SynSent, Established, task(5, "nc")),
            reset(3, CLIENT, t, Established, ResetDirection::Received),
            state(4, CLIENT, t, Established, Close, task(5, "nc")),
        ]);
        assert_eq!(rec.closed[0].close, Some(CloseCause::ResetReceived));
    }

    #[test]
    fn close_without_fin_or_reset_received_is_a_local_abort() {
        let t = loopback(8080, 40000);
        let (_, rec) = run(&[
            state(1, SERVER, t, Listen, SynRecv, task(1, "a")),
            state(2, SERVER, t, SynRecv, Established, task(1, "a")),
            state(3, SERVER, t, Established, Close, task(9, "srv")),
            // The RST is traced after the CLOSE transition; it must not resurrect the record.
            Event::Reset {
                ts_ns: 4,
                sock: SERVER,
                netns: NS,
                tuple: t,
                state: Close,
                direction: ResetDirection::Sent,
                reason: Some(3),
                task: task(0, "swapper/0"),
            },
        ]);
        assert_eq!(rec.closed.len(), 1);
        assert_eq!(rec.closed[0].close, Some(CloseCause::Aborted));
        assert_eq!(rec.resets, vec![ResetDirection::Sent]);
        // The record waited for its RST, which names the reason.
        assert_eq!(rec.closed[0].resets_sent, 1);
        assert_eq!(rec.closed[0].reset_sent_reason, Some(3));
    }

    #[test]
    fn an_abort_without_a_rst_is_given_out_at_the_next_tick() {
        let t = loopback(8080, 40000);
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        for e in [
            state(1, SERVER, t, Listen, SynRecv, task(1, "a")),
            state(2, SERVER, t, SynRecv, Established, task(1, "a")),
            state(3, SERVER, t, Established, Close, task(9, "srv")),
        ] {
            tracker.on_event(&e, &mut rec);
        }
        assert!(rec.closed.is_empty(), "held for its RST");
        tracker.tick(4, &mut rec);
        assert_eq!(rec.closed.len(), 1);
        assert_eq!(
            (rec.closed[0].resets_sent, rec.closed[0].reset_sent_reason),
            (0, None)
        );
    }

    #[test]
    fn retransmits_are_summed_in_segments() {
        let t = loopback(40000, 80);
        let retx = |ts, segs, kind| Event::Retransmit {
            ts_ns: ts,
            sock: CLIENT,
            netns: NS,
            tuple: t,
            state: Established,
            kind,
            segs,
        };
        let (_, rec) = run(&[
            state(1, CLIENT, t, Close, SynSent, task(5, "nc")),
            state(2, CLIENT, t, SynSent, Established, task(5, "nc")),
            retx(3, 10, RetransmitKind::Fast),
            retx(4, 1, RetransmitKind::Timeout),
            state(5, CLIENT, t, Established, FinWait1, task(5, "nc")),
            state(6, CLIENT, t, FinWait1, Close, task(5, "nc")),
        ]);
        assert_eq!(rec.closed[0].retransmits, 11);
        assert_eq!(
            rec.retransmits,
            vec![(RetransmitKind::Fast, 10), (RetransmitKind::Timeout, 1)]
        );
    }

    #[test]
    fn missing_middle_event_marks_record_incomplete() {
        let t = loopback(40000, 80);
        let (_, rec) = run(&[
            state(1, CLIENT, t, Close, SynSent, task(5, "nc")),
            // SYN_SENT -> ESTABLISHED lost.
            state(5, CLIENT, t, Established, FinWait1, task(5, "nc")),
            state(6, CLIENT, t, FinWait1, Close, task(5, "nc")),
        ]);
        let c = &rec.closed[0];
        assert!(!c.complete);
        assert_eq!(c.close, Some(CloseCause::Local));
        assert_eq!(c.duration_ns(), Some(5));
    }

    #[test]
    fn missing_close_is_finished_when_the_socket_address_is_reused() {
        let (tracker, rec) = run(&[
            state(
                1,
                CLIENT,
                loopback(40000, 80),
                Close,
                SynSent,
                task(5, "nc"),
            ),
            state(
                2,
                CLIENT,
                loopback(40000, 80),
                SynSent,
                Established,
                task(5, "nc"),
            ),
            // CLOSE lost; the same struct sock is reused for a new connection.
            state(9, CLIENT, loopback(0, 81), Close, SynSent, task(5, "nc")),
        ]);
        assert_eq!(rec.closed.len(), 1);
        assert_eq!(rec.closed[0].close, Some(CloseCause::Unknown));
        assert!(!rec.closed[0].complete);
        assert_eq!(tracker.active(), 1);
        assert_eq!(rec.opened.len(), 2);
    }

    #[test]
    fn events_for_a_socket_seen_mid_life_start_a_partial_record() {
        let t = loopback(40000, 80);
        let (_, rec) = run(&[
            state(5, CLIENT, t, Established, FinWait1, task(5, "nc")),
            state(6, CLIENT, t, FinWait1, FinWait2, task(0, "swapper/1")),
            state(7, CLIENT, t, FinWait2, Close, task(0, "swapper/1")),
        ]);
        let c = &rec.closed[0];
        assert_eq!(c.direction, Direction::Unknown);
        assert_eq!(c.opened_ns, None);
        assert_eq!(c.duration_ns(), None);
        assert!(!c.complete && !c.seeded);
        assert_eq!(path(c), vec![Established, FinWait1, FinWait2, Close]);
        assert!(rec.opened.is_empty(), "not opened while we watched");
    }

    #[test]
    fn out_of_order_close_before_open_does_not_invent_a_connection() {
        // A CLOSE for a socket never seen, from a state that is not a connection state.
        let (tracker, rec) = run(&[state(
            1,
            CLIENT,
            loopback(1, 2),
            Listen,
            Close,
            task(1, "x"),
        )]);
        assert!(rec.closed.is_empty());
        assert_eq!(tracker.active(), 0);
    }

    fn seed(t: Tuple, direction: Direction) -> Seed {
        Seed {
            netns: NS,
            tuple: t,
            state: Established,
            direction,
        }
    }

    #[test]
    fn seeded_connection_is_adopted_when_it_closes() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let t = loopback(8080, 40000);
        tracker.seed(
            [
                seed(t, Direction::Passive),
                Seed {
                    state: Listen,
                    ..seed(loopback(8080, 0), Direction::Unknown)
                },
                Seed {
                    state: TimeWait,
                    ..seed(loopback(8080, 40001), Direction::Passive)
                },
            ],
            0,
        );
        assert_eq!(
            tracker.active(),
            1,
            "listeners and TIME_WAIT are not connections"
        );
        let mut rec = Recorder::default();
        for e in [
            state(10, SERVER, t, Established, CloseWait, task(1, "a")),
            state(11, SERVER, t, CloseWait, LastAck, task(3, "srv")),
            state(12, SERVER, t, LastAck, Close, task(1, "a")),
        ] {
            tracker.on_event(&e, &mut rec);
        }
        let c = &rec.closed[0];
        assert!(c.seeded);
        assert_eq!(c.direction, Direction::Passive);
        assert_eq!(c.close, Some(CloseCause::Remote));
        assert_eq!(
            tracker.active(),
            0,
            "the seed was consumed, not counted twice"
        );
    }

    #[test]
    fn connection_opened_between_attach_and_dump_is_not_counted_twice() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let t = loopback(40000, 80);
        let mut rec = Recorder::default();
        // The dump saw it; its opening events were queued before the dump was applied.
        tracker.seed([seed(t, Direction::Active)], 0);
        tracker.on_event(
            &state(1, CLIENT, loopback(0, 80), Close, SynSent, task(5, "nc")),
            &mut rec,
        );
        assert_eq!(
            tracker.active(),
            2,
            "not yet matched: port unknown at SYN_SENT"
        );
        tracker.on_event(
            &state(2, CLIENT, t, SynSent, Established, task(5, "nc")),
            &mut rec,
        );
        assert_eq!(tracker.active(), 1);
        tracker.on_event(
            &state(3, CLIENT, t, Established, FinWait1, task(5, "nc")),
            &mut rec,
        );
        tracker.on_event(
            &state(4, CLIENT, t, FinWait1, Close, task(5, "nc")),
            &mut rec,
        );
        let c = &rec.closed[0];
        assert!(!c.seeded, "we saw it open");
        assert_eq!(c.duration_ns(), Some(3));
        assert_eq!(tracker.active(), 0);
    }

    /// Memory is worth giving back once the table has shrunk by `FREED_WORTH_TRIMMING`, not
    /// under churn, where as many connections open as close.
    #[test]
    fn memory_is_given_back_when_the_table_shrinks_not_under_churn() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        let burst = u16::try_from(2 * FREED_WORTH_TRIMMING).unwrap();
        let open = |tracker: &mut Tracker, rec: &mut Recorder, i: u16| {
            let t = loopback(20000 + i, 80);
            let sock = 0x1000 + u64::from(i);
            tracker.on_event(
                &state(u64::from(i), sock, t, Close, SynSent, task(1, "c")),
                rec,
            );
            (sock, t)
        };
        // Churn: each close is followed by an open; the table never holds more than one.
        for i in 0..burst {
            let (sock, t) = open(&mut tracker, &mut rec, i);
            tracker.on_event(
                &state(u64::from(i) + 1, sock, t, SynSent, Close, task(1, "c")),
                &mut rec,
            );
            assert!(!tracker.freed_many(), "churn at {i}");
        }
        // A burst opens, then closes.
        let opened: Vec<_> = (burst..2 * burst)
            .map(|i| open(&mut tracker, &mut rec, i))
            .collect();
        let mut given_back = 0;
        for (n, (sock, t)) in opened.into_iter().enumerate() {
            tracker.on_event(
                &state(1_000_000, sock, t, SynSent, Close, task(1, "c")),
                &mut rec,
            );
            given_back += usize::from(tracker.freed_many());
            assert!(given_back <= (n + 1) / FREED_WORTH_TRIMMING);
        }
        assert_eq!(given_back, 2, "once per {FREED_WORTH_TRIMMING} closed");
        assert_eq!(tracker.tracked(), 0);
    }

    /// The per-cgroup counts kept as connections come and go equal a count of the table,
    /// through opens, cgroups learnt and changed, closes and evictions.
    #[test]
    fn connections_by_cgroup_follow_the_table() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: 8,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let recount = |tracker: &Tracker| {
            let mut counts: HashMap<u64, usize> = HashMap::default();
            for conn in tracker.connections() {
                *counts.entry(conn.cgroup).or_default() += 1;
            }
            counts
        };
        for i in 0..40u16 {
            let sock = 0x100 + u64::from(i % 12);
            let t = loopback(30000 + i, 80);
            let ts = u64::from(i) * 10;
            tracker.on_event(&state(ts, sock, t, Close, SynSent, task(1, "c")), &mut rec);
            let info = Event::SocketInfo {
                ts_ns: ts + 1,
                sock,
                cgroup: u64::from(i % 3) + 1,
                cost: None,
            };
            tracker.on_event(&info, &mut rec);
            if i % 4 == 0 {
                tracker.on_event(
                    &state(ts + 2, sock, t, SynSent, Close, task(1, "c")),
                    &mut rec,
                );
            }
            assert_eq!(
                *tracker.connections_by_cgroup(),
                recount(&tracker),
                "after {i}"
            );
        }
        assert!(tracker.evictions() > 0, "evictions were part of it");
        assert_eq!(
            tracker.connections_by_cgroup().values().sum::<usize>(),
            tracker.tracked()
        );
    }

    #[test]
    fn table_is_bounded_and_evicts_least_recently_active() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: 2,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        for (i, sock) in [0x10u64, 0x20, 0x30].into_iter().enumerate() {
            let ts = i as u64 * 10;
            tracker.on_event(
                &state(ts, sock, loopback(0, 80), Close, SynSent, task(1, "c")),
                &mut rec,
            );
        }
        assert_eq!(tracker.active(), 2);
        assert_eq!(tracker.evictions(), 1);
        assert_eq!(rec.evicted.len(), 1);
        assert_eq!(rec.evicted[0].sock, 0x10);
    }

    /// A connection active after it was opened is not the one evicted, however many
    /// connections fill the table; and the eviction queue stays bounded as connections close.
    #[test]
    fn eviction_spares_recent_activity_and_its_queue_stays_bounded() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: 100,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let busy = loopback(40000, 80);
        tracker.on_event(&state(0, 0x1, busy, Close, SynSent, task(1, "c")), &mut rec);
        for i in 0..1_000u64 {
            let sock = 0x1000 + i;
            let t = loopback(41000 + i as u16, 80);
            tracker.on_event(
                &state(10 + 3 * i, sock, t, Close, SynSent, task(1, "c")),
                &mut rec,
            );
            // The busy connection keeps talking.
            tracker.on_event(
                &state(11 + 3 * i, 0x1, busy, SynSent, Established, task(1, "c")),
                &mut rec,
            );
        }
        assert_eq!(tracker.active(), 100);
        assert!(
            rec.evicted.iter().all(|c| c.sock != 0x1),
            "the busy one stays"
        );
        assert_eq!(rec.evicted.len(), 901);
        // Evicted in the order they went quiet.
        let order: Vec<u64> = rec.evicted.iter().map(|c| c.sock).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // Churn: open and close far more connections than the table holds.
        for i in 0..10_000u64 {
            let sock = 0x10_0000 + i;
            let t = loopback(50000, 80);
            let ts = 1_000_000 + 2 * i;
            tracker.on_event(&state(ts, sock, t, Close, SynSent, task(1, "c")), &mut rec);
            tracker.on_event(
                &state(ts + 1, sock, t, SynSent, Close, task(1, "c")),
                &mut rec,
            );
        }
        assert!(tracker.activity.len() <= 2 * tracker.active() + 1024 + 1);
    }

    /// After a burst closes, the tables give their memory back.
    #[test]
    fn tables_shrink_after_a_burst_closes() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        for i in 0..20_000u64 {
            let t = loopback(10_000 + (i % 50_000) as u16, 80);
            tracker.on_event(
                &state(i, 0x1_0000 + i, t, Close, SynSent, task(1, "c")),
                &mut rec,
            );
        }
        let peak = tracker.conns.capacity();
        assert!(peak >= 20_000);
        assert!(!tracker.shrink(), "nothing is sparse while the burst lasts");
        for i in 0..20_000u64 {
            let t = loopback(10_000 + (i % 50_000) as u16, 80);
            tracker.on_event(
                &state(30_000 + i, 0x1_0000 + i, t, SynSent, Close, task(1, "c")),
                &mut rec,
            );
        }
        assert_eq!(tracker.active(), 0);
        assert!(tracker.shrink());
        assert!(
            tracker.conns.capacity() < peak / 4,
            "{} of {peak}",
            tracker.conns.capacity()
        );
        assert!(tracker.activity.capacity() < 20_000);
    }

    #[test]
    fn state_list_is_bounded() {
        let t = loopback(40000, 80);
        let mut events = vec![state(0, CLIENT, t, Close, SynSent, task(1, "c"))];
        // A pathological flip-flop: far more transitions than any real lifecycle.
        for i in 0..40u64 {
            let (old, new) = if i % 2 == 0 {
                (SynSent, Established)
            } else {
                (Established, SynSent)
            };
            events.push(state(i + 1, CLIENT, t, old, new, task(1, "c")));
        }
        events.push(state(100, CLIENT, t, SynSent, Close, task(1, "c")));
        let (_, rec) = run(&events);
        assert_eq!(rec.closed[0].states.len(), MAX_STATES);
        assert!(!rec.closed[0].complete);
    }

    const SEC: u64 = 1_000_000_000;

    fn passive_until_close_wait(sock: SockId, t: Tuple, at: u64) -> Vec<Event> {
        vec![
            state(at, sock, t, Listen, SynRecv, task(1, "curl")),
            state(at + 1, sock, t, SynRecv, Established, task(1, "curl")),
            state(at + 2, sock, t, Established, CloseWait, task(1, "curl")),
        ]
    }

    #[test]
    fn close_wait_past_the_threshold_is_a_leak_until_the_app_closes() {
        let mut tracker = Tracker::new(TrackerConfig {
            close_wait_threshold_ns: 5 * SEC,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let t = loopback(8080, 40000);
        for e in passive_until_close_wait(SERVER, t, 0) {
            tracker.on_event(&e, &mut rec);
        }
        assert_eq!(tracker.close_wait(), (1, 0));
        tracker.tick(4 * SEC, &mut rec);
        assert!(rec.leaks.is_empty(), "not yet past the threshold");
        tracker.tick(6 * SEC, &mut rec);
        assert_eq!(rec.leaks.len(), 1);
        assert_eq!(rec.leaks[0].tuple, t);
        assert_eq!(rec.leaks[0].direction, Direction::Passive);
        assert_eq!(tracker.close_wait(), (1, 1));
        tracker.tick(60 * SEC, &mut rec);
        assert_eq!(rec.leaks.len(), 1, "reported once");
        // The application finally closes.
        tracker.on_event(
            &state(61 * SEC, SERVER, t, CloseWait, LastAck, task(9, "srv")),
            &mut rec,
        );
        assert_eq!(tracker.close_wait(), (0, 0));
    }

    #[test]
    fn close_wait_that_ends_in_time_is_not_a_leak() {
        let mut tracker = Tracker::new(TrackerConfig {
            close_wait_threshold_ns: 5 * SEC,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let t = loopback(8080, 40000);
        for e in passive_until_close_wait(SERVER, t, 0) {
            tracker.on_event(&e, &mut rec);
        }
        tracker.on_event(
            &state(SEC, SERVER, t, CloseWait, LastAck, task(9, "srv")),
            &mut rec,
        );
        tracker.on_event(
            &state(SEC + 1, SERVER, t, LastAck, Close, task(0, "x")),
            &mut rec,
        );
        tracker.tick(10 * SEC, &mut rec);
        assert!(rec.leaks.is_empty());
        assert_eq!(tracker.close_wait(), (0, 0));
    }

    /// A burst of closes passing through CLOSE_WAIT leaves no queue behind it (one entry each
    /// until the threshold otherwise), and the one connection still there is still reported.
    #[test]
    fn a_burst_through_close_wait_is_dropped_from_the_queue_but_a_leak_is_kept() {
        let mut tracker = Tracker::new(TrackerConfig {
            close_wait_threshold_ns: 5 * SEC,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let burst: u16 = 20_000;
        for i in 0..=burst {
            let sock = 0x1000 + u64::from(i);
            let t = loopback(8080, 30000 + i);
            for e in passive_until_close_wait(sock, t, u64::from(i) * 10) {
                tracker.on_event(&e, &mut rec);
            }
            if i < burst {
                tracker.on_event(
                    &state(SEC, sock, t, CloseWait, LastAck, task(9, "srv")),
                    &mut rec,
                );
                tracker.on_event(
                    &state(SEC + 1, sock, t, LastAck, Close, task(0, "x")),
                    &mut rec,
                );
            }
        }
        assert_eq!(tracker.close_wait(), (1, 0));
        tracker.shrink();
        assert_eq!(
            tracker.close_wait_queue.len(),
            1,
            "only the one still in CLOSE_WAIT"
        );
        tracker.tick(6 * SEC, &mut rec);
        assert_eq!(rec.leaks.len(), 1);
        assert_eq!(rec.leaks[0].tuple, loopback(8080, 30000 + burst));
    }

    #[test]
    fn seeded_close_wait_counts_from_start_and_leaks() {
        let mut tracker = Tracker::new(TrackerConfig {
            close_wait_threshold_ns: 5 * SEC,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let t = loopback(8080, 40000);
        tracker.seed(
            [Seed {
                state: CloseWait,
                ..seed(t, Direction::Passive)
            }],
            100 * SEC,
        );
        assert_eq!(tracker.close_wait(), (1, 0));
        tracker.tick(106 * SEC, &mut rec);
        assert_eq!(rec.leaks.len(), 1);
        assert!(rec.leaks[0].seeded);
        assert_eq!(tracker.close_wait(), (1, 1));
        // When it finally closes, the seed is claimed and the counts drop.
        tracker.on_event(
            &state(107 * SEC, SERVER, t, CloseWait, LastAck, task(9, "srv")),
            &mut rec,
        );
        assert_eq!(tracker.close_wait(), (0, 0));
    }

    #[test]
    fn held_write_and_peer_delayed_ack_on_this_host_make_a_stall() {
        let ms = 1_000_000;
        let client_t = loopback(40000, 8080);
        let server_t = loopback(8080, 40000);
        let mut events = vec![
            state(0, CLIENT, client_t, Close, SynSent, task(5, "client")),
            state(1, CLIENT, client_t, SynSent, Established, task(0, "x")),
            state(1, SERVER, server_t, Listen, SynRecv, task(0, "x")),
            state(2, SERVER, server_t, SynRecv, Established, task(0, "x")),
        ];
        // The second small write of a round is held by Nagle; the server's delayed ACK,
        // armed just before it, releases it 40 ms later.
        events.push(Event::NagleHeld {
            ts_ns: 10 * ms,
            sock: CLIENT,
            netns: NS,
            tuple: client_t,
            bytes: 10,
            task: task(5, "client"),
        });
        events.push(Event::DelayedAck {
            ts_ns: 50 * ms,
            sock: SERVER,
            netns: NS,
            tuple: server_t,
            held_ns: Some(41 * ms),
            pingpong: false,
        });
        let (_, rec) = run(&events);
        assert_eq!(rec.stalls.len(), 1);
        assert_eq!(rec.stalls[0].1, 40 * ms);
        assert_eq!(rec.stalls[0].0.sock, CLIENT);
        assert_eq!(
            rec.stall_reports.len(),
            1,
            "the first stall is reported at once"
        );
        let writer = rec.stall_reports[0].acks.writer.expect("writer known");
        assert_eq!(
            (writer.pid, writer.comm.as_str().into_owned()),
            (5, "client".to_owned())
        );
    }

    #[test]
    fn delayed_ack_without_held_write_is_no_stall() {
        let server_t = loopback(8080, 40000);
        let (_, rec) = run(&[
            state(1, SERVER, server_t, Listen, SynRecv, task(0, "x")),
            state(2, SERVER, server_t, SynRecv, Established, task(0, "x")),
            Event::DelayedAck {
                ts_ns: 50,
                sock: SERVER,
                netns: NS,
                tuple: server_t,
                held_ns: Some(40),
                pingpong: true,
            },
        ]);
        assert!(rec.stalls.is_empty());
    }

    #[test]
    fn a_reused_socket_with_a_new_tuple_leaves_no_index_entry_behind() {
        let who = task(1, "c");
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        for i in 0..100u16 {
            // The same socket address, a new connection each time, its opening lost.
            let t = loopback(40000 + i, 80);
            tracker.on_event(
                &state(u64::from(i), CLIENT, t, Established, FinWait1, who),
                &mut rec,
            );
        }
        assert_eq!(tracker.active(), 1);
        assert_eq!(
            tracker.by_tuple.len(),
            1,
            "one live connection, one index entry"
        );
    }
}
