//! Delayed ACKs and the Nagle + delayed-ACK stall, per connection. Pure.
//!
//! The stall: a sender with Nagle on writes a small segment while an earlier one is still
//! unacknowledged, so the kernel holds it until an ACK arrives; the receiver is delaying that
//! ACK (about 40 ms on Linux). When both ends are on this host (loopback, containers), the
//! receiver's delayed ACK on the reverse 4-tuple, fired while the held write waited, closes the
//! loop: the time lost is from the held write to that ACK.
use crate::model::Owner;

/// A held write older than this when a delayed ACK fires is not what that ACK released (the
/// longest delayed-ACK timeouts elsewhere are 500 ms).
pub const STALL_WINDOW_NS: u64 = 500_000_000;

/// A live connection's stall report is repeated at most this often (event time).
pub const REPORT_EVERY_NS: u64 = 10_000_000_000;

/// A connection's [`AckStats`], allocated on first use: most connections never send a delayed
/// ACK or hold a write, and the table holds up to hundreds of thousands of connections. Reads
/// see zeros until then.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acks(Option<Box<AckStats>>);

static NO_ACKS: AckStats = AckStats {
    delayed_acks: 0,
    delayed_ack_ns: 0,
    nagle_held_writes: 0,
    nagle_stalls: 0,
    nagle_lost_ns: 0,
    writer: None,
    held_write_ns: None,
    reported_ns: None,
    reported_stalls: 0,
};

impl std::ops::Deref for Acks {
    type Target = AckStats;

    fn deref(&self) -> &AckStats {
        self.0.as_deref().unwrap_or(&NO_ACKS)
    }
}

impl Acks {
    pub fn delayed_ack(&mut self, held_ns: Option<u64>) {
        self.stats().delayed_ack(held_ns);
    }

    pub fn held_write(&mut self, ts_ns: u64, writer: Owner) {
        self.stats().held_write(ts_ns, writer);
    }

    /// See [`AckStats::peer_delayed_ack`]; nothing was held when nothing was ever recorded.
    pub fn peer_delayed_ack(&mut self, ack_ns: u64, held_ns: Option<u64>) -> Option<u64> {
        self.0.as_mut()?.peer_delayed_ack(ack_ns, held_ns)
    }

    /// See [`AckStats::report_due`].
    pub fn report_due(&mut self, now_ns: u64, closing: bool) -> bool {
        self.0
            .as_mut()
            .is_some_and(|stats| stats.report_due(now_ns, closing))
    }

    fn stats(&mut self) -> &mut AckStats {
        self.0.get_or_insert_with(Box::default)
    }
}

/// Delayed-ACK and Nagle figures of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckStats {
    /// Delayed ACKs this socket sent.
    pub delayed_acks: u32,
    /// Time those ACKs were held, summed (only those whose arming was seen).
    pub delayed_ack_ns: u64,
    /// Small writes held back by Nagle with data in flight.
    pub nagle_held_writes: u32,
    /// Held writes that waited for the peer's delayed ACK.
    pub nagle_stalls: u32,
    /// Time those writes waited.
    pub nagle_lost_ns: u64,
    /// The process that made the held writes (known: they run in its system call).
    pub writer: Option<Owner>,
    /// The latest held write not yet matched with an ACK.
    pub held_write_ns: Option<u64>,
    /// When a stall report was last emitted, and the stalls it covered.
    pub reported_ns: Option<u64>,
    pub reported_stalls: u32,
}

impl AckStats {
    pub fn delayed_ack(&mut self, held_ns: Option<u64>) {
        self.delayed_acks = self.delayed_acks.saturating_add(1);
        self.delayed_ack_ns = self.delayed_ack_ns.saturating_add(held_ns.unwrap_or(0));
    }

    pub fn held_write(&mut self, ts_ns: u64, writer: Owner) {
        self.nagle_held_writes = self.nagle_held_writes.saturating_add(1);
        self.writer = Some(writer);
        // The first unmatched write is the one that waits longest.
        self.held_write_ns.get_or_insert(ts_ns);
    }

    /// The peer sent a delayed ACK at `ack_ns`, held for `held_ns`: if a write of ours was
    /// waiting for it, that is a stall. Returns the time lost.
    pub fn peer_delayed_ack(&mut self, ack_ns: u64, held_ns: Option<u64>) -> Option<u64> {
        let write_ns = self.held_write_ns?;
        if write_ns > ack_ns {
            return None;
        }
        let lost = ack_ns - write_ns;
        // The write must have waited on this ACK: it was held while the ACK was being delayed.
        let waiting_since = ack_ns.saturating_sub(held_ns.unwrap_or(STALL_WINDOW_NS));
        self.held_write_ns = None;
        if lost > STALL_WINDOW_NS || write_ns < waiting_since {
            return None;
        }
        self.nagle_stalls = self.nagle_stalls.saturating_add(1);
        self.nagle_lost_ns = self.nagle_lost_ns.saturating_add(lost);
        Some(lost)
    }

    /// Whether a stall report is due at `now_ns`: the first stall at once, then at most every
    /// `REPORT_EVERY_NS` while new stalls occur; `closing` flushes what is left.
    pub fn report_due(&mut self, now_ns: u64, closing: bool) -> bool {
        if self.nagle_stalls == self.reported_stalls {
            return false;
        }
        let due = closing
            || self
                .reported_ns
                .is_none_or(|last| now_ns.saturating_sub(last) >= REPORT_EVERY_NS);
        if due {
            self.reported_ns = Some(now_ns);
            self.reported_stalls = self.nagle_stalls;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Comm;

    const MS: u64 = 1_000_000;

    fn writer() -> Owner {
        Owner {
            pid: 7,
            comm: Comm::from("client"),
        }
    }

    #[test]
    fn held_write_released_by_peer_delayed_ack_is_a_stall() {
        let mut stats = AckStats::default();
        stats.held_write(1_000 * MS, writer());
        let lost = stats.peer_delayed_ack(1_040 * MS, Some(41 * MS));
        assert_eq!(lost, Some(40 * MS));
        assert_eq!((stats.nagle_stalls, stats.nagle_lost_ns), (1, 40 * MS));
        assert_eq!(stats.held_write_ns, None, "matched once");
        assert_eq!(stats.peer_delayed_ack(1_080 * MS, Some(40 * MS)), None);
    }

    #[test]
    fn delayed_ack_armed_after_the_write_did_not_hold_it() {
        let mut stats = AckStats::default();
        stats.held_write(1_000 * MS, writer());
        // Armed at 1 030 ms, after the write: some other segment's ACK.
        assert_eq!(stats.peer_delayed_ack(1_070 * MS, Some(40 * MS)), None);
        assert_eq!(stats.nagle_stalls, 0);
    }

    #[test]
    fn stale_held_write_is_not_a_stall() {
        let mut stats = AckStats::default();
        stats.held_write(0, writer());
        assert_eq!(stats.peer_delayed_ack(2_000 * MS, None), None);
    }

    #[test]
    fn reports_first_stall_then_rate_limited_then_on_close() {
        let mut stats = AckStats::default();
        assert!(!stats.report_due(0, false), "nothing to report");
        stats.held_write(0, writer());
        stats.peer_delayed_ack(40 * MS, Some(40 * MS));
        assert!(stats.report_due(40 * MS, false));
        stats.held_write(100 * MS, writer());
        stats.peer_delayed_ack(140 * MS, Some(40 * MS));
        assert!(!stats.report_due(140 * MS, false), "rate limited");
        assert!(stats.report_due(150 * MS, true), "flushed at close");
        assert!(!stats.report_due(200 * MS, true), "nothing new");
    }

    #[test]
    fn delayed_acks_sum_known_hold_times() {
        let mut stats = AckStats::default();
        stats.delayed_ack(Some(40 * MS));
        stats.delayed_ack(None);
        assert_eq!((stats.delayed_acks, stats.delayed_ack_ns), (2, 40 * MS));
    }
}

#[cfg(test)]
mod lazy_tests {
    use super::*;

    #[test]
    fn figures_read_as_zero_until_first_recorded_and_nothing_is_allocated_for_reads() {
        let mut acks = Acks::default();
        assert_eq!(acks.delayed_acks, 0);
        assert_eq!(acks.peer_delayed_ack(10, None), None);
        assert!(!acks.report_due(10, true));
        assert!(acks.0.is_none(), "reads and no-op checks allocate nothing");
        acks.delayed_ack(Some(40));
        assert_eq!((acks.delayed_acks, acks.delayed_ack_ns), (1, 40));
    }
}
