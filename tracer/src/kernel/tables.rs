//! The kernel-side tables the agent reads on its refresh rather than receiving records for:
//! the runs of state changes the kernel still holds (open connections, CLOSE_WAIT sockets),
//! timewait sockets' exits, and the programs' own counters.
use aya::maps::{Array, Map, MapData, PerCpuArray};
use std::sync::atomic::{Ordering, fence};
use tracer_common::{COUNT_SLOTS, PathSlot, RawEvent, RawPathOpen, TwExitKey};
use tracer_core::model::{Event, SockId, TcpState};

use crate::kernel::batch::BatchReader;
use crate::kernel::decode;
use crate::kernel::mapped::MappedArray;
use crate::kernel::programs::{ProbeError, Probes};

/// Takes the hash map `name` out of the loaded object.
fn hash_map(probes: &mut Probes, name: &'static str) -> Result<MapData, ProbeError> {
    match probes.take_map(name)? {
        Map::HashMap(map) => Ok(map),
        _ => Err(ProbeError::MissingMap(name)),
    }
}

/// The array map `name` out of the loaded object.
fn array_map(probes: &mut Probes, name: &'static str) -> Result<MapData, ProbeError> {
    match probes.take_map(name)? {
        Map::Array(map) => Ok(map),
        _ => Err(ProbeError::MissingMap(name)),
    }
}

/// The kernel's `PATH_SLOTS` and `PATHS` tables: each socket's state changes from its first to
/// its CLOSE, when the kernel sends them as one record (in the socket's slot, or in `PATHS`
/// when another socket held it). A connection that stays open is read from here once a second
/// and handed to the tracker then ("promoted", see [`promotable`]), so that it counts as open
/// and its CLOSE_WAIT is followed while it lasts; [`already_given`] drops those changes from
/// the record that later carries them again.
pub struct PathTable {
    slots: MappedArray<PathSlot>,
    reader: BatchReader<u64, RawPathOpen>,
    /// `PATHS_IN_USE`: while 0, `PATHS` is empty, and its 65 536 buckets are not walked.
    in_use: Array<MapData, u64>,
}

impl PathTable {
    pub fn take(probes: &mut Probes) -> Result<PathTable, ProbeError> {
        let slots = MappedArray::new(array_map(probes, "PATH_SLOTS")?)
            .map_err(|e| ProbeError::Table("PATH_SLOTS", e))?;
        let in_use = Array::try_from(probes.take_map("PATHS_IN_USE")?)
            .map_err(|e| ProbeError::Map("PATHS_IN_USE", e))?;
        Ok(PathTable {
            slots,
            reader: BatchReader::new(hash_map(probes, "PATHS")?),
            in_use,
        })
    }

    /// Calls `each` with every socket's run in the tables.
    pub fn walk(&mut self, mut each: impl FnMut(SockId, &RawPathOpen)) -> Result<(), ProbeError> {
        self.slots
            .each(|slot| {
                if let Some((sock, run)) = read_slot(slot) {
                    each(sock, &run);
                }
            })
            .map_err(|e| ProbeError::Table("PATH_SLOTS", e))?;
        // The kernel counts an entry just after adding it: one not counted yet stays in the
        // table and is read on the next walk, as one added during a walk is.
        let in_use = self
            .in_use
            .get(&0, 0)
            .map_err(|e| ProbeError::Map("PATHS_IN_USE", e))?;
        if in_use == 0 {
            return Ok(());
        }
        self.reader
            .walk(false, |&sock, path| each(sock, path))
            .map_err(|e| ProbeError::Table("PATHS", e))
    }
}

/// The run a `PATH_SLOTS` slot holds, read in place while the kernel may write it: none when
/// the slot is free or empty, or when the kernel rewrote it while it was read (its two
/// counters differ, see `PathSlot`: read `seq` first and `seq_end` last) or gave it to another
/// socket meanwhile (the run's socket is not the owner read first).
fn read_slot(slot: *const PathSlot) -> Option<(SockId, RawPathOpen)> {
    // SAFETY: `slot` points at a whole slot of the mapping, valid for this call
    // (`MappedArray::each`); a volatile read of a plain integer the kernel may write meanwhile.
    let owner = unsafe { std::ptr::read_volatile(&raw const (*slot).owner) };
    if owner == 0 {
        return None;
    }
    // SAFETY: as above, for the counters and the run (a Pod struct, every bit pattern valid);
    // what the kernel wrote meanwhile is caught by the counters, read before and after it.
    let (seq, path, seq_end) = unsafe {
        let seq = std::ptr::read_volatile(&raw const (*slot).seq);
        fence(Ordering::Acquire);
        let path = std::ptr::read_volatile(&raw const (*slot).path);
        fence(Ordering::Acquire);
        (
            seq,
            path,
            std::ptr::read_volatile(&raw const (*slot).seq_end),
        )
    };
    let copy = PathSlot {
        owner,
        seq,
        path,
        seq_end,
    };
    slot_run(&copy).map(|(sock, run)| (sock, *run))
}

/// The run a copy of a `PATH_SLOTS` slot holds: none when the slot is free or empty, or when
/// the kernel rewrote it while it was copied (its two counters differ, see `PathSlot`) or gave
/// it to another socket meanwhile (the run's socket is not the owner read first).
fn slot_run(slot: &PathSlot) -> Option<(SockId, &RawPathOpen)> {
    let whole = slot.seq == slot.seq_end && slot.path.len > 0;
    (whole && slot.owner != 0 && slot.path.head.skaddr == slot.owner)
        .then_some((slot.owner, &slot.path))
}

/// Whether the tracker holds every state change of `run` (a socket's run as the table holds
/// it, raw) already: it entered its latest state (`last_state_ns`) no earlier than the run's
/// latest step. Such a run, a connection that stays open, is most of a busy host's table, read
/// every second: it is not decoded at all ([`promotable`] would find nothing in it).
pub fn given_whole(run: &RawPathOpen, last_state_ns: Option<u64>) -> bool {
    let latest = run.steps().map(|(at_ns, _, _)| at_ns).max();
    matches!((latest, last_state_ns), (Some(latest), Some(given)) if given >= latest)
}

/// When the latest state change of `run` (a socket's run as the table holds it, decoded) came.
pub fn latest_change_ns(run: &[Event]) -> Option<u64> {
    run.iter()
        .filter_map(|event| match *event {
            Event::StateChange { ts_ns, .. } => Some(ts_ns),
            _ => None,
        })
        .max()
}

/// Appends to `out` what of `run` (a socket's run as the table holds it, decoded) the tracker
/// has not been given: the state changes after `last_state_ns` (when it entered its latest
/// state, `None` when it does not track the socket), and the socket's cgroup with the first
/// of them. A socket still in its handshake waits: it is not a connection yet (a connect()
/// retrying its SYN may stay in SYN_SENT for a minute and never become one).
pub fn promotable(run: &[Event], last_state_ns: Option<u64>, out: &mut Vec<Event>) {
    let latest = run.iter().rev().find_map(|event| match *event {
        Event::StateChange { new, .. } => Some(new),
        _ => None,
    });
    if matches!(latest, None | Some(TcpState::SynSent | TcpState::SynRecv)) {
        return;
    }
    let given = last_state_ns.unwrap_or(0);
    let mut any = false;
    for event in run {
        match *event {
            Event::StateChange { ts_ns, .. } if ts_ns > given => {
                any = true;
                out.push(*event);
            }
            Event::SocketInfo { .. } if last_state_ns.is_none() && any => out.push(*event),
            _ => {}
        }
    }
}

/// Whether `event` (from a record) is a state change the tracker was given already (by a
/// promotion: `last_state_ns` is when the socket's tracked connection entered its latest
/// state).
pub fn already_given(event: &Event, last_state_ns: impl Fn(SockId) -> Option<u64>) -> bool {
    match *event {
        Event::StateChange { ts_ns, sock, .. } => {
            last_state_ns(sock).is_some_and(|last| ts_ns <= last)
        }
        _ => false,
    }
}

/// The kernel's `TW_EXITS` table: timewait sockets' exits, read and emptied once a second
/// instead of a record each.
pub struct TimeWaitExits {
    reader: BatchReader<TwExitKey, RawEvent>,
    /// The last walk's exits as decoded, and their order by time (kept between walks).
    events: Vec<Event>,
    order: Vec<(u64, u32)>,
}

impl TimeWaitExits {
    pub fn take(probes: &mut Probes) -> Result<TimeWaitExits, ProbeError> {
        Ok(TimeWaitExits {
            reader: BatchReader::new(hash_map(probes, "TW_EXITS")?),
            events: Vec::new(),
            order: Vec::new(),
        })
    }

    /// Takes every exit out of the table and hands them to `each` in the order they happened;
    /// returns how many did not decode (counted as malformed records are).
    pub fn take_exits(&mut self, mut each: impl FnMut(&Event)) -> Result<u64, ProbeError> {
        let events = &mut self.events;
        events.clear();
        let mut malformed = 0;
        let walked = self.reader.walk(true, |_, exit| {
            if decode::exit_events(exit, events).is_err() {
                malformed += 1;
            }
        });
        // The table is a hash: put the exits back in time order (the same address can leave
        // twice within a walk). Sorting (time, index) pairs moves a sixth of the bytes that
        // sorting the events would, and keeps an exit's expiry after it.
        self.order.clear();
        self.order.extend(
            (0u32..)
                .zip(&self.events)
                .map(|(at, event)| (event.ts_ns(), at)),
        );
        self.order.sort_unstable();
        for &(_, at) in &self.order {
            if let Some(event) = self.events.get(at as usize) {
                each(event);
            }
        }
        if self.events.capacity() > 4 * self.events.len().max(1024) {
            self.events = Vec::new();
            self.order = Vec::new();
        }
        walked
            .map(|()| malformed)
            .map_err(|e| ProbeError::Table("TW_EXITS", e))
    }
}

/// The programs' `COUNTERS` (`COUNT_*` slots) and `RST_NO_SOCKET` counts, summed over CPUs.
pub struct KernelCounters {
    array: PerCpuArray<MapData, u64>,
    rst_no_socket: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub fn take(probes: &mut Probes) -> Result<KernelCounters, ProbeError> {
        let map = probes.take_map("COUNTERS")?;
        let array = PerCpuArray::try_from(map).map_err(|e| ProbeError::Map("COUNTERS", e))?;
        let map = probes.take_map("RST_NO_SOCKET")?;
        let rst_no_socket =
            PerCpuArray::try_from(map).map_err(|e| ProbeError::Map("RST_NO_SOCKET", e))?;
        Ok(KernelCounters {
            array,
            rst_no_socket,
        })
    }

    /// RSTs sent for no socket since the programs were loaded: `(reason code, total)` for each
    /// reason seen (the last slot: unknown).
    pub fn rst_no_socket(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let mut seen = Vec::new();
        for code in 0..tracer_common::RST_NO_SOCKET_SLOTS {
            let values = self
                .rst_no_socket
                .get(&code, 0)
                .map_err(|e| ProbeError::Map("RST_NO_SOCKET", e))?;
            let total: u64 = values.iter().sum();
            if total > 0 {
                seen.push((code, total));
            }
        }
        Ok(seen)
    }

    /// Every slot's total since the programs were loaded.
    pub fn totals(&self) -> Result<[u64; COUNT_SLOTS as usize], ProbeError> {
        let mut totals = [0u64; COUNT_SLOTS as usize];
        for (slot, total) in (0..COUNT_SLOTS).zip(totals.iter_mut()) {
            let values = self
                .array
                .get(&slot, 0)
                .map_err(|e| ProbeError::Map("COUNTERS", e))?;
            *total = values.iter().sum();
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_core::model::{Comm, Task, Tuple};

    #[test]
    fn a_slot_counts_only_when_whole_and_held_by_the_socket_it_describes() {
        let mut slot = PathSlot {
            owner: 0xffff_8880_1000_0000,
            seq: 3,
            seq_end: 3,
            ..PathSlot::default()
        };
        slot.path.head.skaddr = slot.owner;
        slot.path.len = 2;
        assert_eq!(slot_run(&slot).map(|(sock, _)| sock), Some(slot.owner));
        // Rewritten while copied: the counter written first moved on.
        let torn = PathSlot { seq_end: 4, ..slot };
        assert!(slot_run(&torn).is_none());
        // Given to another socket between the owner's read and the run's.
        let mut taken = slot;
        taken.path.head.skaddr += 0x800;
        assert!(slot_run(&taken).is_none());
        // Free, or emptied as its run was sent.
        assert!(slot_run(&PathSlot { owner: 0, ..slot }).is_none());
        let mut emptied = slot;
        emptied.path.len = 0;
        assert!(slot_run(&emptied).is_none());
        // Read in place, as the mapping is read: the same answers.
        assert_eq!(
            read_slot(&raw const slot).map(|(sock, run)| (sock, run.len)),
            Some((slot.owner, 2))
        );
        for unread in [torn, taken, PathSlot { owner: 0, ..slot }, emptied] {
            assert!(read_slot(&raw const unread).is_none());
        }
    }

    /// A run the tracker has whole is skipped before decoding; one with a later step, or of a
    /// socket it does not track, is not.
    #[test]
    fn a_run_given_whole_is_skipped_and_only_then() {
        let mut run = RawPathOpen {
            len: 2,
            // The third is past `len`: not a step.
            at_ns: [100, 200, 900, 0, 0, 0],
            ..RawPathOpen::default()
        };
        assert!(given_whole(&run, Some(200)));
        assert!(given_whole(&run, Some(250)));
        assert!(!given_whole(&run, Some(199)), "its ESTABLISHED is new");
        assert!(!given_whole(&run, None), "not tracked: all of it is new");
        run.len = 0;
        assert!(
            !given_whole(&run, Some(1000)),
            "an empty run is not skipped, only ignored"
        );
    }

    fn change(sock: SockId, ts_ns: u64, old: TcpState, new: TcpState) -> Event {
        Event::StateChange {
            ts_ns,
            sock,
            netns: 1,
            tuple: Tuple {
                src: "127.0.0.1".parse().expect("ip"),
                sport: 8080,
                dst: "127.0.0.1".parse().expect("ip"),
                dport: 40000,
            },
            old,
            new,
            task: Task {
                pid: 0,
                tid: 0,
                comm: Comm([0; 16]),
            },
        }
    }

    fn info(sock: SockId) -> Event {
        Event::SocketInfo {
            ts_ns: 1,
            sock,
            cgroup: 42,
            cost: None,
        }
    }

    use TcpState::{Close, CloseWait, Established, LastAck, Listen, SynRecv, SynSent};

    #[test]
    fn a_run_is_handed_over_once_then_only_its_new_changes() {
        let mut out = Vec::new();
        let open = [
            change(7, 100, Listen, SynRecv),
            change(7, 200, SynRecv, Established),
            info(7),
        ];
        promotable(&open, None, &mut out);
        assert_eq!(out, open.to_vec(), "the whole run and the cgroup, once");
        out.clear();
        promotable(&open, Some(200), &mut out);
        assert!(
            out.is_empty(),
            "a tracked socket in that state gets nothing again"
        );
        let longer = [
            open[0],
            open[1],
            change(7, 300, Established, CloseWait),
            info(7),
        ];
        promotable(&longer, Some(200), &mut out);
        assert_eq!(out, vec![longer[2]], "only the move into CLOSE_WAIT is new");
    }

    #[test]
    fn the_closing_record_drops_what_was_handed_over() {
        let record = [
            change(7, 100, Listen, SynRecv),
            change(7, 200, SynRecv, Established),
            change(7, 300, Established, CloseWait),
            change(7, 400, CloseWait, LastAck),
            info(7),
            change(7, 500, LastAck, Close),
        ];
        let tracked = |sock: SockId| (sock == 7).then_some(200);
        let kept: Vec<bool> = record
            .iter()
            .map(|event| !already_given(event, tracked))
            .collect();
        assert_eq!(kept, [false, false, true, true, true, true]);
        let untracked = |_: SockId| None;
        assert!(!already_given(&record[0], untracked));
    }

    #[test]
    fn a_socket_in_its_handshake_waits_until_it_is_a_connection() {
        let mut out = Vec::new();
        let connecting = [change(7, 100, Close, SynSent), info(7)];
        promotable(&connecting, None, &mut out);
        assert!(out.is_empty());
        let open = [connecting[0], change(7, 200, SynSent, Established), info(7)];
        promotable(&open, None, &mut out);
        assert_eq!(
            out,
            open.to_vec(),
            "the whole run once the handshake is over"
        );
    }
}
