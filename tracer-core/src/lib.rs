//! The pure core of tracer: what a TCP connection is, how its lifecycle is rebuilt from kernel
//! events, and how exporters hear about it. No I/O, no clock (time comes from the events), no
//! kernel or runtime crates: everything here is tested without root.
//!
//! Flow: [`model::Event`]s go into a [`tracker::Tracker`], which keeps the connection table, the
//! TIME_WAIT table ([`tracker::TimeWaitTable`]), per-connection delayed-ACK / Nagle accounting
//! ([`acks`]) and the CLOSE_WAIT deadlines, and tells an [`observer::Observer`] what it derives
//! ([`record`]s).
pub mod acks;
pub mod cost;
pub mod model;
pub mod observer;
pub mod record;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tracker;
pub mod workload;
