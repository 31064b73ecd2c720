//! RSTs received and sent, so a close can be told apart as reset, refused or aborted.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::debug;
use tracer_common::{EVENT_RESET_RECEIVED, EVENT_RESET_SENT, RST_REASON_UNKNOWN};

use crate::sock::Probed;
use crate::{maps, paths, sock};

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    emit(&ctx, sk, EVENT_RESET_RECEIVED, 0)
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    if sk.is_null() {
        // A RST answering a segment that matched no socket (a refused connection, a scan):
        // no connection of ours to attribute it to, only counted by reason.
        maps::count_rst_no_socket(reason);
        return 0;
    }
    emit(&ctx, sk, EVENT_RESET_SENT, reason as u16)
}

/// Kernels before 6.10 pass `(sk, skb)` without a reason; the RST still counts, its reason
/// unknown.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_noreason(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        maps::count_rst_no_socket(u32::MAX);
        return 0;
    }
    emit(&ctx, sk, EVENT_RESET_SENT, RST_REASON_UNKNOWN)
}

#[inline(always)]
fn emit(ctx: &BtfTracePointContext, sk: *const u8, kind: u8, reason: u16) -> i32 {
    if maps::off!(valid) == 0 {
        debug!(ctx, "reset seen before offsets were set");
        return 0;
    }
    // Both hooks sit in TCP code, so no protocol check; `sk` may be a TIME_WAIT or request
    // mini socket, whose `sock_common` part (all that `fill` reads) is valid.
    let program = if kind == EVENT_RESET_SENT {
        tracer_common::LOST_SEND_RESET
    } else {
        tracer_common::LOST_RECEIVE_RESET
    };
    paths::send::<Probed>(sk, program);
    let Some(mut entry) = maps::reserve(program) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; fill writes every
    // field not written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Probed>(event, sk, false);
    event.kind = kind;
    event.oldstate = 0;
    event.newstate = sock::state::<Probed>(sk);
    event.segs = reason;
    entry.submit(maps::submit_flags());
    0
}
