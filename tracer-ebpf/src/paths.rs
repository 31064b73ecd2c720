//! A socket's state changes are kept in the kernel (in its `PATH_SLOTS` slot, or in `PATHS`
//! when another socket holds that slot) and sent as one record when the socket closes, or
//! before any other record of the same socket (so that user space still sees everything in
//! order), or when the run is longer than a record holds. The agent reads both tables once a
//! second to learn of the connections that stay open. A connection then costs one record per
//! socket, at its end.
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{
    COUNT_PATH_SLOT_TAKEN, COUNT_PATH_TABLE_FULL, EVENT_PATH, LOST_STATE, PATH_STEPS, PathSlot,
    RawEvent, RawPath, RawPathOpen, path_slot,
};

use crate::atomic::{self, add, load, swap_if};
use crate::maps::off;
use crate::sock::{Mem, Typed};
use crate::{cost, maps, sock, timers};

/// The error `BPF_NOEXIST` gets for a key already there.
const EEXIST: i32 = -17;

/// Where a socket's run is kept, which says how to let go of it once sent.
#[derive(Clone, Copy)]
pub enum Home {
    /// Its `PATH_SLOTS` slot, which it owns (its address as a number, see
    /// `sock::address`): freed.
    Slot(*mut PathSlot, u64),
    /// Its `PATHS` entry: deleted.
    Table,
    /// Nowhere to free: this CPU's scratch, or a slot that keeps its owner for a new run.
    Kept,
}

/// Keeps one state change of `sk` (a BTF-typed pointer), and acts on it (see [`act_on`]);
/// `false` when it cannot be kept (the caller then sends the change on its own). `opening`
/// (connect, or a child of a listener): whatever is still kept under this address belonged to
/// an earlier socket, and goes first. A run lives in the socket's slot of `PATH_SLOTS` when it
/// is free, in `PATHS` otherwise.
#[inline(always)]
pub fn keep(sk: *const u8, now: u64, old: u8, new: u8, owner: bool, opening: bool) -> bool {
    let key = sock::address(sk, LOST_STATE);
    let Some(slot) = maps::PATH_SLOTS.get_ptr_mut(path_slot(key)) else {
        return false;
    };
    // SAFETY: a pointer from a lookup in this array, valid for the program's run; the
    // socket's state changes run under its lock, so only this program writes the slot of this
    // socket meanwhile (a claim by another socket first sees it held).
    let (owner_of_slot, path) = unsafe { (&raw mut (*slot).owner, &raw mut (*slot).path) };
    if load(owner_of_slot) == key {
        // SAFETY: as above.
        let kept = unsafe { &mut *path };
        if !opening && (kept.len as usize) < PATH_STEPS {
            append(kept, now, old, new, owner);
            act_on(sk, path, new, Home::Slot(slot, key));
            return true;
        }
        // An earlier socket's run at this address (it left without a CLOSE we saw), or a run
        // longer than a record holds: it goes, and a new one starts in the same slot.
        send_kept::<Typed>(sk, path, false, Home::Kept);
        restart(slot, key, sk, now, old, new, owner);
        return true;
    }
    if !opening
        && table_in_use()
        && let Some(entry) = maps::PATHS.get_ptr_mut(key)
    {
        // SAFETY: a pointer from a lookup in this map, valid for the program's run; as for
        // the slot, no other program writes this entry meanwhile.
        let kept = unsafe { &mut *entry };
        if (kept.len as usize) < PATH_STEPS {
            append(kept, now, old, new, owner);
            act_on(sk, entry, new, Home::Table);
            return true;
        }
        send_kept::<Typed>(sk, entry, false, Home::Table);
    } else if opening {
        // An earlier socket's run at this address, kept in `PATHS` because its slot was taken.
        send_from_table::<Typed>(sk);
    }
    // A new run: in the slot, when free.
    if swap_if(owner_of_slot, 0, key) {
        restart(slot, key, sk, now, old, new, owner);
        return true;
    }
    maps::count(COUNT_PATH_SLOT_TAKEN);
    // Otherwise in `PATHS`, built in this CPU's scratch and inserted whole: one map update
    // instead of an insert, a lookup and the writes through it.
    let Some(scratch) = maps::PATH_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch, valid for the program's run; only this program uses it, and
    // a program does not nest with itself on a CPU.
    let fresh = unsafe { &mut *scratch };
    start(fresh, sk, now);
    append(fresh, now, old, new, owner);
    if act_on(sk, scratch, new, Home::Kept) {
        // Its whole run was this CLOSE (it predates the agent, or the tables were full): sent
        // from the scratch.
        return true;
    }
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value would copy the entry onto the BPF stack"
    )]
    let mut inserted = maps::PATHS.insert(key, &*fresh, maps::NOEXIST);
    if inserted == Err(EEXIST) {
        // An earlier socket's run under this address (it left without a CLOSE we saw).
        send_from_table::<Typed>(sk);
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
    count_in_table(1);
    true
}

/// Writes a new run of one change into `slot`, which `sk` (at `key`) owns, between the slot's
/// counters (see `PathSlot`), and acts on the change.
#[inline(always)]
fn restart(slot: *mut PathSlot, key: u64, sk: *const u8, now: u64, old: u8, new: u8, owner: bool) {
    // SAFETY: `slot` is a slot `sk` owns, valid for the program's run (see `keep`).
    let (path, seq, seq_end) = unsafe {
        (
            &raw mut (*slot).path,
            &raw mut (*slot).seq,
            &raw mut (*slot).seq_end,
        )
    };
    add(seq_end, 1);
    // SAFETY: as above.
    let run = unsafe { &mut *path };
    start(run, sk, now);
    append(run, now, old, new, owner);
    add(seq, 1);
    act_on(sk, path, new, Home::Slot(slot, key));
}

/// Starts an empty run of `sk` in `run`: the head's addressing, namespace and cgroup.
#[inline(always)]
fn start(run: &mut RawPathOpen, sk: *const u8, now: u64) {
    sock::fill_at::<Typed>(&mut run.head, sk, false, now);
    run.head.kind = EVENT_PATH;
    run.head.oldstate = 0;
    run.head.newstate = 0;
    // The steps past `len` are not read: not cleared.
    run.len = 0;
    run.has_task = 0;
    run.cgroup = cost::cgroup(sk);
}

/// Whether `PATHS` may hold entries (`PATHS_IN_USE`).
#[inline(always)]
fn table_in_use() -> bool {
    atomic::in_use(&maps::PATHS_IN_USE)
}

/// Counts an entry added to `PATHS` or deleted from it (see `atomic::count`).
#[inline(always)]
fn count_in_table(delta: u64) {
    atomic::count(&maps::PATHS_IN_USE, delta);
}

/// What a change just kept in `path` (a socket's run, kept at `home`) calls for: at
/// ESTABLISHED the local port that connect() picked after SYN_SENT (the agent may read the run
/// while the connection lives); at CLOSE the run goes, with what the connection cost, and its
/// home is let go. `true` when it was sent.
#[inline(always)]
fn act_on(sk: *const u8, path: *mut RawPathOpen, new: u8, home: Home) -> bool {
    if new == ESTABLISHED {
        // SAFETY: `path` is valid for the program's run (a slot or entry of `sk`, or this
        // CPU's scratch); the socket's state changes run under its lock.
        port_if_unset::<Typed>(sk, unsafe { &mut (*path).head });
    } else if new == CLOSE {
        send_kept::<Typed>(sk, path, true, home);
        return true;
    }
    false
}

/// Appends one state change to `kept` (which has room), with the owner when it is one.
#[inline(always)]
fn append(kept: &mut RawPathOpen, now: u64, old: u8, new: u8, owner: bool) {
    let at = usize::from(kept.len);
    let (Some(at_ns), Some(was), Some(is)) = (
        kept.at_ns.get_mut(at),
        kept.old.get_mut(at),
        kept.new.get_mut(at),
    ) else {
        return;
    };
    *at_ns = now;
    *was = old;
    *is = new;
    kept.len += 1;
    if owner {
        let pid_tgid = bpf_get_current_pid_tgid();
        kept.head.pid = (pid_tgid >> 32) as u32;
        kept.head.tid = pid_tgid as u32;
        sock::current_comm(&mut kept.head.comm);
        kept.has_task = 1;
    }
}

const ESTABLISHED: u8 = 1;
const CLOSE: u8 = 7;

/// Sends the kept state changes of `sk`, if any, and forgets them; `program`: the caller's
/// `LOST_*` slot.
#[inline(always)]
pub fn send<M: Mem>(sk: *const u8, program: u32) {
    let key = sock::address(sk, program);
    if let Some(slot) = maps::PATH_SLOTS.get_ptr_mut(path_slot(key)) {
        // SAFETY: a pointer from a lookup in this array, valid for the program's run.
        let (owner, path) = unsafe { (&raw mut (*slot).owner, &raw mut (*slot).path) };
        if load(owner) == key {
            send_kept::<M>(sk, path, false, Home::Slot(slot, key));
            return;
        }
    }
    send_from_table::<M>(sk);
}

/// [`send`] for a run kept in `PATHS`.
#[inline(always)]
fn send_from_table<M: Mem>(sk: *const u8) {
    if table_in_use()
        && let Some(entry) = maps::PATHS.get_ptr_mut(sk as u64)
    {
        send_kept::<M>(sk, entry, false, Home::Table);
    }
}

/// Sends `path`, the run of `sk`, and lets go of its `home`; `closing`: the run ends in CLOSE,
/// so the record also carries what the connection cost and the timewait socket that replaces
/// it (otherwise only the leading part goes: [`RawPathOpen`]). `closing` needs a BTF-typed `sk`.
#[inline(always)]
pub fn send_kept<M: Mem>(sk: *const u8, path: *mut RawPathOpen, closing: bool, home: Home) {
    // SAFETY: `path` is the run in a slot of `PATH_SLOTS` or an entry of `PATHS`, both from a
    // lookup during this program's run, or this CPU's scratch of a new run.
    let len = unsafe { (*path).len };
    if len == 0 {
    } else if closing {
        // SAFETY: as above.
        timers::flush_born_unless_of(unsafe { &(*path).head }, LOST_STATE);
        if let Some(mut entry) = maps::reserve_for::<RawPath>(LOST_STATE, u64::from(len)) {
            // SAFETY: `entry` is ring buffer memory reserved for one RawPath, whose leading part
            // has the layout of the RawPathOpen map value `path` (checked in tracer-common);
            // they do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(path, entry.as_mut_ptr().cast::<RawPathOpen>(), 1)
            };
            // SAFETY: as above: the reserved record, its leading part now written.
            let record = unsafe { &mut *entry.as_mut_ptr() };
            port_if_unset::<M>(sk, &mut record.run.head);
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
    match home {
        Home::Slot(slot, key) => free(slot, key),
        Home::Table => {
            if maps::PATHS.remove(sk as u64).is_ok() {
                count_in_table(u64::MAX);
            }
        }
        Home::Kept => {}
    }
}

/// Empties `slot` and gives it up, if the socket at `key` still owns it. No counter moves: a
/// copy taken meanwhile holds the run whole (sent, and read again from its record) or empty;
/// the next claim moves them before it writes.
#[inline(always)]
fn free(slot: *mut PathSlot, key: u64) {
    // SAFETY: a slot from a lookup in `PATH_SLOTS`, valid for the program's run.
    let (owner, len) = unsafe { (&raw mut (*slot).owner, &raw mut (*slot).path.len) };
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(len, 0) };
    swap_if(owner, key, 0);
}

/// connect() picks the local port after SYN_SENT (the addresses are set before): read it now.
#[inline(always)]
pub fn port_if_unset<M: Mem>(sk: *const u8, head: &mut RawEvent) {
    if head.sport == 0 {
        head.sport = M::read::<u16>(sk, off!(skc_num)).unwrap_or(0);
    }
}
