//! What the trackers report: connection records, CLOSE_WAIT leaks and TIME_WAIT stays.
use std::net::IpAddr;

use serde::Serialize;
use smallvec::SmallVec;
use strum::{EnumCount, IntoStaticStr, VariantArray};

use crate::acks::Acks;
use crate::model::{
    CloseCause, ConnectionCost, Direction, Owner, RetransmitKind, SockId, TcpState, Tuple,
    all_variants,
};

/// The most state stamps kept per connection. A TCP lifecycle has at most about six states;
/// the bound keeps a misbehaving socket from growing without limit.
pub const MAX_STATES: usize = 16;

/// When the connection entered a state (CLOCK_MONOTONIC nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StateStamp {
    pub state: TcpState,
    pub ts_ns: u64,
}

/// A connection that existed before the agent started, from sock_diag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    pub netns: u32,
    pub tuple: Tuple,
    pub state: TcpState,
    /// Inferred from whether the local port is listening.
    pub direction: Direction,
}

/// One connection's lifecycle as rebuilt so far (final once `closed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub sock: SockId,
    pub netns: u32,
    pub tuple: Tuple,
    pub direction: Direction,
    pub owner: Option<Owner>,
    /// States in the order entered; the first is the state the agent first saw it in. Inline:
    /// no allocation per connection for the usual handful of states.
    pub states: SmallVec<[StateStamp; 2]>,
    /// When it was opened; `None` when it was opened before the agent saw it.
    pub opened_ns: Option<u64>,
    pub established_ns: Option<u64>,
    pub closed_ns: Option<u64>,
    pub close: Option<CloseCause>,
    /// Retransmitted segments.
    pub retransmits: u32,
    /// The same by kind, indexed in `RetransmitKind::ALL` order.
    pub retransmit_kinds: [u32; RetransmitKind::ALL.len()],
    pub resets_sent: u32,
    pub resets_received: u32,
    /// The kernel's `enum sk_rst_reason` of the last RST it sent, when the kernel gave one.
    pub reset_sent_reason: Option<u16>,
    /// Known from sock_diag rather than from its opening event.
    pub seeded: bool,
    /// Every state change from open to close was seen in order.
    pub complete: bool,
    /// It went on into TIME_WAIT (as a timewait socket) after CLOSE.
    pub time_wait: bool,
    /// Delayed ACKs sent and Nagle stalls suffered.
    pub acks: Acks,
    /// The socket's cgroup v2 id (0: unknown), from the kernel.
    pub cgroup: u64,
    /// What it cost, read from the kernel's socket as it closed.
    pub cost: Option<Box<ConnectionCost>>,
    /// When it entered CLOSE_WAIT, while it is there.
    pub close_wait_since: Option<u64>,
    /// Reported as a CLOSE_WAIT leak.
    pub close_wait_leaked: bool,
    /// Who sent the first FIN, once known.
    pub(crate) first_fin: Option<CloseCause>,
    pub(crate) last_seen_ns: u64,
    /// When it was last queued for eviction (see the tracker's `make_room`).
    pub(crate) queued_ns: u64,
    /// State changes seen since the last update of the tuple (for the seed match).
    pub(crate) tuple_matched: bool,
}

impl Connection {
    /// Time from opening to close, when both were seen.
    pub fn duration_ns(&self) -> Option<u64> {
        Some(self.closed_ns?.saturating_sub(self.opened_ns?))
    }

    /// Time from `connect()` (SYN_SENT) to ESTABLISHED, for active opens.
    pub fn handshake_ns(&self) -> Option<u64> {
        if self.direction != Direction::Active {
            return None;
        }
        Some(self.established_ns?.saturating_sub(self.opened_ns?))
    }

    pub fn state(&self) -> Option<TcpState> {
        self.states.last().map(|s| s.state)
    }
}

/// A connection stuck in CLOSE_WAIT: the peer closed, the local application has not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseWaitLeak {
    pub netns: u32,
    pub tuple: Tuple,
    /// When it entered CLOSE_WAIT, or when the agent started for one found there.
    pub since_ns: u64,
    pub detected_ns: u64,
    pub direction: Direction,
    pub owner: Option<Owner>,
    /// Already in CLOSE_WAIT when the agent started.
    pub seeded: bool,
    /// The socket's cgroup v2 id (0: unknown).
    pub cgroup: u64,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, IntoStaticStr, VariantArray, EnumCount,
)]
#[serde(into = "&'static str")]
#[strum(serialize_all = "lowercase")]
pub enum TimeWaitExit {
    /// The 2MSL wait ran out.
    Expired,
    /// A new connection took over the 4-tuple.
    Reused,
    /// Ended early otherwise: RST, namespace teardown, timewait bucket pressure.
    Killed,
}

impl TimeWaitExit {
    /// Every variant, in declaration order (which is also the discriminant order).
    pub const ALL: [TimeWaitExit; TimeWaitExit::COUNT] = all_variants!(TimeWaitExit);

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Who a TIME_WAIT socket is about: the remote address and the service port. When the local
/// port is ephemeral this host was the client and `port` is the remote (service) port;
/// otherwise this host was the server and `port` is its own listening port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub peer: IpAddr,
    pub port: u16,
    /// This host was the client: its TIME_WAIT sockets hold ephemeral ports toward the peer.
    pub client: bool,
}

impl PeerKey {
    /// The peer of a socket on `tuple` (local first), by whether this host was the client.
    pub fn of(tuple: &Tuple, client: bool) -> PeerKey {
        PeerKey {
            peer: tuple.dst,
            port: if client { tuple.dport } else { tuple.sport },
            client,
        }
    }
}

/// A socket's whole stay in TIME_WAIT, reported when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeWaitRecord {
    pub netns: u32,
    pub tuple: Tuple,
    /// When it entered TIME_WAIT; `None` when it was already there at start-up.
    pub entered_ns: Option<u64>,
    pub exited_ns: u64,
    pub exit: TimeWaitExit,
    /// The substate it left in: TIME_WAIT, or FIN_WAIT2 when the peer's FIN never came.
    pub substate: TcpState,
    /// From the connection that entered TIME_WAIT, when the agent saw it.
    pub direction: Option<Direction>,
    pub owner: Option<Owner>,
    /// The cgroup v2 id of the connection that entered TIME_WAIT (0: unknown).
    pub cgroup: u64,
}

impl TimeWaitRecord {
    pub fn duration_ns(&self) -> Option<u64> {
        Some(self.exited_ns.saturating_sub(self.entered_ns?))
    }
}
