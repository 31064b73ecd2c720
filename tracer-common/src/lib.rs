//! Types shared by the kernel programs (`tracer-ebpf`) and the agent (`tracer`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on the
//! layout byte for byte; a size assertion at the bottom catches accidental changes.
#![no_std]

/// `RawEvent::kind`: a socket changed TCP state (`inet_sock_set_state`).
pub const EVENT_STATE: u8 = 1;
/// `RawEvent::kind`: an skb was retransmitted (`tcp_retransmit_skb`); `segs` holds its segments.
pub const EVENT_RETRANSMIT: u8 = 2;
/// `RawEvent::kind`: the socket received a RST (`tcp_receive_reset`).
pub const EVENT_RESET_RECEIVED: u8 = 3;
/// `RawEvent::kind`: the kernel sent a RST on this socket (`tcp_send_reset`); `segs` holds the
/// `sk_rst_reason`.
pub const EVENT_RESET_SENT: u8 = 4;
/// `segs` of an `EVENT_RESET_SENT` from a kernel whose `tcp_send_reset` gives no reason
/// (before 6.10).
pub const RST_REASON_UNKNOWN: u16 = u16::MAX;

/// `RawEvent::kind`: a TIME_WAIT timer was armed (`timer_start` of `tw_timer_handler`): a
/// timewait mini socket entered TIME_WAIT (or FIN_WAIT2), or was re-armed (`aux` 1). `skaddr`
/// is the timewait socket, `newstate` its `tw_substate`.
pub const EVENT_TW_START: u8 = 5;
/// `RawEvent::kind`: a TIME_WAIT timer was detached (`timer_cancel`): every exit, including a
/// normal expiry (`aux` 1: detached at its deadline, an expiry). Kept in the `TW_EXITS` table
/// for the agent's read, or sent as a record when the table is full.
pub const EVENT_TW_CANCEL: u8 = 6;
/// `RawEvent::kind`: a TIME_WAIT timer fired (`timer_expire_entry`): the 2MSL wait ran out.
pub const EVENT_TW_EXPIRE: u8 = 7;

/// `RawEvent::kind`: the delayed-ACK timer fired with an ACK still pending: a delayed ACK was
/// sent. `aux` is how long it was held (ns, 0 when the arming was not seen), `ca_state` the
/// socket's `icsk_ack.pingpong` at the time.
pub const EVENT_DELAYED_ACK: u8 = 8;
/// `RawEvent::kind`: a write smaller than the MSS was queued with Nagle on while data was in
/// flight, so it waits for an ACK (`tcp_sendmsg_locked`, process context). `aux` is the bytes.
pub const EVENT_NAGLE_HELD: u8 = 9;
/// `RawEvent::kind`: a listener retransmitted a SYN-ACK (`tcp_retransmit_synack`); the address
/// fields are the request socket's. Counted like `TcpRetransSegs`, one segment each.
pub const EVENT_SYNACK_RETRANSMIT: u8 = 10;

/// `RawEvent::kind`: the head of a [`RawPath`] record: a run of state changes of one socket,
/// gathered in the kernel and sent at once (when the socket closes, or before any other record
/// of that socket, so that user space sees them in order). The agent reads the runs still in
/// the kernel's table once a second, so that open connections are known while they live.
pub const EVENT_PATH: u8 = 11;

/// Slots of the `LOST` per-CPU array, one per program: a program never nests with itself on a
/// CPU (the kernel's recursion guard), so each slot has a single writer per CPU and no count is
/// lost when a softirq program interrupts a process-context one. User space sums them all.
pub const LOST_STATE: u32 = 0;
pub const LOST_RETRANSMIT: u32 = 1;
pub const LOST_SYNACK: u32 = 2;
pub const LOST_RECEIVE_RESET: u32 = 3;
pub const LOST_SEND_RESET: u32 = 4;
pub const LOST_SENDMSG: u32 = 5;
pub const LOST_TIMER_START: u32 = 6;
pub const LOST_TIMER_CANCEL: u32 = 7;
pub const LOST_TIMER_EXPIRE: u32 = 8;
pub const LOST_SLOTS: u32 = 9;

/// Slots of the `COUNTERS` per-CPU array: what the programs count without sending anything.
/// Each slot is written by one program only (see `LOST_*` for why that keeps counts exact).
/// State changes sent one record each because the socket's path could not be kept in the
/// kernel's table (it was full).
pub const COUNT_PATH_TABLE_FULL: u32 = 0;
/// Sockets whose congestion states could not be followed (the `CONG` table was full).
pub const COUNT_CONG_TABLE_FULL: u32 = 1;
/// Timewait sockets' exits sent as records because the `TW_EXITS` table was full.
pub const COUNT_TW_EXITS_TABLE_FULL: u32 = 2;
/// Sockets whose run went to `PATHS` because another socket held their `PATH_SLOTS` slot.
pub const COUNT_PATH_SLOT_TAKEN: u32 = 3;
pub const COUNT_SLOTS: u32 = 4;

/// Slots of the `SOFTIRQS` per-CPU array: softirq runs the programs saw, by vector (the
/// kernel's `NR_SOFTIRQS`). The agent compares them with the kernel's own count
/// (`/proc/softirqs`): a run the kernel counted but no program saw is one in which the kernel
/// ran no BPF program at all, and whose TCP events are lost without any other trace.
pub const SOFTIRQ_VECTORS: u32 = 10;

/// Exits of timewait sockets the kernel's `TW_EXITS` table holds between two reads of the
/// agent (once a second).
pub const TW_EXITS_MAX: u32 = 65_536;

/// Key of the `TW_EXITS` table: the timewait socket's address and when it left (the same
/// address can leave twice within a read: the memory of a socket killed is handed out again).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TwExitKey {
    pub tw: u64,
    pub ts_ns: u64,
}

/// Sockets the kernel's `PATHS` table holds at most: every socket from its first state change
/// to its CLOSE (preallocated: about 270 bytes each in kernel memory).
pub const PATHS_MAX: u32 = 65_536;

/// `PATH_SLOTS` has `1 << PATH_SLOT_BITS` slots, each holding the run of the socket whose
/// address hashes to it (see [`path_slot`]); a socket whose slot is taken goes to `PATHS`.
pub const PATH_SLOT_BITS: u32 = 14;

/// The `PATH_SLOTS` index of the socket at `sk`: the top bits of a multiplicative hash (socket
/// addresses share their low bits).
#[inline(always)]
pub fn path_slot(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - PATH_SLOT_BITS)) as u32
}

/// One slot of the direct-mapped `PATH_SLOTS` table: a run of state changes, as `PATHS` keeps
/// it, claimed by one socket at a time. A socket's state changes then cost plain loads and
/// stores instead of a hash table's lookup, insert and delete.
///
/// The kernel writes a new run into a slot (at a claim, or in place of a run it sent) between
/// two counters: `seq_end` goes up first, `seq` after the last write. The agent reads a slot
/// in place, `owner` and `seq` first and `seq_end` last, so a read with `seq == seq_end`
/// overlapped no such write, and one
/// of a run whose socket is not `owner` is stale. Appending a step moves no counter (a copy
/// that catches one half-written does not decode, as for `PATHS`), nor does a release, which
/// only empties the run (`len` 0) before it frees `owner`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathSlot {
    /// The socket's address; 0 while the slot is free. Claimed and freed with compare-and-swap.
    pub owner: u64,
    pub seq: u64,
    pub path: RawPathOpen,
    pub seq_end: u64,
}

/// Slots of the `RST_NO_SOCKET` per-CPU array: RSTs the host sent answering a segment no
/// socket matched (a closed port), by the kernel's `enum sk_rst_reason` value; a reason past
/// the last slot, or none (kernels before 6.10), counts in the last slot.
pub const RST_NO_SOCKET_SLOTS: u32 = 64;

/// State changes one [`RawPath`] carries at most; a longer run is sent in several records.
pub const PATH_STEPS: usize = 6;

/// A socket's state changes not yet sent, as kept in the kernel (its `PATH_SLOTS` slot, or the
/// `PATHS` table keyed by the socket's address), and the record of a run that does not end in
/// CLOSE. `head.kind` is [`EVENT_PATH`]; the head's addressing is read when the first step is
/// kept, and its local port again at sending and at ESTABLISHED while still unassigned
/// (`connect()` picks it after SYN_SENT). Its task fields are the owner when `has_task` is set.
/// Step `i` (below `len`) is `at_ns[i]`, `old[i]` -> `new[i]`; the steps past `len` hold
/// whatever an earlier run left. Laid out by column, with no padding per step: every byte of a
/// record costs at sending (the ring buffer's memory is cold), so records are kept small.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawPathOpen {
    pub head: RawEvent,
    /// `bpf_ktime_get_ns()` at each change.
    pub at_ns: [u64; PATH_STEPS],
    /// Each change's states, kernel `TCP_*` numbers.
    pub old: [u8; PATH_STEPS],
    pub new: [u8; PATH_STEPS],
    /// Steps in use.
    pub len: u8,
    /// Non-zero once the head's `pid`, `tid` and `comm` hold the owner (taken in an owner
    /// transition).
    pub has_task: u8,
    pub _pad: [u8; 2],
    /// The socket's cgroup v2 id (`sk_cgrp_data.cgroup->kn->id`, the inode number of the
    /// cgroup's directory), read when the first step is kept; 0 when unknown.
    pub cgroup: u64,
}

impl RawPathOpen {
    /// The steps in use, as (time, old state, new state).
    pub fn steps(&self) -> impl Iterator<Item = (u64, u8, u8)> + '_ {
        let len = usize::from(self.len).min(PATH_STEPS);
        self.at_ns[..len]
            .iter()
            .zip(&self.old[..len])
            .zip(&self.new[..len])
            .map(|((&at, &old), &new)| (at, old, new))
    }
}

/// The record of a run that ends in CLOSE: the run, what the connection cost, and the
/// timewait socket that replaced it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawPath {
    pub run: RawPathOpen,
    /// What the connection cost, read from the socket as it closes.
    pub cost: ConnCost,
    /// The timewait socket that replaced this one, when it closed through TIME_WAIT.
    pub tw: RawTwBirth,
}

/// A timewait socket's birth (its timer's start), carried in the record of the socket it
/// replaces: the kernel arms the timer just before that socket's CLOSE, on the same CPU. Its
/// addressing is the closing socket's (the kernel copies it), so only what differs rides here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawTwBirth {
    /// `bpf_ktime_get_ns()` at the timer's start.
    pub ts_ns: u64,
    /// Address of the `struct inet_timewait_sock`; 0: none.
    pub tw: u64,
    /// `tw_substate`: `TCP_TIME_WAIT`, or `TCP_FIN_WAIT2` for an orphan's FIN_WAIT2 kept in a
    /// timewait socket.
    pub substate: u8,
    pub _pad: [u8; 7],
}

/// What a connection cost, read from its `struct tcp_sock` as it closes (`valid` non-zero),
/// plus what `tcp_cong_state_set` saw during its life.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCost {
    /// `bytes_acked`: bytes sent and acknowledged by the peer.
    pub bytes_acked: u64,
    /// `bytes_received`: bytes received in order.
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    /// `total_retrans`: retransmitted segments over the connection's life.
    pub total_retrans: u32,
    /// `srtt_us`: smoothed RTT in µs, shifted left by 3 (as the kernel keeps it).
    pub srtt_us_x8: u32,
    /// `mdev_us`: RTT mean deviation in µs, shifted left by 2.
    pub mdev_us_x4: u32,
    /// `rtt_min`'s current minimum, µs.
    pub rtt_min_us: u32,
    /// `snd_cwnd` at close, segments.
    pub snd_cwnd: u32,
    /// The largest `snd_cwnd` seen: at close and at each congestion state change.
    pub max_cwnd: u32,
    /// `chrono_stat[TCP_CHRONO_RWND_LIMITED - 1]`: time the sender was held by the peer's
    /// receive window (zero-window stalls), in jiffies.
    pub rwnd_limited_jiffies: u32,
    /// Bit `1 << state` for every `icsk_ca_state` entered (`tcp_cong_state_set`).
    pub ca_states: u32,
    /// Non-zero when the fields above were read.
    pub valid: u32,
    pub _pad: u32,
}

/// What `tcp_cong_state_set` keeps per socket until the socket closes (`CONG` table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongSeen {
    pub ca_states: u32,
    pub max_cwnd: u32,
}

/// Whether a state change (kernel `TCP_*` numbers) runs in the socket owner's own system call
/// (connect, close, shutdown), so that `current` is the owner. Elsewhere (softirq) `current` is
/// whoever was interrupted. The kernel programs read the task only for these; the tracker takes
/// the owner only from these: one rule for both sides.
pub const fn owner_transition(old: u8, new: u8) -> bool {
    const ESTABLISHED: u8 = 1;
    const SYN_SENT: u8 = 2;
    const SYN_RECV: u8 = 3;
    const FIN_WAIT1: u8 = 4;
    const CLOSE: u8 = 7;
    const CLOSE_WAIT: u8 = 8;
    const LAST_ACK: u8 = 9;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT)
            | (ESTABLISHED, FIN_WAIT1)
            | (SYN_RECV, FIN_WAIT1)
            | (CLOSE_WAIT, LAST_ACK)
    )
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// One record pushed through the ring buffer. Fixed size so the ring buffer can reserve it
/// without a copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Address of the kernel `struct sock`: the connection's identity while it lives.
    pub skaddr: u64,
    /// Local address; IPv4 uses the first 4 bytes (network order).
    pub saddr: [u8; 16],
    /// Remote address; IPv4 uses the first 4 bytes (network order).
    pub daddr: [u8; 16],
    /// `current->comm` when the event fired (only the owner in process context).
    pub comm: [u8; 16],
    /// `current` thread group id (process id) when the event fired.
    pub pid: u32,
    /// `current` thread id when the event fired.
    pub tid: u32,
    /// Inode number of the socket's network namespace (0 when unknown).
    pub netns: u32,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Retransmit: segments in the skb (`tcp_skb_pcount`). Reset sent: `sk_rst_reason`.
    pub segs: u16,
    /// One of the `EVENT_*` constants.
    pub kind: u8,
    /// State change: the previous state (kernel `TCP_*` numbering).
    pub oldstate: u8,
    /// State change: the new state. Retransmit / reset: the socket's state at the event.
    pub newstate: u8,
    /// Retransmit: `icsk_ca_state` (0 open, 1 disorder, 2 CWR, 3 recovery, 4 loss).
    pub ca_state: u8,
    /// Kind-specific value (see the `EVENT_*` constants).
    pub aux: u64,
}

impl RawEvent {
    /// Every field zero (the kernel programs build records from it without a stack copy).
    pub const ZERO: RawEvent = RawEvent {
        ts_ns: 0,
        skaddr: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        comm: [0; 16],
        pid: 0,
        tid: 0,
        netns: 0,
        sport: 0,
        dport: 0,
        family: 0,
        segs: 0,
        kind: 0,
        oldstate: 0,
        newstate: 0,
        ca_state: 0,
        aux: 0,
    };
}

impl RawPath {
    /// Every field zero.
    pub const ZERO: RawPath = RawPath {
        run: RawPathOpen {
            head: RawEvent::ZERO,
            at_ns: [0; PATH_STEPS],
            old: [0; PATH_STEPS],
            new: [0; PATH_STEPS],
            len: 0,
            has_task: 0,
            _pad: [0; 2],
            cgroup: 0,
        },
        cost: ConnCost {
            bytes_acked: 0,
            bytes_received: 0,
            segs_in: 0,
            segs_out: 0,
            total_retrans: 0,
            srtt_us_x8: 0,
            mdev_us_x4: 0,
            rtt_min_us: 0,
            snd_cwnd: 0,
            max_cwnd: 0,
            rwnd_limited_jiffies: 0,
            ca_states: 0,
            valid: 0,
            _pad: 0,
        },
        tw: RawTwBirth {
            ts_ns: 0,
            tw: 0,
            substate: 0,
            _pad: [0; 7],
        },
    };
}

/// Byte offsets into kernel structures, discovered from the running kernel's BTF by the agent
/// and written into the programs' read-only data before they load (Rust eBPF has no CO-RE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common` members (offsets from the start of `struct sock`).
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    /// `skc_state` (one byte).
    pub skc_state: u32,
    /// `struct net` -> `ns.inum`.
    pub net_ns_inum: u32,
    /// `struct sock` -> `sk_protocol` (a `u16` on kernels since 5.6).
    pub sk_protocol: u32,
    /// `struct inet_connection_sock` -> byte holding the `icsk_ca_state` bitfield.
    pub icsk_ca_state_byte: u32,
    /// Bit shift of `icsk_ca_state` within that byte.
    pub icsk_ca_state_shift: u32,
    /// `struct sk_buff` -> `cb` plus `struct tcp_skb_cb` -> `tcp_gso_segs`.
    pub skb_tcp_gso_segs: u32,
    /// `struct timer_list` -> `function`.
    pub timer_function: u32,
    /// `struct inet_timewait_sock` -> `tw_timer`.
    pub tw_timer: u32,
    /// `struct inet_timewait_sock` -> `tw_substate`.
    pub tw_substate: u32,
    /// `struct timer_list` -> `expires`.
    pub timer_expires: u32,
    /// `struct inet_connection_sock` -> `icsk_delack_timer`.
    pub icsk_delack_timer: u32,
    /// `struct inet_connection_sock` -> `icsk_ack.pending` (ICSK_ACK_SCHED 1, ICSK_ACK_TIMER 2).
    pub icsk_ack_pending: u32,
    /// `struct inet_connection_sock` -> `icsk_ack.pingpong`.
    pub icsk_ack_pingpong: u32,
    /// `struct tcp_sock` -> byte holding the `nonagle` bitfield, and its shift.
    pub tcp_nonagle_byte: u32,
    pub tcp_nonagle_shift: u32,
    /// `struct tcp_sock` -> `packets_out`.
    pub tcp_packets_out: u32,
    /// `struct tcp_sock` -> `mss_cache`.
    pub tcp_mss_cache: u32,
    /// `struct msghdr` -> `msg_iter.count`: bytes left to send.
    pub msghdr_left: u32,
    /// `struct sock` -> `sk_cgrp_data.cgroup`, `struct cgroup` -> `kn`, `struct kernfs_node`
    /// -> `id`: the socket's cgroup id (0 offsets: not read).
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kernfs_id: u32,
    /// `struct tcp_sock` members read at close (see [`ConnCost`]); `tcp_bytes_acked` 0: not
    /// read.
    pub tcp_bytes_acked: u32,
    pub tcp_bytes_received: u32,
    pub tcp_segs_in: u32,
    pub tcp_segs_out: u32,
    pub tcp_total_retrans: u32,
    pub tcp_srtt_us: u32,
    pub tcp_mdev_us: u32,
    /// `rtt_min.s[0].v`.
    pub tcp_rtt_min: u32,
    pub tcp_snd_cwnd: u32,
    /// `chrono_stat[1]` (TCP_CHRONO_RWND_LIMITED).
    pub tcp_rwnd_limited: u32,
    /// Non-zero when the head of `struct sock_common` has the layout every kernel since 2.6 has
    /// (daddr 0, rcv_saddr 4, dport 12, num 14, family 16, state 18), checked against BTF: the
    /// programs then read it in three loads (`skc_addrpair`, `skc_portpair`, the family)
    /// instead of one per field.
    pub sock_head_standard: u32,
    /// Non-zero when every `sock_common` member the programs read, and `tw_substate`, lies
    /// within the first [`SOCK_HEAD_BYTES`] of a socket: a socket the verifier cannot type (a
    /// timewait socket found from its timer) is then copied with one `bpf_probe_read_kernel`
    /// instead of one per field.
    pub head_copy_fits: u32,
    /// Non-zero once the agent has filled this struct (programs do nothing before that).
    pub valid: u32,
}

/// Bytes of a socket's head copied at once when it cannot be read with plain loads (see
/// `KernelOffsets::head_copy_fits`): `struct sock_common` (136 bytes on x86-64) and the
/// timewait socket's members that follow it.
pub const SOCK_HEAD_BYTES: u32 = 160;

/// Room for a copy of a socket's head ([`SOCK_HEAD_BYTES`], aligned to 8).
pub type SockHead = [u64; SOCK_HEAD_BYTES as usize / 8];

impl KernelOffsets {
    /// Whether every member read from a socket's head lies within [`SOCK_HEAD_BYTES`].
    pub fn head_fits(&self) -> bool {
        [
            (self.skc_daddr, 4),
            (self.skc_rcv_saddr, 4),
            (self.skc_dport, 2),
            (self.skc_num, 2),
            (self.skc_family, 2),
            (self.skc_state, 1),
            (self.skc_net, 8),
            (self.skc_v6_daddr, 16),
            (self.skc_v6_rcv_saddr, 16),
            (self.tw_substate, 1),
        ]
        .iter()
        .all(|&(at, size)| at.saturating_add(size) <= SOCK_HEAD_BYTES)
    }
}

/// Kernel function addresses from `/proc/kallsyms`, to pick TCP timers out of all timers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelSymbols {
    /// `tw_timer_handler`: the TIME_WAIT timer's callback.
    pub tw_timer_handler: u64,
    /// `tcp_delack_timer`: the delayed-ACK timer's callback.
    pub tcp_delack_timer: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: RawEvent is repr(C), Copy, made only of integers and byte arrays, with no
    // implicit padding (checked by the size assertion below), so any bit pattern is valid.
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: KernelOffsets is repr(C), Copy and made only of u32 fields: no padding, every
    // bit pattern valid.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: KernelSymbols is repr(C), Copy and made only of u64 fields.
    unsafe impl aya::Pod for super::KernelSymbols {}
    // SAFETY: repr(C), Copy, integers and byte arrays only, no implicit padding (size checked
    // below): any bit pattern is valid.
    unsafe impl aya::Pod for super::RawPath {}
    // SAFETY: as for RawPath, whose leading part it is.
    unsafe impl aya::Pod for super::RawPathOpen {}
    // SAFETY: repr(C), integers and a byte array, no padding (size checked below).
    unsafe impl aya::Pod for super::RawTwBirth {}
    // SAFETY: as above: `repr(C)`, integers and a `repr(C)` struct, no padding.
    unsafe impl aya::Pod for super::PathSlot {}
    // SAFETY: as for RawPath: two u32, no padding.
    unsafe impl aya::Pod for super::CongSeen {}
    // SAFETY: two u64, no padding.
    unsafe impl aya::Pod for super::TwExitKey {}
}

// Both sides must agree on the layout; padding would make the Pod impls unsound.
const _: () = assert!(core::mem::size_of::<RawEvent>() == 96);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 42 * 4);
const _: () = assert!(core::mem::size_of::<ConnCost>() == 64);
const _: () = assert!(core::mem::size_of::<RawPathOpen>() == 96 + 10 * PATH_STEPS + 4 + 8);
const _: () = assert!(core::mem::size_of::<PathSlot>() == 24 + core::mem::size_of::<RawPathOpen>());
const _: () = assert!(core::mem::size_of::<RawTwBirth>() == 24);
const _: () = assert!(core::mem::size_of::<RawPath>() == size_of::<RawPathOpen>() + 64 + 24);
// The kernel programs clear these fields in word stores (`sock::clear`).
const _: () = assert!(core::mem::offset_of!(RawEvent, saddr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(RawEvent, daddr) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(RawEvent, comm) % 8 == 0);
const _: () = assert!(core::mem::align_of::<RawEvent>() == 8);
