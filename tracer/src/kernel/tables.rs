//! The kernel-side tables the agent reads on its refresh rather than receiving records for:
//! sockets in CLOSE_WAIT right now, and the programs' own counters.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use tracer_common::{COUNT_SLOTS, CloseWaitEntry};
use tracer_core::model::{Event, SockId, TcpState};

use crate::kernel::decode;
use crate::kernel::programs::{ProbeError, Probes};

/// More promoted sockets than this means their closing runs were lost: start over.
const MAX_PROMOTED: usize = 65_536;

/// Sockets in CLOSE_WAIT as the kernel keeps them (`CLOSE_WAIT` map). A socket passing through
/// CLOSE_WAIT reaches the agent in its closing run; one still there at a refresh is handed to
/// the tracker then ("promoted"), so that CLOSE_WAIT counts and leaks stay live, and the same
/// transition in its later run is dropped.
pub struct CloseWaitTable {
    map: BpfHashMap<MapData, u64, CloseWaitEntry>,
    promotions: Promotions,
}

/// Promoted sockets and when they entered CLOSE_WAIT.
#[derive(Default)]
pub struct Promotions {
    promoted: HashMap<SockId, u64>,
}

impl CloseWaitTable {
    pub fn take(probes: &mut Probes) -> Result<CloseWaitTable, ProbeError> {
        let map = probes.take_map("CLOSE_WAIT")?;
        let map = BpfHashMap::try_from(map).map_err(|e| ProbeError::Map("CLOSE_WAIT", e))?;
        Ok(CloseWaitTable {
            map,
            promotions: Promotions::default(),
        })
    }

    /// Appends to `out` the move into CLOSE_WAIT of every socket there now that the tracker
    /// has not heard of (`known` tells which it has).
    pub fn promote(&mut self, known: impl Fn(SockId) -> bool, out: &mut Vec<Event>) {
        // A socket that leaves while the table is walked is skipped by the walk: fine, its
        // closing run carries the transition.
        for (sock, entry) in self.map.iter().flatten() {
            if known(sock) {
                continue;
            }
            if let Ok(event) = decode::decode(&entry.event)
                && self.promotions.promote(event, out)
            {
                out.push(Event::SocketInfo {
                    ts_ns: entry.since_ns,
                    sock,
                    cgroup: entry.cgroup,
                    cost: None,
                });
            }
        }
    }

    /// Whether `event` is the move into CLOSE_WAIT already handed over by [`Self::promote`].
    pub fn already_given(&mut self, event: &Event) -> bool {
        self.promotions.already_given(event)
    }
}

impl Promotions {
    /// Hands `event` (a move into CLOSE_WAIT) over once per socket; `true` when it did now.
    pub fn promote(&mut self, event: Event, out: &mut Vec<Event>) -> bool {
        if self.promoted.len() >= MAX_PROMOTED {
            self.promoted.clear();
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.promoted.entry(event.sock()) {
            slot.insert(event.ts_ns());
            out.push(event);
            return true;
        }
        false
    }

    /// Whether `event` was handed over already; forgets it then (the run that carries it is
    /// the socket's last word on CLOSE_WAIT).
    pub fn already_given(&mut self, event: &Event) -> bool {
        let Event::StateChange {
            ts_ns,
            sock,
            new: TcpState::CloseWait,
            ..
        } = *event
        else {
            return false;
        };
        if self.promoted.get(&sock) == Some(&ts_ns) {
            self.promoted.remove(&sock);
            return true;
        }
        false
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

    fn into_close_wait(sock: SockId, ts_ns: u64) -> Event {
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
            old: TcpState::Established,
            new: TcpState::CloseWait,
            task: Task {
                pid: 0,
                tid: 0,
                comm: Comm([0; 16]),
            },
        }
    }

    #[test]
    fn a_promoted_move_is_handed_over_once_and_dropped_from_its_run() {
        let mut promotions = Promotions::default();
        let mut out = Vec::new();
        assert!(promotions.promote(into_close_wait(7, 100), &mut out));
        assert!(!promotions.promote(into_close_wait(7, 100), &mut out));
        assert_eq!(out.len(), 1, "a second refresh does not hand it over again");
        assert!(promotions.already_given(&into_close_wait(7, 100)));
        assert!(
            !promotions.already_given(&into_close_wait(7, 100)),
            "only the run's own copy is dropped"
        );
        // The same address reused by a later socket entering CLOSE_WAIT at another time.
        assert!(promotions.promote(into_close_wait(7, 100), &mut out));
        assert!(!promotions.already_given(&into_close_wait(7, 900)));
    }
}
