//! Kernel timer tracepoints, filtered down to the TCP timers we care about. They fire for every
//! timer in the kernel, so the first thing each program does is compare the callback with the
//! addresses the agent found in kallsyms, and return.
//!
//! TIME_WAIT: the timer lives inside `struct inet_timewait_sock`; arming it means a socket
//! entered TIME_WAIT (or was re-armed), detaching it means it left (an expiry detaches too and is
//! followed by `timer_expire_entry`).
//!
//! Delayed ACK: `icsk_delack_timer` inside `struct inet_connection_sock`. A firing sends a
//! delayed ACK only if one is still pending (ICSK_ACK_SCHED | ICSK_ACK_TIMER); otherwise the ACK
//! already left with data and the firing is a no-op, which is not reported.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{
    COUNT_TW_EXITS_TABLE_FULL, EVENT_DELAYED_ACK, EVENT_TW_CANCEL, EVENT_TW_START, RawEvent,
    RawTwBirth, SockHead, TwExitKey,
};

use crate::sock::{Copied, Mem, Probed, Typed};
use crate::{maps, paths, sock};

/// A re-arm detaches and starts the timer in one `mod_timer` call, with interrupts off: within
/// this much of each other. A kill followed by a new timewait socket at the same address (the
/// slab hands the memory back out at once) takes a whole connection in between, far longer;
/// without the bound that birth passed for a re-arm of the socket just killed.
const REARM_NS: u64 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Cancel,
    Expire,
}

#[btf_tracepoint(function = "timer_start")]
pub fn timer_start(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, Phase::Start)
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, Phase::Cancel)
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, Phase::Expire)
}

#[inline(always)]
fn on_timer(ctx: &BtfTracePointContext, phase: Phase) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    // Every timer in the kernel comes through here and almost none is ours: read only what
    // the filter needs before anything else.
    // A plain load: the tracepoint's `struct timer_list *` is BTF-typed (see `sock::Typed`).
    let function: u64 = Typed::read(timer, maps::off!(timer_function)).unwrap_or(0);
    let symbols = maps::symbols();
    if function == 0
        || (function != symbols.tcp_delack_timer && function != symbols.tw_timer_handler)
    {
        return 0;
    }
    if maps::off!(valid) == 0 {
        return 0;
    }
    if function == symbols.tcp_delack_timer {
        return match phase {
            Phase::Start => delack_armed(timer),
            Phase::Expire => delack_fired(timer),
            Phase::Cancel => 0,
        };
    }
    if function != symbols.tw_timer_handler {
        return 0;
    }
    if phase == Phase::Expire {
        // The detach just before told it already (see below).
        return 0;
    }
    let tw = timer.wrapping_sub(maps::off!(tw_timer) as usize);
    let program = match phase {
        Phase::Start => tracer_common::LOST_TIMER_START,
        _ => tracer_common::LOST_TIMER_CANCEL,
    };
    let (Some(slot), Some(copy)) = (
        maps::TW_BORN.get_ptr_mut(0),
        maps::HEADS.get_ptr_mut(program),
    ) else {
        return 0;
    };
    // SAFETY: this CPU's slot, valid for the program's run. Its writers (this program and
    // the CLOSE that takes a birth) run with BHs off around the birth and its CLOSE.
    let slot = unsafe { &mut *slot };
    let head = Tw {
        at: tw,
        copied: sock::copy_head(tw, copy),
        head: copy,
    };
    let substate: u8 = head.read(maps::off!(tw_substate)).unwrap_or(0);
    // An expiry detaches the timer once `jiffies` has reached its deadline; a kill (reuse, RST,
    // namespace exit) detaches it before. Telling them apart here saves the expiry's record.
    let expired = phase == Phase::Cancel && {
        let expires: u64 = Typed::read(timer, maps::off!(timer_expires)).unwrap_or(u64::MAX);
        // SAFETY: bpf_jiffies64 takes no arguments and only reads the jiffies counter.
        let now = unsafe { bpf_jiffies64() };
        // `expires` is an unsigned long compared as the kernel's time_after_eq does.
        (now.wrapping_sub(expires) as i64) >= 0
    };
    // SAFETY: bpf_ktime_get_ns takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut rearm = false;
    if phase == Phase::Cancel {
        // Whatever birth is still held goes first, in order.
        send_born(slot, tracer_common::LOST_TIMER_CANCEL);
        slot.last_cancel = timer as u64;
        slot.last_cancel_ns = now;
        if keep_exit(slot, &head, now, substate, expired) {
            return 0;
        }
    } else if slot.last_cancel == timer as u64
        && now.wrapping_sub(slot.last_cancel_ns) < REARM_NS
        && same_socket(slot, &head, now)
    {
        // A re-arm: detached then started again by one mod_timer. The detach was no exit:
        // taken back from the table, it never reaches the agent and nothing is sent. If it
        // already left (the table was full, or the agent read it in between), the start
        // goes at once, marked as a re-arm, for the agent to take the detach back.
        let taken_back = maps::TW_EXITS
            .remove(TwExitKey {
                tw: tw as u64,
                ts_ns: slot.last_cancel_ns,
            })
            .is_ok();
        slot.last_cancel = 0;
        if taken_back {
            return 0;
        }
        rearm = true;
    } else {
        // A birth: held for the CLOSE of the socket it replaces.
        send_born(slot, tracer_common::LOST_TIMER_START);
        timer_event(&mut slot.born, &head, now, EVENT_TW_START, substate, false);
        return 0;
    }
    let Some(mut entry) = maps::reserve(program) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; `timer_event`
    // writes every field.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    if phase == Phase::Start {
        timer_event(event, &head, now, EVENT_TW_START, substate, rearm);
    } else {
        timer_event(event, &head, now, EVENT_TW_CANCEL, substate, expired);
    }
    entry.submit(maps::submit_flags());
    0
}

/// Whether the timewait socket at `tw` now is the one whose detach `slot.exit` holds (same
/// namespace and 4-tuple): a re-arm. Under churn a socket killed on this CPU often hands its
/// memory, timer included, to the next timewait socket within microseconds; that start is a
/// birth, and the kill before it an exit.
#[inline(always)]
fn same_socket(slot: &mut maps::TwSlot, tw: &Tw, now: u64) -> bool {
    tw.fill(&mut slot.again, now);
    let (a, b) = (&slot.again, &slot.exit);
    a.netns == b.netns
        && a.sport == b.sport
        && a.dport == b.dport
        && same_address(&a.saddr, &b.saddr)
        && same_address(&a.daddr, &b.daddr)
}

/// Byte by byte: array equality could become a `memcmp` call, which BPF does not have.
#[inline(always)]
fn same_address(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut same = true;
    let mut i = 0;
    while i < 16 {
        same &= a[i] == b[i];
        i += 1;
    }
    same
}

/// Keeps the exit of the timewait socket `tw` in `TW_EXITS` for the agent's once-a-second
/// read instead of a record; `false` when the table is full (it is sent as a record then).
#[inline(always)]
fn keep_exit(slot: &mut maps::TwSlot, tw: &Tw, now: u64, substate: u8, expired: bool) -> bool {
    timer_event(&mut slot.exit, tw, now, EVENT_TW_CANCEL, substate, expired);
    let key = TwExitKey {
        tw: tw.at as u64,
        ts_ns: now,
    };
    // BPF_NOEXIST: an exit is never overwritten (a timewait socket at the same address
    // leaves under another time).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value would copy the event onto the BPF stack"
    )]
    let kept = maps::TW_EXITS.insert(key, &slot.exit, maps::NOEXIST);
    if kept.is_err() {
        maps::count(COUNT_TW_EXITS_TABLE_FULL);
        return false;
    }
    true
}

/// Fills `event` as a TIME_WAIT timer event of `tw` at `now`: its addressing (a timewait
/// socket starts with a `sock_common`, all that `fill_at` reads), `kind`, its substate, and
/// `aux` (a start: a re-arm; a detach: at its deadline, an expiry).
#[inline(always)]
fn timer_event(event: &mut RawEvent, tw: &Tw, now: u64, kind: u8, substate: u8, aux: bool) {
    tw.fill(event, now);
    event.kind = kind;
    event.oldstate = 0;
    event.newstate = substate;
    event.aux = u64::from(aux);
}

/// Sends a held TIME_WAIT birth in a record of its own (nobody took it), and empties the slot.
#[inline(always)]
pub fn send_born(slot: &mut maps::TwSlot, lost_slot: u32) {
    if slot.born.kind == 0 {
        return;
    }
    if let Some(mut entry) = maps::reserve(lost_slot) {
        // SAFETY: entry points at ring buffer memory reserved for one RawEvent, apart from the
        // slot. A copy that cannot overlap: an assignment compiles to a byte-at-a-time memmove.
        unsafe { core::ptr::copy_nonoverlapping(&raw const slot.born, entry.as_mut_ptr(), 1) };
        entry.submit(maps::submit_flags());
    }
    slot.born.kind = 0;
}

/// Takes the held TIME_WAIT birth, if any, into `into` (`tw` 0 when none). The caller has
/// sent first a birth that is not of its socket (see [`flush_born_unless_of`]).
#[inline(always)]
pub fn take_born(into: &mut RawTwBirth) {
    into.tw = 0;
    if let Some(slot) = maps::TW_BORN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, valid for the program's run (see `on_timer`).
        let slot = unsafe { &mut *slot };
        if slot.born.kind != 0 {
            into.ts_ns = slot.born.ts_ns;
            into.tw = slot.born.skaddr;
            into.substate = slot.born.newstate;
            slot.born.kind = 0;
        }
    }
}

/// Sends the held TIME_WAIT birth on its own unless it replaces the socket of `head` (same
/// ports and namespace): the closing record carries only what differs from its own
/// addressing. The kernel arms the timer just before that socket's CLOSE on the same CPU, so
/// a birth of another socket is not expected; it is not mislabelled either.
#[inline(always)]
pub fn flush_born_unless_of(head: &RawEvent, lost_slot: u32) {
    if let Some(slot) = maps::TW_BORN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, valid for the program's run (see `on_timer`).
        let slot = unsafe { &mut *slot };
        let born = &slot.born;
        if born.kind != 0
            && (born.sport != head.sport
                || born.dport != head.dport
                || born.netns != head.netns
                || born.family != head.family)
        {
            send_born(slot, lost_slot);
        }
    }
}

/// Sends the held TIME_WAIT birth on its own, if any (its CLOSE could not take it).
#[inline(always)]
pub fn flush_born(lost_slot: u32) {
    if let Some(slot) = maps::TW_BORN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, valid for the program's run (see `on_timer`).
        send_born(unsafe { &mut *slot }, lost_slot);
    }
}

/// Remembers when the ACK started waiting. A re-arm for the same expiry is the kernel keeping
/// the earlier deadline, so the first arming time stays.
#[inline(always)]
fn delack_armed(timer: *const u8) -> i32 {
    let sk = timer.wrapping_sub(maps::off!(icsk_delack_timer) as usize) as u64;
    let expires: u64 = Typed::read(timer, maps::off!(timer_expires)).unwrap_or(0);
    if let Some(armed) = maps::DELACK_ARMED.get_ptr(sk) {
        // SAFETY: the pointer comes from a lookup in this map and stays valid for the program's
        // run; a concurrent update can only change the value, never free it under us.
        if unsafe { (*armed)[1] } == expires {
            return 0;
        }
    }
    // SAFETY: bpf_ktime_get_ns takes no arguments and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = maps::DELACK_ARMED.insert(sk, [now, expires], 0);
    0
}

#[inline(always)]
fn delack_fired(timer: *const u8) -> i32 {
    let sk_addr = timer.wrapping_sub(maps::off!(icsk_delack_timer) as usize);
    let key = sk_addr as u64;
    let armed = maps::DELACK_ARMED.get_ptr(key).map(|armed| {
        // SAFETY: as in `delack_armed`: a pointer from a lookup in this map.
        unsafe { (*armed)[0] }
    });
    let _ = maps::DELACK_ARMED.remove(key);
    let pending: u8 = sock::read(sk_addr, maps::off!(icsk_ack_pending)).unwrap_or(0);
    if pending & 3 != 3 {
        return 0;
    }
    let pingpong: u8 = sock::read(sk_addr, maps::off!(icsk_ack_pingpong)).unwrap_or(0);
    paths::send::<Probed>(sk_addr, tracer_common::LOST_TIMER_EXPIRE);
    let Some(mut entry) = maps::reserve(tracer_common::LOST_TIMER_EXPIRE) else {
        return 0;
    };
    // SAFETY: entry points at ring buffer memory reserved for one RawEvent; `fill` writes every
    // field not written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    sock::fill::<Probed>(event, sk_addr, false);
    event.kind = EVENT_DELAYED_ACK;
    event.oldstate = 0;
    event.newstate = sock::state::<Probed>(sk_addr);
    event.ca_state = pingpong;
    event.aux = match armed {
        Some(at) if at > 0 && event.ts_ns > at => event.ts_ns - at,
        _ => 0,
    };
    entry.submit(maps::submit_flags());
    0
}

/// A timewait socket found from its timer: an address the verifier cannot type, read from a
/// copy of its head when that holds every member read (one helper call instead of one per
/// field, see `sock::copy_head`), field by field otherwise.
struct Tw {
    at: *const u8,
    copied: bool,
    head: *const SockHead,
}

impl Tw {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: u32) -> Option<T> {
        if self.copied {
            Copied::read(self.head.cast(), offset)
        } else {
            Probed::read(self.at, offset)
        }
    }

    /// `sock::fill_at` for the timewait socket (a timewait socket starts with a
    /// `sock_common`, all that it reads).
    #[inline(always)]
    fn fill(&self, event: &mut RawEvent, now: u64) {
        if self.copied {
            sock::fill_from::<Copied>(event, self.at, self.head.cast(), false, now);
        } else {
            sock::fill_at::<Probed>(event, self.at, false, now);
        }
    }
}
