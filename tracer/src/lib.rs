//! The tracer agent: loads the kernel programs, rebuilds TCP connection lifecycles from their
//! events, and exports them as Prometheus metrics, JSON / text events and `diagnose` findings.
//!
//! Data flows one way; each stage is a folder:
//!
//! ```text
//! kernel (programs, BTF, decode) ──► tracer_core (tracker, pure) ──► export (metrics, events)
//!        ▲                                   ▲                   └─► diagnose (findings)
//!        │                                   │
//!   host (sock_diag, namespaces, /proc) ─────┘      app (session, pump, commands) wires them;
//!                                                   cli parses arguments into app's configs.
//! ```
pub mod app;
pub mod cli;
pub mod diagnose;
pub mod export;
pub mod host;
pub mod kernel;
