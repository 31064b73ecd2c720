//! TIME_WAIT accounting from the TIME_WAIT timer's events. Pure: time comes from the events and
//! from `tick`.
//!
//! The state tracepoint never shows TIME_WAIT: the full socket reports FIN_WAIT2 -> CLOSE and a
//! timewait mini socket takes its place. That mini socket's timer is armed once when it is
//! created (`Start`) and detached once on every way out (`Cancel`, including a normal expiry,
//! which `Expire` then follows). A re-arm (the peer's FIN moving a FIN_WAIT2 socket to
//! TIME_WAIT, a retransmitted FIN) detaches and starts the timer again: the kernel program takes
//! that detach back from its exit table and sends nothing, unless the detach already left; then
//! it shows as cancel + `Rearm`, so a cancel is only an exit once no re-arm or expiry of the same
//! timer followed it: it is settled after `settle_ns`.
//!
//! The agent reads exits from a kernel table once a second, so an exit can come after later
//! events: a birth at the address of a socket still counted ends that socket (its memory was
//! handed out again) and sets it aside ("superseded") until the next read of the table brings
//! its own exit, older than that birth, which tells how it ended. A socket from the start-up
//! dump has no address until its first event: its exit older than a birth at its address finds
//! it by its 4-tuple.
//!
//! Every timewait socket is counted, whatever its substate. One born in FIN_WAIT2 (this side's
//! FIN was acknowledged before the peer's FIN arrived) moves to TIME_WAIT when that FIN comes,
//! and the kernel re-arms its timer without any tracepoint when the new expiry falls in the same
//! timer-wheel bucket: waiting for that re-arm undercounts. Both substates hold the local port
//! and the 4-tuple until the timer ends them, and `/proc/net/sockstat`'s `tw` counts both too.
//! The substate is known again at the exit (the cancel reads it), and reported then.
//!
//! An early exit is `Reused` when a connection with the same 4-tuple shows up within
//! `reuse_window_ns` (a new SYN taking over the 4-tuple, or `tcp_tw_reuse` on connect), or came
//! already since the socket's birth (remembered a while for exits read late), and `Killed`
//! otherwise (RST, namespace teardown, `tcp_max_tw_buckets` pressure...).
use foldhash::HashMap;
use std::collections::VecDeque;

use crate::model::{Direction, Owner, SockId, TcpState, TimerPhase, Tuple};
use crate::observer::Observer;
use crate::record::{Connection, PeerKey, TimeWaitExit, TimeWaitRecord};
use crate::tracker::superseded::Superseded;
use crate::tracker::{KeyHashes, Listed, SockIndex, forget_until};

#[derive(Clone, Copy, Debug)]
pub struct TimeWaitConfig {
    /// Timewait sockets tracked at most (the kernel's `tcp_max_tw_buckets` is per namespace).
    pub max_entries: usize,
    /// How long after a cancel a re-arm or expiry may still follow.
    pub settle_ns: u64,
    /// How long after an early exit a connection on the same 4-tuple counts as a reuse.
    pub reuse_window_ns: u64,
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub ephemeral_ports: (u16, u16),
}

impl Default for TimeWaitConfig {
    fn default() -> Self {
        TimeWaitConfig {
            max_entries: 1 << 20,
            settle_ns: 10_000_000,
            // Kills are read from the kernel once a second, and a connection still open is
            // read once a second too: either may come up to about two seconds after the other.
            reuse_window_ns: 3_000_000_000,
            ephemeral_ports: (32768, 60999),
        }
    }
}

struct Entry {
    netns: u32,
    tuple: Tuple,
    /// This host was the client (see `PeerKey`): fixed when it entered, so a later port range
    /// change cannot unbalance the counts.
    client: bool,
    substate: TcpState,
    entered_ns: Option<u64>,
    /// The cancel still waiting for a re-arm or expiry.
    pending_cancel: Option<u64>,
    /// The time of its latest timer event, for a resync: a dump taken before it cannot judge it.
    last_event_ns: u64,
    /// When a connection on its 4-tuple was last seen while it was counted (0: none): a kill
    /// read later is then a reuse (see `report`). Kept here rather than in `recent_opens`, a
    /// table insert per connection under churn, where nearly every connect takes over the
    /// 4-tuple of a timewait socket.
    taken_over_ns: u64,
    direction: Option<Direction>,
    owner: Option<Owner>,
    /// The cgroup of the connection it came from (0: unknown).
    cgroup: u64,
}

impl Entry {
    fn peer(&self) -> PeerKey {
        PeerKey::of(&self.tuple, self.client)
    }

    /// A socket from the start-up dump, first seen in an event at `ts_ns` (its birth unknown).
    fn seeded(
        netns: u32,
        tuple: Tuple,
        peer: PeerKey,
        substate: TcpState,
        ts_ns: u64,
    ) -> Box<Entry> {
        Box::new(Entry {
            netns,
            tuple,
            client: peer.client,
            substate,
            entered_ns: None,
            pending_cancel: None,
            last_event_ns: ts_ns,
            taken_over_ns: 0,
            direction: None,
            owner: None,
            cgroup: 0,
        })
    }
}

/// Live timewait sockets.
pub struct TimeWaitTable {
    config: TimeWaitConfig,
    /// Boxed, as the connection table's records are: a burst that doubles the table then
    /// copies and holds 16 bytes a slot, not a whole entry's 120.
    entries: HashMap<SockId, Box<Entry>>,
    /// (netns, tuple) -> timewait socket, to attach the connection that just closed.
    by_tuple: SockIndex<(u32, Tuple)>,
    /// In TIME_WAIT before the agent started and not yet seen in an event.
    seeded: HashMap<(u32, Tuple), PeerKey>,
    /// Sockets no longer counted because a newer one was born at their address, by (address,
    /// that birth's time, their own birth or 0), waiting for their own exit from the kernel's
    /// table (see `exits_read`). An event at `ts` for address `tw` belongs to the first one
    /// on its 4-tuple superseded after `ts`.
    superseded: Superseded<Entry>,
    /// Cancels in arrival order, settled after `settle_ns`.
    cancels: VecDeque<(u64, SockId)>,
    /// Early exits waiting to learn whether a new connection reuses the 4-tuple.
    early_exits: HashMap<(u32, Tuple), TimeWaitRecord>,
    early_order: VecDeque<(u64, (u32, Tuple))>,
    /// Timewait sockets right now, by peer.
    peers: HashMap<PeerKey, u32>,
    in_time_wait: usize,
    dropped: u64,
    /// Ports with a listener, by namespace: a server on a port inside the ephemeral range is
    /// still the server.
    listening: HashMap<(u32, u16), u32>,
    /// Cancels of timewait sockets not known yet, by socket, with their time: the kernel sends
    /// a birth with the CLOSE of the socket it replaces, so a kill on another CPU in between
    /// can arrive first. A start older than its remembered cancel is a socket already gone.
    early_cancels: HashMap<SockId, u64>,
    early_cancel_order: VecDeque<(u64, SockId)>,
    /// Timewait sockets now by their connection's cgroup, for the cgroups known (not 0).
    cgroups: HashMap<u64, usize>,
    /// Connections seen lately, by a 64-bit hash of namespace and 4-tuple (a quarter of the
    /// memory of the key itself; a collision is one in 2^64), and when they opened (see
    /// `connection_seen`).
    recent_opens: HashMap<u64, u64>,
    recent_order: VecDeque<(u64, u64)>,
    /// Every exit before this time was read from the kernel's table (`exits_read`; the end of
    /// time until then: exits come as events only).
    exits_read_until: u64,
}

/// Connections remembered for a later kill of a timewait socket on their 4-tuple.
const RECENT_OPENS_MAX: usize = 65_536;
/// For a timewait socket seeded at start-up (its birth unknown): how long before its kill the
/// connection that reused its 4-tuple may open (connect() takes SYN_SENT, then picks the port
/// and kills the socket holding it).
const REUSE_BEFORE_NS: u64 = 10_000_000;

/// How long (event time) a cancel of an unknown timewait socket waits for its start.
const EARLY_CANCEL_WINDOW_NS: u64 = 1_000_000_000;
/// The most such cancels remembered at once.
const EARLY_CANCEL_MAX: usize = 4096;

impl TimeWaitTable {
    pub fn new(config: TimeWaitConfig) -> TimeWaitTable {
        TimeWaitTable {
            config,
            entries: HashMap::default(),
            by_tuple: SockIndex::new(),
            seeded: HashMap::default(),
            superseded: Superseded::default(),
            cancels: VecDeque::new(),
            early_exits: HashMap::default(),
            early_order: VecDeque::new(),
            peers: HashMap::default(),
            in_time_wait: 0,
            dropped: 0,
            listening: HashMap::default(),
            early_cancels: HashMap::default(),
            early_cancel_order: VecDeque::new(),
            cgroups: HashMap::default(),
            recent_opens: HashMap::default(),
            recent_order: VecDeque::new(),
            exits_read_until: u64::MAX,
        }
    }

    /// A listener opened (`up`) or closed on `port`.
    pub fn listener(&mut self, netns: u32, port: u16, up: bool) {
        let key = (netns, port);
        if up {
            *self.listening.entry(key).or_insert(0) += 1;
        } else if let Some(count) = self.listening.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.listening.remove(&key);
            }
        }
    }

    pub fn set_ephemeral_ports(&mut self, range: (u16, u16)) {
        self.config.ephemeral_ports = range;
    }

    /// Timewait sockets now, in either substate, summed over network namespaces: what
    /// `/proc/net/sockstat` counts as `tw`, and what `ss` lists as TIME-WAIT plus the FIN-WAIT-2
    /// sockets whose timer is `timewait`.
    pub fn count(&self) -> usize {
        self.in_time_wait
    }

    /// Shrinks tables left sparse by a burst that has ended; see `Tracker::shrink`.
    pub fn shrink(&mut self) -> bool {
        use super::{shrink_map, shrink_queue};
        let mut shrank = shrink_map(&mut self.entries);
        shrank |= self.by_tuple.shrink();
        shrank |= shrink_map(&mut self.seeded);
        shrank |= shrink_map(&mut self.early_exits);
        shrank |= shrink_map(&mut self.peers);
        shrank |= shrink_map(&mut self.early_cancels);
        shrank |= shrink_queue(&mut self.early_cancel_order);
        shrank |= shrink_map(&mut self.cgroups);
        shrank |= shrink_map(&mut self.recent_opens);
        shrank |= shrink_queue(&mut self.recent_order);
        shrank |= shrink_queue(&mut self.cancels);
        shrank |= self.superseded.shrink();
        shrank | shrink_queue(&mut self.early_order)
    }

    /// Timewait sockets now by the cgroup of the connection each came from (0: unknown, those
    /// already there at start-up included); the counts add up to [`TimeWaitTable::count`].
    pub fn by_cgroup(&self) -> HashMap<u64, usize> {
        let mut counts = self.cgroups.clone();
        let known: usize = counts.values().sum();
        let unknown = self.in_time_wait.saturating_sub(known);
        if unknown > 0 {
            counts.insert(0, unknown);
        }
        counts
    }

    /// Timewait sockets not tracked because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sockets in TIME_WAIT by peer, largest first, at most `n`.
    pub fn top_peers(&self, n: usize) -> Vec<(PeerKey, u32)> {
        let mut peers: Vec<(PeerKey, u32)> = self.peers.iter().map(|(k, v)| (*k, *v)).collect();
        peers.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        peers.truncate(n);
        peers
    }

    /// TIME_WAIT sockets that existed before the agent started (from sock_diag).
    pub fn seed(&mut self, sockets: impl IntoIterator<Item = (u32, Tuple)>) {
        for key in sockets {
            if self.seeded.len() + self.entries.len() >= self.config.max_entries {
                self.dropped += 1;
                continue;
            }
            let peer = self.peer_key(key.0, &key.1);
            if self.seeded.insert(key, peer).is_none() {
                self.in_time_wait += 1;
                self.add_peer(peer);
            }
        }
    }

    /// Brings the table in line with a sock_diag dump (`present`) that started at `from_ns`,
    /// while events kept coming (see the tracker's resync): a socket the dump does not list is
    /// dropped (its exit was lost) unless its last timer event came at or after `from_ns` or its
    /// cancel is still settling (a 4-tuple's newer socket must not keep an older entry whose
    /// exit was lost, so `touched` is not asked) or its namespace is one the dump did not `read`;
    /// with `add`, a listed socket the table does not hold and no event touched is added (its
    /// start was lost). Returns (dropped, added).
    pub fn reconcile(
        &mut self,
        present: &Listed,
        from_ns: u64,
        touched: &impl Fn(&(u32, Tuple)) -> bool,
        read: &impl Fn(u32) -> bool,
        add: bool,
    ) -> (usize, usize) {
        let stale: Vec<SockId> = self
            .entries
            .iter()
            .filter(|(tw, e)| {
                let key = (e.netns, e.tuple);
                // The kernel holds one socket per 4-tuple: one listed on the key of an entry that
                // is not the latest of its key is a newer one.
                let listed = present.contains(&key)
                    && self.socket_on(&key).is_some_and(|(on, _)| on == **tw);
                e.pending_cancel.is_none() && e.last_event_ns < from_ns && !listed && read(e.netns)
            })
            .map(|(tw, _)| *tw)
            .collect();
        let mut dropped = 0;
        for tw in stale {
            if self.take_entry(tw).is_some() {
                dropped += 1;
            }
        }
        let gone: Vec<(u32, Tuple)> = self
            .seeded
            .keys()
            .filter(|key| !present.contains(key) && read(key.0))
            .copied()
            .collect();
        for key in gone {
            if self.take_seeded(&key).is_some() {
                dropped += 1;
            }
        }
        let mut added = 0;
        if add {
            let missing: Vec<(u32, Tuple)> = present
                .new_keys()
                .iter()
                .filter(|key| {
                    self.socket_on(key).is_none()
                        && !self.seeded.contains_key(*key)
                        && !touched(key)
                })
                .copied()
                .collect();
            let before = self.in_time_wait;
            self.seed(missing);
            added = self.in_time_wait - before;
        }
        (dropped, added)
    }

    /// The keys of the timewait sockets counted now (see `Listed`).
    pub fn known_keys(&self) -> KeyHashes {
        let counted = self
            .entries
            .values()
            .map(|entry| (entry.netns, entry.tuple));
        KeyHashes::sized(
            self.entries.len() + self.seeded.len(),
            counted.chain(self.seeded.keys().copied()),
        )
    }

    /// Timewait sockets from the start-up dump not seen in any event since.
    pub fn seeded_len(&self) -> usize {
        self.seeded.len()
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the fields of one TimeWait event"
    )]
    pub fn on_timer(
        &mut self,
        ts_ns: u64,
        tw: SockId,
        netns: u32,
        tuple: Tuple,
        substate: TcpState,
        phase: TimerPhase,
        obs: &mut impl Observer,
    ) {
        match phase {
            TimerPhase::Start => self.on_start(ts_ns, tw, netns, tuple, substate, obs),
            TimerPhase::Rearm => {
                if let Some(entry) = self.entries.get_mut(&tw)
                    && (entry.netns, entry.tuple) == (netns, tuple)
                {
                    // The cancel before it, if it came, was no exit.
                    entry.pending_cancel = None;
                    entry.last_event_ns = ts_ns;
                    entry.substate = substate;
                } else {
                    // Its socket is not known (its birth or start-up seed was not seen, or its
                    // detach was read as an exit): from now on it is.
                    self.on_start(ts_ns, tw, netns, tuple, substate, obs);
                }
            }
            TimerPhase::Cancel => self.on_cancel(ts_ns, tw, netns, tuple, substate),
            TimerPhase::Expire => {
                if self.older_than_birth(tw, ts_ns) {
                    if let Some(key) = self.superseded_key(tw, ts_ns, netns, tuple)
                        && let Some(entry) = self.superseded.remove(&key)
                    {
                        self.report(*entry, ts_ns, Some(TimeWaitExit::Expired), obs);
                    }
                } else if self.entries.contains_key(&tw) {
                    self.exit(tw, ts_ns, Some(TimeWaitExit::Expired), obs);
                }
            }
        }
    }

    /// The kernel's exit table was read whole, from `until_ns` back: a socket superseded
    /// before that whose expiry did not come was killed (at its cancel, if that came).
    pub fn exits_read(&mut self, until_ns: u64, obs: &mut impl Observer) {
        self.exits_read_until = until_ns;
        let mut done = std::mem::take(&mut self.superseded);
        done.take_before(until_ns, |key, entry| self.report(*entry, key.1, None, obs));
        self.superseded = done;
    }

    /// The superseded socket an event at `ts_ns` for address `tw` belongs to: the first one
    /// superseded after `ts_ns` on that 4-tuple, or one from the start-up dump, set aside now
    /// (its address, unknown until this event, already serves a newer socket).
    fn superseded_key(
        &mut self,
        tw: SockId,
        ts_ns: u64,
        netns: u32,
        tuple: Tuple,
    ) -> Option<(SockId, u64, u64)> {
        let found = self.superseded.first_after(tw, ts_ns, |entry| {
            (entry.netns, entry.tuple) == (netns, tuple)
        });
        if found.is_some() {
            return found;
        }
        let newer_birth = self.entries.get(&tw).and_then(|entry| entry.entered_ns)?;
        let peer = self.take_seeded(&(netns, tuple))?;
        let key = (tw, newer_birth, 0);
        let entry = Entry::seeded(netns, tuple, peer, TcpState::TimeWait, ts_ns);
        self.superseded.insert(key, entry);
        Some(key)
    }

    /// Whether an event at `ts_ns` for the address `tw` came before the birth of the socket
    /// counted there now: it belongs to an earlier socket at that address, already ended by
    /// this one's birth (exits are read from the kernel's table once a second, births arrive
    /// at once).
    fn older_than_birth(&self, tw: SockId, ts_ns: u64) -> bool {
        self.entries
            .get(&tw)
            .and_then(|entry| entry.entered_ns)
            .is_some_and(|entered| ts_ns < entered)
    }

    fn on_start(
        &mut self,
        ts_ns: u64,
        tw: SockId,
        netns: u32,
        tuple: Tuple,
        substate: TcpState,
        obs: &mut impl Observer,
    ) {
        if let Some(entry) = self.take_entry(tw) {
            // A birth at the address of a timewait socket still counted: that one is gone, its
            // memory handed out again. Its exit, read from the kernel's table once a second,
            // comes later and says how it ended.
            if self.superseded.len() < self.config.max_entries {
                let key = (tw, ts_ns, entry.entered_ns.unwrap_or(0));
                if let Some(earlier) = self.superseded.insert(key, entry) {
                    self.report(*earlier, ts_ns, None, obs);
                }
            } else {
                self.report(*entry, ts_ns, None, obs);
            }
        }
        let key = (netns, tuple);
        // Dumped at start-up and also seen starting: the same socket, counted once.
        let seeded = self.take_seeded(&key);
        if self.seeded.len() + self.entries.len() >= self.config.max_entries {
            self.dropped += 1;
            return;
        }
        // Its cancel already came (a kill on another CPU overtook this birth): it enters and
        // leaves at once, as it did in the kernel.
        let gone_at = self
            .early_cancels
            .remove(&tw)
            .filter(|&cancel_ns| cancel_ns >= ts_ns);
        let peer = self.peer_key(netns, &tuple);
        self.entries.insert(
            tw,
            Box::new(Entry {
                netns,
                tuple,
                client: peer.client,
                substate,
                entered_ns: Some(ts_ns),
                pending_cancel: None,
                last_event_ns: ts_ns,
                taken_over_ns: 0,
                direction: None,
                owner: None,
                cgroup: 0,
            }),
        );
        self.by_tuple.insert(&key, tw);
        self.in_time_wait += 1;
        self.add_peer(peer);
        if seeded.is_none() {
            obs.time_wait_entered(netns, &tuple);
        }
        if let Some(cancel_ns) = gone_at {
            self.on_cancel(cancel_ns, tw, netns, tuple, substate);
        }
    }

    fn on_cancel(&mut self, ts_ns: u64, tw: SockId, netns: u32, tuple: Tuple, substate: TcpState) {
        if self.older_than_birth(tw, ts_ns) {
            if let Some(key) = self.superseded_key(tw, ts_ns, netns, tuple)
                && let Some(entry) = self.superseded.get_mut(&key)
            {
                entry.pending_cancel = Some(ts_ns);
                entry.last_event_ns = ts_ns;
                entry.substate = substate;
            }
            return;
        }
        if !self.entries.contains_key(&tw) {
            // A socket that was in TIME_WAIT before we started is leaving: track it from now.
            let key = (netns, tuple);
            let Some(peer) = self.seeded.remove(&key) else {
                if self.early_cancels.len() < EARLY_CANCEL_MAX {
                    self.early_cancels.insert(tw, ts_ns);
                    self.early_cancel_order.push_back((ts_ns, tw));
                }
                return;
            };
            let entry = Entry::seeded(netns, tuple, peer, substate, ts_ns);
            self.entries.insert(tw, entry);
            self.by_tuple.insert(&key, tw);
        }
        if let Some(entry) = self.entries.get_mut(&tw) {
            entry.pending_cancel = Some(ts_ns);
            entry.last_event_ns = ts_ns;
            entry.substate = substate;
            self.cancels.push_back((ts_ns, tw));
        }
    }

    /// Attaches a connection that just reached CLOSE to the timewait socket that replaced it.
    /// Returns whether it went into TIME_WAIT (or FIN_WAIT2 as a timewait socket).
    pub fn adopt(&mut self, conn: &Connection) -> bool {
        let Some((tw, _)) = self.socket_on(&(conn.netns, conn.tuple)) else {
            return false;
        };
        let Some(entry) = self.entries.get_mut(&tw) else {
            return false;
        };
        if entry.pending_cancel.is_some() || entry.direction.is_some() {
            return false;
        }
        entry.direction = Some(conn.direction);
        entry.owner = conn.owner;
        if entry.cgroup == 0 && conn.cgroup != 0 {
            entry.cgroup = conn.cgroup;
            *self.cgroups.entry(conn.cgroup).or_default() += 1;
        }
        // The connection's direction says the role better than the port guess made at the
        // start (the listener may have closed before its last connection did).
        let client = match conn.direction {
            Direction::Active => true,
            Direction::Passive => false,
            Direction::Unknown => return true,
        };
        if entry.client != client {
            let old = entry.peer();
            entry.client = client;
            let peer = entry.peer();
            self.remove_peer(old);
            self.add_peer(peer);
        }
        true
    }

    /// A connection with a complete 4-tuple appeared: if a timewait socket on that 4-tuple just
    /// ended early, it was reused. On loopback the new connection shows up microseconds after
    /// the timewait socket's cancel, before that cancel settles: end it right away.
    pub fn connection_seen(
        &mut self,
        netns: u32,
        tuple: &Tuple,
        ts_ns: u64,
        obs: &mut impl Observer,
    ) {
        // Kills are read from the kernel's table once a second, so the connection that took a
        // 4-tuple over often arrives first: the socket it took over remembers it, and one not
        // known yet (or from the start-up dump) is remembered by its 4-tuple for a while.
        if let Some((tw, entry)) = self.socket_on_mut(&(netns, *tuple)) {
            if entry.pending_cancel.is_some() {
                self.exit(tw, 0, Some(TimeWaitExit::Reused), obs);
                return;
            }
            entry.taken_over_ns = entry.taken_over_ns.max(ts_ns);
        } else {
            // Bounded by the order kept (one entry per sighting), hence the map too.
            if self.recent_order.len() >= RECENT_OPENS_MAX
                && let Some(&(oldest, _)) = self.recent_order.front()
            {
                forget_until(&mut self.recent_order, &mut self.recent_opens, oldest + 1);
            }
            let key = super::key_hash(netns, tuple);
            self.recent_opens.insert(key, ts_ns);
            self.recent_order.push_back((ts_ns, key));
        }
        if let Some(mut record) = self.early_exits.remove(&(netns, *tuple)) {
            record.exit = TimeWaitExit::Reused;
            obs.time_wait_exited(&record);
        }
    }

    /// Settles cancels that no re-arm or expiry followed, and early exits that no reuse
    /// followed, as of `now_ns`.
    pub fn tick(&mut self, now_ns: u64, obs: &mut impl Observer) {
        let before = now_ns.saturating_sub(EARLY_CANCEL_WINDOW_NS);
        forget_until(
            &mut self.early_cancel_order,
            &mut self.early_cancels,
            before,
        );
        while let Some(&(ts, tw)) = self.cancels.front() {
            if ts.saturating_add(self.config.settle_ns) > now_ns {
                break;
            }
            self.cancels.pop_front();
            let still_pending = self
                .entries
                .get(&tw)
                .is_some_and(|e| e.pending_cancel == Some(ts));
            if still_pending {
                self.exit(tw, ts, None, obs);
            }
        }
        while let Some(&(ts, key)) = self.early_order.front() {
            if ts.saturating_add(self.config.reuse_window_ns) > now_ns {
                break;
            }
            self.early_order.pop_front();
            if let Some(record) = self.early_exits.remove(&key) {
                obs.time_wait_exited(&record);
            }
        }
        // A connection is remembered until the exits of its time were read and settled (just
        // above): when the agent falls behind (its output blocked), a kill read late still
        // finds the connection that took its 4-tuple over.
        let read_until = now_ns.min(self.exits_read_until);
        let before = read_until.saturating_sub(self.config.reuse_window_ns);
        forget_until(&mut self.recent_order, &mut self.recent_opens, before);
    }

    /// Removes `tw`. `exit` is known for expiries; early exits wait for a possible reuse.
    fn exit(
        &mut self,
        tw: SockId,
        ts_ns: u64,
        exit: Option<TimeWaitExit>,
        obs: &mut impl Observer,
    ) {
        if let Some(entry) = self.take_entry(tw) {
            self.report(*entry, ts_ns, exit, obs);
        }
    }

    /// Removes a socket of the start-up dump from the table and from the counts.
    fn take_seeded(&mut self, key: &(u32, Tuple)) -> Option<PeerKey> {
        let peer = self.seeded.remove(key)?;
        self.in_time_wait = self.in_time_wait.saturating_sub(1);
        self.remove_peer(peer);
        Some(peer)
    }

    /// The timewait socket counted on `key` (namespace and 4-tuple), if any, with its entry.
    fn socket_on(&self, key: &(u32, Tuple)) -> Option<(SockId, &Entry)> {
        let tw = self.by_tuple.get(key)?;
        let entry = self.entries.get(&tw)?;
        ((entry.netns, entry.tuple) == *key).then_some((tw, &**entry))
    }

    /// [`TimeWaitTable::socket_on`], to change the entry.
    fn socket_on_mut(&mut self, key: &(u32, Tuple)) -> Option<(SockId, &mut Entry)> {
        let tw = self.by_tuple.get(key)?;
        let entry = self.entries.get_mut(&tw)?;
        ((entry.netns, entry.tuple) == *key).then_some((tw, &mut **entry))
    }

    /// Removes `tw` from the table and from the counts.
    fn take_entry(&mut self, tw: SockId) -> Option<Box<Entry>> {
        let entry = self.entries.remove(&tw)?;
        let key = (entry.netns, entry.tuple);
        self.by_tuple.remove_if(&key, tw);
        self.in_time_wait = self.in_time_wait.saturating_sub(1);
        self.remove_peer(entry.peer());
        self.forget_cgroup(entry.cgroup);
        Some(entry)
    }

    /// Reports the exit of a socket no longer counted (see `exit`).
    fn report(
        &mut self,
        entry: Entry,
        ts_ns: u64,
        exit: Option<TimeWaitExit>,
        obs: &mut impl Observer,
    ) {
        let key = (entry.netns, entry.tuple);
        let record = TimeWaitRecord {
            netns: entry.netns,
            tuple: entry.tuple,
            entered_ns: entry.entered_ns,
            exited_ns: entry.pending_cancel.unwrap_or(ts_ns),
            exit: exit.unwrap_or(TimeWaitExit::Killed),
            substate: entry.substate,
            direction: entry.direction,
            owner: entry.owner,
            cgroup: entry.cgroup,
        };
        // A connection on the same 4-tuple that opened after this socket was born and already
        // arrived took the 4-tuple over: a reuse. (A connect() reusing the port opens just
        // before it kills the timewait socket, a SYN taking it over just after; an exit time
        // taken from the next birth at this address is later than the kill.)
        let opened_since = record
            .entered_ns
            .unwrap_or(record.exited_ns.saturating_sub(REUSE_BEFORE_NS));
        let took_over = |opened: u64| {
            opened >= opened_since
                && opened <= record.exited_ns.saturating_add(self.config.reuse_window_ns)
        };
        let reused_by_earlier = exit.is_none()
            && ((entry.taken_over_ns != 0 && took_over(entry.taken_over_ns))
                || self
                    .recent_opens
                    .get(&super::key_hash(key.0, &key.1))
                    .is_some_and(|&opened| took_over(opened)));
        let exit = if reused_by_earlier {
            Some(TimeWaitExit::Reused)
        } else {
            exit
        };
        let record = TimeWaitRecord {
            exit: exit.unwrap_or(TimeWaitExit::Killed),
            ..record
        };
        match exit {
            Some(_) => obs.time_wait_exited(&record),
            None => {
                self.early_order.push_back((record.exited_ns, key));
                if let Some(previous) = self.early_exits.insert(key, record) {
                    obs.time_wait_exited(&previous);
                }
            }
        }
    }

    fn peer_key(&self, netns: u32, tuple: &Tuple) -> PeerKey {
        let (low, high) = self.config.ephemeral_ports;
        let client = (low..=high).contains(&tuple.sport)
            && !self.listening.contains_key(&(netns, tuple.sport));
        PeerKey::of(tuple, client)
    }

    /// One timewait socket of `cgroup` fewer (0: none known).
    fn forget_cgroup(&mut self, cgroup: u64) {
        if cgroup != 0
            && let Some(count) = self.cgroups.get_mut(&cgroup)
        {
            *count -= 1;
            if *count == 0 {
                self.cgroups.remove(&cgroup);
            }
        }
    }

    fn add_peer(&mut self, key: PeerKey) {
        *self.peers.entry(key).or_insert(0) += 1;
    }

    fn remove_peer(&mut self, key: PeerKey) {
        if let Some(count) = self.peers.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.peers.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::TcpState::*;
    use crate::testkit::Recorder;

    const NS: u32 = 4_026_531_840;
    const MS: u64 = 1_000_000;

    fn tuple(sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport,
            dst: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dport,
        }
    }

    /// A timer event of the socket at `TW` in `NS`, in TIME_WAIT.
    fn at_tw(t: &mut TimeWaitTable, rec: &mut Recorder, ts: u64, tp: Tuple, phase: TimerPhase) {
        t.on_timer(ts, TW, NS, tp, TimeWait, phase, rec);
    }

    fn table() -> TimeWaitTable {
        TimeWaitTable::new(TimeWaitConfig::default())
    }

    const TW: SockId = 0xaa00;

    #[test]
    fn expiry_is_cancel_then_expire_and_counts_down() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(40000, 80);
        t.on_timer(0, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        assert_eq!((t.count(), rec.time_wait_entered.len()), (1, 1));
        at_tw(&mut t, &mut rec, 60_000 * MS, tp, TimerPhase::Cancel);
        assert_eq!(t.count(), 1, "a cancel is not an exit until it settles");
        at_tw(&mut t, &mut rec, 60_000 * MS + 1, tp, TimerPhase::Expire);
        assert_eq!(t.count(), 0);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Expired);
        assert_eq!(rec.time_wait_exited[0].duration_ns(), Some(60_000 * MS));
    }

    /// The common close: this side's FIN is acknowledged before the peer's FIN arrives, so the
    /// timewait socket is born in FIN_WAIT2 and moves to TIME_WAIT with no timer event at all
    /// (the kernel only updates the expiry). It is counted from its birth, once.
    #[test]
    fn born_in_fin_wait2_counts_at_once_and_leaves_as_time_wait() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(40000, 80);
        t.on_timer(0, TW, NS, tp, FinWait2, TimerPhase::Start, &mut rec);
        assert_eq!((t.count(), rec.time_wait_entered.len()), (1, 1));
        assert_eq!(t.top_peers(1)[0].1, 1, "it holds its port toward the peer");
        t.tick(100 * MS, &mut rec);
        assert_eq!(t.count(), 1);
        // The silent move to TIME_WAIT shows only in the substate read at the exit.
        for phase in [TimerPhase::Cancel, TimerPhase::Expire] {
            t.on_timer(60_000 * MS, TW, NS, tp, TimeWait, phase, &mut rec);
        }
        assert_eq!(t.count(), 0);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].substate, TimeWait);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Expired);
        assert_eq!(rec.time_wait_exited[0].duration_ns(), Some(60_000 * MS));
    }

    /// Where the re-arm does show (the new expiry lands in another wheel bucket), cancel + start
    /// nets to nothing.
    #[test]
    fn a_visible_rearm_is_neither_an_exit_nor_an_entry() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(40000, 80);
        t.on_timer(0, TW, NS, tp, FinWait2, TimerPhase::Start, &mut rec);
        t.on_timer(5 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(5 * MS, TW, NS, tp, TimeWait, TimerPhase::Rearm, &mut rec);
        t.tick(100 * MS, &mut rec);
        t.on_timer(6 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(6 * MS, TW, NS, tp, TimeWait, TimerPhase::Rearm, &mut rec);
        t.tick(200 * MS, &mut rec);
        assert_eq!(
            (
                t.count(),
                rec.time_wait_entered.len(),
                rec.time_wait_exited.len()
            ),
            (1, 1, 0)
        );
    }

    /// A peer that never sends its FIN: the socket stays in FIN_WAIT2 until its timer ends it,
    /// holding the port all along, and says so when it leaves.
    #[test]
    fn orphaned_fin_wait2_counts_until_it_times_out() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(40000, 80);
        t.on_timer(0, TW, NS, tp, FinWait2, TimerPhase::Start, &mut rec);
        assert_eq!(t.count(), 1);
        t.on_timer(60 * MS, TW, NS, tp, FinWait2, TimerPhase::Cancel, &mut rec);
        t.on_timer(60 * MS, TW, NS, tp, FinWait2, TimerPhase::Expire, &mut rec);
        assert_eq!(t.count(), 0);
        assert_eq!(rec.time_wait_entered.len(), 1);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(
            (
                rec.time_wait_exited[0].substate,
                rec.time_wait_exited[0].exit
            ),
            (FinWait2, TimeWaitExit::Expired)
        );
    }

    #[test]
    fn early_exit_without_reuse_is_killed_after_the_window() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(40000, 80);
        t.on_timer(0, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        t.on_timer(10 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.tick(30 * MS, &mut rec);
        assert_eq!(t.count(), 0, "gone once the cancel settled");
        assert!(
            rec.time_wait_exited.is_empty(),
            "reason waits for a possible reuse"
        );
        t.tick(2_000 * MS, &mut rec);
        assert!(
            rec.time_wait_exited.is_empty(),
            "a reusing connection may be read from the kernel up to seconds later"
        );
        t.tick(3_100 * MS, &mut rec);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Killed);
        assert_eq!(
            rec.time_wait_exited[0].exited_ns,
            10 * MS,
            "exit time is the cancel"
        );
    }

    #[test]
    fn early_exit_followed_by_same_tuple_is_reused() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        t.on_timer(0, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        t.on_timer(10 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.tick(30 * MS, &mut rec);
        t.connection_seen(NS, &tp, 40 * MS, &mut rec);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Reused);
        t.tick(5_000 * MS, &mut rec);
        assert_eq!(rec.time_wait_exited.len(), 1, "reported once");
    }

    #[test]
    fn takeover_before_the_cancel_settles_is_reused_and_a_new_stay_is_new() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        t.on_timer(0, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        // A SYN takes the 4-tuple over: cancel, then the new connection, within microseconds.
        t.on_timer(100 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.connection_seen(NS, &tp, 100 * MS + 1, &mut rec);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Reused);
        assert_eq!(rec.time_wait_exited[0].exited_ns, 100 * MS);
        assert_eq!(t.count(), 0);
        // That connection closes first too: a second stay, possibly at the same address.
        t.on_timer(200 * MS, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        assert_eq!((t.count(), rec.time_wait_entered.len()), (1, 2));
        t.tick(1_000 * MS, &mut rec);
        assert_eq!(rec.time_wait_exited.len(), 1, "the second stay is still on");
    }

    #[test]
    fn seeded_sockets_count_once_and_leave_through_their_timer() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let (a, b) = (tuple(40000, 80), tuple(40001, 80));
        t.seed([(NS, a), (NS, b)]);
        assert_eq!(t.count(), 2);
        // `a` also started after attach but before the dump: the same socket.
        t.on_timer(1, TW, NS, a, TimeWait, TimerPhase::Start, &mut rec);
        assert_eq!(t.count(), 2);
        assert!(
            rec.time_wait_entered.is_empty(),
            "it entered before the agent could see it"
        );
        // `b` expires: its timewait socket was never seen starting.
        t.on_timer(9, 0xbb00, NS, b, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(9, 0xbb00, NS, b, TimeWait, TimerPhase::Expire, &mut rec);
        assert_eq!(t.count(), 1);
        assert_eq!(rec.time_wait_exited[0].entered_ns, None);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Expired);
    }

    #[test]
    fn address_reuse_after_an_unsettled_cancel_is_a_new_socket() {
        let (mut t, mut rec) = (table(), Recorder::default());
        at_tw(&mut t, &mut rec, 0, tuple(40000, 80), TimerPhase::Start);
        at_tw(&mut t, &mut rec, 1, tuple(40000, 80), TimerPhase::Cancel);
        at_tw(&mut t, &mut rec, 2, tuple(40001, 80), TimerPhase::Start);
        assert_eq!(t.count(), 1);
        assert_eq!(rec.time_wait_entered.len(), 2);
    }

    #[test]
    fn peers_are_grouped_by_service_port_and_role() {
        let (mut t, mut rec) = (table(), Recorder::default());
        for i in 0..5u16 {
            // This host as a client of 10.0.0.2:80.
            t.on_timer(
                0,
                0x100 + u64::from(i),
                NS,
                tuple(40000 + i, 80),
                TimeWait,
                TimerPhase::Start,
                &mut rec,
            );
        }
        for i in 0..2u16 {
            // This host as the server on port 8080 (the local port is not ephemeral).
            t.on_timer(
                0,
                0x200 + u64::from(i),
                NS,
                tuple(8080, 50000 + i),
                TimeWait,
                TimerPhase::Start,
                &mut rec,
            );
        }
        let top = t.top_peers(10);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0.port, top[0].0.client, top[0].1), (80, true, 5));
        assert_eq!((top[1].0.port, top[1].0.client, top[1].1), (8080, false, 2));
        assert_eq!(t.top_peers(1).len(), 1, "bounded by n");
    }

    #[test]
    fn server_on_an_ephemeral_port_is_still_the_server() {
        let (mut t, mut rec) = (table(), Recorder::default());
        t.listener(NS, 40000, true);
        at_tw(&mut t, &mut rec, 0, tuple(40000, 50000), TimerPhase::Start);
        let top = t.top_peers(1);
        assert_eq!((top[0].0.port, top[0].0.client), (40000, false));
    }

    #[test]
    fn reconcile_follows_the_dump_except_where_events_are_newer() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let start = |t: &mut TimeWaitTable, rec: &mut Recorder, ts, tw, port| {
            t.on_timer(
                ts,
                tw,
                NS,
                tuple(port, 80),
                TimeWait,
                TimerPhase::Start,
                rec,
            );
        };
        // Before the dump started (at 100): 40000's exit was lost; 40001 is still there.
        start(&mut t, &mut rec, 0, TW, 40000);
        start(&mut t, &mut rec, 0, TW + 1, 40001);
        // While it ran: 40003 started (the dump missed it); 40004 was dumped, then left, and
        // its cancel has settled.
        start(&mut t, &mut rec, 150, TW + 3, 40003);
        start(&mut t, &mut rec, 90, TW + 4, 40004);
        t.on_timer(
            160,
            TW + 4,
            NS,
            tuple(40004, 80),
            TimeWait,
            TimerPhase::Cancel,
            &mut rec,
        );
        t.tick(160 + TimeWaitConfig::default().settle_ns, &mut rec);
        assert_eq!(t.count(), 3);
        let touched: foldhash::HashSet<(u32, Tuple)> =
            [(NS, tuple(40003, 80)), (NS, tuple(40004, 80))]
                .into_iter()
                .collect();
        // The dump: 40001, 40002 (whose start was lost) and 40004 (gone since).
        let present: Listed = [40001, 40002, 40004]
            .into_iter()
            .map(|p| (NS, tuple(p, 80)))
            .collect();
        let (dropped, added) =
            t.reconcile(&present, 100, &|k| touched.contains(k), &|_| true, true);
        assert_eq!((dropped, added), (1, 1), "40000 dropped, 40002 added");
        assert_eq!(t.count(), 3, "40001, 40002, 40003");
        assert_eq!(t.top_peers(1)[0].1, 3);
        // A socket added from the dump leaving through its timer is still followed.
        let t2 = tuple(40002, 80);
        t.on_timer(200, TW + 2, NS, t2, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(200, TW + 2, NS, t2, TimeWait, TimerPhase::Expire, &mut rec);
        assert_eq!(t.count(), 2);
        // A 4-tuple reused: the first timewait socket's exit was lost, a second one holds the
        // key now and the dump lists it. Only the second stays.
        start(&mut t, &mut rec, 210, TW + 5, 40005);
        start(&mut t, &mut rec, 220, TW + 6, 40005);
        assert_eq!(t.count(), 4);
        let present: Listed = [40001, 40003, 40005]
            .into_iter()
            .map(|p| (NS, tuple(p, 80)))
            .collect();
        assert_eq!(
            t.reconcile(&present, 300, &|_| false, &|_| true, true),
            (1, 0)
        );
        assert_eq!(t.count(), 3);
        t.on_timer(
            400,
            TW + 6,
            NS,
            tuple(40005, 80),
            TimeWait,
            TimerPhase::Cancel,
            &mut rec,
        );
        t.on_timer(
            400,
            TW + 6,
            NS,
            tuple(40005, 80),
            TimeWait,
            TimerPhase::Expire,
            &mut rec,
        );
        assert_eq!(t.count(), 2);
        // Without `add` (the journal overflowed), nothing is added.
        let mut u = table();
        assert_eq!(
            u.reconcile(&present, 100, &|_| false, &|_| true, false),
            (0, 0)
        );
        assert_eq!(u.count(), 0);
    }

    #[test]
    fn seeded_sockets_a_later_dump_no_longer_lists_are_forgotten() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let (a, b, c) = (tuple(40000, 80), tuple(40001, 80), tuple(40002, 80));
        t.seed([(NS, a), (NS, b), (NS, c)]);
        // `a` is seen leaving; `b` left before the programs were attached; `c` is still there.
        t.on_timer(5, TW, NS, a, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(5, TW, NS, a, TimeWait, TimerPhase::Expire, &mut rec);
        assert_eq!((t.count(), t.seeded_len()), (2, 2));
        let present: Listed = [(NS, c)].into_iter().collect();
        assert_eq!(
            t.reconcile(&present, 10, &|_| false, &|_| true, true),
            (1, 0)
        );
        assert_eq!((t.count(), t.seeded_len()), (1, 1));
        assert_eq!(t.top_peers(5)[0].1, 1);
    }

    #[test]
    fn a_namespace_the_dump_could_not_read_keeps_its_timewait_sockets() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let seeded = tuple(40001, 80);
        t.seed([(NS, seeded)]);
        let traced = tuple(40000, 80);
        t.on_timer(10, TW, NS, traced, TimeWait, TimerPhase::Start, &mut rec);
        let empty = Listed::default();
        assert_eq!(
            t.reconcile(&empty, 100, &|_| false, &|ns| ns != NS, true),
            (0, 0)
        );
        assert_eq!((t.count(), t.seeded_len()), (2, 1));
        assert_eq!(
            t.reconcile(&empty, 100, &|_| false, &|_| true, true),
            (2, 0)
        );
        assert_eq!(t.count(), 0);
    }

    #[test]
    fn table_is_bounded() {
        let mut t = TimeWaitTable::new(TimeWaitConfig {
            max_entries: 2,
            ..TimeWaitConfig::default()
        });
        let mut rec = Recorder::default();
        for i in 0..3u16 {
            t.on_timer(
                0,
                u64::from(i) + 1,
                NS,
                tuple(40000 + i, 80),
                TimeWait,
                TimerPhase::Start,
                &mut rec,
            );
        }
        assert_eq!((t.count(), t.dropped()), (2, 1));
    }

    #[test]
    fn a_kill_that_overtakes_the_birth_it_ends_leaves_nothing_counted() {
        let mut t = TimeWaitTable::new(TimeWaitConfig::default());
        let mut rec = Recorder::default();
        let tp = tuple(40000, 80);
        // The kill on another CPU arrives before the birth, carried by the CLOSE record.
        t.on_timer(2 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.on_timer(MS, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        t.tick(3_100 * MS, &mut rec);
        assert_eq!(t.count(), 0, "entered and left");
        assert_eq!(rec.time_wait_exited.len(), 1);
        // A cancel of an unknown socket long before a start of the same address is forgotten.
        at_tw(&mut t, &mut rec, 3_000 * MS, tp, TimerPhase::Cancel);
        t.tick(6_000 * MS, &mut rec);
        at_tw(&mut t, &mut rec, 6_001 * MS, tp, TimerPhase::Start);
        assert_eq!(t.count(), 1);
    }

    /// Kills are read from the kernel's table once a second: the connection that took the
    /// 4-tuple over, and the timewait socket it left at the same address, often come first.
    #[test]
    fn a_birth_at_the_address_of_a_socket_whose_kill_is_still_on_its_way_ends_it() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        t.on_timer(0, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        t.connection_seen(NS, &tp, 20 * MS, &mut rec);
        t.on_timer(30 * MS, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        assert_eq!((t.count(), rec.time_wait_entered.len()), (1, 2));
        assert!(
            rec.time_wait_exited.is_empty(),
            "how it ended comes with its exit"
        );
        // The first socket's kill, read later, is older than the second's birth: it ends the
        // first one, reused by the connection that opened since.
        t.on_timer(10 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.exits_read(1_000 * MS, &mut rec);
        t.tick(10_000 * MS, &mut rec);
        assert_eq!((t.count(), rec.time_wait_exited.len()), (1, 1));
        let exit = &rec.time_wait_exited[0];
        assert_eq!((exit.exit, exit.exited_ns), (TimeWaitExit::Reused, 10 * MS));
    }

    /// Under churn nearly every connect takes over a timewait socket's 4-tuple: the socket
    /// remembers it (no table insert per connection), also once a newer socket born at its
    /// address set it aside, and its kill read later is a reuse.
    #[test]
    fn the_socket_taken_over_remembers_the_connection_even_when_set_aside() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let (old, next) = (tuple(40000, 80), tuple(40001, 80));
        at_tw(&mut t, &mut rec, 5 * MS, old, TimerPhase::Start);
        t.connection_seen(NS, &old, 20 * MS, &mut rec);
        assert!(t.recent_opens.is_empty() && t.recent_order.is_empty());
        // Not known as a timewait socket: remembered by its 4-tuple.
        t.connection_seen(NS, &next, 21 * MS, &mut rec);
        assert_eq!(t.recent_opens.len(), 1);
        // The connection on `old` closed; its timewait socket took the killed one's memory.
        at_tw(&mut t, &mut rec, 30 * MS, next, TimerPhase::Start);
        at_tw(&mut t, &mut rec, 19 * MS, old, TimerPhase::Cancel);
        t.exits_read(1_000 * MS, &mut rec);
        t.tick(10_000 * MS, &mut rec);
        assert_eq!(t.count(), 1);
        let exits = &rec.time_wait_exited[..];
        assert_eq!(exits.len(), 1);
        assert_eq!(
            (exits[0].tuple, exits[0].exit, exits[0].exited_ns),
            (old, TimeWaitExit::Reused, 19 * MS)
        );
    }

    #[test]
    fn a_superseded_socket_without_any_exit_read_was_killed_before_the_birth() {
        let (mut t, mut rec) = (table(), Recorder::default());
        at_tw(&mut t, &mut rec, 0, tuple(40000, 80), TimerPhase::Start);
        let newer = tuple(40001, 80);
        at_tw(&mut t, &mut rec, 50 * MS, newer, TimerPhase::Start);
        // A read that began before the birth cannot have held its exit.
        t.exits_read(40 * MS, &mut rec);
        assert!(rec.time_wait_exited.is_empty());
        t.exits_read(1_000 * MS, &mut rec);
        t.tick(10_000 * MS, &mut rec);
        assert_eq!(t.count(), 1);
        let exit = &rec.time_wait_exited[..];
        assert_eq!(exit.len(), 1);
        assert_eq!(
            (exit[0].exit, exit[0].exited_ns),
            (TimeWaitExit::Killed, 50 * MS)
        );
    }

    #[test]
    fn a_seeded_socket_whose_address_serves_a_newer_one_leaves_by_its_4_tuple() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let (old, newer) = (tuple(40000, 80), tuple(40001, 80));
        t.seed([(NS, old)]);
        // Its address is unknown until its exit, and a newer socket born there came first.
        at_tw(&mut t, &mut rec, 500 * MS, newer, TimerPhase::Start);
        assert_eq!(t.count(), 2);
        for phase in [TimerPhase::Cancel, TimerPhase::Expire] {
            at_tw(&mut t, &mut rec, 400 * MS, old, phase);
        }
        t.exits_read(1_000 * MS, &mut rec);
        t.tick(10_000 * MS, &mut rec);
        assert_eq!((t.count(), t.seeded_len()), (1, 0));
        let exit = &rec.time_wait_exited[..];
        assert_eq!(exit.len(), 1);
        assert_eq!((exit[0].tuple, exit[0].exit), (old, TimeWaitExit::Expired));
        assert_eq!(exit[0].exited_ns, 400 * MS);
    }

    #[test]
    fn a_kill_read_seconds_late_still_finds_the_connection_that_reused_its_4_tuple() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        at_tw(&mut t, &mut rec, 5 * MS, tp, TimerPhase::Start);
        t.exits_read(6 * MS, &mut rec);
        t.connection_seen(NS, &tp, 11 * MS, &mut rec);
        // The agent fell behind (its output blocked): events drained 5 s later tick the clock
        // on before the exit table is read again.
        t.tick(5_000 * MS, &mut rec);
        at_tw(&mut t, &mut rec, 10 * MS, tp, TimerPhase::Cancel);
        t.exits_read(5_001 * MS, &mut rec);
        t.tick(5_002 * MS, &mut rec);
        let exits = &rec.time_wait_exited[..];
        assert_eq!(exits.len(), 1);
        assert_eq!(
            (exits[0].exit, exits[0].exited_ns),
            (TimeWaitExit::Reused, 10 * MS)
        );
    }

    #[test]
    fn a_kill_read_after_the_connection_that_reused_its_4_tuple_is_a_reuse() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        t.on_timer(5 * MS, TW, NS, tp, TimeWait, TimerPhase::Start, &mut rec);
        // The SYN killed it at 10 ms; the new connection (at 11 ms) is known first.
        t.connection_seen(NS, &tp, 11 * MS, &mut rec);
        t.on_timer(10 * MS, TW, NS, tp, TimeWait, TimerPhase::Cancel, &mut rec);
        t.tick(1_000 * MS, &mut rec);
        assert_eq!(t.count(), 0);
        assert_eq!(rec.time_wait_exited.len(), 1);
        assert_eq!(rec.time_wait_exited[0].exit, TimeWaitExit::Reused);
        // The connection a timewait socket came from (before its birth) makes no reuse.
        let other = tuple(8080, 40001);
        t.connection_seen(NS, &other, 1_990 * MS, &mut rec);
        t.on_timer(
            2_000 * MS,
            0xcc00,
            NS,
            other,
            TimeWait,
            TimerPhase::Start,
            &mut rec,
        );
        t.on_timer(
            2_010 * MS,
            0xcc00,
            NS,
            other,
            TimeWait,
            TimerPhase::Cancel,
            &mut rec,
        );
        t.tick(9_000 * MS, &mut rec);
        assert_eq!(rec.time_wait_exited[1].exit, TimeWaitExit::Killed);
    }

    #[test]
    fn recent_connections_are_bounded_and_keep_the_newest_sighting() {
        let (mut t, mut rec) = (table(), Recorder::default());
        let tp = tuple(8080, 40000);
        for i in 0..(RECENT_OPENS_MAX as u64 + 10) {
            let port = 1024 + (i % 50_000) as u16;
            t.connection_seen(NS, &tuple(port, 80), i, &mut rec);
        }
        t.connection_seen(NS, &tp, 1_000_000, &mut rec);
        assert!(t.recent_order.len() <= RECENT_OPENS_MAX);
        assert!(t.recent_opens.len() <= RECENT_OPENS_MAX);
        assert_eq!(
            t.recent_opens.get(&crate::tracker::key_hash(NS, &tp)),
            Some(&1_000_000)
        );
    }

    /// The expiry of a socket read after a newer socket was born at its address ends neither:
    /// the newer one stays counted.
    #[test]
    fn an_expiry_read_after_a_birth_at_the_same_address_leaves_the_new_socket_counted() {
        let (mut t, mut rec) = (table(), Recorder::default());
        at_tw(&mut t, &mut rec, 0, tuple(40000, 80), TimerPhase::Start);
        // It expired at 60 s; its memory went to a new timewait socket at 60.5 s, whose birth
        // came first.
        let newer = tuple(40001, 80);
        at_tw(&mut t, &mut rec, 60_500 * MS, newer, TimerPhase::Start);
        for phase in [TimerPhase::Cancel, TimerPhase::Expire] {
            let old = tuple(40000, 80);
            at_tw(&mut t, &mut rec, 60_000 * MS, old, phase);
        }
        t.exits_read(61_000 * MS, &mut rec);
        t.tick(70_000 * MS, &mut rec);
        assert_eq!(t.count(), 1, "the newer socket is still there");
        assert_eq!(rec.time_wait_entered.len(), 2);
        assert_eq!(rec.time_wait_exited.len(), 1, "only the older one left");
        let exit = &rec.time_wait_exited[0];
        assert_eq!(
            (exit.tuple, exit.exit),
            (tuple(40000, 80), TimeWaitExit::Expired)
        );
        assert_eq!(exit.exited_ns, 60_000 * MS);
    }
}
