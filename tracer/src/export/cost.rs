//! What turns a connection's raw cost into units and names, shared by the event lines and
//! the metrics: the kernel's jiffy length (measured at start-up, `host::hz`) and its RST
//! reason names (from BTF).
use std::collections::HashMap;
use std::sync::Arc;

use tracer_core::model::ConnectionCost;
use tracer_core::record::Connection;

/// What turns the raw cost into units: the kernel's jiffy length and its RST reason names.
#[derive(Clone, Debug, Default)]
pub struct CostContext {
    /// Length of one jiffy (from the measured HZ); `None` leaves jiffy-based times unknown.
    pub jiffy_ns: Option<u64>,
    /// The kernel's `enum sk_rst_reason` names (from BTF), by value.
    pub rst_reasons: Arc<HashMap<u16, String>>,
}

impl CostContext {
    /// The name of the reason of the RST `conn` sent: `unknown` when the kernel gave none or
    /// an unnamed one; `None` when it sent none.
    pub fn reset_sent_reason(&self, conn: &Connection) -> Option<&str> {
        if conn.resets_sent == 0 {
            return None;
        }
        Some(
            conn.reset_sent_reason
                .and_then(|code| self.rst_reasons.get(&code))
                .map_or("unknown", String::as_str),
        )
    }

    /// Time the sender was held by the peer's receive window, in nanoseconds.
    pub fn rwnd_limited_ns(&self, cost: &ConnectionCost) -> Option<u64> {
        Some(u64::from(cost.rwnd_limited_jiffies).saturating_mul(self.jiffy_ns?))
    }
}
