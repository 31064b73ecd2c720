//! The findings, one file per topic. Each adds to `Diagnosis` the method that turns the tallies
//! into that topic's `Finding` (or none when there is nothing to say), building its text lines
//! and its JSON details side by side so that both show the same figures.
mod close_wait;
mod delayed_ack;
mod listen_overflows;
mod nagle;
mod resets;
mod retransmits;
mod slow_peer;
mod time_wait;
mod zero_window;

// Each threshold stays next to the rule that uses it; `diagnose` re-exports them.
pub use close_wait::MAX_OWNER_LOOKUPS;
pub use delayed_ack::DELAYED_ACK_NOTICE;
pub use listen_overflows::{ListenOverflows, OverflowingListener};
pub use resets::RESETS_PROBLEM;
pub use time_wait::{TIME_WAIT_BUCKETS_WARNING, TIME_WAIT_NOTICE};

pub(super) use slow_peer::PeerCost;
pub(super) use zero_window::WindowStall;
