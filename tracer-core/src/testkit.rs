//! Synthetic kernel event sequences and a recording observer, shared by the tests of this crate
//! and of the agent (feature `testkit`). A test reads as a specification: events in, records
//! out.
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    Comm, Direction, Event, ResetDirection, RetransmitKind, SockId, Task, TcpState, TimerPhase,
    Tuple,
};
use crate::observer::Observer;
use crate::record::{CloseWaitLeak, Connection, TimeWaitRecord};
use crate::tracker::{Tracker, TrackerConfig};

/// The initial network namespace's inode on most hosts.
pub const NETNS: u32 = 4_026_531_840;
pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1_000 * MS;

/// `src:sport -> dst:dport`.
pub fn tuple(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Tuple {
    Tuple {
        src,
        sport,
        dst,
        dport,
    }
}

/// `127.0.0.1:sport -> 127.0.0.1:dport`.
pub fn loopback(sport: u16, dport: u16) -> Tuple {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    tuple(lo, sport, lo, dport)
}

/// A process's thread as the kernel names it.
pub fn task(pid: u32, comm: &str) -> Task {
    Task {
        pid,
        tid: pid,
        comm: Comm::from(comm),
    }
}

/// Whatever a softirq interrupted: not the socket's owner.
pub fn softirq() -> Task {
    task(0, "swapper/0")
}

/// A state change in the initial namespace.
pub fn state(ts_ns: u64, sock: SockId, t: Tuple, old: TcpState, new: TcpState, who: Task) -> Event {
    Event::StateChange {
        ts_ns,
        sock,
        netns: NETNS,
        tuple: t,
        old,
        new,
        task: who,
    }
}

/// An event of the TIME_WAIT timer of timewait socket `tw`.
pub fn time_wait(ts_ns: u64, tw: SockId, t: Tuple, substate: TcpState, phase: TimerPhase) -> Event {
    Event::TimeWait {
        ts_ns,
        tw,
        netns: NETNS,
        tuple: t,
        substate,
        timer: phase,
    }
}

/// `segs` segments of `kind` retransmitted on `sock` in ESTABLISHED.
pub fn retransmit(ts_ns: u64, sock: SockId, t: Tuple, kind: RetransmitKind, segs: u32) -> Event {
    Event::Retransmit {
        ts_ns,
        sock,
        netns: NETNS,
        tuple: t,
        state: TcpState::Established,
        kind,
        segs,
    }
}

/// A RST sent or received on `sock` in `st`.
pub fn reset(ts_ns: u64, sock: SockId, t: Tuple, st: TcpState, dir: ResetDirection) -> Event {
    Event::Reset {
        ts_ns,
        sock,
        netns: NETNS,
        tuple: t,
        state: st,
        direction: dir,
        reason: None,
        task: softirq(),
    }
}

/// A connection this host opens at `t0` (handshake 50 µs) and closes first 1 s later, by `who`,
/// into a timewait socket `tw` born in `substate` (FIN_WAIT2 when the peer's FIN comes later,
/// the usual case). The kernel reports the opening with the local port still 0 and clears it
/// again before the final CLOSE.
pub fn active_close_first(
    t0: u64,
    sock: SockId,
    tw: SockId,
    t: Tuple,
    substate: TcpState,
    who: Task,
) -> Vec<Event> {
    use TcpState::*;
    let unbound = Tuple { sport: 0, ..t };
    vec![
        state(t0, sock, unbound, Close, SynSent, who),
        state(t0 + 50_000, sock, t, SynSent, Established, softirq()),
        state(t0 + SEC, sock, t, Established, FinWait1, who),
        state(t0 + SEC + 10_000, sock, t, FinWait1, FinWait2, softirq()),
        time_wait(t0 + SEC + 20_000, tw, t, substate, TimerPhase::Start),
        state(t0 + SEC + 20_000, sock, unbound, FinWait2, Close, softirq()),
    ]
}

/// A connection this host accepts at `t0` and whose peer closes first 1 s later, the
/// application closing right after (LAST_ACK, no TIME_WAIT here).
pub fn passive_closed_by_peer(t0: u64, sock: SockId, t: Tuple, who: Task) -> Vec<Event> {
    use TcpState::*;
    vec![
        state(t0, sock, t, Listen, SynRecv, softirq()),
        state(t0 + 50_000, sock, t, SynRecv, Established, softirq()),
        state(t0 + SEC, sock, t, Established, CloseWait, softirq()),
        state(t0 + SEC + 10_000, sock, t, CloseWait, LastAck, who),
        state(t0 + SEC + 20_000, sock, t, LastAck, Close, softirq()),
    ]
}

/// Feeds `events` to a tracker with the default configuration; returns it and what it said.
pub fn replay(events: &[Event]) -> (Tracker, Recorder) {
    replay_with(TrackerConfig::default(), events)
}

pub fn replay_with(config: TrackerConfig, events: &[Event]) -> (Tracker, Recorder) {
    let mut tracker = Tracker::new(config);
    let mut recorder = Recorder::default();
    for event in events {
        tracker.on_event(event, &mut recorder);
    }
    tracker.flush_closed(&mut recorder);
    (tracker, recorder)
}

/// Everything the tracker told its observer, in order.
#[derive(Default)]
pub struct Recorder {
    pub transitions: Vec<(TcpState, TcpState)>,
    pub opened: Vec<Direction>,
    pub established: Vec<Connection>,
    pub closed: Vec<Connection>,
    pub retransmits: Vec<(RetransmitKind, u32)>,
    pub resets: Vec<ResetDirection>,
    pub evicted: Vec<Connection>,
    pub time_wait_entered: Vec<Tuple>,
    pub time_wait_exited: Vec<TimeWaitRecord>,
    pub delayed_acks: Vec<(Connection, Option<u64>)>,
    pub stalls: Vec<(Connection, u64)>,
    pub stall_reports: Vec<Connection>,
    pub leaks: Vec<CloseWaitLeak>,
}

impl Observer for Recorder {
    fn transition(&mut self, from: TcpState, to: TcpState) {
        self.transitions.push((from, to));
    }
    fn opened(&mut self, direction: Direction) {
        self.opened.push(direction);
    }
    fn established(&mut self, conn: &Connection) {
        self.established.push(conn.clone());
    }
    fn closed(&mut self, conn: &Connection) {
        self.closed.push(conn.clone());
    }
    fn retransmit(&mut self, _tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        self.retransmits.push((kind, segs));
    }
    fn reset(&mut self, _tuple: &Tuple, direction: ResetDirection, _reason: Option<u16>) {
        self.resets.push(direction);
    }
    fn evicted(&mut self, conn: &Connection) {
        self.evicted.push(conn.clone());
    }
    fn time_wait_entered(&mut self, _netns: u32, tuple: &Tuple) {
        self.time_wait_entered.push(*tuple);
    }
    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        self.time_wait_exited.push(record.clone());
    }
    fn delayed_ack(&mut self, conn: &Connection, held_ns: Option<u64>, _pingpong: bool) {
        self.delayed_acks.push((conn.clone(), held_ns));
    }
    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        self.stalls.push((conn.clone(), lost_ns));
    }
    fn nagle_stall_report(&mut self, conn: &Connection) {
        self.stall_reports.push(conn.clone());
    }
    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        self.leaks.push(*leak);
    }
}
