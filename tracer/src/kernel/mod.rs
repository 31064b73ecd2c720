//! Stage 1, the kernel: what the agent learns from the running kernel (privileges, BTF offsets,
//! timer symbols, sysctls, clocks), the eBPF programs it loads, and the decoding of their
//! ring-buffer records into `tracer_core` events.
pub mod batch;
pub mod btf;
pub mod btf_types;
pub mod clock;
pub mod compat;
pub mod decode;
pub mod mapped;
pub mod programs;
pub mod softirqs;
pub mod system;
pub mod tables;
