//! `tcp_sendmsg_locked`: the sender's half of the Nagle + delayed-ACK stall. A write smaller
//! than the MSS, on a socket with Nagle on (no TCP_NODELAY, not corked) and data still
//! unacknowledged, is held back until an ACK arrives. Runs in the writer's system call, so
//! `current` is the process that owns the socket.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::EVENT_NAGLE_HELD;

use crate::sock::{Mem, Probed, Typed};
use crate::{cost, maps, paths, sock};

/// `TCP_NAGLE_OFF` (TCP_NODELAY) and `TCP_NAGLE_CORK` (TCP_CORK) in `tcp_sock.nonagle`.
const NAGLE_OFF_OR_CORK: u8 = 1 | 2;

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    // Runs on every send: one helper call, then plain loads of the `tcp_sock` members.
    let Some(tp) = cost::tcp_sock(sk) else {
        return 0;
    };
    let nonagle_byte: u8 = Typed::read(tp, maps::off!(tcp_nonagle_byte)).unwrap_or(0);
    let nonagle = (nonagle_byte >> (maps::off!(tcp_nonagle_shift) & 7)) & 0xf;
    if nonagle & NAGLE_OFF_OR_CORK != 0 {
        return 0;
    }
    let packets_out: u32 = Typed::read(tp, maps::off!(tcp_packets_out)).unwrap_or(0);
    if packets_out == 0 {
        return 0;
    }
    // `const struct msghdr *`: typed too.
    let msg: *const u8 = ctx.arg(1);
    let left: u64 = Typed::read(msg, maps::off!(msghdr_left)).unwrap_or(0);
    let mss: u32 = Typed::read(tp, maps::off!(tcp_mss_cache)).unwrap_or(0);
    if left == 0 || left >= u64::from(mss) {
        return 0;
    }
    paths::send::<Probed>(sk, tracer_common::LOST_SENDMSG);
    let Some(mut entry) = maps::reserve(tracer_common::LOST_SENDMSG) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; `fill` writes every
    // field not written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Probed>(event, sk, true);
    event.kind = EVENT_NAGLE_HELD;
    event.oldstate = 0;
    event.newstate = sock::state::<Probed>(sk);
    event.aux = left;
    entry.submit(maps::submit_flags());
    0
}
