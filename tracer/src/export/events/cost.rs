//! The cost fields of a `connection_closed` event: what the kernel's socket said of the
//! connection as it closed (bytes, segments, RTT, window, congestion states, rwnd-limited
//! time) and the reset it sent or received. Every key is always present, `null` when unknown
//! (a kernel without the `connection_cost` feature, or a figure the path cannot make exact).
use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};
use tracer_core::cost::{ca_state_names, payload_received, payload_sent};
use tracer_core::model::{ConnectionCost, RetransmitKind};
use tracer_core::record::Connection;

use crate::export::cost::CostContext;

/// Number of fields `write` adds.
pub const FIELDS: usize = 18;

/// Writes the cost fields into a `connection_closed` object.
pub fn write<S: SerializeStruct>(
    conn: &Connection,
    ctx: &CostContext,
    s: &mut S,
) -> Result<(), S::Error> {
    let cost = conn.cost.as_deref();
    let us = |ns: u64| ns / 1_000;
    // The kernel reports 0 for a figure it has no sample of yet.
    let rtt = |f: fn(&ConnectionCost) -> u64| cost.map(f).filter(|ns| *ns > 0).map(us);
    s.serialize_field(
        "bytes_sent",
        &cost.and_then(|c| payload_sent(conn, c.bytes_sent)),
    )?;
    s.serialize_field(
        "bytes_received",
        &cost.and_then(|c| payload_received(conn, c.bytes_received)),
    )?;
    s.serialize_field("seq_bytes_acked", &cost.map(|c| c.bytes_sent))?;
    s.serialize_field("seq_bytes_received", &cost.map(|c| c.bytes_received))?;
    s.serialize_field("segs_out", &cost.map(|c| c.segs_out))?;
    s.serialize_field("segs_in", &cost.map(|c| c.segs_in))?;
    s.serialize_field("retransmits_by_kind", &Kinds(&conn.retransmit_kinds))?;
    s.serialize_field("kernel_retransmits", &cost.map(|c| c.total_retrans))?;
    s.serialize_field("srtt_us", &rtt(|c| c.srtt_ns))?;
    // Without an RTT sample the variance is the kernel's initial guess (TCP_TIMEOUT_INIT).
    s.serialize_field(
        "rttvar_us",
        &cost.filter(|c| c.srtt_ns > 0).map(|c| us(c.rttvar_ns)),
    )?;
    s.serialize_field("min_rtt_us", &rtt(|c| c.min_rtt_ns))?;
    s.serialize_field("cwnd", &cost.map(|c| c.cwnd))?;
    s.serialize_field("max_cwnd", &cost.map(|c| c.max_cwnd))?;
    s.serialize_field(
        "congestion_states",
        &cost.map(|c| ca_state_names(c.ca_states).collect::<Vec<_>>()),
    )?;
    s.serialize_field(
        "rwnd_limited_us",
        &cost.and_then(|c| ctx.rwnd_limited_ns(c)).map(us),
    )?;
    s.serialize_field("reset_sent_reason", &ctx.reset_sent_reason(conn))?;
    s.serialize_field("reset_received", &(conn.resets_received > 0))?;
    s.serialize_field("cost_known", &cost.is_some())
}

/// Retransmitted segments by kind, as an object keyed like the metric's `kind` label.
struct Kinds<'a>(&'a [u32; RetransmitKind::ALL.len()]);

impl Serialize for Kinds<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut m = serializer.serialize_map(Some(self.0.len()))?;
        for (kind, n) in RetransmitKind::ALL.iter().zip(self.0) {
            m.serialize_entry(kind.as_str(), n)?;
        }
        m.end()
    }
}

/// The text line's cost columns: kilobytes sent and received (sequence space, as `tcplife`
/// shows them) and the smoothed RTT in ms, `-` when unknown.
pub fn text_columns(conn: &Connection) -> [String; 3] {
    match conn.cost.as_deref() {
        Some(c) => [
            (c.bytes_sent / 1024).to_string(),
            (c.bytes_received / 1024).to_string(),
            format!("{}.{:03}", c.srtt_ns / 1_000_000, c.srtt_ns / 1_000 % 1_000),
        ],
        None => ["-".to_owned(), "-".to_owned(), "-".to_owned()],
    }
}
