//! Reading `struct sock` fields through the offsets handed over by the agent.
//!
//! Two ways to read kernel memory. [`Typed`]: a plain load from a pointer whose type the
//! verifier knows (a `tp_btf` argument such as the state tracepoint's `struct sock *`, or a
//! pointer loaded through one). The verifier checks the offset, a known constant from the
//! read-only `OFFSETS`, against the kernel's BTF when the program loads and makes the load
//! fault-tolerant: no helper call, about a tenth of [`Probed`]'s cost. [`Probed`]: through
//! `bpf_probe_read_kernel`, for any address (a socket found from its timer's address, which
//! the verifier cannot type).
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated,
};
use tracer_common::{AF_INET, AF_INET6, RawEvent, SOCK_HEAD_BYTES, SockHead};

use crate::maps::off;

/// A way to read kernel memory (see the module's comment).
pub trait Mem {
    /// How to read memory reached through a pointer read this way.
    type Far: Mem;
    /// The `T` at `base + offset`; `None` (or zero for [`Typed`]) when the read faults.
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T>;
}

/// Plain loads from a BTF-typed pointer.
pub struct Typed;

/// `bpf_probe_read_kernel`, for addresses the verifier cannot type.
pub struct Probed;

/// Plain loads from a copy of a socket's head (see [`copy_head`]), whose base is the copy;
/// pointers read from it are reached with [`Probed`].
pub struct Copied;

impl Mem for Typed {
    type Far = Typed;
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // SAFETY: `base` is a BTF-typed kernel pointer and `offset` that of a field of type `T`
        // in its type (from the kernel's BTF): the verifier checks both at load time and turns
        // this load into one that yields zero instead of faulting.
        Some(unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) })
    }
}

impl Mem for Probed {
    type Far = Probed;
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        read(base, offset)
    }
}

impl Mem for Copied {
    type Far = Probed;
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // The offsets are constants of the read-only `OFFSETS`: the verifier checks this bound
        // at load time and drops whichever branch cannot run.
        if offset as usize + core::mem::size_of::<T>() > SOCK_HEAD_BYTES as usize {
            return None;
        }
        // SAFETY: `base` is a copy of SOCK_HEAD_BYTES bytes of a socket, aligned to 8 (a
        // `SockHead`), and the field lies within it (checked above); kernel members are aligned
        // to their size, and so they are in the copy.
        Some(unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) })
    }
}

/// Copies the head of the socket at `sk` (an address the verifier cannot type) into `head` in
/// one `bpf_probe_read_kernel`, when every member read from it lies there (`head_copy_fits`,
/// a constant at load time); `false` otherwise, and the caller reads field by field with
/// [`Probed`]. A faulting read leaves zeroes, as failed reads of single fields give.
#[inline(always)]
pub fn copy_head(sk: *const u8, head: *mut SockHead) -> bool {
    if off!(head_copy_fits) == 0 {
        return false;
    }
    // SAFETY: `head` is SOCK_HEAD_BYTES writable bytes (a map value) and that is the size
    // passed; bpf_probe_read_kernel copies through the kernel's fault-tolerant accessor and
    // zeroes the destination when the read faults.
    unsafe {
        generated::bpf_probe_read_kernel(
            head.cast(),
            SOCK_HEAD_BYTES,
            sk.cast::<core::ffi::c_void>(),
        )
    };
    true
}

/// Reads a `T` at `base + offset` in kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-tolerant accessor: a bad
    // address yields an error, never a crash. The offset comes from the kernel's own BTF.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()).ok() }
}

/// Offsets of the head of `struct sock_common` when it has the usual layout (the agent checks
/// `sock_head_standard` against BTF): both IPv4 addresses in one `u64` (`skc_addrpair`), both
/// ports in one `u32` (`skc_portpair`), then the family.
const ADDRPAIR: u32 = 0;
const PORTPAIR: u32 = 12;
const FAMILY: u32 = 16;

/// Fills time, the socket's addressing and namespace into `event`, and the task only when
/// `task` (process context: elsewhere `current` is whoever was interrupted, and user space
/// ignores it, so reading it is wasted work).
#[inline(always)]
pub fn fill<M: Mem>(event: &mut RawEvent, sk: *const u8, task: bool) {
    // SAFETY: bpf_ktime_get_ns takes no arguments and only reads the clock.
    fill_at::<M>(event, sk, task, unsafe { bpf_ktime_get_ns() });
}

/// [`fill`] with the time already read.
#[inline(always)]
pub fn fill_at<M: Mem>(event: &mut RawEvent, sk: *const u8, task: bool, now: u64) {
    fill_from::<M>(event, sk, sk, task, now);
}

/// [`fill_at`] for the socket at `sk` with its fields read from `base` (a [`Copied`] head, or
/// `sk` itself).
#[inline(always)]
pub fn fill_from<M: Mem>(
    event: &mut RawEvent,
    sk: *const u8,
    base: *const u8,
    task: bool,
    now: u64,
) {
    event.ts_ns = now;
    event.skaddr = sk as u64;
    if task {
        let pid_tgid = bpf_get_current_pid_tgid();
        event.pid = (pid_tgid >> 32) as u32;
        event.tid = pid_tgid as u32;
        current_comm(&mut event.comm);
    } else {
        event.pid = 0;
        event.tid = 0;
        clear(&mut event.comm);
    }
    clear(&mut event.saddr);
    clear(&mut event.daddr);
    let family = if off!(sock_head_standard) != 0 {
        // Whole words: a load of a byte array could become one load per byte.
        let addrs = M::read::<u64>(base, ADDRPAIR).unwrap_or(0).to_ne_bytes();
        // skc_dport (network order) then skc_num (host order).
        let ports = M::read::<u32>(base, PORTPAIR).unwrap_or(0).to_ne_bytes();
        event.sport = u16::from_ne_bytes([ports[2], ports[3]]);
        event.dport = u16::from_be_bytes([ports[0], ports[1]]);
        let family: u16 = M::read(base, FAMILY).unwrap_or(0);
        if family == AF_INET {
            // skc_daddr then skc_rcv_saddr.
            event.daddr[..4].copy_from_slice(&addrs[..4]);
            event.saddr[..4].copy_from_slice(&addrs[4..]);
        }
        family
    } else {
        let family: u16 = M::read(base, off!(skc_family)).unwrap_or(0);
        event.sport = M::read::<u16>(base, off!(skc_num)).unwrap_or(0);
        event.dport = u16::from_be(M::read::<u16>(base, off!(skc_dport)).unwrap_or(0));
        if family == AF_INET {
            let s: [u8; 4] = M::read(base, off!(skc_rcv_saddr)).unwrap_or([0; 4]);
            let d: [u8; 4] = M::read(base, off!(skc_daddr)).unwrap_or([0; 4]);
            event.saddr[..4].copy_from_slice(&s);
            event.daddr[..4].copy_from_slice(&d);
        }
        family
    };
    event.family = family;
    if family == AF_INET6 {
        event.saddr = v6::<M>(base, off!(skc_v6_rcv_saddr));
        event.daddr = v6::<M>(base, off!(skc_v6_daddr));
    }
    event.netns = match M::read::<u64>(base, off!(skc_net)) {
        Some(net) if net != 0 => {
            M::Far::read::<u32>(net as *const u8, off!(net_ns_inum)).unwrap_or(0)
        }
        _ => 0,
    };
    event.segs = 0;
    event.ca_state = 0;
    event.aux = 0;
}

/// `current->comm` written into `comm` by the helper itself (zeroed when it fails): aya's
/// wrapper zeroes a stack buffer first, and on BPF any zeroing or copy of a byte array longer
/// than a word compiles to a call of a byte-at-a-time `memset` or `memmove` (about a hundred
/// instructions for 16 bytes).
#[inline(always)]
pub fn current_comm(comm: &mut [u8; 16]) {
    // SAFETY: `comm` is 16 writable bytes (of a map value, a ring buffer record or the stack)
    // and 16 is the size passed: the helper writes no more.
    unsafe { generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) };
}

/// Zeroes `bytes`, a 16-byte field of a `RawEvent` (each at a multiple of 8 in a struct aligned
/// to 8, asserted in tracer-common), in two word stores instead of a `memset` call (see
/// [`current_comm`]). Volatile, so that the compiler cannot merge them back into one.
#[inline(always)]
pub fn clear(bytes: &mut [u8; 16]) {
    let words = (bytes as *mut [u8; 16]).cast::<u64>();
    // SAFETY: `words` points at 16 writable bytes aligned to 8 (see above).
    unsafe {
        core::ptr::write_volatile(words, 0);
        core::ptr::write_volatile(words.add(1), 0);
    }
}

/// An IPv6 address (`struct in6_addr`, 4-byte aligned) in four word loads.
#[inline(always)]
fn v6<M: Mem>(sk: *const u8, at: u32) -> [u8; 16] {
    let mut addr = [0; 16];
    for (word, chunk) in (0u32..).zip(addr.chunks_exact_mut(4)) {
        let value = M::read::<u32>(sk, at + word * 4).unwrap_or(0);
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    addr
}

/// The address `sk` as a plain number, to compute with. The verifier allows no arithmetic but
/// adding offsets on a BTF-typed pointer (a hash of it is refused), but a value read back from
/// a map is an untyped number: `sk` goes through this CPU's `ADDRESS` cell of the calling
/// `program` (its `LOST_*` slot). A program does not nest with itself on a CPU, so no other
/// writes that cell between the write and the read.
#[inline(always)]
pub fn address(sk: *const u8, program: u32) -> u64 {
    if let Some(cell) = crate::maps::ADDRESS.get_ptr_mut(program) {
        // SAFETY: this CPU's cell of this program, valid for the program's run; an aligned u64
        // written and read whole.
        return unsafe {
            core::ptr::write_volatile(cell.cast::<*const u8>(), sk);
            core::ptr::read_volatile(cell)
        };
    }
    let held = sk;
    // SAFETY: reads the 8 bytes of `held`, a local on this program's stack.
    unsafe { bpf_probe_read_kernel((&raw const held).cast::<u64>()) }.unwrap_or(0)
}

/// True for TCP sockets of the families we decode.
#[inline(always)]
pub fn is_tcp<M: Mem>(sk: *const u8) -> bool {
    M::read::<u16>(sk, off!(sk_protocol)) == Some(tracer_common::IPPROTO_TCP)
}

/// The socket's current `skc_state`.
#[inline(always)]
pub fn state<M: Mem>(sk: *const u8) -> u8 {
    M::read::<u8>(sk, off!(skc_state)).unwrap_or(0)
}
