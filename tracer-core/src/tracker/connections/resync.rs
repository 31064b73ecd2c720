//! Reconciling the tracker with a sock_diag dump, after kernel events were lost.
//!
//! A lost CLOSE leaves a connection in the table for good, a lost open leaves one out, and the
//! same goes for TIME_WAIT starts and exits: the gauges drift from what `ss` shows. A dump of
//! the kernel's sockets says what is really there, but it is taken on a worker thread, off the
//! event path, so events keep being applied while it runs, and the dump itself is smeared over
//! the time it takes. The merge is kept free of races by an epoch:
//!
//! - `begin_resync`, when the dump is asked for, starts a journal of the (namespace, 4-tuple)
//!   keys that events touch from then on (bounded).
//! - The worker reads CLOCK_MONOTONIC, the events' clock, just before the dump starts
//!   (`Snapshot::started_ns`), after the journal started.
//! - `finish_resync` runs in the event loop after a drain that began once the dump was done, so
//!   that every event of the dump's time has been applied. The dump decides only for what no
//!   event since it started speaks of; otherwise the events are at least as new as the dump
//!   and win (they are already applied, so "replaying" them is leaving them alone):
//!   * a tracked connection absent from the dump whose last event came before the dump started
//!     existed then and is gone now: its CLOSE was lost. It is closed out (cause unknown,
//!     incomplete) and counted as reconciled; so is a seed the dump no longer lists;
//!   * a connection the dump lists, the tracker does not hold, and no event touched is one
//!     whose open was lost: it becomes a seed, as at start-up, within `max_connections`;
//!   * TIME_WAIT sockets likewise (`TimeWaitTable::reconcile`).
//!
//!   A connection closed out this way may still have its run of state changes in the kernel's
//!   tables: the CLOSE that would have sent it reached no program, so the kernel keeps it
//!   until another socket takes the address, and the agent reads it once a second. Such a run
//!   is marked dead ([`Tracker::is_dead_run`]) so that it does not bring the connection back.
//!
//!   For additions any journaled event counts, not only those after `started_ns`: the kernel
//!   traces a CLOSE or a timewait socket's last timer event microseconds before it unhashes the
//!   socket, so a dump that starts in between still lists a socket whose end was already
//!   applied; the journal, started before the dump, holds that end. Removals do not use the
//!   journal but each entry's own last event time: a 4-tuple is reused (one connection after
//!   another from the same port), and a newer socket's events on the key must not keep an
//!   older entry whose end was lost. When the journal overflowed, nothing is added and the
//!   outcome says so, so that the caller resyncs again soon.
use foldhash::{HashMap, HashSet};

use super::{Tracker, finish};
use crate::model::{CloseCause, Event, SockId, TcpState};
use crate::observer::Observer;
use crate::record::Seed;
use crate::tracker::{Key, KeyHashes, Listed};

/// Keys journaled at most while a dump runs (about 64 bytes each).
pub const JOURNAL_MAX: usize = 1 << 16;

/// Keys touched by events since `begin_resync`.
#[derive(Default)]
pub(super) struct Journal {
    touched: HashSet<Key>,
    overflowed: bool,
}

impl Journal {
    pub(super) fn record(&mut self, event: &Event) {
        let key = match *event {
            Event::StateChange { netns, tuple, .. } | Event::TimeWait { netns, tuple, .. } => {
                (netns, tuple)
            }
            _ => return,
        };
        if !key.1.is_complete() || self.touched.contains(&key) {
            return;
        }
        if self.touched.len() < JOURNAL_MAX {
            self.touched.insert(key);
        } else {
            self.overflowed = true;
        }
    }
}

/// Marks kept at most of runs that resyncs closed out (about 24 bytes each).
pub const DEAD_RUNS_MAX: usize = 1 << 16;

/// The connections resyncs closed out whose runs the kernel may still hold: by socket, the
/// time of their last event, and whether the latest table walk still met the run.
#[derive(Default)]
pub(super) struct DeadRuns {
    marks: HashMap<SockId, (u64, bool)>,
}

/// The keys the tables held when a dump was asked for (`Tracker::known_keys`).
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// Tracked and seeded connections: they need no seed.
    pub connections: KeyHashes,
    /// Timewait sockets counted: they need not be listed in full (see `Listed`).
    pub time_wait: KeyHashes,
}

/// What a dump of every reachable namespace listed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC just before the dump started.
    pub started_ns: u64,
    /// Connections: every socket but listeners, request sockets and timewait sockets.
    pub connections: KeyHashes,
    /// The connections the tracker may take up as seeds when it does not hold them: those it
    /// did not know when the dump was asked for (`Tracker::known_keys`), or all of them.
    pub seeds: Vec<Seed>,
    /// Timewait sockets, in either substate.
    pub time_wait: Listed,
    /// Namespaces that exist but the dump could not read (an agent without CAP_SYS_ADMIN
    /// cannot enter them): their entries are left as they are, since the dump says nothing of
    /// them. A namespace missing from the dump otherwise is gone, and its sockets with it.
    pub unread: HashSet<u32>,
}

impl Snapshot {
    /// Whether the dump speaks for `netns`: it read it, or the namespace no longer exists.
    pub fn speaks_for(&self, netns: u32) -> bool {
        !self.unread.contains(&netns)
    }
}

/// What a resync changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResyncOutcome {
    /// Tracked connections closed out because the kernel no longer has them.
    pub closed: usize,
    /// Seeds dropped for the same reason.
    pub seeds_dropped: usize,
    /// Connections taken up as seeds because their open was lost.
    pub added: usize,
    pub time_wait_dropped: usize,
    pub time_wait_added: usize,
    /// `false` when the journal overflowed and nothing was added: resync again soon.
    pub complete: bool,
}

impl ResyncOutcome {
    /// Connections (tracked or seeded) the kernel no longer had.
    pub fn reconciled(&self) -> usize {
        self.closed + self.seeds_dropped
    }
}

impl Tracker {
    /// Starts journaling the keys events touch: call it before asking for the dump.
    pub fn begin_resync(&mut self) {
        self.journal = Some(Journal::default());
    }

    /// The dump asked for will not come (it failed): stops the journal.
    pub fn abandon_resync(&mut self) {
        self.journal = None;
    }

    /// Whether the run the kernel's tables hold for `sock`, whose latest change came at
    /// `latest_ns`, belongs to a connection a resync closed out: then it must not be handed
    /// over again. A run with a later change is a new socket's at the same address, and the
    /// mark goes. Call it for every run of a table walk, then [`Tracker::end_table_walk`].
    pub fn is_dead_run(&mut self, sock: SockId, latest_ns: u64) -> bool {
        if self.dead_runs.marks.is_empty() {
            return false;
        }
        match self.dead_runs.marks.get_mut(&sock) {
            Some((last_ns, seen)) if latest_ns <= *last_ns => {
                *seen = true;
                true
            }
            Some(_) => {
                self.dead_runs.marks.remove(&sock);
                false
            }
            None => false,
        }
    }

    /// After a whole table walk: forgets the dead runs the walk did not meet (the kernel let
    /// them go when another socket took the address).
    pub fn end_table_walk(&mut self) {
        self.dead_runs
            .marks
            .retain(|_, (_, seen)| std::mem::take(seen));
    }

    /// Whether a dump was asked for and not applied yet.
    pub fn resync_pending(&self) -> bool {
        self.journal.is_some()
    }

    /// What the tables hold now, for a dump to leave out what it need not keep whole.
    pub fn known_keys(&self) -> Known {
        let tracked = self.conns.values().map(|conn| (conn.netns, conn.tuple));
        Known {
            connections: KeyHashes::sized(
                self.conns.len() + self.seeds.len(),
                tracked.chain(self.seeds.keys().copied()),
            ),
            time_wait: self.time_wait.known_keys(),
        }
    }

    /// Brings the tables in line with `snapshot` (see the module comment); ends the journal.
    pub fn finish_resync(&mut self, snapshot: &Snapshot, obs: &mut impl Observer) -> ResyncOutcome {
        let journal = self.journal.take().unwrap_or(Journal {
            touched: HashSet::default(),
            overflowed: true,
        });
        let from = snapshot.started_ns;
        let touched = |key: &Key| journal.touched.contains(key);
        let mut outcome = ResyncOutcome {
            complete: !journal.overflowed,
            ..ResyncOutcome::default()
        };

        let gone: Vec<SockId> = self
            .conns
            .values()
            .filter(|c| {
                let key = (c.netns, c.tuple);
                // The kernel holds one socket per 4-tuple: one listed on the key of a connection
                // that a later one of the same namespace took over is that later one.
                let newer = self
                    .by_tuple
                    .get(&c.tuple)
                    .and_then(|sock| self.conns.get(&sock))
                    .is_some_and(|other| {
                        other.sock != c.sock && other.netns == c.netns && other.tuple == c.tuple
                    });
                let listed = snapshot.connections.contains(&key) && !newer;
                c.tuple.is_complete()
                    && c.last_seen_ns < from
                    && !listed
                    && snapshot.speaks_for(c.netns)
            })
            .map(|c| c.sock)
            .collect();
        for sock in gone {
            if let Some(mut conn) = self.conns.remove(&sock) {
                self.forget(&conn);
                conn.complete = false;
                let last_seen_ns = conn.last_seen_ns;
                if self.dead_runs.marks.len() < DEAD_RUNS_MAX {
                    self.dead_runs.marks.insert(sock, (last_seen_ns, true));
                }
                finish(&mut conn, last_seen_ns, CloseCause::Unknown);
                obs.closed(&conn);
                outcome.closed += 1;
            }
        }

        let gone_seeds: Vec<Key> = self
            .seeds
            .keys()
            .filter(|key| !snapshot.connections.contains(key) && snapshot.speaks_for(key.0))
            .copied()
            .collect();
        for key in gone_seeds {
            if let Some(seed) = self.seeds.remove(&key) {
                if seed.state == TcpState::CloseWait {
                    self.close_wait = self.close_wait.saturating_sub(1);
                    if self.leaked_seeds.remove(&key) {
                        self.close_wait_leaked = self.close_wait_leaked.saturating_sub(1);
                    }
                }
                outcome.seeds_dropped += 1;
            }
        }

        if outcome.complete {
            let tracked = KeyHashes::sized(
                self.conns.len(),
                self.conns.values().map(|conn| (conn.netns, conn.tuple)),
            );
            let room = self.config.max_connections.saturating_sub(self.active());
            // A connection still in SYN_SENT is not one yet: the kernel reports it, if ever,
            // when its handshake completes.
            let missing: Vec<Seed> = snapshot
                .seeds
                .iter()
                .filter(|s| {
                    let key = (s.netns, s.tuple);
                    s.state != TcpState::SynSent
                        && !tracked.contains(&key)
                        && !self.seeds.contains_key(&key)
                        && !touched(&key)
                })
                .take(room)
                .copied()
                .collect();
            outcome.added = missing.len();
            self.seed(missing, from);
        }

        let (dropped, added) = self.time_wait.reconcile(
            &snapshot.time_wait,
            from,
            &touched,
            &|netns| snapshot.speaks_for(netns),
            outcome.complete,
        );
        outcome.time_wait_dropped = dropped;
        outcome.time_wait_added = added;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TcpState::*;
    use crate::model::{Direction, Tuple};
    use crate::testkit::{NETNS, Recorder, loopback, state, task};
    use crate::tracker::TrackerConfig;

    fn seed(t: Tuple, state: TcpState) -> Seed {
        Seed {
            netns: NETNS,
            tuple: t,
            state,
            direction: Direction::Active,
        }
    }

    fn snapshot(started_ns: u64, listed: &[(Tuple, TcpState)]) -> Snapshot {
        Snapshot {
            started_ns,
            connections: listed.iter().map(|(t, _)| (NETNS, *t)).collect(),
            seeds: listed.iter().map(|(t, s)| seed(*t, *s)).collect(),
            time_wait: Listed::default(),
            unread: HashSet::default(),
        }
    }

    /// Opens `sock` on `t` at `ts` (the path record the kernel sends when the handshake ends).
    fn open(tracker: &mut Tracker, rec: &mut Recorder, ts: u64, sock: SockId, t: Tuple) {
        let who = task(1, "client");
        tracker.on_event(&state(ts, sock, t, Close, SynSent, who), rec);
        tracker.on_event(&state(ts + 1, sock, t, SynSent, Established, who), rec);
    }

    /// What a dump needs no seed for: every tracked connection and every seed, nothing else.
    #[test]
    fn known_keys_are_the_tracked_connections_and_the_seeds() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        let (tracked, seeded, unknown) = (
            loopback(40000, 80),
            loopback(40001, 80),
            loopback(40002, 80),
        );
        open(&mut tracker, &mut rec, 10, 0xa0, tracked);
        tracker.seed([seed(seeded, Established)], 5);
        let known = tracker.known_keys().connections;
        assert_eq!(known.len(), 2);
        assert!(known.contains(&(NETNS, tracked)));
        assert!(known.contains(&(NETNS, seeded)));
        assert!(!known.contains(&(NETNS, unknown)));
    }

    #[test]
    fn a_connection_whose_close_was_lost_is_closed_out_and_a_lost_open_is_taken_up() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        let (kept, lost_close, opened_during) = (
            loopback(40000, 80),
            loopback(40001, 80),
            loopback(40002, 80),
        );
        let (lost_open, closed_during) = (loopback(40003, 80), loopback(40004, 80));
        open(&mut tracker, &mut rec, 10, 1, kept);
        open(&mut tracker, &mut rec, 10, 2, lost_close);
        open(&mut tracker, &mut rec, 10, 4, closed_during);
        let closed_just_before = loopback(40006, 80);
        open(&mut tracker, &mut rec, 10, 5, closed_just_before);
        tracker.begin_resync();
        let who = task(1, "client");
        // Traced closing just before the dump started, but still hashed when the dump passed
        // (the kernel unhashes a socket after tracing its CLOSE): listed, and not taken up.
        tracker.on_event(
            &state(99, 5, closed_just_before, Established, Close, who),
            &mut rec,
        );
        // The dump starts at 100. While it runs: one connection opens (the dump missed it),
        // one that the dump listed closes.
        open(&mut tracker, &mut rec, 150, 3, opened_during);
        tracker.on_event(
            &state(160, 4, closed_during, Established, Close, who),
            &mut rec,
        );
        assert_eq!(tracker.active(), 3);
        let snap = snapshot(
            100,
            &[
                (kept, Established),
                (lost_open, CloseWait),
                (closed_during, Established),
                (closed_just_before, Established),
                (loopback(40005, 80), SynSent),
            ],
        );
        let outcome = tracker.finish_resync(&snap, &mut rec);
        assert_eq!(
            outcome,
            ResyncOutcome {
                closed: 1,
                added: 1,
                complete: true,
                ..ResyncOutcome::default()
            }
        );
        // kept, opened_during, lost_open (a seed, in CLOSE_WAIT).
        assert_eq!(tracker.active(), 3);
        assert_eq!(tracker.close_wait(), (1, 0));
        let closed = rec
            .closed
            .iter()
            .find(|c| c.tuple == lost_close)
            .expect("closed out");
        assert_eq!(closed.close, Some(CloseCause::Unknown));
        assert!(!closed.complete);
        assert!(!tracker.resync_pending());

        // The next dump no longer lists the seed: dropped, CLOSE_WAIT count with it.
        tracker.begin_resync();
        let snap = snapshot(300, &[(kept, Established), (opened_during, Established)]);
        let outcome = tracker.finish_resync(&snap, &mut rec);
        assert_eq!((outcome.closed, outcome.seeds_dropped), (0, 1));
        assert_eq!(tracker.active(), 2);
        assert_eq!(tracker.close_wait(), (0, 0));
    }

    #[test]
    fn a_namespace_the_dump_could_not_read_keeps_its_connections_and_seeds() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        let (traced, seeded) = (loopback(42000, 80), loopback(42001, 80));
        open(&mut tracker, &mut rec, 10, 1, traced);
        tracker.begin_resync();
        let listed = [(traced, Established), (seeded, CloseWait)];
        let outcome = tracker.finish_resync(&snapshot(20, &listed), &mut rec);
        assert_eq!((outcome.added, tracker.active()), (1, 2));
        // An agent without CAP_SYS_ADMIN cannot enter the namespace: the dump lists nothing
        // there, which says nothing of what it holds.
        tracker.begin_resync();
        let mut unreadable = snapshot(100, &[]);
        unreadable.unread.insert(NETNS);
        let outcome = tracker.finish_resync(&unreadable, &mut rec);
        assert_eq!(outcome.reconciled(), 0);
        assert_eq!(tracker.active(), 2);
        assert_eq!(tracker.close_wait(), (1, 0));
        // Once read (or gone), its empty listing closes both out.
        tracker.begin_resync();
        let outcome = tracker.finish_resync(&snapshot(200, &[]), &mut rec);
        assert_eq!((outcome.closed, outcome.seeds_dropped), (1, 1));
        assert_eq!(tracker.active(), 0);
    }

    #[test]
    fn the_kernel_run_of_a_connection_closed_out_does_not_bring_it_back() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut rec = Recorder::default();
        let (lost_close, other) = (loopback(43000, 80), loopback(43001, 80));
        open(&mut tracker, &mut rec, 10, 1, lost_close);
        open(&mut tracker, &mut rec, 10, 2, other);
        tracker.begin_resync();
        let outcome = tracker.finish_resync(&snapshot(100, &[(other, Established)]), &mut rec);
        assert_eq!(outcome.closed, 1);
        // The kernel still holds socket 1's run (its CLOSE reached no program), up to 11.
        assert!(tracker.is_dead_run(1, 11));
        assert!(!tracker.is_dead_run(2, 11), "never closed out");
        tracker.end_table_walk();
        // Met again by the next walk: still dead, and still marked after that walk.
        assert!(tracker.is_dead_run(1, 11));
        tracker.end_table_walk();
        assert!(tracker.is_dead_run(1, 11));
        // A new socket took the address: its run has later changes, and the mark goes.
        assert!(!tracker.is_dead_run(1, 500));
        assert!(!tracker.is_dead_run(1, 11));
        // A mark the walks no longer meet is forgotten.
        open(&mut tracker, &mut rec, 600, 3, loopback(43002, 80));
        tracker.begin_resync();
        tracker.finish_resync(&snapshot(700, &[(other, Established)]), &mut rec);
        tracker.end_table_walk();
        tracker.end_table_walk();
        assert!(
            !tracker.is_dead_run(3, 601),
            "not met by the last walk: forgotten"
        );
    }

    #[test]
    fn an_overflowed_journal_adds_nothing_and_additions_stay_within_the_table() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: 2,
            ..TrackerConfig::default()
        });
        let mut rec = Recorder::default();
        let listed: Vec<(Tuple, TcpState)> = (0..4)
            .map(|i| (loopback(41000 + i, 80), Established))
            .collect();
        // No `begin_resync`: nothing says what events touched, so nothing is added.
        let outcome = tracker.finish_resync(&snapshot(100, &listed), &mut rec);
        assert!(!outcome.complete);
        assert_eq!(tracker.active(), 0);
        tracker.begin_resync();
        let outcome = tracker.finish_resync(&snapshot(100, &listed), &mut rec);
        assert_eq!((outcome.added, tracker.active()), (2, 2));
        assert_eq!(tracker.evictions(), 0, "a bound, not an eviction");
    }

    #[test]
    fn the_journal_is_bounded() {
        let mut journal = Journal::default();
        let who = task(1, "c");
        for i in 0..=JOURNAL_MAX as u64 {
            let t = loopback(1 + (i % 60000) as u16, 1 + (i / 60000) as u16);
            journal.record(&state(i, i, t, Established, Close, who));
        }
        assert_eq!(journal.touched.len(), JOURNAL_MAX);
        assert!(journal.overflowed);
    }
}
