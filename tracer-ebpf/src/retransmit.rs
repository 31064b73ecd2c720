//! `tcp_retransmit_skb`: retransmitted segments, counted as the kernel's `TcpRetransSegs` does.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{EVENT_RETRANSMIT, EVENT_SYNACK_RETRANSMIT};

use crate::sock::Probed;
use crate::{maps, paths, sock};

/// Kernels since 6.10 fire the tracepoint for failed attempts too and pass the error as the
/// third argument; only successful retransmits count (as in `__tcp_retransmit_skb`).
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let err: i32 = ctx.arg(2);
    if err != 0 {
        return 0;
    }
    emit(&ctx)
}

/// Older kernels (two arguments) fire only on success.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_noerr(ctx: BtfTracePointContext) -> i32 {
    emit(&ctx)
}

/// A listener resent a SYN-ACK; `req` is the request socket, whose `sock_common` holds the
/// connection's addresses.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 {
        return 0;
    }
    let req: *const u8 = ctx.arg(1);
    let Some(mut entry) = maps::reserve(tracer_common::LOST_SYNACK) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; fill writes every
    // field not written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Probed>(event, req, false);
    event.kind = EVENT_SYNACK_RETRANSMIT;
    event.oldstate = 0;
    event.newstate = sock::state::<Probed>(req);
    event.segs = 1;
    entry.submit(maps::submit_flags());
    0
}

#[inline(always)]
fn emit(ctx: &BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    // One skb can carry many segments under GSO; tcp_skb_pcount() is what the kernel adds.
    let segs = match sock::read::<u16>(skb, maps::off!(skb_tcp_gso_segs)) {
        Some(0) | None => 1,
        Some(n) => n,
    };
    let ca_byte: u8 = sock::read(sk, maps::off!(icsk_ca_state_byte)).unwrap_or(0);
    paths::send::<Probed>(sk, tracer_common::LOST_RETRANSMIT);
    let Some(mut entry) = maps::reserve(tracer_common::LOST_RETRANSMIT) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; fill writes every
    // field not written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Probed>(event, sk, false);
    event.kind = EVENT_RETRANSMIT;
    event.oldstate = 0;
    event.newstate = sock::state::<Probed>(sk);
    event.segs = segs;
    event.ca_state = (ca_byte >> (maps::off!(icsk_ca_state_shift) & 7)) & 0x1f;
    entry.submit(maps::submit_flags());
    0
}
