//! The trackers: the connection table and, inside it, the TIME_WAIT table.
mod connections;
mod time_wait;

pub use connections::{Tracker, TrackerConfig};
pub use time_wait::{TimeWaitConfig, TimeWaitTable};
