//! What a connection cost: read from its `struct tcp_sock` once, as it closes, plus the
//! congestion states it went through (`tcp_cong_state_set`, kept per socket in `CONG`).
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{COUNT_CONG_TABLE_FULL, CongSeen, ConnCost};

use crate::maps::{self, off};
use crate::sock;

#[btf_tracepoint(function = "tcp_cong_state_set")]
pub fn tcp_cong_state_set(ctx: BtfTracePointContext) -> i32 {
    if maps::off!(valid) == 0 || maps::off!(tcp_snd_cwnd) == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let state: u8 = ctx.arg(1);
    // The window as the state changes: entering recovery or loss is when it is largest.
    let cwnd: u32 = sock::read(sk, off!(tcp_snd_cwnd)).unwrap_or(0);
    let key = sk as u64;
    let bit = 1u32 << (state & 31);
    if let Some(seen) = maps::CONG.get_ptr_mut(key) {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run; the
        // socket's congestion state changes run under its lock.
        let seen = unsafe { &mut *seen };
        seen.ca_states |= bit;
        seen.max_cwnd = seen.max_cwnd.max(cwnd);
    } else if maps::CONG
        .insert(
            key,
            CongSeen {
                ca_states: bit,
                max_cwnd: cwnd,
            },
            0,
        )
        .is_err()
    {
        maps::count(COUNT_CONG_TABLE_FULL);
    }
    0
}

/// Forgets what was seen under `sk`'s address: a new socket opens there.
#[inline(always)]
pub fn forget(sk: *const u8) {
    let _ = maps::CONG.remove(sk as u64);
}

/// Fills `cost` from the closing socket and what `CONG` kept of it (then forgotten).
#[inline(always)]
pub fn read_at_close(sk: *const u8, cost: &mut ConnCost) {
    if off!(tcp_bytes_acked) == 0 {
        return;
    }
    cost.bytes_acked = sock::read(sk, off!(tcp_bytes_acked)).unwrap_or(0);
    cost.bytes_received = sock::read(sk, off!(tcp_bytes_received)).unwrap_or(0);
    cost.segs_in = sock::read(sk, off!(tcp_segs_in)).unwrap_or(0);
    cost.segs_out = sock::read(sk, off!(tcp_segs_out)).unwrap_or(0);
    cost.total_retrans = sock::read(sk, off!(tcp_total_retrans)).unwrap_or(0);
    cost.srtt_us_x8 = sock::read(sk, off!(tcp_srtt_us)).unwrap_or(0);
    cost.mdev_us_x4 = sock::read(sk, off!(tcp_mdev_us)).unwrap_or(0);
    cost.rtt_min_us = sock::read(sk, off!(tcp_rtt_min)).unwrap_or(0);
    cost.snd_cwnd = sock::read(sk, off!(tcp_snd_cwnd)).unwrap_or(0);
    cost.rwnd_limited_jiffies = sock::read(sk, off!(tcp_rwnd_limited)).unwrap_or(0);
    cost.max_cwnd = cost.snd_cwnd;
    cost.ca_states = 0;
    let key = sk as u64;
    if let Some(seen) = maps::CONG.get_ptr(key) {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run.
        let seen = unsafe { *seen };
        cost.ca_states = seen.ca_states;
        cost.max_cwnd = cost.max_cwnd.max(seen.max_cwnd);
        let _ = maps::CONG.remove(key);
    }
    cost.valid = 1;
}

/// The socket's cgroup v2 id, 0 when the kernel does not say.
#[inline(always)]
pub fn cgroup(sk: *const u8) -> u64 {
    if off!(sk_cgroup) == 0 {
        return 0;
    }
    let Some(cgroup) = sock::read::<u64>(sk, off!(sk_cgroup)).filter(|&p| p != 0) else {
        return 0;
    };
    let Some(kn) = sock::read::<u64>(cgroup as *const u8, off!(cgroup_kn)).filter(|&p| p != 0)
    else {
        return 0;
    };
    sock::read::<u64>(kn as *const u8, off!(kernfs_id)).unwrap_or(0)
}
