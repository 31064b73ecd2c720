//! Maps and globals shared by all programs, declared in one place.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    COUNT_SLOTS, CongSeen, KernelOffsets, KernelSymbols, LOST_SLOTS, PATH_SLOT_BITS, PATHS_MAX,
    PathSlot, RawEvent, RawPathOpen, SOFTIRQ_VECTORS, SockHead, TW_EXITS_MAX, TwExitKey,
};

/// Events to user space. The agent resizes it at load time (`--ring-buffer-bytes`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Events dropped because the ring buffer was full, one slot per program (`LOST_*`). Per CPU so
/// that two CPUs never race on one counter, per program so that nesting programs on one CPU do
/// not either; user space sums every slot of every CPU.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// What the programs count without sending a record (`COUNT_*` slots), per CPU and per
/// writing program as `LOST` is.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT_SLOTS, 0);

/// Softirq runs seen, per CPU and vector (`SOFTIRQ_VECTORS`), written by `softirq_entry` only.
#[map]
pub static SOFTIRQS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SOFTIRQ_VECTORS, 0);

/// `BPF_F_NO_PREALLOC`: entries take kernel memory only while they exist (tracing programs may
/// use such maps since 6.1, the oldest kernel supported), so the tables can be sized for a
/// burst of closes without holding that memory all the time.
const NO_PREALLOC: u32 = 1;

/// `BPF_F_MMAPABLE`: the agent reads the array in place through a mapping of its values
/// rather than copying it out with a system call.
const MMAPABLE: u32 = 1 << 10;

/// `BPF_NOEXIST`: an update that only inserts, never overwrites.
pub const NOEXIST: u64 = 1;

/// State changes of each socket not yet sent, keyed by the socket's address: sent as one record
/// at CLOSE, or before any other record of the socket; the agent reads the table once a second
/// to learn of the connections that stay open (and of CLOSE_WAIT leaks) without a record each.
/// Not LRU: an entry is never dropped silently; when the table is full a change goes out on its
/// own. Preallocated: an allocation per socket cost about 150 ns (measured). Only sockets
/// whose `PATH_SLOTS` slot is taken come here.
#[map]
pub static PATHS: HashMap<u64, RawPathOpen> = HashMap::with_max_entries(PATHS_MAX, 0);

/// Each socket's run of state changes, in the slot its address hashes to (`path_slot`),
/// claimed at its first change and freed when the run is sent: the common path costs no hash
/// table operation. A socket whose slot another holds goes to `PATHS`. The agent reads it once
/// a second, in place (`MMAPABLE`).
#[map]
pub static PATH_SLOTS: Array<PathSlot> = Array::with_max_entries(1 << PATH_SLOT_BITS, MMAPABLE);

/// Entries in `PATHS` (slot 0), kept with atomic adds: while it is 0, as it is unless the
/// slots collide, a socket's first change need not look for an earlier run there.
#[map]
pub static PATHS_IN_USE: Array<u64> = Array::with_max_entries(1, 0);

/// RSTs sent for no socket, by reason (`RST_NO_SOCKET_SLOTS`); one writer per CPU (the
/// `tcp_send_reset` program does not nest with itself).
#[map]
pub static RST_NO_SOCKET: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(tracer_common::RST_NO_SOCKET_SLOTS, 0);

/// Adds one to `RST_NO_SOCKET`'s slot for `reason`.
#[inline(always)]
pub fn count_rst_no_socket(reason: u32) {
    let last = tracer_common::RST_NO_SOCKET_SLOTS - 1;
    if let Some(counter) = RST_NO_SOCKET.get_ptr_mut(reason.min(last)) {
        // SAFETY: a pointer from the lookup of an existing index, valid for the program's run;
        // only the reset program writes this array and it does not nest with itself on a CPU.
        unsafe { *counter += 1 };
    }
}

/// What `tcp_cong_state_set` saw of each socket (congestion states entered, largest window),
/// keyed by the socket's address, taken into its closing record (and dropped when a new socket
/// opens at the same address). Not LRU: when full, what is not kept is counted.
#[map]
pub static CONG: HashMap<u64, CongSeen> = HashMap::with_max_entries(65_536, NO_PREALLOC);

/// Entries in `CONG` (slot 0), kept with atomic adds: while it is 0, as it is unless
/// connections meet congestion, a closing socket need not look for its entry.
#[map]
pub static CONG_IN_USE: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: the start of a TIME_WAIT timer just armed for a new timewait socket, held until
/// the CLOSE of the socket it replaces (which follows on the same CPU, BHs off) takes it into
/// its record; and the last TIME_WAIT timer detached here and when, to tell a re-arm (detach +
/// start in one `mod_timer`, sent at once as before) from a birth.
#[map]
pub static TW_BORN: PerCpuArray<TwSlot> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TwSlot {
    /// `kind` 0: empty.
    pub born: RawEvent,
    /// Scratch for the exit kept in `TW_EXITS` (too large for the BPF stack next to the rest).
    pub exit: RawEvent,
    /// Scratch for the timer's socket at a start that may be a re-arm, to compare with `exit`.
    pub again: RawEvent,
    pub last_cancel: u64,
    /// When `last_cancel` was detached (`bpf_ktime_get_ns`).
    pub last_cancel_ns: u64,
}

/// Per CPU and program (`LOST_*` slots): a copy of the socket a program reads
/// (`sock::copy_head`). Per program, because programs of different hooks nest on a CPU (a
/// softirq on top of a system call) while the outer one still reads its copy.
#[map]
pub static HEADS: PerCpuArray<SockHead> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Per CPU and program (`LOST_*` slots): a cell through which a socket's address becomes a
/// plain number (`sock::address`).
#[map]
pub static ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

/// Per CPU: where a socket's new run is built before it is inserted into `PATHS` whole.
#[map]
pub static PATH_SCRATCH: PerCpuArray<RawPathOpen> = PerCpuArray::with_max_entries(1, 0);

/// Timewait sockets' exits (a kill, or an expiry told at the detach), keyed by the socket's
/// address and the time: the agent reads and deletes them once a second instead of receiving a
/// record each. Preallocated (an exit happens about once per connection under churn); when
/// full, an exit is sent as a record and counted.
#[map]
pub static TW_EXITS: HashMap<TwExitKey, RawEvent> = HashMap::with_max_entries(TW_EXITS_MAX, 0);

/// Adds one to a `COUNTERS` slot.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a pointer from the lookup of an existing index, valid for the program's run;
        // each slot has one writing program, which does not nest with itself on a CPU.
        unsafe { *counter += 1 };
    }
}

/// Filled by the agent from BTF before loading. Read one field at a time with [`off!`]: a
/// copy of the whole struct per event cost more than the fields an event needs.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    skc_state: 0,
    net_ns_inum: 0,
    sk_protocol: 0,
    icsk_ca_state_byte: 0,
    icsk_ca_state_shift: 0,
    skb_tcp_gso_segs: 0,
    timer_function: 0,
    tw_timer: 0,
    tw_substate: 0,
    timer_expires: 0,
    icsk_delack_timer: 0,
    icsk_ack_pending: 0,
    icsk_ack_pingpong: 0,
    tcp_nonagle_byte: 0,
    tcp_nonagle_shift: 0,
    tcp_packets_out: 0,
    tcp_mss_cache: 0,
    msghdr_left: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kernfs_id: 0,
    tcp_bytes_acked: 0,
    tcp_bytes_received: 0,
    tcp_segs_in: 0,
    tcp_segs_out: 0,
    tcp_total_retrans: 0,
    tcp_srtt_us: 0,
    tcp_mdev_us: 0,
    tcp_rtt_min: 0,
    tcp_snd_cwnd: 0,
    tcp_rwnd_limited: 0,
    sock_head_standard: 0,
    head_copy_fits: 0,
    valid: 0,
};

/// One field of [`OFFSETS`], read volatile so that the compiler cannot fold the zero
/// initialiser (the loader rewrites the value before the program loads).
macro_rules! off {
    ($field:ident) => {
        // SAFETY: a plain static rewritten by the loader; reading one aligned u32 field.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::OFFSETS.$field)) }
    };
}
pub(crate) use off;

/// Filled by the agent from `/proc/kallsyms` before loading.
#[unsafe(no_mangle)]
static SYMBOLS: KernelSymbols = KernelSymbols {
    tw_timer_handler: 0,
    tcp_delack_timer: 0,
};

/// When each socket's delayed-ACK timer was armed, and for which expiry, keyed by socket. LRU:
/// sockets that close with the timer armed are forgotten without a cleanup hook.
#[map]
pub static DELACK_ARMED: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
pub fn symbols() -> KernelSymbols {
    // SAFETY: as for `OFFSETS` (see `off!`): a plain static rewritten by the loader, read volatile so the
    // compiler cannot fold the zero initialiser.
    unsafe { core::ptr::read_volatile(&SYMBOLS) }
}

/// Pending bytes in `EVENTS` past which a submit wakes the agent (set by the agent from the
/// ring size). Below it the agent is not woken per event: it drains on its own timer, which
/// saves a wake-up (an IPI and a context switch) per event under load.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// The agent's read position in `EVENTS` (plus one, so that 0 means never) when a submit
/// last woke it. Written without atomics: two CPUs racing cost at most a second wake-up.
#[map]
static WOKEN_AT: Array<u64> = Array::with_max_entries(1, 0);

/// Submits on this CPU, so that only every [`CHECK_EVERY`]th asks the ring how much is
/// pending (two helper calls).
#[map]
static SUBMITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// How often a submit checks whether to wake the agent: the wake-up comes at most this many
/// records per CPU late, against a threshold of an eighth of the ring (thousands of records).
const CHECK_EVERY: u64 = 8;

/// `bpf_ringbuf_submit` flags: wake the reader once enough data is pending, and then not
/// again until it has read something. Waking it on every submit past the threshold cost a
/// self-IPI per record while the agent was busy (a VM exit on virtual machines: measured at
/// twice the program's own time under churn).
#[inline(always)]
pub fn submit_flags() -> u64 {
    // SAFETY: as for `OFFSETS` (see `off!`): a plain static rewritten by the loader.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let quiet = u64::from(aya_ebpf::bindings::BPF_RB_NO_WAKEUP);
    if let Some(submits) = SUBMITS.get_ptr_mut(0) {
        // SAFETY: this CPU's counter, valid for the program's run. Programs nesting on this
        // CPU may race on it: that only moves which submit checks.
        let count = unsafe {
            let count = *submits;
            *submits = count.wrapping_add(1);
            count
        };
        if count % CHECK_EVERY != 0 {
            return quiet;
        }
    }
    if EVENTS.query(u64::from(aya_ebpf::bindings::BPF_RB_AVAIL_DATA)) < threshold {
        return quiet;
    }
    let read_at = EVENTS.query(u64::from(aya_ebpf::bindings::BPF_RB_CONS_POS)) + 1;
    let Some(woken_at) = WOKEN_AT.get_ptr_mut(0) else {
        return u64::from(aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP);
    };
    // SAFETY: a pointer from the lookup of an existing index, valid for the program's run; an
    // aligned u64 read and written whole (a race only repeats a wake-up).
    unsafe {
        if core::ptr::read_volatile(woken_at) == read_at {
            return quiet;
        }
        core::ptr::write_volatile(woken_at, read_at);
    }
    u64::from(aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP)
}

/// Reserves an event slot, or counts the loss in the calling program's `LOST` slot and returns
/// `None`.
#[inline(always)]
pub fn reserve(lost_slot: u32) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<RawEvent>> {
    reserve_for::<RawEvent>(lost_slot, 1)
}

/// Reserves a record of type `T` carrying `events` events, or counts them as lost.
#[inline(always)]
pub fn reserve_for<T: 'static>(
    lost_slot: u32,
    events: u64,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none()
        && let Some(lost) = LOST.get_ptr_mut(lost_slot)
    {
        // SAFETY: the pointer comes from the map lookup of an existing index and stays valid
        // for the program's run. The slot is this program's on this CPU, and the kernel does
        // not let a program nest with itself on a CPU: nobody else writes it meanwhile.
        unsafe { *lost += events };
    }
    entry
}
