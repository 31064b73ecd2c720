//! Domain types shared by the decoder, the trackers and the exporters. Pure data: no I/O, no
//! kernel types.
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use strum::{EnumCount, IntoStaticStr, VariantArray};

/// `T::VARIANTS` (strum) as an array of `T::COUNT`, usable in `const` array lengths.
macro_rules! all_variants {
    ($t:ty) => {
        match <$t as VariantArray>::VARIANTS.first_chunk() {
            Some(all) => *all,
            None => panic!("VARIANTS lists every variant"),
        }
    };
}
pub(crate) use all_variants;

/// Kernel TCP states, numbered as in `include/net/tcp_states.h`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    IntoStaticStr,
    VariantArray,
    EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// Every variant, in declaration order (which is also the discriminant order).
    pub const ALL: [TcpState; TcpState::COUNT] = all_variants!(TcpState);

    pub fn from_kernel(value: u8) -> Option<TcpState> {
        TcpState::ALL
            .get(usize::from(value).checked_sub(1)?)
            .copied()
    }

    /// The name `ss` and the kernel use, e.g. `SYN_SENT`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection's addressing as seen from this host: `src` is local, `dst` is remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Tuple {
    /// `connect()` reports SYN_SENT before the local port is bound, and a freshly accepted child
    /// reports SYN_RECV before its peer is filled in: such partial tuples are not identities.
    pub fn is_complete(&self) -> bool {
        self.sport != 0 && self.dport != 0
    }

    pub fn family(&self) -> Family {
        match self.src {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The task that was current when an event fired. It owns the socket only for transitions made
/// from a system call (see `conntrack`); softirq transitions show whatever task was interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
}

/// `task->comm`: up to 15 bytes, NUL padded. Stored inline so events carry no heap data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..len])
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Comm {
        let mut bytes = [0u8; 16];
        let n = s.len().min(15);
        bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        Comm(bytes)
    }
}

/// Identity of a kernel socket while it lives: its `struct sock` address. Addresses are reused
/// after a socket is freed, so a record ends at CLOSE.
pub type SockId = u64;

/// What a connection cost, read from the kernel's socket as it closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCost {
    /// Bytes sent and acknowledged by the peer (`bytes_acked`). The kernel counts sequence
    /// space: an acknowledged SYN and FIN add one each to the payload.
    pub bytes_sent: u64,
    /// Bytes received in order (`bytes_received`), a received FIN counting one.
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    /// Segments retransmitted over the connection's life (`total_retrans`), as `tcpi_total_retrans`.
    pub total_retrans: u32,
    /// Smoothed RTT, its mean deviation and the windowed minimum at close.
    pub srtt_ns: u64,
    pub rttvar_ns: u64,
    pub min_rtt_ns: u64,
    /// Congestion window at close and the largest seen (at close and at each congestion state
    /// change), in segments.
    pub cwnd: u32,
    pub max_cwnd: u32,
    /// Time the sender was held by the peer's receive window, in the kernel's jiffies (the
    /// agent knows their length).
    pub rwnd_limited_jiffies: u32,
    /// Bit `1 << icsk_ca_state` for each congestion state entered (0 open, 1 disorder, 2 CWR,
    /// 3 recovery, 4 loss).
    pub ca_states: u8,
}

/// A decoded kernel event, in the order the ring buffer delivered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    StateChange {
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        old: TcpState,
        new: TcpState,
        task: Task,
    },
    Retransmit {
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        /// The socket's state at the retransmit.
        state: TcpState,
        kind: RetransmitKind,
        /// Segments, as the kernel's `TcpRetransSegs` counts them.
        segs: u32,
    },
    Reset {
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        state: TcpState,
        direction: ResetDirection,
        /// Sent RSTs: the kernel's `enum sk_rst_reason` value.
        reason: Option<u16>,
        task: Task,
    },
    /// The TIME_WAIT timer of a timewait mini socket was armed, detached or fired.
    TimeWait {
        ts_ns: u64,
        /// The timewait socket (a different object from the full socket it replaced).
        tw: SockId,
        netns: u32,
        tuple: Tuple,
        /// `tw_substate`: TIME_WAIT, or FIN_WAIT2 for an orphaned socket waiting for the
        /// peer's FIN.
        substate: TcpState,
        timer: TimerPhase,
    },
    /// The delayed-ACK timer fired with an ACK pending: this socket sent a delayed ACK.
    DelayedAck {
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        /// How long the ACK was held, when its arming was seen.
        held_ns: Option<u64>,
        /// The socket was in pingpong (interactive) mode, which this firing ends.
        pingpong: bool,
    },
    /// A sub-MSS write waits for an ACK because of Nagle (no TCP_NODELAY, data in flight).
    NagleHeld {
        ts_ns: u64,
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        bytes: u64,
        /// The writer: this runs in its system call.
        task: Task,
    },
    /// What the kernel knows of a tracked socket beyond its state: its cgroup (from its first
    /// record) and, as it closes, what it cost. Comes with the socket's state changes, before
    /// its CLOSE; says nothing of a socket the tracker does not know.
    SocketInfo {
        ts_ns: u64,
        sock: SockId,
        /// The socket's cgroup v2 id; 0 when unknown.
        cgroup: u64,
        cost: Option<ConnectionCost>,
    },
}

/// What happened to a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerPhase {
    /// Armed for a new timewait socket (a birth).
    Start,
    /// Armed again for the same socket (its detach just before was no exit).
    Rearm,
    Cancel,
    Expire,
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::SocketInfo { ts_ns, .. }
            | Event::StateChange { ts_ns, .. }
            | Event::Retransmit { ts_ns, .. }
            | Event::Reset { ts_ns, .. }
            | Event::TimeWait { ts_ns, .. }
            | Event::DelayedAck { ts_ns, .. }
            | Event::NagleHeld { ts_ns, .. } => *ts_ns,
        }
    }

    pub fn sock(&self) -> SockId {
        match self {
            Event::SocketInfo { sock, .. }
            | Event::StateChange { sock, .. }
            | Event::Retransmit { sock, .. }
            | Event::Reset { sock, .. }
            | Event::DelayedAck { sock, .. }
            | Event::NagleHeld { sock, .. } => *sock,
            Event::TimeWait { tw, .. } => *tw,
        }
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr, VariantArray, EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum ResetDirection {
    Sent,
    Received,
}

impl ResetDirection {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a segment was retransmitted, from the socket's state and congestion state at the event.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr, VariantArray, EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "snake_case")]
pub enum RetransmitKind {
    /// SYN retransmitted by a connecting socket.
    Syn,
    /// Fast retransmit during recovery (`icsk_ca_state` Recovery).
    Fast,
    /// Retransmission timeout (`icsk_ca_state` Loss).
    Timeout,
    /// Open / disorder / CWR: tail-loss probes and the like.
    Other,
    /// A listener's SYN-ACK retransmitted (the client's ACK did not come).
    #[strum(serialize = "synack")]
    SynAck,
}

impl RetransmitKind {
    /// Every variant, in declaration order (which is also the discriminant order).
    pub const ALL: [RetransmitKind; RetransmitKind::COUNT] = all_variants!(RetransmitKind);

    pub fn classify(state: TcpState, ca_state: u8) -> RetransmitKind {
        match (state, ca_state) {
            (TcpState::SynSent, _) => RetransmitKind::Syn,
            (_, 3) => RetransmitKind::Fast,
            (_, 4) => RetransmitKind::Timeout,
            _ => RetransmitKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Who opened the connection.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr, VariantArray, EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum Direction {
    /// This host called `connect()`.
    Active,
    /// This host accepted it.
    Passive,
    /// Opened before the agent started and not attributable.
    Unknown,
}

impl Direction {
    /// Every variant, in declaration order (which is also the discriminant order).
    pub const ALL: [Direction; Direction::COUNT] = all_variants!(Direction);

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// How a connection ended.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr, VariantArray, EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "snake_case")]
pub enum CloseCause {
    /// This host sent the first FIN (it will hold TIME_WAIT).
    Local,
    /// The peer sent the first FIN.
    Remote,
    /// A RST was received on an established (or closing) connection.
    ResetReceived,
    /// This host ended an established connection without a FIN: the application closed with
    /// unread data or `SO_LINGER` 0 (a RST is sent), or the kernel gave up after retransmission
    /// or keepalive timeouts.
    Aborted,
    /// `connect()` was answered with a RST.
    Refused,
    /// `connect()` never completed: SYN timeout, unreachable, or cancelled.
    Failed,
    /// Events were missed, or the agent stopped first.
    Unknown,
}

impl CloseCause {
    /// Every variant, in declaration order (which is also the discriminant order).
    pub const ALL: [CloseCause; CloseCause::COUNT] = all_variants!(CloseCause);

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The process that owns a connection, learnt from a transition made in its system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are part of the output (events, metric labels): they must not drift.
    #[test]
    fn names_are_the_documented_ones() {
        let states: Vec<&str> = TcpState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            states,
            [
                "ESTABLISHED",
                "SYN_SENT",
                "SYN_RECV",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE",
                "CLOSE_WAIT",
                "LAST_ACK",
                "LISTEN",
                "CLOSING",
                "NEW_SYN_RECV"
            ]
        );
        for (i, state) in TcpState::ALL.iter().enumerate() {
            assert_eq!(TcpState::from_kernel(i as u8 + 1), Some(*state));
        }
        let kinds: Vec<&str> = RetransmitKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["syn", "fast", "timeout", "other", "synack"]);
        let causes: Vec<&str> = CloseCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            causes,
            [
                "local",
                "remote",
                "reset_received",
                "aborted",
                "refused",
                "failed",
                "unknown"
            ]
        );
        let directions: Vec<&str> = Direction::ALL.iter().map(|d| d.as_str()).collect();
        assert_eq!(directions, ["active", "passive", "unknown"]);
        assert_eq!(
            [
                ResetDirection::Sent.as_str(),
                ResetDirection::Received.as_str()
            ],
            ["sent", "received"]
        );
        assert_eq!(
            [Family::Ipv4.as_str(), Family::Ipv6.as_str()],
            ["ipv4", "ipv6"]
        );
        assert_eq!(
            serde_json::to_string(&[TcpState::FinWait1, TcpState::NewSynRecv]).unwrap(),
            r#"["FIN_WAIT1","NEW_SYN_RECV"]"#
        );
    }
}
