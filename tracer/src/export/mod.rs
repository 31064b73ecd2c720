//! Stage 3, the exporters: Prometheus metrics (definitions and the HTTP endpoint) and
//! per-connection events (JSON or text lines). Both observe the tracker.
pub mod cost;
pub mod events;
pub mod filter;
pub mod metrics;
