//! The kernel-side tables the agent reads on its refresh rather than receiving records for:
//! the runs of state changes the kernel still holds (open connections, CLOSE_WAIT sockets),
//! and the programs' own counters.
use aya::maps::{Map, MapData, PerCpuArray};
use foldhash::HashMap;
use tracer_common::{COUNT_SLOTS, RawEvent, RawPathOpen, TwExitKey};
use tracer_core::model::{Event, SockId, TcpState};

use crate::kernel::batch::BatchReader;
use crate::kernel::decode;
use crate::kernel::programs::{ProbeError, Probes};

/// Takes the hash map `name` out of the loaded object.
fn hash_map(probes: &mut Probes, name: &'static str) -> Result<MapData, ProbeError> {
    match probes.take_map(name)? {
        Map::HashMap(map) => Ok(map),
        _ => Err(ProbeError::MissingMap(name)),
    }
}

/// The kernel's `PATHS` table: each socket's state changes from its first to its CLOSE, when
/// the kernel sends them as one record. A connection that stays open is read from here once a
/// second and handed to the tracker then ("promoted"), so that it counts as open and its
/// CLOSE_WAIT is followed while it lasts; [`Promotions`] drops those changes from the record
/// that later carries them again.
pub struct PathTable {
    reader: BatchReader<u64, RawPathOpen>,
    promotions: Promotions,
}

impl PathTable {
    pub fn take(probes: &mut Probes) -> Result<PathTable, ProbeError> {
        Ok(PathTable {
            reader: BatchReader::new(hash_map(probes, "PATHS")?),
            promotions: Promotions::default(),
        })
    }

    /// Appends to `out` the state changes of every socket in the table that the tracker has
    /// not been given yet (see [`Promotions::promote`]).
    pub fn promote(&mut self, out: &mut Vec<Event>) -> Result<(), ProbeError> {
        self.promotions.begin_walk();
        let mut run = Vec::new();
        let promotions = &mut self.promotions;
        let walked = self.reader.walk(false, |&sock, path| {
            run.clear();
            // A run that does not decode is what a malformed record would be: skipped.
            if decode::open_path_events(path, &mut run).is_ok() {
                promotions.promote(sock, &run, out);
            }
        });
        // Only a whole walk tells which sockets left the table.
        if walked.is_ok() {
            self.promotions.end_walk();
        }
        walked.map_err(|e| ProbeError::Table("PATHS", e))
    }

    /// Whether `event`, from a record, was handed over already by [`Self::promote`].
    pub fn already_given(&mut self, event: &Event) -> bool {
        self.promotions.already_given(event)
    }
}

/// The kernel's `TW_EXITS` table: timewait sockets' exits, read and emptied once a second
/// instead of a record each.
pub struct TimeWaitExits {
    reader: BatchReader<TwExitKey, RawEvent>,
    exits: Vec<RawEvent>,
}

impl TimeWaitExits {
    pub fn take(probes: &mut Probes) -> Result<TimeWaitExits, ProbeError> {
        Ok(TimeWaitExits {
            reader: BatchReader::new(hash_map(probes, "TW_EXITS")?),
            exits: Vec::new(),
        })
    }

    /// Takes every exit out of the table and appends them to `out` in the order they happened.
    pub fn take_exits(&mut self, out: &mut Vec<Event>) -> Result<(), ProbeError> {
        let exits = &mut self.exits;
        exits.clear();
        let walked = self.reader.walk(true, |_, exit| exits.push(*exit));
        // The table is a hash: put the exits back in time order (the same address can leave
        // twice within a walk).
        self.exits.sort_unstable_by_key(|exit| exit.ts_ns);
        for exit in &self.exits {
            // An exit that does not decode is what a malformed record would be: skipped.
            let _ = decode::exit_events(exit, out);
        }
        if self.exits.capacity() > 4 * self.exits.len().max(1024) {
            self.exits = Vec::new();
        }
        walked.map_err(|e| ProbeError::Table("TW_EXITS", e))
    }
}

/// What was handed over of each socket's run still in the kernel's table.
#[derive(Default)]
pub struct Promotions {
    given: HashMap<SockId, Given>,
    walk: u64,
}

struct Given {
    /// The time of the latest state change handed over: the kernel's clock is monotonic, so
    /// the changes of the same socket (or of a later one at its address) after it are new.
    last_ns: u64,
    /// The walk that last saw the socket in the table.
    seen_in: u64,
}

impl Promotions {
    fn begin_walk(&mut self) {
        self.walk += 1;
    }

    /// Forgets the sockets gone from the table for two walks: their record, sent when they
    /// left it, was drained in between.
    fn end_walk(&mut self) {
        let walk = self.walk;
        self.given.retain(|_, given| given.seen_in + 1 >= walk);
    }

    /// Hands over the state changes of `run` (a socket's run as the table holds it, decoded)
    /// not handed over before, and the socket's cgroup with the first of them. A socket still
    /// in its handshake waits: it is not a connection yet (a connect() retrying its SYN may
    /// stay in SYN_SENT for a minute and never become one).
    pub fn promote(&mut self, sock: SockId, run: &[Event], out: &mut Vec<Event>) {
        let latest = run.iter().rev().find_map(|event| match *event {
            Event::StateChange { new, .. } => Some(new),
            _ => None,
        });
        if matches!(latest, None | Some(TcpState::SynSent | TcpState::SynRecv)) {
            return;
        }
        let walk = self.walk;
        let given = self.given.entry(sock).or_insert(Given {
            last_ns: 0,
            seen_in: walk,
        });
        given.seen_in = walk;
        let first = given.last_ns == 0;
        let mut any = false;
        for event in run {
            match *event {
                Event::StateChange { ts_ns, .. } if ts_ns > given.last_ns => {
                    given.last_ns = ts_ns;
                    any = true;
                    out.push(*event);
                }
                Event::SocketInfo { .. } if first && any => out.push(*event),
                _ => {}
            }
        }
    }

    /// Whether `event` (from a record) was handed over already. A socket's final CLOSE ends
    /// what is remembered of it.
    pub fn already_given(&mut self, event: &Event) -> bool {
        let Event::StateChange {
            ts_ns, sock, new, ..
        } = *event
        else {
            return false;
        };
        let Some(given) = self.given.get(&sock) else {
            return false;
        };
        let seen = ts_ns <= given.last_ns;
        if new == TcpState::Close && !seen {
            self.given.remove(&sock);
        }
        seen
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

    use TcpState::{Close, CloseWait, Established, LastAck, SynRecv};

    #[test]
    fn a_run_is_handed_over_once_then_only_its_new_changes() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        let open = [
            change(7, 100, TcpState::Listen, SynRecv),
            change(7, 200, SynRecv, Established),
            info(7),
        ];
        promotions.begin_walk();
        promotions.promote(7, &open, &mut out);
        promotions.end_walk();
        assert_eq!(out, open.to_vec(), "the whole run and the cgroup, once");
        out.clear();
        promotions.begin_walk();
        promotions.promote(7, &open, &mut out);
        promotions.end_walk();
        assert!(out.is_empty(), "a second walk hands nothing over again");
        let longer = [
            open[0],
            open[1],
            change(7, 300, Established, CloseWait),
            info(7),
        ];
        promotions.begin_walk();
        promotions.promote(7, &longer, &mut out);
        promotions.end_walk();
        assert_eq!(out, vec![longer[2]], "only the move into CLOSE_WAIT is new");
    }

    #[test]
    fn the_closing_record_drops_what_was_handed_over_and_ends_the_socket() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        let open = [
            change(7, 100, TcpState::Listen, SynRecv),
            change(7, 200, SynRecv, Established),
            info(7),
        ];
        promotions.begin_walk();
        promotions.promote(7, &open, &mut out);
        promotions.end_walk();
        let record = [
            open[0],
            open[1],
            change(7, 300, Established, CloseWait),
            change(7, 400, CloseWait, LastAck),
            info(7),
            change(7, 500, LastAck, Close),
        ];
        let kept: Vec<bool> = record
            .iter()
            .map(|event| !promotions.already_given(event))
            .collect();
        assert_eq!(kept, [false, false, true, true, true, true]);
        // A later socket at the same address is new throughout.
        assert!(!promotions.already_given(&change(7, 150, TcpState::Listen, SynRecv)));
    }

    #[test]
    fn a_later_socket_at_the_same_address_is_handed_over_too() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        promotions.begin_walk();
        promotions.promote(7, &[change(7, 100, SynRecv, Established)], &mut out);
        promotions.end_walk();
        // Its CLOSE record was lost; a new socket took the address.
        promotions.begin_walk();
        promotions.promote(7, &[change(7, 900, SynRecv, Established)], &mut out);
        promotions.end_walk();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_socket_in_its_handshake_waits_until_it_is_a_connection() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        let connecting = [change(7, 100, Close, TcpState::SynSent), info(7)];
        promotions.begin_walk();
        promotions.promote(7, &connecting, &mut out);
        promotions.end_walk();
        assert!(out.is_empty());
        let open = [
            connecting[0],
            change(7, 200, TcpState::SynSent, Established),
            info(7),
        ];
        promotions.begin_walk();
        promotions.promote(7, &open, &mut out);
        promotions.end_walk();
        assert_eq!(
            out,
            open.to_vec(),
            "the whole run once the handshake is over"
        );
    }

    #[test]
    fn sockets_gone_from_the_table_for_two_walks_are_forgotten() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        promotions.begin_walk();
        promotions.promote(7, &[change(7, 100, SynRecv, Established)], &mut out);
        promotions.end_walk();
        promotions.begin_walk();
        promotions.end_walk();
        assert_eq!(promotions.given.len(), 1, "its record may still be queued");
        promotions.begin_walk();
        promotions.end_walk();
        assert!(promotions.given.is_empty());
    }
}
