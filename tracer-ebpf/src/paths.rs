//! A socket's state changes are kept in the kernel (`PATHS`) and sent as one record at the
//! moments user space needs them: when the handshake completes (the connection becomes live),
//! at CLOSE (the connection is finished), before any other record of the same socket (so that
//! user space still sees everything in order), and when the run is longer than a record holds.
//! A connection then costs two records instead of one per state change.
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid};
use tracer_common::{
    COUNT_CLOSE_WAIT_TABLE_FULL, COUNT_PATH_TABLE_FULL, CloseWaitEntry, EVENT_PATH, EVENT_STATE,
    LOST_STATE, PATH_STEPS, PathStep, RawEvent, RawPath,
};

use crate::{maps, sock};

/// What a new entry starts from; inserted from here rather than from the stack.
static EMPTY: RawPath = RawPath {
    head: RawEvent {
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
        kind: EVENT_PATH,
        oldstate: 0,
        newstate: 0,
        ca_state: 0,
        aux: 0,
    },
    steps: [PathStep {
        ts_ns: 0,
        old: 0,
        new: 0,
        _pad: [0; 6],
    }; PATH_STEPS],
    len: 0,
    has_task: 0,
};

/// Keeps one state change of `sk`. `false` when it could not be kept (the table is full): the
/// caller then sends the change on its own.
#[inline(always)]
pub fn keep(sk: *const u8, now: u64, old: u8, new: u8, owner: bool) -> bool {
    let key = sk as u64;
    if let Some(path) = maps::PATHS.get_ptr(key)
        // SAFETY: a pointer from a lookup in this map, valid for the program's run.
        && unsafe { (*path).len } as usize >= PATH_STEPS
    {
        send(sk);
    }
    let path = match maps::PATHS.get_ptr_mut(key) {
        Some(path) => path,
        None => {
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "by value would copy 200 bytes onto the 512-byte BPF stack"
            )]
            let inserted = maps::PATHS.insert(key, &EMPTY, 0);
            if inserted.is_err() {
                maps::count(COUNT_PATH_TABLE_FULL);
                return false;
            }
            let Some(path) = maps::PATHS.get_ptr_mut(key) else {
                return false;
            };
            // SAFETY: a pointer from a lookup in this map, valid for the program's run; the
            // socket's state changes run under its lock, so no other program writes this entry.
            sock::fill(unsafe { &mut (*path).head }, sk, false);
            path
        }
    };
    // SAFETY: as above.
    let path = unsafe { &mut *path };
    let Some(step) = path.steps.get_mut(path.len as usize) else {
        return false;
    };
    step.ts_ns = now;
    step.old = old;
    step.new = new;
    path.len += 1;
    if owner {
        let pid_tgid = bpf_get_current_pid_tgid();
        path.head.pid = (pid_tgid >> 32) as u32;
        path.head.tid = pid_tgid as u32;
        path.head.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        path.has_task = 1;
    }
    true
}

/// Sends the kept state changes of `sk`, if any, and forgets them.
#[inline(always)]
pub fn send(sk: *const u8) {
    let key = sk as u64;
    let Some(path) = maps::PATHS.get_ptr(key) else {
        return;
    };
    // SAFETY: a pointer from a lookup in this map, valid for the program's run.
    let len = unsafe { (*path).len };
    if len > 0
        && let Some(mut entry) = maps::reserve_for::<RawPath>(LOST_STATE, u64::from(len))
    {
        // SAFETY: `entry` is ring buffer memory reserved for one RawPath and `path` a valid map
        // value of the same type; they do not overlap.
        unsafe { core::ptr::copy_nonoverlapping(path, entry.as_mut_ptr(), 1) };
        // SAFETY: as above: the reserved record, now a full copy.
        let record = unsafe { &mut *entry.as_mut_ptr() };
        if record.head.sport == 0 {
            // connect() picks the local port after SYN_SENT: read the addressing again.
            let (pid, tid, comm) = (record.head.pid, record.head.tid, record.head.comm);
            sock::fill(&mut record.head, sk, false);
            (record.head.pid, record.head.tid, record.head.comm) = (pid, tid, comm);
        }
        record.head.kind = EVENT_PATH;
        entry.submit(maps::submit_flags());
    }
    let _ = maps::PATHS.remove(key);
}

/// Remembers that `sk` entered CLOSE_WAIT, with its addressing, for the agent's once-a-second
/// read. `false` when the table is full (the caller then sends the path at once, as before).
#[inline(always)]
pub fn close_wait_entered(sk: *const u8, now: u64, old: u8) -> bool {
    let key = sk as u64;
    let Some(path) = maps::PATHS.get_ptr(key) else {
        return false;
    };
    let mut entry = CloseWaitEntry {
        since_ns: now,
        // SAFETY: a pointer from a lookup in this map, valid for the program's run.
        event: unsafe { (*path).head },
    };
    entry.event.kind = EVENT_STATE;
    entry.event.ts_ns = now;
    entry.event.oldstate = old;
    entry.event.newstate = 8; // CLOSE_WAIT
    entry.event.pid = 0;
    entry.event.tid = 0;
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value would copy the entry a second time onto the BPF stack"
    )]
    let inserted = maps::CLOSE_WAIT.insert(key, &entry, 0);
    if inserted.is_err() {
        maps::count(COUNT_CLOSE_WAIT_TABLE_FULL);
        return false;
    }
    true
}

#[inline(always)]
pub fn close_wait_left(sk: *const u8) {
    let _ = maps::CLOSE_WAIT.remove(sk as u64);
}
