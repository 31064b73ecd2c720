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

/// What a new entry starts from; inserted from here rather than from the stack.
static EMPTY: RawPathOpen = RawPathOpen {
    head: RawEvent {
        kind: EVENT_PATH,
        ..RawEvent::ZERO
    },
    steps: RawPath::ZERO.steps,
    len: 0,
    has_task: 0,
    cgroup: 0,
};

/// Keeps one state change of `sk` (a BTF-typed pointer) and returns its entry, or `None` when
/// the table is full (the caller then sends the change on its own). `opening` (connect, or a
/// child of a listener): whatever is still kept under this address belonged to an earlier
/// socket, and goes first.
#[inline(always)]
pub fn keep(
    sk: *const u8,
    now: u64,
    old: u8,
    new: u8,
    owner: bool,
    opening: bool,
) -> Option<*mut RawPathOpen> {
    let key = sk as u64;
    let mut existing = maps::PATHS.get_ptr_mut(key);
    if let Some(path) = existing
        // SAFETY: a pointer from a lookup in this map, valid for the program's run.
        && (opening || unsafe { (*path).len } as usize >= PATH_STEPS)
    {
        send_kept::<Typed>(sk, path, false);
        existing = None;
    }
    let path = match existing {
        Some(path) => path,
        None => {
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "by value would copy 208 bytes onto the 512-byte BPF stack"
            )]
            let inserted = maps::PATHS.insert(key, &EMPTY, 0);
            if inserted.is_err() {
                maps::count(COUNT_PATH_TABLE_FULL);
                return None;
            }
            let path = maps::PATHS.get_ptr_mut(key)?;
            // SAFETY: a pointer from a lookup in this map, valid for the program's run; the
            // socket's state changes run under its lock, so no other program writes this entry.
            let fresh = unsafe { &mut *path };
            sock::fill_at::<Typed>(&mut fresh.head, sk, false, now);
            fresh.cgroup = cost::cgroup(sk);
            path
        }
    };
    // SAFETY: as above.
    let kept = unsafe { &mut *path };
    let step = kept.steps.get_mut(kept.len as usize)?;
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
    Some(path)
}

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
    // SAFETY: `path` comes from a lookup in `PATHS` during this program's run.
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
