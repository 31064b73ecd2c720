//! What a run saw, in bounded memory: `Diagnosis` as an observer of the tracker, and the capped
//! breakdowns it fills, which rank their keys and sum the rest under "other".
use std::collections::HashMap;
use std::hash::Hash;

use serde_json::{Value, json};
use tracer_core::model::{Direction, Owner, ResetDirection, RetransmitKind, TcpState, Tuple};
use tracer_core::observer::Observer;
use tracer_core::record::{CloseWaitLeak, Connection, TimeWaitExit, TimeWaitRecord};

use crate::diagnose::render::{extend, grouped, plural};
use crate::diagnose::{Diagnosis, ProcKey, WindowStall};

/// Retransmissions are counted per kind, in arrays indexed like `RetransmitKind::ALL`.
pub(super) const KINDS: usize = RetransmitKind::ALL.len();

/// Where `kind` is counted in a `[u64; KINDS]`.
pub(super) fn kind_index(kind: RetransmitKind) -> usize {
    RetransmitKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0)
}

/// The key under which a process's events are tallied; `None` for an unknown owner.
pub(super) fn proc_key(owner: Option<Owner>) -> ProcKey {
    owner.map(|o| (o.pid, o.comm.0))
}

impl Observer for Diagnosis {
    fn opened(&mut self, _direction: Direction) {
        self.opened += 1;
    }

    fn closed(&mut self, conn: &Connection) {
        self.closed += 1;
        if conn.time_wait {
            *self.tw_closers.slot(proc_key(conn.owner)) += 1;
            self.workloads.add(super::TOPIC_TIME_WAIT, conn.cgroup, 1);
        }
        if conn.cost.is_some() {
            self.costed_conns += 1;
            self.peer_costs.slot(conn.tuple.dst).add(conn);
        }
        if let Some(stall) = WindowStall::of(conn) {
            self.window_total.merge(&stall);
            self.window_conns
                .slot((conn.netns, conn.tuple))
                .merge(&stall);
        }
    }

    fn retransmit(&mut self, tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        let i = kind_index(kind);
        let segs = u64::from(segs);
        self.retransmits[i] = self.retransmits[i].saturating_add(segs);
        let peer = &mut self.retransmit_peers.slot(tuple.dst)[i];
        *peer = peer.saturating_add(segs);
    }

    fn reset(&mut self, tuple: &Tuple, direction: ResetDirection, reason: Option<u16>) {
        match direction {
            ResetDirection::Sent => {
                self.resets_sent += 1;
                *self.reset_reasons.slot(reason) += 1;
            }
            ResetDirection::Received => {
                self.resets_received += 1;
                *self.reset_peers.slot(tuple.dst) += 1;
            }
        }
    }

    fn time_wait_entered(&mut self, _netns: u32, _tuple: &Tuple) {
        self.tw_entered += 1;
    }

    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        if let Some(i) = TimeWaitExit::ALL.iter().position(|e| *e == record.exit) {
            self.tw_exited[i] += 1;
        }
        if record.substate == TcpState::FinWait2 {
            self.tw_fin_wait2_exits += 1;
        }
    }

    fn delayed_ack(&mut self, conn: &Connection, held_ns: Option<u64>, _pingpong: bool) {
        self.delayed.add(held_ns);
        self.workloads.add(super::TOPIC_DELAYED_ACK, conn.cgroup, 1);
        self.delayed_procs.slot(proc_key(conn.owner)).add(held_ns);
        let per_conn = self.delayed_conns.slot((conn.netns, conn.tuple));
        per_conn.add(held_ns);
        per_conn.who = conn.owner.or(per_conn.who);
    }

    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        let writer = conn.acks.writer;
        self.stalls.add(lost_ns);
        self.workloads.add(super::TOPIC_NAGLE, conn.cgroup, 1);
        self.stall_writers.slot(proc_key(writer)).add(lost_ns);
        let per_conn = self.stall_conns.slot((conn.netns, conn.tuple));
        per_conn.add(lost_ns);
        per_conn.who = writer.or(per_conn.who);
    }

    fn retransmit_on(&mut self, conn: &Connection, _kind: RetransmitKind, segs: u32) {
        self.workloads
            .add(super::TOPIC_RETRANSMISSIONS, conn.cgroup, u64::from(segs));
    }

    fn reset_on(&mut self, conn: &Connection, _direction: ResetDirection, _reason: Option<u16>) {
        self.workloads.add(super::TOPIC_RESETS, conn.cgroup, 1);
    }

    // Every stall arrives through `nagle_stall`; the rate-limited summaries add nothing.
    fn nagle_stall_report(&mut self, _conn: &Connection) {}

    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        self.leaks_total += 1;
        self.workloads.add(super::TOPIC_CLOSE_WAIT, leak.cgroup, 1);
        if self.leaks.len() < self.config.max_keys {
            self.leaks.push(*leak);
        }
    }
}

/// Figures that can be summed into "other" and ranked.
pub(super) trait Tally: Default + Clone {
    fn merge(&mut self, other: &Self);
    fn weight(&self) -> u64;
}

impl Tally for u64 {
    fn merge(&mut self, other: &Self) {
        *self = self.saturating_add(*other);
    }
    fn weight(&self) -> u64 {
        *self
    }
}

impl Tally for [u64; KINDS] {
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.iter_mut().zip(other) {
            *a = a.saturating_add(*b);
        }
    }
    fn weight(&self) -> u64 {
        self.iter().sum()
    }
}

/// Nagle stalls and the time they lost; `who` is the writer, for per-connection rows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Stalls {
    pub(super) stalls: u64,
    pub(super) lost_ns: u64,
    pub(super) who: Option<Owner>,
}

impl Stalls {
    fn add(&mut self, lost_ns: u64) {
        self.stalls += 1;
        self.lost_ns = self.lost_ns.saturating_add(lost_ns);
    }
}

impl Tally for Stalls {
    fn merge(&mut self, other: &Self) {
        self.stalls += other.stalls;
        self.lost_ns = self.lost_ns.saturating_add(other.lost_ns);
    }
    fn weight(&self) -> u64 {
        self.lost_ns
    }
}

/// Delayed ACKs sent; `timed` of them with a known hold time. `who` is the receiving process,
/// for per-connection rows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct DelayedAcks {
    pub(super) acks: u64,
    held_ns: u64,
    timed: u64,
    pub(super) who: Option<Owner>,
}

impl DelayedAcks {
    fn add(&mut self, held_ns: Option<u64>) {
        self.acks += 1;
        if let Some(held) = held_ns {
            self.timed += 1;
            self.held_ns = self.held_ns.saturating_add(held);
        }
    }

    pub(super) fn average_ns(&self) -> Option<u64> {
        (self.timed > 0).then(|| self.held_ns / self.timed)
    }
}

impl Tally for DelayedAcks {
    fn merge(&mut self, other: &Self) {
        self.acks += other.acks;
        self.timed += other.timed;
        self.held_ns = self.held_ns.saturating_add(other.held_ns);
    }
    fn weight(&self) -> u64 {
        self.acks
    }
}

/// A breakdown with at most `cap` keys; what comes for further keys is summed in `folded`.
pub(super) struct Capped<K, V> {
    cap: usize,
    pub(super) map: HashMap<K, V>,
    pub(super) folded: V,
    /// Events that went to `folded`.
    pub(super) folded_events: u64,
}

impl<K: Eq + Hash + Ord, V: Tally> Capped<K, V> {
    pub(super) fn new(cap: usize) -> Self {
        Capped {
            cap,
            map: HashMap::new(),
            folded: V::default(),
            folded_events: 0,
        }
    }

    pub(super) fn slot(&mut self, key: K) -> &mut V {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.folded_events += 1;
            return &mut self.folded;
        }
        self.map.entry(key).or_default()
    }

    /// How many keys, as text: exact unless some were folded.
    pub(super) fn distinct(&self, one: &str, many: &str) -> String {
        if self.folded_events > 0 {
            format!("more than {} {many}", grouped(self.map.len() as u64))
        } else {
            plural(self.map.len() as u64, one, many)
        }
    }

    /// The `n` largest, and the rest (folded keys included) summed.
    pub(super) fn ranked(&self, n: usize) -> Ranked<'_, K, V> {
        let mut top: Vec<(&K, &V)> = self.map.iter().collect();
        top.sort_by(|a, b| b.1.weight().cmp(&a.1.weight()).then_with(|| a.0.cmp(b.0)));
        let rest = top.split_off(n.min(top.len()));
        let mut other = self.folded.clone();
        for (_, v) in &rest {
            other.merge(v);
        }
        Ranked {
            top,
            other,
            other_keys: rest.len(),
            folded_events: self.folded_events,
        }
    }
}

pub(super) struct Ranked<'a, K, V> {
    pub(super) top: Vec<(&'a K, &'a V)>,
    pub(super) other: V,
    /// Kept keys outside the top.
    other_keys: usize,
    /// Events for keys past the cap, included in `other`.
    folded_events: u64,
}

impl<K, V> Ranked<'_, K, V> {
    pub(super) fn has_other(&self) -> bool {
        self.other_keys > 0 || self.folded_events > 0
    }

    pub(super) fn other_label(&self, things: &str) -> String {
        if self.folded_events > 0 {
            format!("other {things} (past the per-report limit too)")
        } else {
            format!("{} other {things}", grouped(self.other_keys as u64))
        }
    }

    pub(super) fn json(
        &self,
        row: impl Fn(&K, &V) -> Value,
        totals: impl Fn(&V) -> Value,
    ) -> Value {
        let top: Vec<Value> = self.top.iter().map(|(k, v)| row(k, v)).collect();
        let other = if self.has_other() {
            let mut other = totals(&self.other);
            extend(
                &mut other,
                json!({"keys": self.other_keys, "folded_events": self.folded_events}),
            );
            other
        } else {
            Value::Null
        };
        json!({"top": top, "other": other})
    }
}

#[cfg(test)]
mod tests {
    use tracer_core::model::SockId;
    use tracer_core::testkit::{retransmit, tuple};

    use super::*;
    use crate::diagnose::test_support::{Run, ip, reset, sysctls};
    use crate::diagnose::{DiagnoseConfig, TOPIC_RESETS, TOPIC_RETRANSMISSIONS};

    #[test]
    fn caps_fold_extra_keys_into_other() {
        let config = DiagnoseConfig {
            max_keys: 2,
            top: 5,
            ..DiagnoseConfig::default()
        };
        let mut run = Run::new(config);
        let mut events = Vec::new();
        for peer in 0..5u8 {
            let t = tuple(ip(1), 40000, ip(20 + peer), 80);
            events.push(retransmit(
                1,
                0x10 + SockId::from(peer),
                t,
                RetransmitKind::Fast,
                u32::from(peer) + 1,
            ));
            events.push(reset(t, ResetDirection::Received, None));
        }
        run.feed(&events);
        assert_eq!(run.diagnosis.retransmit_peers.map.len(), 2);
        assert_eq!(run.diagnosis.retransmit_peers.folded_events, 3);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_RETRANSMISSIONS).expect("finding");
        let peers = &f.details["peers"];
        assert_eq!(peers["top"].as_array().map(Vec::len), Some(2));
        assert_eq!(peers["other"]["segments"], 3 + 4 + 5);
        assert_eq!(peers["other"]["folded_events"], 3);
        assert_eq!(f.details["segments"], 15, "totals are exact");
        assert!(f.measured.contains("more than 2 peers"), "{}", f.measured);
        let text = report.to_string();
        assert!(
            text.contains("other peers (past the per-report limit too): 12 segments"),
            "{text}"
        );
        let resets = report.finding(TOPIC_RESETS).expect("resets");
        assert_eq!(resets.details["received_by_peer"]["other"]["resets"], 3);

        // Outside the top but kept: "N other".
        let config = DiagnoseConfig {
            top: 1,
            ..DiagnoseConfig::default()
        };
        let mut run = Run::new(config);
        run.feed(&events);
        let text = run.report(sysctls()).to_string();
        assert!(text.contains("4 other peers: 10 segments"), "{text}");
    }
}
