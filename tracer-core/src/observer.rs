//! The observer: how exporters hear what the trackers derive.
use crate::model::{Direction, ResetDirection, RetransmitKind, TcpState, Tuple};
use crate::record::{CloseWaitLeak, Connection, TimeWaitRecord};

/// Receives what the tracker derives, as it happens. Every method has an empty default so that
/// each exporter implements only what it needs.
pub trait Observer {
    /// Every state change of a TCP socket (listeners included).
    fn transition(&mut self, _from: TcpState, _to: TcpState) {}
    /// A connection was opened while the agent watched.
    fn opened(&mut self, _direction: Direction) {}
    /// The handshake of an actively opened connection completed.
    fn established(&mut self, _conn: &Connection) {}
    /// A connection reached CLOSE; its record is final.
    fn closed(&mut self, _conn: &Connection) {}
    /// Segments retransmitted, on any TCP socket.
    fn retransmit(&mut self, _tuple: &Tuple, _kind: RetransmitKind, _segs: u32) {}
    /// A RST sent (with the kernel's reason code) or received on a TCP socket.
    fn reset(&mut self, _tuple: &Tuple, _direction: ResetDirection, _reason: Option<u16>) {}
    /// A live connection was dropped from the table because it was full.
    fn evicted(&mut self, _conn: &Connection) {}
    /// A socket entered the TIME_WAIT state.
    fn time_wait_entered(&mut self, _netns: u32, _tuple: &Tuple) {}
    /// A socket left TIME_WAIT; reported once its exit reason is known.
    fn time_wait_exited(&mut self, _record: &TimeWaitRecord) {}
    /// `conn` sent a delayed ACK held for `held_ns` (when its arming was seen).
    fn delayed_ack(&mut self, _conn: &Connection, _held_ns: Option<u64>, _pingpong: bool) {}
    /// A small write on `conn` waited `lost_ns` for the peer's delayed ACK.
    fn nagle_stall(&mut self, _conn: &Connection, _lost_ns: u64) {}
    /// Time to tell about `conn`'s stalls so far (first stall, then rate limited, and at close).
    fn nagle_stall_report(&mut self, _conn: &Connection) {}
    /// A connection has stayed in CLOSE_WAIT past the threshold: the application never closed
    /// its socket after the peer did.
    fn close_wait_leak(&mut self, _leak: &CloseWaitLeak) {}
    /// The kernel named `conn`'s cgroup (`conn.cgroup`), first or anew.
    fn cgroup_known(&mut self, _conn: &Connection) {}
    /// `segs` segments of a tracked connection were retransmitted (after [`Observer::retransmit`]).
    fn retransmit_on(&mut self, _conn: &Connection, _kind: RetransmitKind, _segs: u32) {}
    /// A RST was sent or received on a tracked connection (after [`Observer::reset`]).
    fn reset_on(&mut self, _conn: &Connection, _direction: ResetDirection, _reason: Option<u16>) {}
}

/// Lets several exporters observe one tracker: `(&mut metrics, &mut sink)`.
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn transition(&mut self, from: TcpState, to: TcpState) {
        self.0.transition(from, to);
        self.1.transition(from, to);
    }
    fn opened(&mut self, direction: Direction) {
        self.0.opened(direction);
        self.1.opened(direction);
    }
    fn established(&mut self, conn: &Connection) {
        self.0.established(conn);
        self.1.established(conn);
    }
    fn closed(&mut self, conn: &Connection) {
        self.0.closed(conn);
        self.1.closed(conn);
    }
    fn retransmit(&mut self, tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        self.0.retransmit(tuple, kind, segs);
        self.1.retransmit(tuple, kind, segs);
    }
    fn reset(&mut self, tuple: &Tuple, direction: ResetDirection, reason: Option<u16>) {
        self.0.reset(tuple, direction, reason);
        self.1.reset(tuple, direction, reason);
    }
    fn evicted(&mut self, conn: &Connection) {
        self.0.evicted(conn);
        self.1.evicted(conn);
    }
    fn time_wait_entered(&mut self, netns: u32, tuple: &Tuple) {
        self.0.time_wait_entered(netns, tuple);
        self.1.time_wait_entered(netns, tuple);
    }
    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        self.0.time_wait_exited(record);
        self.1.time_wait_exited(record);
    }
    fn delayed_ack(&mut self, conn: &Connection, held_ns: Option<u64>, pingpong: bool) {
        self.0.delayed_ack(conn, held_ns, pingpong);
        self.1.delayed_ack(conn, held_ns, pingpong);
    }
    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        self.0.nagle_stall(conn, lost_ns);
        self.1.nagle_stall(conn, lost_ns);
    }
    fn nagle_stall_report(&mut self, conn: &Connection) {
        self.0.nagle_stall_report(conn);
        self.1.nagle_stall_report(conn);
    }
    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        self.0.close_wait_leak(leak);
        self.1.close_wait_leak(leak);
    }
    fn cgroup_known(&mut self, conn: &Connection) {
        self.0.cgroup_known(conn);
        self.1.cgroup_known(conn);
    }
    fn retransmit_on(&mut self, conn: &Connection, kind: RetransmitKind, segs: u32) {
        self.0.retransmit_on(conn, kind, segs);
        self.1.retransmit_on(conn, kind, segs);
    }
    fn reset_on(&mut self, conn: &Connection, direction: ResetDirection, reason: Option<u16>) {
        self.0.reset_on(conn, direction, reason);
        self.1.reset_on(conn, direction, reason);
    }
}

impl<T: Observer + ?Sized> Observer for &mut T {
    fn transition(&mut self, from: TcpState, to: TcpState) {
        (**self).transition(from, to);
    }
    fn opened(&mut self, direction: Direction) {
        (**self).opened(direction);
    }
    fn established(&mut self, conn: &Connection) {
        (**self).established(conn);
    }
    fn closed(&mut self, conn: &Connection) {
        (**self).closed(conn);
    }
    fn retransmit(&mut self, tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        (**self).retransmit(tuple, kind, segs);
    }
    fn reset(&mut self, tuple: &Tuple, direction: ResetDirection, reason: Option<u16>) {
        (**self).reset(tuple, direction, reason);
    }
    fn evicted(&mut self, conn: &Connection) {
        (**self).evicted(conn);
    }
    fn time_wait_entered(&mut self, netns: u32, tuple: &Tuple) {
        (**self).time_wait_entered(netns, tuple);
    }
    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        (**self).time_wait_exited(record);
    }
    fn delayed_ack(&mut self, conn: &Connection, held_ns: Option<u64>, pingpong: bool) {
        (**self).delayed_ack(conn, held_ns, pingpong);
    }
    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        (**self).nagle_stall(conn, lost_ns);
    }
    fn nagle_stall_report(&mut self, conn: &Connection) {
        (**self).nagle_stall_report(conn);
    }
    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        (**self).close_wait_leak(leak);
    }
    fn cgroup_known(&mut self, conn: &Connection) {
        (**self).cgroup_known(conn);
    }
    fn retransmit_on(&mut self, conn: &Connection, kind: RetransmitKind, segs: u32) {
        (**self).retransmit_on(conn, kind, segs);
    }
    fn reset_on(&mut self, conn: &Connection, direction: ResetDirection, reason: Option<u16>) {
        (**self).reset_on(conn, direction, reason);
    }
}
