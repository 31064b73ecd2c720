//! The report's wording for what the kernel reports: what each retransmit kind and reset reason
//! means and what to do about it, how TIME_WAIT exits are named, how the settings read.
use tracer_core::model::RetransmitKind;
use tracer_core::record::TimeWaitExit;

use crate::diagnose::render::grouped;
use crate::kernel::system::TcpSysctls;

/// What retransmits of `kind` say about the path, as a clause of the finding's `why`.
pub(super) fn kind_explanation(kind: RetransmitKind) -> &'static str {
    match kind {
        RetransmitKind::Syn => {
            "SYN retransmits are connection attempts that got no answer: the peer is down or \
             unreachable, a firewall drops the SYNs, or its accept queue is full; connect() \
             waits 1 s, then 2 s, 4 s... each time"
        }
        RetransmitKind::SynAck => {
            "SYN-ACK retransmits mean this host answered a connection attempt but the client's \
             final ACK did not come: loss on the path, a client that gave up, or a SYN flood"
        }
        RetransmitKind::Timeout => {
            "timeout retransmits mean nothing was acknowledged for a whole retransmission \
             timeout (200 ms or more): heavy loss, a stalled peer or a broken path"
        }
        RetransmitKind::Fast => {
            "fast retransmits repair a lost segment quickly, from duplicate ACKs: some loss or \
             congestion on the path"
        }
        RetransmitKind::Other => {
            "other retransmits (tail-loss probes and the like) are mostly harmless on their own"
        }
    }
}

/// `kind` as the breakdowns name it (`SYN-ACK 3`).
pub(super) fn kind_label(kind: RetransmitKind) -> &'static str {
    match kind {
        RetransmitKind::Syn => "SYN",
        RetransmitKind::SynAck => "SYN-ACK",
        RetransmitKind::Timeout => "timeout",
        RetransmitKind::Fast => "fast",
        RetransmitKind::Other => "other",
    }
}

/// Why the kernel sent a RST, for the common `enum sk_rst_reason` values.
pub(super) fn reason_explanation(name: &str) -> Option<&'static str> {
    Some(match name {
        "no_socket" => {
            "a segment arrived for which no socket exists: a connection attempt to a port \
             nothing listens on, or data for a connection this host has already closed"
        }
        "tcp_abort_on_close" => {
            "the application closed its socket while received data was still unread"
        }
        "tcp_abort_on_data" => {
            "data arrived after the application had closed the socket or shut down reading, or \
             it closed with SO_LINGER set to 0"
        }
        "tcp_abort_on_linger" => {
            "an orphaned connection in FIN_WAIT2 was aborted at once because TCP_LINGER2 is \
             negative"
        }
        "tcp_abort_on_memory" => {
            "the kernel was short of memory for TCP or had too many orphaned sockets \
             (net.ipv4.tcp_mem, tcp_max_orphans)"
        }
        "tcp_keepalive_timeout" => "keepalive probes went unanswered: the peer is gone",
        "tcp_state" => {
            "the connection was torn down in a state that requires a RST (an abortive close, \
             e.g. SO_LINGER 0, or a disconnect)"
        }
        "tcp_disconnect_with_data" => "the connection was disconnected with data not yet sent",
        "tcp_timewait_socket" => "a segment reached a TIME_WAIT socket that had to reject it",
        "invalid_syn" => "an unexpected SYN arrived on an established connection",
        "tcp_invalid_ack_sequence"
        | "tcp_too_old_ack"
        | "tcp_ack_unsent_data"
        | "tcp_old_ack"
        | "tcp_rfc7323_paws"
        | "tcp_flags" => {
            "a segment did not fit the connection (ACK number, timestamps or flags): often a \
             peer or a middlebox that forgot the connection (restart, NAT or idle timeout)"
        }
        "not_specified" => "the kernel gave no reason",
        _ => return None,
    })
}

/// What to do about RSTs sent for `name`, for the reasons with a clear fix; `None` leaves the
/// generic advice.
pub(super) fn reason_action(name: &str) -> Option<&'static str> {
    Some(match name {
        "no_socket" => {
            "Check that the service listens on the port its clients use (`ss -ltn`), and that \
             clients do not keep using connections the server has already closed (idle \
             timeouts)."
        }
        "tcp_abort_on_close" => {
            "Make the application read what the peer sent (until EOF) before it closes the \
             socket, or have the protocol end cleanly so nothing is left unread."
        }
        "tcp_abort_on_data" => {
            "Make both sides agree on when the conversation ends: shutdown(SHUT_WR), then read \
             until EOF before close(); avoid SO_LINGER 0 unless an abortive close is wanted."
        }
        "tcp_abort_on_linger" => {
            "Leave TCP_LINGER2 at its default unless aborting orphaned connections is wanted."
        }
        "tcp_abort_on_memory" => {
            "Find what leaves so many orphaned sockets, or raise net.ipv4.tcp_max_orphans / \
             tcp_mem."
        }
        "tcp_keepalive_timeout" => {
            "Check the peers and the path (NAT and firewall idle timeouts) behind these \
             connections."
        }
        _ => return None,
    })
}

/// `exit` as the TIME_WAIT finding counts it (`3 ended early`).
pub(super) fn exit_label(exit: TimeWaitExit) -> &'static str {
    match exit {
        TimeWaitExit::Expired => "expired",
        TimeWaitExit::Reused => "reused",
        TimeWaitExit::Killed => "ended early",
    }
}

/// The TIME_WAIT settings as one line, `unknown` where they could not be read.
pub(super) fn settings_text(sysctls: &TcpSysctls) -> String {
    let show = |v: Option<i64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let range = match (sysctls.ip_local_port_range, sysctls.port_range_size()) {
        (Some((lo, hi)), Some(size)) => format!("{lo}-{hi} ({}\u{a0}ports)", grouped(size.into())),
        (Some((lo, hi)), None) => format!("{lo}-{hi}"),
        _ => "unknown".to_owned(),
    };
    format!(
        "tcp_tw_reuse={}, tcp_max_tw_buckets={}, ip_local_port_range={range}",
        show(sysctls.tcp_tw_reuse),
        show(sysctls.tcp_max_tw_buckets),
    )
}
