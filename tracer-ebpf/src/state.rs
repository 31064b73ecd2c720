//! `inet_sock_set_state`: every TCP state change, the backbone of the lifecycle.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::EVENT_STATE;

use crate::{maps, sock};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    if !sock::is_tcp(sk) {
        return 0;
    }
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    let Some(mut entry) = maps::reserve(tracer_common::LOST_STATE) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; every field is
    // written before submit (fill writes all fields not written here).
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill(
        event,
        sk,
        tracer_common::owner_transition(oldstate as u8, newstate as u8),
    );
    event.kind = EVENT_STATE;
    event.oldstate = oldstate as u8;
    event.newstate = newstate as u8;
    entry.submit(maps::submit_flags());
    0
}
