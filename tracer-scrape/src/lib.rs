//! Reads a tracer agent's `/metrics`: one HTTP GET ([`http`]) and one parser of the Prometheus
//! text format ([`text`]), shared by the agent's integration tests and `cargo xtask bench` so
//! that neither writes its own; and a temporary real Prometheus with its query API
//! ([`prometheus`]) for the end-to-end test and `cargo xtask plots`.
//!
//! The parser is ours because the `prometheus-parse` crate splits label values on `,` and `=`
//! and keeps their escapes, and drops lines it cannot read: the tests need escaped values read
//! exactly and a malformed exposition reported, not skipped. Why the HTTP client is ours too is
//! told in [`http`].
pub mod http;
pub mod prometheus;
pub mod text;

pub use http::{Response, get};
pub use text::{Exposition, ParseError, Sample};
