//! The rules of one connection record: how it starts, whom it belongs to, how it ends and why.
use foldhash::HashMap;
use smallvec::SmallVec;

use crate::acks::Acks;
use crate::model::{CloseCause, Direction, Owner, RetransmitKind, SockId, Task, TcpState, Tuple};
use crate::record::Connection;

impl Connection {
    pub(super) fn new(
        sock: SockId,
        netns: u32,
        tuple: Tuple,
        direction: Direction,
        ts_ns: u64,
    ) -> Connection {
        Connection {
            sock,
            netns,
            tuple,
            direction,
            owner: None,
            states: SmallVec::new(),
            opened_ns: None,
            established_ns: None,
            closed_ns: None,
            close: None,
            retransmits: 0,
            retransmit_kinds: [0; RetransmitKind::ALL.len()],
            resets_sent: 0,
            resets_received: 0,
            reset_sent_reason: None,
            seeded: false,
            complete: false,
            time_wait: false,
            acks: Acks::default(),
            cgroup: 0,
            cost: None,
            close_wait_since: None,
            close_wait_leaked: false,
            first_fin: None,
            last_seen_ns: ts_ns,
            queued_ns: ts_ns,
            tuple_matched: false,
        }
    }
}

/// One connection more (`up`) or fewer in `cgroup`.
pub(super) fn count_cgroup(by_cgroup: &mut HashMap<u64, usize>, cgroup: u64, up: bool) {
    if up {
        *by_cgroup.entry(cgroup).or_default() += 1;
    } else if let Some(count) = by_cgroup.get_mut(&cgroup) {
        *count -= 1;
        if *count == 0 {
            by_cgroup.remove(&cgroup);
        }
    }
}

pub(super) fn finish(conn: &mut Connection, ts_ns: u64, cause: CloseCause) {
    conn.closed_ns = Some(ts_ns);
    conn.close = Some(cause);
}

/// Transitions made inside the owner's system call, where `current` is the owner. The others
/// run in softirq context, where `current` is whatever task was interrupted.
pub(super) fn process_context(old: TcpState, new: TcpState) -> bool {
    tracer_common::owner_transition(old as u8, new as u8)
}

pub(super) fn owner(task: Task) -> Owner {
    Owner {
        pid: task.pid,
        comm: task.comm,
    }
}

/// Why a connection reached CLOSE from `old`. The first FIN decides for orderly closes; a RST
/// received decides for the rest. A RST this host sends is traced after the CLOSE transition,
/// so an abrupt close with no FIN and no RST received is this host aborting.
pub(super) fn close_cause(conn: &Connection, old: TcpState) -> CloseCause {
    if old == TcpState::SynSent {
        return if conn.resets_received > 0 {
            CloseCause::Refused
        } else {
            CloseCause::Failed
        };
    }
    if let Some(first) = conn.first_fin {
        return first;
    }
    if conn.resets_received > 0 {
        return CloseCause::ResetReceived;
    }
    match old {
        TcpState::SynRecv => CloseCause::Failed,
        TcpState::Established => CloseCause::Aborted,
        _ => CloseCause::Unknown,
    }
}
