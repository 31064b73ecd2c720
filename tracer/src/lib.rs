//! The tracer agent: loads the kernel programs, rebuilds TCP connection lifecycles from their
//! events, and exports them as Prometheus metrics and JSON / text events.
//!
//! Data flows one way: `probes` (kernel hooks) -> `events` (ring buffer, decoding) ->
//! `conntrack` (pure lifecycle reconstruction) -> exporters (`metrics`, `sinks`).
pub mod agent;
pub mod cli;
pub mod diagnose;
pub mod events;
pub mod kernel;
pub mod metrics;
pub mod probes;
pub mod procfs;
pub mod seed;
pub mod sinks;
