//! Stage 4, the commands: a session (attach, seed), the event loop that pumps kernel events
//! through the tracker to the exporters, and the commands built on them.
pub mod diagnose;
pub mod listen;
pub mod memory;
pub mod privileges;
pub mod pump;
pub mod resync;
pub mod run;
pub mod session;
pub mod top;
pub mod workloads;
