//! `inet_sock_set_state`: every TCP state change, the backbone of the lifecycle. Changes are
//! kept per socket in the kernel and sent in runs (see `paths`); listeners' own changes and
//! whatever cannot be kept go out at once.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::EVENT_STATE;

use crate::sock::Typed;
use crate::{cost, maps, paths, sock, timers};

const SYN_SENT: u8 = 2;
const SYN_RECV: u8 = 3;
const CLOSE: u8 = 7;
const LISTEN: u8 = 10;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 {
        return 0;
    }
    // `const struct sock *`: typed, so its fields are read with plain loads.
    let sk: *const u8 = ctx.arg(0);
    if !sock::is_tcp::<Typed>(sk) {
        return 0;
    }
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;
    let owner = tracer_common::owner_transition(old, new);
    if new == LISTEN || old == LISTEN && new == CLOSE {
        // A listener's own changes are rare and not a connection's: sent at once.
        return send_alone(sk, old, new, owner);
    }
    let opening = (old == CLOSE && new == SYN_SENT) || (old == LISTEN && new == SYN_RECV);
    // SAFETY: bpf_ktime_get_ns takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    if !paths::keep(sk, now, old, new, owner, opening) {
        if new == CLOSE {
            // The timewait socket's birth, if held, must still arrive before this CLOSE; and
            // nothing of this socket may stay for the next one at its address.
            timers::flush_born(tracer_common::LOST_STATE);
            cost::forget(sk);
        }
        return send_alone(sk, old, new, owner);
    }
    0
}

/// One state change in a record of its own.
#[inline(always)]
fn send_alone(sk: *const u8, old: u8, new: u8, owner: bool) -> i32 {
    let Some(mut entry) = maps::reserve(tracer_common::LOST_STATE) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; every field is
    // written before submit (fill writes all fields not written here).
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Typed>(event, sk, owner);
    event.kind = EVENT_STATE;
    event.oldstate = old;
    event.newstate = new;
    entry.submit(maps::submit_flags());
    0
}
