//! Kernel timer tracepoints, filtered down to the TCP timers we care about. They fire for every
//! timer in the kernel, so the first thing each program does is compare the callback with the
//! addresses the agent found in kallsyms, and return.
//!
//! TIME_WAIT: the timer lives inside `struct inet_timewait_sock`; arming it means a socket
//! entered TIME_WAIT (or was re-armed), detaching it means it left (an expiry detaches too and is
//! followed by `timer_expire_entry`).
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{EVENT_TW_CANCEL, EVENT_TW_EXPIRE, EVENT_TW_START};

use crate::{maps, sock};

#[btf_tracepoint(function = "timer_start")]
pub fn timer_start(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, EVENT_TW_START)
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, EVENT_TW_CANCEL)
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, EVENT_TW_EXPIRE)
}

#[inline(always)]
fn on_timer(ctx: &BtfTracePointContext, kind: u8) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    let off = maps::offsets();
    let function: u64 = sock::read(timer, off.timer_function).unwrap_or(0);
    let symbols = maps::symbols();
    if function == 0 || function != symbols.tw_timer_handler || off.valid == 0 {
        return 0;
    }
    let tw = timer.wrapping_sub(off.tw_timer as usize);
    let substate: u8 = sock::read(tw, off.tw_substate).unwrap_or(0);
    let Some(mut entry) = maps::reserve() else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; `fill` writes every
    // field not written below. A timewait socket starts with a `sock_common`, which is all
    // that `fill` reads.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill(event, tw, &off);
    event.kind = kind;
    event.oldstate = 0;
    event.newstate = substate;
    entry.submit(0);
    0
}
