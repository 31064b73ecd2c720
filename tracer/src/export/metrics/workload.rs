//! Metrics by workload (`--metrics-by workload`): connections opened, closed and active,
//! retransmitted segments, resets, TIME_WAIT sockets, Nagle stalls and CLOSE_WAIT leaks, each
//! with a `workload` label for the N most active workloads (`tracer_core::workload::top`) and
//! `other` for the rest, so at most N + 1 series per metric. Registered only when asked for:
//! without the flag the metrics are exactly as before.
//!
//! The event path only counts by cgroup id (a map lookup under an uncontended lock); once a
//! second [`WorkloadMetrics::update`] names the ids, refreshes the top N (deleting the series
//! of labels that left it) and adds the window's counts to the counters.
use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use tracer_core::workload::top::{OTHER, TopLabels};

/// The label of connections whose cgroup is not known (kernels without the feature, sockets
/// seen before their cgroup, cgroups gone before the agent saw them). No workload is named so:
/// names are units, slices, `runtime/id`, `pod/uid` or paths starting with `/`.
pub const UNKNOWN: &str = "unknown";

/// Cgroup ids counted in one window, at most; past it new ids count as unknown (id 0).
const MAX_IDS: usize = 65_536;

/// Windows an id not yet named may wait for its name before it counts as unknown.
const MAX_WAIT: u8 = 3;

/// What a connection's cgroup id is named, at the end of a window.
pub enum Label {
    Named(String),
    /// Not named yet; the next walk may name it.
    Wait,
    Unknown,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    opened: u64,
    closed: u64,
    retransmits: u64,
    resets: u64,
    nagle_stalls: u64,
    close_wait_leaks: u64,
    /// Windows it has waited for a name.
    waited: u8,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.opened += other.opened;
        self.closed += other.closed;
        self.retransmits += other.retransmits;
        self.resets += other.resets;
        self.nagle_stalls += other.nagle_stalls;
        self.close_wait_leaks += other.close_wait_leaks;
    }

    fn activity(&self) -> u64 {
        self.opened
            + self.closed
            + self.retransmits
            + self.resets
            + self.nagle_stalls
            + self.close_wait_leaks
    }
}

struct State {
    window: HashMap<u64, Counts>,
    top: TopLabels,
    /// The label exported for each cgroup id named at the last update (ids since then count
    /// as unknown until the next).
    labels: HashMap<u64, String>,
}

pub struct WorkloadMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    active: IntGaugeVec,
    retransmits: IntCounterVec,
    resets: IntCounterVec,
    time_wait: IntGaugeVec,
    nagle_stalls: IntCounterVec,
    close_wait_leaks: IntCounterVec,
    state: Mutex<State>,
}

/// What one event adds.
#[derive(Clone, Copy, Debug)]
pub enum Count {
    Opened,
    Closed,
    Retransmits(u32),
    Reset,
    NagleStall,
    CloseWaitLeak,
}

impl WorkloadMetrics {
    /// Registers the metrics in `registry`, with `top_n` workloads of their own.
    pub fn register(registry: &Registry, top_n: usize) -> prometheus::Result<WorkloadMetrics> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let vec = IntCounterVec::new(Opts::new(name, help), &["workload"])?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let vec = IntGaugeVec::new(Opts::new(name, help), &["workload"])?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let metrics = WorkloadMetrics {
            opened: counter(
                "tracer_workload_connections_opened_total",
                "TCP connections opened while the agent watched, by the workload (systemd unit, \
                 container, pod) of the socket's cgroup; the top N workloads, the rest under \
                 workload=\"other\".",
            )?,
            closed: counter(
                "tracer_workload_connections_closed_total",
                "TCP connections closed, by workload (top N, the rest under \"other\").",
            )?,
            active: gauge(
                "tracer_workload_connections_active",
                "TCP connections open right now, by workload (top N, the rest under \"other\"; \
                 \"unknown\" for connections open before the agent started).",
            )?,
            retransmits: counter(
                "tracer_workload_retransmits_total",
                "TCP segments retransmitted on tracked connections, by workload (top N, the \
                 rest under \"other\").",
            )?,
            resets: counter(
                "tracer_workload_resets_total",
                "TCP resets sent or received on tracked connections, by workload (top N, the \
                 rest under \"other\").",
            )?,
            time_wait: gauge(
                "tracer_workload_time_wait_sockets",
                "Sockets in TIME_WAIT right now, by the workload of the connection each came \
                 from (top N, the rest under \"other\"); they add up to tracer_time_wait_sockets.",
            )?,
            nagle_stalls: counter(
                "tracer_workload_nagle_stalls_total",
                "Nagle + delayed-ACK stalls suffered by the sender, by workload (top N, the rest \
                 under \"other\").",
            )?,
            close_wait_leaks: counter(
                "tracer_workload_close_wait_leaks_total",
                "Connections reported as CLOSE_WAIT leaks, by workload (top N, the rest under \
                 \"other\").",
            )?,
            state: Mutex::new(State {
                window: HashMap::new(),
                top: TopLabels::new(top_n),
                labels: HashMap::new(),
            }),
        };
        // `other` is always there, so the breakdown always adds up.
        for vec in metrics.counters() {
            vec.get_metric_with_label_values(&[OTHER])?;
        }
        for vec in [&metrics.active, &metrics.time_wait] {
            vec.get_metric_with_label_values(&[OTHER])?;
        }
        Ok(metrics)
    }

    fn counters(&self) -> [&IntCounterVec; 6] {
        [
            &self.opened,
            &self.closed,
            &self.retransmits,
            &self.resets,
            &self.nagle_stalls,
            &self.close_wait_leaks,
        ]
    }

    /// Counts what happened on a connection of cgroup `cgroup` (0: unknown).
    pub fn count(&self, cgroup: u64, what: Count) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let key = if state.window.len() >= MAX_IDS && !state.window.contains_key(&cgroup) {
            0
        } else {
            cgroup
        };
        let counts = state.window.entry(key).or_default();
        match what {
            Count::Opened => counts.opened += 1,
            Count::Closed => counts.closed += 1,
            Count::Retransmits(segs) => counts.retransmits += u64::from(segs),
            Count::Reset => counts.resets += 1,
            Count::NagleStall => counts.nagle_stalls += 1,
            Count::CloseWaitLeak => counts.close_wait_leaks += 1,
        }
    }

    /// Ends a window: names the ids counted (`label`), refreshes the top N, and exports the
    /// window's counts and the gauges (connections open and TIME_WAIT sockets now, by cgroup).
    pub fn update(
        &self,
        label: impl Fn(u64) -> Label,
        active: &HashMap<u64, usize>,
        time_wait: &HashMap<u64, usize>,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let window = std::mem::take(&mut state.window);
        let mut counts: HashMap<String, Counts> = HashMap::new();
        let mut gauges: HashMap<String, (usize, usize)> = HashMap::new();
        let mut names: HashMap<u64, String> = HashMap::new();
        let mut named = |id: u64| {
            names
                .entry(id)
                .or_insert_with(|| match label(id) {
                    Label::Named(name) => name,
                    Label::Wait | Label::Unknown => UNKNOWN.to_owned(),
                })
                .clone()
        };
        for (id, mut c) in window {
            let name = match label(id) {
                Label::Named(name) => {
                    named(id);
                    name
                }
                Label::Wait if c.waited < MAX_WAIT => {
                    // Counted once it is named, within a few windows.
                    c.waited += 1;
                    state.window.insert(id, c);
                    continue;
                }
                Label::Wait | Label::Unknown => UNKNOWN.to_owned(),
            };
            counts.entry(name).or_default().add(&c);
        }
        for (id, n) in active {
            gauges.entry(named(*id)).or_default().0 += n;
        }
        for (id, n) in time_wait {
            gauges.entry(named(*id)).or_default().1 += n;
        }
        let activity: Vec<(&str, u64)> = counts
            .iter()
            .map(|(name, c)| (name.as_str(), c.activity()))
            .chain(
                gauges
                    .iter()
                    .map(|(name, (a, t))| (name.as_str(), (a + t) as u64)),
            )
            .collect();
        let changes = state.top.refresh(activity);
        for gone in &changes.removed {
            for vec in self.counters() {
                let _ = vec.remove_label_values(&[gone]);
            }
            for vec in [&self.active, &self.time_wait] {
                let _ = vec.remove_label_values(&[gone]);
            }
        }
        for (name, c) in &counts {
            let shown = state.top.label(name);
            let pairs = [
                (&self.opened, c.opened),
                (&self.closed, c.closed),
                (&self.retransmits, c.retransmits),
                (&self.resets, c.resets),
                (&self.nagle_stalls, c.nagle_stalls),
                (&self.close_wait_leaks, c.close_wait_leaks),
            ];
            for (vec, n) in pairs {
                // A chosen label's series exist from the window it is chosen in.
                if let Ok(counter) = vec.get_metric_with_label_values(&[shown]) {
                    counter.inc_by(n);
                }
            }
        }
        let mut shown_gauges: HashMap<&str, (usize, usize)> = HashMap::new();
        shown_gauges.insert(OTHER, (0, 0));
        for name in state.top.chosen() {
            shown_gauges.insert(name, (0, 0));
        }
        for (name, (a, t)) in &gauges {
            let entry = shown_gauges.entry(state.top.label(name)).or_default();
            entry.0 += a;
            entry.1 += t;
        }
        for (name, (a, _)) in shown_gauges {
            set(&self.active, name, a);
        }
        for name in &changes.added {
            for vec in self.counters() {
                let _ = vec.get_metric_with_label_values(&[name]);
            }
        }
        let top = &state.top;
        let labels: HashMap<u64, String> = names
            .into_iter()
            .map(|(id, name)| (id, top.label(&name).to_owned()))
            .collect();
        state.labels = labels;
        self.set_time_wait_locked(&state, time_wait);
    }

    /// Sets the TIME_WAIT gauges from the table's counts by cgroup (`TimeWaitTable::by_cgroup`),
    /// with the labels of the last update. Called with every update of
    /// `tracer_time_wait_sockets`, so that the breakdown always adds up to it.
    pub fn set_time_wait(&self, by_cgroup: &HashMap<u64, usize>) {
        if let Ok(state) = self.state.lock() {
            self.set_time_wait_locked(&state, by_cgroup);
        }
    }

    fn set_time_wait_locked(&self, state: &State, by_cgroup: &HashMap<u64, usize>) {
        let mut sums: HashMap<&str, usize> = HashMap::new();
        sums.insert(OTHER, 0);
        for name in state.top.chosen() {
            sums.insert(name, 0);
        }
        let unknown = state.top.label(UNKNOWN);
        for (id, n) in by_cgroup {
            let label = state.labels.get(id).map_or(unknown, String::as_str);
            *sums.entry(label).or_default() += n;
        }
        for (name, n) in sums {
            set(&self.time_wait, name, n);
        }
    }
}

fn set(vec: &IntGaugeVec, label: &str, n: usize) {
    if let Ok(gauge) = vec.get_metric_with_label_values(&[label]) {
        gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(registry: &Registry, name: &str) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for family in registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let label = m.get_label()[0].value().to_owned();
                // The other of the two is 0.
                let value = m.get_counter().get_value() + m.get_gauge().get_value();
                out.push((label, value));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn labels_stay_within_n_plus_one_and_add_up() {
        let registry = Registry::new();
        let metrics = WorkloadMetrics::register(&registry, 2).unwrap();
        // Five workloads, cgroup ids 1..=5, id i opening i * 10 connections.
        for id in 1..=5u64 {
            for _ in 0..id * 10 {
                metrics.count(id, Count::Opened);
            }
        }
        let name = |id: u64| Label::Named(format!("w{id}.service"));
        let tw: HashMap<u64, usize> = [(1, 3), (5, 4), (0, 2)].into_iter().collect();
        metrics.update(name, &HashMap::new(), &tw);
        let opened = series(&registry, "tracer_workload_connections_opened_total");
        assert_eq!(
            opened,
            vec![
                ("other".to_owned(), 60.0),
                ("w4.service".to_owned(), 40.0),
                ("w5.service".to_owned(), 50.0)
            ]
        );
        let tw_series = series(&registry, "tracer_workload_time_wait_sockets");
        assert_eq!(tw_series.len(), 3, "{tw_series:?}");
        assert_eq!(tw_series.iter().map(|s| s.1).sum::<f64>(), 9.0);
        // w1 and w2 busy from now on; w4 and w5 idle: they fade out and their series go.
        for _ in 0..40 {
            for _ in 0..100 {
                metrics.count(1, Count::Opened);
                metrics.count(2, Count::Closed);
            }
            metrics.update(name, &HashMap::new(), &HashMap::new());
            for metric in [
                "tracer_workload_connections_opened_total",
                "tracer_workload_time_wait_sockets",
            ] {
                assert!(series(&registry, metric).len() <= 3);
            }
        }
        let labels: Vec<String> = series(&registry, "tracer_workload_connections_closed_total")
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(labels, ["other", "w1.service", "w2.service"]);
    }

    #[test]
    fn ids_not_named_yet_wait_then_count_as_unknown() {
        let registry = Registry::new();
        let metrics = WorkloadMetrics::register(&registry, 5).unwrap();
        metrics.count(9, Count::Closed);
        metrics.update(|_| Label::Wait, &HashMap::new(), &HashMap::new());
        assert_eq!(
            series(&registry, "tracer_workload_connections_closed_total"),
            vec![("other".to_owned(), 0.0)]
        );
        metrics.update(
            |_| Label::Named("late.service".to_owned()),
            &HashMap::new(),
            &HashMap::new(),
        );
        assert!(
            series(&registry, "tracer_workload_connections_closed_total")
                .contains(&("late.service".to_owned(), 1.0))
        );
    }
}
