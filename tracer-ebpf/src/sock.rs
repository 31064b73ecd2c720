//! Reading `struct sock` fields through the offsets handed over by the agent.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
};
use tracer_common::{AF_INET, AF_INET6, RawEvent};

use crate::maps::off;

/// Reads a `T` at `base + offset` in kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-tolerant accessor: a bad
    // address yields an error, never a crash. The offset comes from the kernel's own BTF.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()).ok() }
}

/// The first 20 bytes of `struct sock_common` when they have the usual layout (the agent checks
/// `sock_head_standard` against BTF): addresses, ports, family and state in one read.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockCommonHead {
    daddr: [u8; 4],
    rcv_saddr: [u8; 4],
    hash: u32,
    /// Network order.
    dport: u16,
    num: u16,
    family: u16,
    state: u8,
    reuse: u8,
}

/// Fills time, the socket's addressing and namespace into `event`, and the task only when
/// `task` (process context: elsewhere `current` is whoever was interrupted, and user space
/// ignores it, so reading it is wasted work).
#[inline(always)]
pub fn fill(event: &mut RawEvent, sk: *const u8, task: bool) {
    // SAFETY: bpf_ktime_get_ns takes no arguments and only reads the clock.
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.skaddr = sk as u64;
    if task {
        let pid_tgid = bpf_get_current_pid_tgid();
        event.pid = (pid_tgid >> 32) as u32;
        event.tid = pid_tgid as u32;
        event.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    } else {
        event.pid = 0;
        event.tid = 0;
        event.comm = [0; 16];
    }
    event.saddr = [0; 16];
    event.daddr = [0; 16];
    let family = if off!(sock_head_standard) != 0 {
        let head: SockCommonHead = read(sk, 0).unwrap_or(SockCommonHead {
            daddr: [0; 4],
            rcv_saddr: [0; 4],
            hash: 0,
            dport: 0,
            num: 0,
            family: 0,
            state: 0,
            reuse: 0,
        });
        event.sport = head.num;
        event.dport = u16::from_be(head.dport);
        if head.family == AF_INET {
            event.saddr[..4].copy_from_slice(&head.rcv_saddr);
            event.daddr[..4].copy_from_slice(&head.daddr);
        }
        head.family
    } else {
        let family: u16 = read(sk, off!(skc_family)).unwrap_or(0);
        event.sport = read::<u16>(sk, off!(skc_num)).unwrap_or(0);
        event.dport = u16::from_be(read::<u16>(sk, off!(skc_dport)).unwrap_or(0));
        if family == AF_INET {
            let s: [u8; 4] = read(sk, off!(skc_rcv_saddr)).unwrap_or([0; 4]);
            let d: [u8; 4] = read(sk, off!(skc_daddr)).unwrap_or([0; 4]);
            event.saddr[..4].copy_from_slice(&s);
            event.daddr[..4].copy_from_slice(&d);
        }
        family
    };
    event.family = family;
    if family == AF_INET6 {
        event.saddr = read(sk, off!(skc_v6_rcv_saddr)).unwrap_or([0; 16]);
        event.daddr = read(sk, off!(skc_v6_daddr)).unwrap_or([0; 16]);
    }
    event.netns = match read::<u64>(sk, off!(skc_net)) {
        Some(net) if net != 0 => read::<u32>(net as *const u8, off!(net_ns_inum)).unwrap_or(0),
        _ => 0,
    };
    event.segs = 0;
    event.ca_state = 0;
    event.aux = 0;
}

/// True for TCP sockets of the families we decode.
#[inline(always)]
pub fn is_tcp(sk: *const u8) -> bool {
    read::<u16>(sk, off!(sk_protocol)) == Some(tracer_common::IPPROTO_TCP)
}

/// The socket's current `skc_state`.
#[inline(always)]
pub fn state(sk: *const u8) -> u8 {
    read::<u8>(sk, off!(skc_state)).unwrap_or(0)
}
