//! What a connection's cost counters mean once its path is known: payload bytes out of the
//! kernel's sequence-space counters, and congestion state names.
//!
//! The kernel's `bytes_acked` and `bytes_received` count sequence space. On this side:
//! - an active opener's SYN, once acknowledged, adds 1 to `bytes_acked`; a passive opener's
//!   SYN-ACK adds nothing (the child socket starts with it already acknowledged);
//! - its own FIN adds 1 to `bytes_acked` once acknowledged;
//! - a received SYN adds nothing to `bytes_received`; the peer's FIN adds 1.
//!
//! So the payload is exact when the path says which of those happened, and unknown otherwise
//! (a connection seen from the middle, or one whose FIN may or may not have been acknowledged
//! or received when it closed).
use crate::model::{Direction, TcpState};
use crate::record::Connection;

/// Congestion state names, indexed by `icsk_ca_state` (bit `1 << state` in `ca_states`).
pub const CA_STATES: [&str; 5] = ["open", "disorder", "cwr", "recovery", "loss"];

/// The names of the congestion states set in `mask`, in state order.
pub fn ca_state_names(mask: u8) -> impl Iterator<Item = &'static str> {
    CA_STATES
        .iter()
        .enumerate()
        .filter(move |(i, _)| mask & (1 << i) != 0)
        .map(|(_, name)| *name)
}

fn saw(conn: &Connection, state: TcpState) -> bool {
    conn.states.iter().any(|s| s.state == state)
}

/// The states before the final CLOSE, the first included.
fn before_close(conn: &Connection) -> Option<TcpState> {
    let n = conn.states.len();
    (n >= 2 && conn.states[n - 1].state == TcpState::Close).then(|| conn.states[n - 2].state)
}

/// Whether the path shows the connection from its opening (so the SYN accounting is known).
fn seen_from_open(conn: &Connection) -> bool {
    matches!(
        conn.states.first().map(|s| s.state),
        Some(TcpState::SynSent | TcpState::SynRecv)
    ) && conn.established_ns.is_some()
}

/// Payload bytes sent and acknowledged, from the kernel's `bytes_acked`, when exact.
pub fn payload_sent(conn: &Connection, bytes_acked: u64) -> Option<u64> {
    if !seen_from_open(conn) {
        return None;
    }
    let syn = u64::from(conn.direction == Direction::Active);
    // Was our FIN acknowledged?
    let fin = if saw(conn, TcpState::FinWait2) || (saw(conn, TcpState::Closing) && conn.time_wait) {
        1
    } else {
        match before_close(conn)? {
            // No FIN sent (an abort or a reset), or sent and never acknowledged.
            TcpState::Established | TcpState::CloseWait | TcpState::FinWait1 => 0,
            // Only an ACK of the FIN, a RST or giving up ends LAST_ACK; giving up needs the FIN
            // retransmitted, so with no retransmit and no RST the FIN was acknowledged.
            TcpState::LastAck if conn.resets_received > 0 => 0,
            TcpState::LastAck if conn.retransmits == 0 => 1,
            _ => return None,
        }
    };
    bytes_acked.checked_sub(syn + fin)
}

/// Payload bytes received in order, from the kernel's `bytes_received`, when exact.
pub fn payload_received(conn: &Connection, bytes_received: u64) -> Option<u64> {
    if !seen_from_open(conn) {
        return None;
    }
    let fin = if saw(conn, TcpState::CloseWait) || saw(conn, TcpState::Closing) {
        1
    } else {
        match before_close(conn)? {
            // Closed without the peer's FIN: an abort or a reset.
            TcpState::Established | TcpState::FinWait1 => 0,
            // FIN_WAIT2 ends on the peer's FIN (TIME_WAIT) or without it (timeout, orphan
            // kept as a FIN_WAIT2 timewait socket): not known here.
            _ => return None,
        }
    };
    bytes_received.checked_sub(fin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TcpState::*;
    use crate::testkit::{loopback, replay, state, task};

    fn closed(path: &[(TcpState, TcpState)]) -> Connection {
        let t = loopback(40000, 8080);
        let events: Vec<_> = path
            .iter()
            .enumerate()
            .map(|(i, (old, new))| state(i as u64 + 1, 0x10, t, *old, *new, task(1, "c")))
            .collect();
        let (_, rec) = replay(&events);
        rec.closed[0].clone()
    }

    #[test]
    fn syn_and_fin_are_taken_out_where_the_path_shows_them() {
        // A client that closes first: SYN and FIN acknowledged; the peer's FIN not known.
        let c = closed(&[
            (Close, SynSent),
            (SynSent, Established),
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close),
        ]);
        assert_eq!(payload_sent(&c, 1002), Some(1000));
        assert_eq!(payload_received(&c, 6), None);
        // A server that closes second: no SYN counted, the peer's FIN received, ours acked.
        let s = closed(&[
            (Listen, SynRecv),
            (SynRecv, Established),
            (Established, CloseWait),
            (CloseWait, LastAck),
            (LastAck, Close),
        ]);
        assert_eq!(payload_sent(&s, 501), Some(500));
        assert_eq!(payload_received(&s, 1001), Some(1000));
        // An abort: nothing but the SYN.
        let a = closed(&[
            (Close, SynSent),
            (SynSent, Established),
            (Established, Close),
        ]);
        assert_eq!(payload_sent(&a, 11), Some(10));
        assert_eq!(payload_received(&a, 7), Some(7));
        // Seen from the middle: unknown.
        let m = closed(&[
            (Established, FinWait1),
            (FinWait1, FinWait2),
            (FinWait2, Close),
        ]);
        assert_eq!(payload_sent(&m, 10), None);
    }

    #[test]
    fn congestion_states_are_named_in_order() {
        let names: Vec<_> = ca_state_names(0b11001).collect();
        assert_eq!(names, ["open", "recovery", "loss"]);
    }
}
