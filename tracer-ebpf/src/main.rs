//! Kernel programs of the tracer. Every hook is a BTF-typed tracepoint (`tp_btf`): the kernels we
//! target refuse kprobes and fentry, and `tp_btf` is cheaper than the classic perf-event path.
//!
//! Struct offsets come from the agent (read from the running kernel's BTF) through the
//! read-only global `OFFSETS`: Rust eBPF has no CO-RE relocations.
#![no_std]
// Atomic read-modify-write instructions (`atomic`): `core::sync::atomic` has none for BPF.
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod atomic;
mod cost;
mod maps;
mod paths;
mod resets;
mod retransmit;
mod sendmsg;
mod sock;
mod softirqs;
mod state;
mod timers;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot unwind or abort; the verifier rejects any path that reaches
    // here, so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
