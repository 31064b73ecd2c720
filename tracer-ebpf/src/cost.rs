//! What a connection cost: read from its `struct tcp_sock` once, as it closes, plus the
//! congestion states it went through (`tcp_cong_state_set`, kept per socket in `CONG`).
use aya_ebpf::{
    helpers::generated::bpf_skc_to_tcp_sock, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use tracer_common::{COUNT_CONG_TABLE_FULL, CongSeen, ConnCost};

use crate::atomic;
use crate::maps::{self, off};
use crate::sock::{Mem, Typed};

/// `TCP_CA_Open`: no congestion seen.
const TCP_CA_OPEN: u8 = 0;

#[btf_tracepoint(function = "tcp_cong_state_set")]
pub fn tcp_cong_state_set(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 || maps::off!(tcp_snd_cwnd) == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let state: u8 = ctx.arg(1);
    if state == TCP_CA_OPEN && !table_in_use() {
        // A socket's first state, set as a passive connection's socket is created, while no
        // socket has an entry: nothing entered, nothing to update. Once per connection, so it
        // costs no lookup and no read.
        return 0;
    }
    // The window as the state changes: entering recovery or loss is when it is largest.
    let cwnd: u32 = tcp_sock(sk)
        .map(|tp| Typed::read(tp, off!(tcp_snd_cwnd)).unwrap_or(0))
        .unwrap_or(0);
    let key = sk as u64;
    let bit = 1u32 << (state & 31);
    if let Some(seen) = maps::CONG.get_ptr_mut(key) {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run; the
        // socket's congestion state changes run under its lock.
        let seen = unsafe { &mut *seen };
        seen.ca_states |= bit;
        seen.max_cwnd = seen.max_cwnd.max(cwnd);
    } else if state == TCP_CA_OPEN {
        // A socket's first state, set as a passive connection's socket is created: nothing
        // entered yet. Kept, it would cost an allocation, a lookup and a delete per connection.
    } else if maps::CONG
        .insert(
            key,
            CongSeen {
                ca_states: bit,
                max_cwnd: cwnd,
            },
            0,
        )
        .is_ok()
    {
        count_in_table(1);
    } else {
        maps::count(COUNT_CONG_TABLE_FULL);
    }
    0
}

/// Whether `CONG` may hold entries (`CONG_IN_USE`).
#[inline(always)]
fn table_in_use() -> bool {
    atomic::in_use(&maps::CONG_IN_USE)
}

/// Counts an entry added to `CONG` or deleted from it (see `atomic::count`).
#[inline(always)]
fn count_in_table(delta: u64) {
    atomic::count(&maps::CONG_IN_USE, delta);
}

/// Deletes the entry of `key` from `CONG`, if any.
#[inline(always)]
fn remove(key: u64) {
    if maps::CONG.remove(key).is_ok() {
        count_in_table(u64::MAX);
    }
}

/// Forgets what was seen under `sk`'s address: a new socket opens there.
#[inline(always)]
pub fn forget(sk: *const u8) {
    if table_in_use() {
        remove(sk as u64);
    }
}

/// Fills `cost` from the closing socket (a BTF-typed pointer) and what `CONG` kept of it (then
/// forgotten).
#[inline(always)]
pub fn read_at_close(sk: *const u8, cost: &mut ConnCost) {
    if off!(tcp_bytes_acked) == 0 {
        return;
    }
    let Some(tp) = tcp_sock(sk) else {
        return;
    };
    let u32_at = |at: u32| Typed::read::<u32>(tp, at).unwrap_or(0);
    let u64_at = |at: u32| Typed::read::<u64>(tp, at).unwrap_or(0);
    cost.bytes_acked = u64_at(off!(tcp_bytes_acked));
    cost.bytes_received = u64_at(off!(tcp_bytes_received));
    cost.segs_in = u32_at(off!(tcp_segs_in));
    cost.segs_out = u32_at(off!(tcp_segs_out));
    cost.total_retrans = u32_at(off!(tcp_total_retrans));
    cost.srtt_us_x8 = u32_at(off!(tcp_srtt_us));
    cost.mdev_us_x4 = u32_at(off!(tcp_mdev_us));
    cost.rtt_min_us = u32_at(off!(tcp_rtt_min));
    cost.snd_cwnd = u32_at(off!(tcp_snd_cwnd));
    cost.rwnd_limited_jiffies = u32_at(off!(tcp_rwnd_limited));
    cost.max_cwnd = cost.snd_cwnd;
    cost.ca_states = 0;
    let key = sk as u64;
    if table_in_use()
        && let Some(seen) = maps::CONG.get_ptr(key)
    {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run.
        let seen = unsafe { *seen };
        cost.ca_states = seen.ca_states;
        cost.max_cwnd = cost.max_cwnd.max(seen.max_cwnd);
        remove(key);
    }
    cost.valid = 1;
}

/// `sk` (BTF-typed) as a `struct tcp_sock`, so that plain loads ([`Typed`]) reach the members
/// past `struct sock`: one helper call instead of a `bpf_probe_read_kernel` per member. `None`
/// when it is not a full TCP socket.
#[inline(always)]
pub fn tcp_sock(sk: *const u8) -> Option<*const u8> {
    // SAFETY: the helper checks that `sk` is a full TCP socket and returns it typed as
    // `struct tcp_sock` (null otherwise).
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }.cast::<u8>() as *const u8;
    (!tp.is_null()).then_some(tp)
}

/// The socket's cgroup v2 id, 0 when the kernel does not say. `sk` is BTF-typed: the pointers
/// loaded through it are too, so the whole chain is plain loads.
#[inline(always)]
pub fn cgroup(sk: *const u8) -> u64 {
    if off!(sk_cgroup) == 0 {
        return 0;
    }
    let Some(cgroup) = Typed::read::<u64>(sk, off!(sk_cgroup)).filter(|&p| p != 0) else {
        return 0;
    };
    let Some(kn) = Typed::read::<u64>(cgroup as *const u8, off!(cgroup_kn)).filter(|&p| p != 0)
    else {
        return 0;
    };
    Typed::read::<u64>(kn as *const u8, off!(kernfs_id)).unwrap_or(0)
}
