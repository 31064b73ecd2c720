//! A socket's state changes are kept in the kernel (`PATHS`) and sent as one record when the
//! socket closes, or before any other record of the same socket (so that user space still sees
//! everything in order), or when the run is longer than a record holds. The agent reads the
//! table once a second to learn of the connections that stay open. A connection then costs one
//! record per socket, at its end.
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid};
use tracer_common::{
    COUNT_PATH_TABLE_FULL, EVENT_PATH, LOST_STATE, PATH_STEPS, RawEvent, RawPath, RawPathOpen,
};

use crate::maps::off;
use crate::sock::{Mem, Typed};
use crate::{cost, maps, sock, timers};

/// The error `BPF_NOEXIST` gets for a key already there.
const EEXIST: i32 = -17;

/// Keeps one state change of `sk` (a BTF-typed pointer), and acts on it (see [`act_on`]);
/// `false` when the table is full (the caller then sends the change on its own). `opening`
/// (connect, or a child of a listener): whatever is still kept under this address belonged to
/// an earlier socket, and goes first.
#[inline(always)]
pub fn keep(sk: *const u8, now: u64, old: u8, new: u8, owner: bool, opening: bool) -> bool {
    let key = sk as u64;
    if !opening && let Some(path) = maps::PATHS.get_ptr_mut(key) {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run; the
        // socket's state changes run under its lock, so no other program writes this entry.
        let kept = unsafe { &mut *path };
        if (kept.len as usize) < PATH_STEPS {
            append(kept, now, old, new, owner);
            act_on(sk, path, new);
            return true;
        }
        // A run longer than a record holds: it goes, and a new one starts.
        send_kept::<Typed>(sk, path, false);
    }
    // A new run, built in this CPU's scratch and inserted whole: one map update instead of an
    // insert, a lookup and the writes through it; for an opening, no lookup before either.
    let Some(scratch) = maps::PATH_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch, valid for the program's run; only this program uses it, and
    // a program does not nest with itself on a CPU.
    let fresh = unsafe { &mut *scratch };
    sock::fill_at::<Typed>(&mut fresh.head, sk, false, now);
    fresh.head.kind = EVENT_PATH;
    fresh.head.oldstate = 0;
    fresh.head.newstate = 0;
    fresh.steps = RawPath::ZERO.steps;
    fresh.len = 0;
    fresh.has_task = 0;
    fresh.cgroup = cost::cgroup(sk);
    append(fresh, now, old, new, owner);
    if act_on(sk, scratch, new) {
        // Nothing kept of it before (it predates the agent, or the table was full): its whole
        // run was this CLOSE, sent from the scratch.
        return true;
    }
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value would copy the entry onto the BPF stack"
    )]
    let mut inserted = maps::PATHS.insert(key, &*fresh, maps::NOEXIST);
    if inserted == Err(EEXIST) {
        // An earlier socket's run under this address (it left without a CLOSE we saw).
        send::<Typed>(sk);
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value would copy the entry onto the BPF stack"
        )]
        let again = maps::PATHS.insert(key, &*fresh, maps::NOEXIST);
        inserted = again;
    }
    if inserted.is_err() {
        maps::count(COUNT_PATH_TABLE_FULL);
        return false;
    }
    true
}

/// What a change just kept in `path` (the entry of `sk`, or the scratch of a new run) calls
/// for: at ESTABLISHED the local port that connect() picked after SYN_SENT (the agent may read
/// the entry while the connection lives); at CLOSE the run goes, with what the connection cost.
/// `true` when it was sent.
#[inline(always)]
fn act_on(sk: *const u8, path: *mut RawPathOpen, new: u8) -> bool {
    if new == ESTABLISHED {
        // SAFETY: `path` is valid for the program's run (a lookup in `PATHS`, or this CPU's
        // scratch); the socket's state changes run under its lock.
        port_if_unset::<Typed>(sk, unsafe { &mut (*path).head });
    } else if new == CLOSE {
        send_kept::<Typed>(sk, path, true);
        return true;
    }
    false
}

/// Appends one state change to `kept` (which has room), with the owner when it is one.
#[inline(always)]
fn append(kept: &mut RawPathOpen, now: u64, old: u8, new: u8, owner: bool) {
    let Some(step) = kept.steps.get_mut(kept.len as usize) else {
        return;
    };
    step.ts_ns = now;
    step.old = old;
    step.new = new;
    kept.len += 1;
    if owner {
        let pid_tgid = bpf_get_current_pid_tgid();
        kept.head.pid = (pid_tgid >> 32) as u32;
        kept.head.tid = pid_tgid as u32;
        kept.head.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        kept.has_task = 1;
    }
}

const ESTABLISHED: u8 = 1;
const CLOSE: u8 = 7;

/// Sends the kept state changes of `sk`, if any, and forgets them.
#[inline(always)]
pub fn send<M: Mem>(sk: *const u8) {
    if let Some(path) = maps::PATHS.get_ptr_mut(sk as u64) {
        send_kept::<M>(sk, path, false);
    }
}

/// Sends `path`, the entry of `sk`, and forgets it; `closing`: the run ends in CLOSE, so the
/// record also carries what the connection cost and the timewait socket that replaces it
/// (otherwise only the leading part goes: [`RawPathOpen`]). `closing` needs a BTF-typed `sk`.
#[inline(always)]
pub fn send_kept<M: Mem>(sk: *const u8, path: *mut RawPathOpen, closing: bool) {
    // SAFETY: `path` comes from a lookup in `PATHS` (or is this CPU's scratch of a new run)
    // during this program's run.
    let len = unsafe { (*path).len };
    if len == 0 {
    } else if closing {
        if let Some(mut entry) = maps::reserve_for::<RawPath>(LOST_STATE, u64::from(len)) {
            // SAFETY: `entry` is ring buffer memory reserved for one RawPath, whose leading part
            // has the layout of the RawPathOpen map value `path` (checked in tracer-common);
            // they do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(path, entry.as_mut_ptr().cast::<RawPathOpen>(), 1)
            };
            // SAFETY: as above: the reserved record, its leading part now written.
            let record = unsafe { &mut *entry.as_mut_ptr() };
            port_if_unset::<M>(sk, &mut record.head);
            record.cost = RawPath::ZERO.cost;
            cost::read_at_close(sk, &mut record.cost);
            timers::take_born(&mut record.tw);
            entry.submit(maps::submit_flags());
        }
    } else if let Some(mut entry) = maps::reserve_for::<RawPathOpen>(LOST_STATE, u64::from(len)) {
        // SAFETY: `entry` is ring buffer memory for one RawPathOpen and `path` a valid map value
        // of the same type; they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(path, entry.as_mut_ptr(), 1) };
        // SAFETY: as above: the reserved record, now a full copy.
        let record = unsafe { &mut *entry.as_mut_ptr() };
        port_if_unset::<M>(sk, &mut record.head);
        entry.submit(maps::submit_flags());
    }
    let _ = maps::PATHS.remove(sk as u64);
}

/// connect() picks the local port after SYN_SENT (the addresses are set before): read it now.
#[inline(always)]
pub fn port_if_unset<M: Mem>(sk: *const u8, head: &mut RawEvent) {
    if head.sport == 0 {
        head.sport = M::read::<u16>(sk, off!(skc_num)).unwrap_or(0);
    }
}
