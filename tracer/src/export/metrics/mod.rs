//! Prometheus metrics derived from the connection tracker, and the HTTP endpoint that serves
//! them.
//!
//! [`Metrics`] owns its own registry (not the process-global one). It observes the tracker
//! through `impl Observer for &Metrics`: every label child is resolved when the metrics are
//! created (state transitions: the first time a pair is seen), so the per-event path is a few
//! atomic operations with no allocation and no label lookup.
//!
//! No metric carries an address, port or pid label: those are per-connection data, exported by
//! the event sinks, and would make the series count unbounded.

use std::io;

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

mod acks;
mod close_wait;
mod cost;
mod features;

mod http;
mod listen;
mod time_wait;
mod workload;

pub use acks::AckMetrics;
pub use close_wait::CloseWaitMetrics;
pub use cost::CostMetrics;
pub use features::FeatureMetrics;

pub use http::{Limits, serve, serve_with};
pub use listen::ListenMetrics;
use time_wait::TimeWaitMetrics;

use crate::kernel::softirqs::WATCHED;
pub use workload::{Count as WorkloadCount, Label as WorkloadLabel, WorkloadMetrics};

use tracer_core::observer::Observer;

use tracer_core::model::Tuple;

use tracer_core::model::{CloseCause, Direction, Event, ResetDirection, RetransmitKind, TcpState};

use tracer_core::record::TimeWaitRecord;

use tracer_core::record::{CloseWaitLeak, Connection};

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `tracer_connection_duration_seconds`: 100 µs to 1 h.
pub const CONNECTION_DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

/// Buckets of `tracer_handshake_duration_seconds`: 10 µs to 5 s.
pub const HANDSHAKE_DURATION_BUCKETS: [f64; 16] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 5.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("creating metric: {0}")]
    Register(#[source] prometheus::Error),
    #[error("encoding metrics: {0}")]
    Encode(#[source] prometheus::Error),
    #[error("metrics endpoint: accepting a connection: {0}")]
    Accept(#[source] io::Error),
}

/// The kinds of kernel events, as counted by `tracer_events_total{kind}`. Metric children are
/// indexed by the discriminant, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum EventKind {
    State,
    Retransmit,
    Reset,
    TimeWaitTimer,
    DelayedAck,
    #[strum(serialize = "nagle_held_write")]
    NagleHeld,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = match <EventKind as strum::VariantArray>::VARIANTS.first_chunk()
    {
        Some(all) => *all,
        None => panic!("VARIANTS lists every variant"),
    };

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl From<&Event> for EventKind {
    fn from(event: &Event) -> EventKind {
        match event {
            Event::StateChange { .. } => EventKind::State,
            Event::Retransmit { .. } => EventKind::Retransmit,
            Event::Reset { .. } => EventKind::Reset,
            Event::TimeWait { .. } => EventKind::TimeWaitTimer,
            Event::DelayedAck { .. } => EventKind::DelayedAck,
            Event::NagleHeld { .. } => EventKind::NagleHeld,
            // Rides in a path record with the state changes it describes.
            Event::SocketInfo { .. } => EventKind::State,
        }
    }
}

const N_STATES: usize = TcpState::ALL.len();

/// The agent's metrics, in a registry of their own.
pub struct Metrics {
    registry: Registry,
    transitions_vec: IntCounterVec,
    /// `[from][to]` by `state as usize - 1`, created on first use.
    transitions: [[OnceLock<IntCounter>; N_STATES]; N_STATES],
    /// Indexed by `Direction as usize`; `None` for `Unknown` (a connection seen opening has a direction).
    opened: [Option<IntCounter>; 3],
    /// `[direction][cause]`.
    closed: [[IntCounter; CloseCause::ALL.len()]; 3],
    active: IntGauge,
    duration: [Option<Histogram>; 3],
    handshake: Histogram,
    retransmits: [IntCounter; RetransmitKind::ALL.len()],
    resets: [IntCounter; 2],
    events: [IntCounter; EventKind::ALL.len()],
    events_lost: IntCounter,
    events_lost_seen: AtomicU64,
    events_malformed: IntCounter,
    records: IntCounter,
    table_full: [IntCounter; 3],
    table_full_seen: [AtomicU64; 3],
    path_slot_collisions: IntCounter,
    path_slot_collisions_seen: AtomicU64,
    softirqs_unobserved: [IntCounter; WATCHED.len()],
    softirqs_unobserved_seen: [AtomicU64; WATCHED.len()],
    evicted: IntCounter,
    evicted_seen: AtomicU64,
    reconciled: IntCounter,
    resyncs: IntCounter,
    program_misses: IntCounterVec,
    /// The kernel's totals already counted, by tracepoint.
    program_misses_seen: std::sync::Mutex<std::collections::HashMap<&'static str, u64>>,
    pub time_wait: TimeWaitMetrics,
    pub acks: AckMetrics,
    pub close_wait: CloseWaitMetrics,
    pub features: FeatureMetrics,
    pub listen: ListenMetrics,
    pub cost: CostMetrics,
    /// By workload, with `--metrics-by workload` only ([`Metrics::enable_workloads`]).
    pub workloads: OnceLock<WorkloadMetrics>,
}

/// TcpState discriminants run from 1 to 12.
fn state_index(state: TcpState) -> usize {
    (state as usize).saturating_sub(1).min(N_STATES - 1)
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A counter family with one label, registered, and its series for `values` (which therefore
/// exist at zero from the start), in that order.
pub(crate) fn labelled_counters<const N: usize>(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: [&str; N],
) -> Result<[IntCounter; N], prometheus::Error> {
    let family = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(family.clone()))?;
    let mut series = Vec::with_capacity(N);
    for value in values {
        series.push(family.get_metric_with_label_values(&[value])?);
    }
    series
        .try_into()
        .map_err(|_| prometheus::Error::Msg(format!("{name}: {N} series expected")))
}

/// Adds to `counter` what `total` (a cumulative count kept elsewhere) has grown by since the
/// last call; `seen` is that last total. The counter never goes down.
pub(crate) fn add_delta(counter: &IntCounter, seen: &AtomicU64, total: u64) {
    let previous = seen.fetch_max(total, Ordering::Relaxed);
    if total > previous {
        counter.inc_by(total - previous);
    }
}

/// [`add_delta`] for each series of a family whose counters, last totals and new totals are
/// kept in the same order.
pub(crate) fn add_deltas(counters: &[IntCounter], seen: &[AtomicU64], totals: &[u64]) {
    for ((counter, seen), &total) in counters.iter().zip(seen).zip(totals) {
        add_delta(counter, seen, total);
    }
}

/// How much a kernel counter's `total` for `key` grew since the last call for `key` (all of it
/// the first time); remembers `total`.
pub(crate) fn growth<K: Eq + std::hash::Hash>(
    seen: &mut std::collections::HashMap<K, u64>,
    key: K,
    total: u64,
) -> u64 {
    let before = seen.insert(key, total).unwrap_or(0);
    total.saturating_sub(before)
}

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        Self::build().map_err(MetricsError::Register)
    }

    fn build() -> prometheus::Result<Metrics> {
        let registry = Registry::new();

        let build_info = IntGaugeVec::new(
            Opts::new(
                "tracer_build_info",
                "Build information of the tracer agent; the value is always 1.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);

        let opened_vec = IntCounterVec::new(
            Opts::new(
                "tracer_connections_opened_total",
                "TCP connections opened while the agent watched, by who opened them \
                 (active: this host connected, passive: this host accepted).",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(opened_vec.clone()))?;
        let opened = [
            Some(opened_vec.get_metric_with_label_values(&[Direction::Active.as_str()])?),
            Some(opened_vec.get_metric_with_label_values(&[Direction::Passive.as_str()])?),
            None,
        ];

        let closed_vec = IntCounterVec::new(
            Opts::new(
                "tracer_connections_closed_total",
                "TCP connections closed, by who opened them (unknown: opened before the agent \
                 started) and by how they ended.",
            ),
            &["direction", "close"],
        )?;
        registry.register(Box::new(closed_vec.clone()))?;
        let closed_row = |direction: Direction| -> prometheus::Result<[IntCounter; 7]> {
            let mut row = Vec::with_capacity(CloseCause::ALL.len());
            for cause in CloseCause::ALL {
                row.push(
                    closed_vec
                        .get_metric_with_label_values(&[direction.as_str(), cause.as_str()])?,
                );
            }
            row.try_into()
                .map_err(|_| prometheus::Error::Msg("close cause count".to_owned()))
        };
        let closed = [
            closed_row(Direction::Active)?,
            closed_row(Direction::Passive)?,
            closed_row(Direction::Unknown)?,
        ];

        let active = IntGauge::with_opts(Opts::new(
            "tracer_connections_active",
            "TCP connections open right now, as tracked by the agent (including those open \
             before it started).",
        ))?;
        registry.register(Box::new(active.clone()))?;

        let duration_vec = HistogramVec::new(
            HistogramOpts::new(
                "tracer_connection_duration_seconds",
                "Lifetime of closed TCP connections from open (SYN_SENT or SYN_RECV) to CLOSE, \
                 for connections seen opening.",
            )
            .buckets(CONNECTION_DURATION_BUCKETS.to_vec()),
            &["direction"],
        )?;
        registry.register(Box::new(duration_vec.clone()))?;
        let duration = [
            Some(duration_vec.get_metric_with_label_values(&[Direction::Active.as_str()])?),
            Some(duration_vec.get_metric_with_label_values(&[Direction::Passive.as_str()])?),
            None,
        ];

        let handshake = Histogram::with_opts(
            HistogramOpts::new(
                "tracer_handshake_duration_seconds",
                "Time from connect() (SYN_SENT) to ESTABLISHED for actively opened TCP \
                 connections.",
            )
            .buckets(HANDSHAKE_DURATION_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(handshake.clone()))?;

        let transitions_vec = IntCounterVec::new(
            Opts::new(
                "tracer_tcp_state_transitions_total",
                "TCP socket state changes (listeners included), by old and new state.",
            ),
            &["from", "to"],
        )?;
        registry.register(Box::new(transitions_vec.clone()))?;

        let retransmits = labelled_counters(
            &registry,
            "tracer_retransmits_total",
            "TCP segments retransmitted, by kind (syn: connection attempt, fast: fast \
             recovery, timeout: retransmission timeout, other: tail loss probes and the \
             like).",
            "kind",
            [
                RetransmitKind::Syn,
                RetransmitKind::Fast,
                RetransmitKind::Timeout,
                RetransmitKind::Other,
                RetransmitKind::SynAck,
            ]
            .map(RetransmitKind::as_str),
        )?;

        let resets = labelled_counters(
            &registry,
            "tracer_resets_total",
            "TCP resets (RST) sent or received by this host.",
            "direction",
            [
                ResetDirection::Sent.as_str(),
                ResetDirection::Received.as_str(),
            ],
        )?;

        let events = labelled_counters(
            &registry,
            "tracer_events_total",
            "Kernel events received from the ring buffer, by kind.",
            "kind",
            [
                EventKind::State,
                EventKind::Retransmit,
                EventKind::Reset,
                EventKind::TimeWaitTimer,
                EventKind::DelayedAck,
                EventKind::NagleHeld,
            ]
            .map(EventKind::as_str),
        )?;

        let events_lost = IntCounter::with_opts(Opts::new(
            "tracer_events_lost_total",
            "Kernel events dropped because the ring buffer was full.",
        ))?;
        registry.register(Box::new(events_lost.clone()))?;

        let events_malformed = IntCounter::with_opts(Opts::new(
            "tracer_events_malformed_total",
            "Ring buffer records the agent could not decode (agent and kernel programs disagree).",
        ))?;
        registry.register(Box::new(events_malformed.clone()))?;

        let records = IntCounter::with_opts(Opts::new(
            "tracer_kernel_records_total",
            "Records read from the kernel's ring buffer (one can carry several events: a \
             socket's run of state changes).",
        ))?;
        registry.register(Box::new(records.clone()))?;
        let table_full = labelled_counters(
            &registry,
            "tracer_kernel_table_full_total",
            "Times a kernel-side table was full: `paths` (a state change was sent on its own \
             instead of in its socket's run), `cong` (a socket's congestion states were not \
             followed), `time_wait_exits` (a timewait socket's exit was sent as a record \
             instead of being read with the others once a second).",
            "table",
            ["paths", "cong", "time_wait_exits"],
        )?;
        let path_slot_collisions = IntCounter::with_opts(Opts::new(
            "tracer_kernel_path_slot_collisions_total",
            "Sockets whose run of state changes the kernel kept in its hash table because \
             another socket held their slot of the direct-mapped table (each costs a hash \
             insert and delete; a steady rise means many sockets open at once).",
        ))?;
        registry.register(Box::new(path_slot_collisions.clone()))?;

        let softirqs_unobserved = labelled_counters(
            &registry,
            "tracer_softirqs_unobserved_total",
            "Softirq runs the kernel made without running the agent's programs (its count in \
             /proc/softirqs against theirs), by vector: the TCP events of those runs are lost \
             like those of a full ring buffer, and a resync follows. Seen on kernels that run \
             no BPF program at all in softirqs on top of certain tasks.",
            "vector",
            WATCHED.map(|(_, _, label)| label),
        )?;

        let evicted = IntCounter::with_opts(Opts::new(
            "tracer_connections_evicted_total",
            "Connections dropped from the agent's table because it was full.",
        ))?;
        registry.register(Box::new(evicted.clone()))?;
        let reconciled = IntCounter::with_opts(Opts::new(
            "tracer_connections_reconciled_total",
            "Connections closed out because a sock_diag dump (a resync) no longer listed them \
             (their CLOSE was lost).",
        ))?;
        registry.register(Box::new(reconciled.clone()))?;
        let resyncs = IntCounter::with_opts(Opts::new(
            "tracer_resyncs_total",
            "Sock_diag dumps of every namespace applied to the agent's tables: after lost \
             kernel events, and every --resync-every (the audit).",
        ))?;
        registry.register(Box::new(resyncs.clone()))?;
        let program_misses = IntCounterVec::new(
            Opts::new(
                "tracer_kernel_program_misses_total",
                "Runs of the agent's kernel program on this tracepoint that the kernel skipped \
                 because the program was already running on that CPU (an interrupt came while it \
                 ran): what they would have seen is lost, like the events of a full ring buffer.",
            ),
            &["tracepoint"],
        )?;
        registry.register(Box::new(program_misses.clone()))?;

        // The agent's own CPU, memory and descriptors (process_*), the standard way.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let time_wait = TimeWaitMetrics::register(&registry)?;
        let acks = AckMetrics::register(&registry)?;
        let close_wait = CloseWaitMetrics::register(&registry)?;
        let features = FeatureMetrics::register(&registry)?;
        let listen = ListenMetrics::register(&registry)?;
        let cost = CostMetrics::register(&registry)?;

        Ok(Metrics {
            registry,
            transitions_vec,
            transitions: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            opened,
            closed,
            active,
            duration,
            handshake,
            retransmits,
            resets,
            events,
            events_lost,
            events_lost_seen: AtomicU64::new(0),
            events_malformed,
            records,
            table_full,
            table_full_seen: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            path_slot_collisions,
            path_slot_collisions_seen: AtomicU64::new(0),
            softirqs_unobserved,
            softirqs_unobserved_seen: Default::default(),
            evicted,
            evicted_seen: AtomicU64::new(0),
            reconciled,
            resyncs,
            program_misses,
            program_misses_seen: std::sync::Mutex::default(),
            time_wait,
            acks,
            close_wait,
            features,
            listen,
            cost,
            workloads: OnceLock::new(),
        })
    }

    /// Adds the metrics by workload, `top_n` workloads with their own series.
    pub fn enable_workloads(&self, top_n: usize) -> Result<(), MetricsError> {
        if self.workloads.get().is_none() {
            let metrics =
                WorkloadMetrics::register(&self.registry, top_n).map_err(MetricsError::Register)?;
            let _ = self.workloads.set(metrics);
        }
        Ok(())
    }

    fn by_workload(&self, cgroup: u64, what: WorkloadCount) {
        if let Some(workloads) = self.workloads.get() {
            workloads.count(cgroup, what);
        }
    }

    /// The registry holding these metrics, for callers that add their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one kernel event received.
    pub fn event_received(&self, kind: EventKind) {
        self.events[kind as usize].inc();
    }

    /// Counts one kernel event received; same as `event_received(EventKind::from(event))`.
    pub fn event(&self, event: &Event) {
        if let Event::SocketInfo { .. } = event {
            // Not a kernel event of its own: it rides in a path record.
            return;
        }
        self.event_received(EventKind::from(event));
    }

    /// Sets the number of connections open right now.
    pub fn set_active(&self, active: usize) {
        self.active.set(i64::try_from(active).unwrap_or(i64::MAX));
    }

    /// Takes the kernel's cumulative count of lost events; adds what it grew by since the last
    /// call. A smaller total than before is ignored: the counter never goes down.
    /// A ring buffer record that did not decode.
    pub fn event_malformed(&self) {
        self.events_malformed.inc();
    }

    /// One record read from the ring buffer.
    pub fn record_read(&self) {
        self.records.inc();
    }

    /// Takes the programs' cumulative `COUNT_*` counts: the table-full ones (`paths`, `cong`,
    /// `time_wait_exits`) and the slot collisions.
    pub fn set_kernel_counts(&self, totals: [u64; tracer_common::COUNT_SLOTS as usize]) {
        let [paths, cong, exits, collisions] = totals;
        add_deltas(
            &self.table_full,
            &self.table_full_seen,
            &[paths, cong, exits],
        );
        add_delta(
            &self.path_slot_collisions,
            &self.path_slot_collisions_seen,
            collisions,
        );
    }

    /// Takes the softirq runs made without the programs so far, by watched vector
    /// (`kernel::softirqs::WATCHED`).
    pub fn set_softirqs_unobserved(&self, totals: [u64; WATCHED.len()]) {
        add_deltas(
            &self.softirqs_unobserved,
            &self.softirqs_unobserved_seen,
            &totals,
        );
    }

    /// Takes the kernel's skipped-run totals by tracepoint (`Probes::misses`).
    pub fn set_program_misses(&self, totals: &[(&'static str, u64)]) {
        let Ok(mut seen) = self.program_misses_seen.lock() else {
            return;
        };
        for &(tracepoint, total) in totals {
            let grown = growth(&mut seen, tracepoint, total);
            // Asked for even at zero: every attached tracepoint's series exists from the
            // first refresh on.
            if let Ok(counter) = self
                .program_misses
                .get_metric_with_label_values(&[tracepoint])
            {
                counter.inc_by(grown);
            }
        }
    }

    pub fn set_events_lost(&self, total: u64) {
        add_delta(&self.events_lost, &self.events_lost_seen, total);
    }

    /// Takes the tracker's cumulative eviction count (`Tracker::evictions`). Evictions already
    /// reported through `Observer::evicted` are part of that total and are not counted twice,
    /// so both may be used together.
    pub fn set_evictions(&self, total: u64) {
        add_delta(&self.evicted, &self.evicted_seen, total);
    }

    /// A resync was applied; it closed out `count` connections (`ResyncOutcome::reconciled`).
    pub fn resynced(&self, count: usize) {
        self.resyncs.inc();
        self.reconciled
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(MetricsError::Encode)
    }

    fn transition_counter(&self, from: TcpState, to: TcpState) -> Option<&IntCounter> {
        let cell = &self.transitions[state_index(from)][state_index(to)];
        if let Some(counter) = cell.get() {
            return Some(counter);
        }
        match self
            .transitions_vec
            .get_metric_with_label_values(&[from.as_str(), to.as_str()])
        {
            Ok(counter) => Some(cell.get_or_init(|| counter)),
            Err(err) => {
                log::warn!("tracer_tcp_state_transitions_total{{from={from},to={to}}}: {err}");
                None
            }
        }
    }
}

impl Observer for &Metrics {
    fn transition(&mut self, from: TcpState, to: TcpState) {
        if let Some(counter) = self.transition_counter(from, to) {
            counter.inc();
        }
    }

    fn opened(&mut self, direction: Direction) {
        if let Some(counter) = &self.opened[direction as usize] {
            counter.inc();
        }
    }

    fn established(&mut self, conn: &Connection) {
        if let Some(ns) = conn.handshake_ns() {
            self.handshake.observe(seconds(ns));
        }
    }

    fn closed(&mut self, conn: &Connection) {
        let direction = conn.direction as usize;
        let cause = conn.close.unwrap_or(CloseCause::Unknown) as usize;
        self.closed[direction][cause].inc();
        self.by_workload(conn.cgroup, WorkloadCount::Closed);
        if let (Some(ns), Some(histogram)) = (conn.duration_ns(), &self.duration[direction]) {
            histogram.observe(seconds(ns));
        }
        self.cost.closed(conn);
    }

    fn retransmit(&mut self, _tuple: &Tuple, kind: RetransmitKind, segs: u32) {
        self.retransmits[kind as usize].inc_by(u64::from(segs));
    }

    fn reset(&mut self, _tuple: &Tuple, direction: ResetDirection, reason: Option<u16>) {
        self.resets[direction as usize].inc();
        if direction == ResetDirection::Sent {
            self.cost.reset_sent(reason);
        }
    }

    fn evicted(&mut self, _conn: &Connection) {
        self.evicted_seen.fetch_add(1, Ordering::Relaxed);
        self.evicted.inc();
    }

    fn time_wait_entered(&mut self, _netns: u32, _tuple: &Tuple) {
        self.time_wait.entered();
    }

    fn time_wait_exited(&mut self, record: &TimeWaitRecord) {
        self.time_wait.exited(record.exit, record.substate);
    }

    fn delayed_ack(&mut self, _conn: &Connection, held_ns: Option<u64>, pingpong: bool) {
        self.acks.delayed_ack(held_ns, pingpong);
    }

    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        self.acks.nagle_stall(lost_ns);
        self.by_workload(conn.cgroup, WorkloadCount::NagleStall);
    }

    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        self.close_wait.close_wait_leak();
        self.by_workload(leak.cgroup, WorkloadCount::CloseWaitLeak);
    }

    fn cgroup_known(&mut self, conn: &Connection) {
        if conn.opened_ns.is_some() {
            self.by_workload(conn.cgroup, WorkloadCount::Opened);
        }
    }

    fn retransmit_on(&mut self, conn: &Connection, _kind: RetransmitKind, segs: u32) {
        self.by_workload(conn.cgroup, WorkloadCount::Retransmits(segs));
    }

    fn reset_on(&mut self, conn: &Connection, _direction: ResetDirection, _reason: Option<u16>) {
        self.by_workload(conn.cgroup, WorkloadCount::Reset);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use tracer_core::model::{Comm, Task, Tuple};
    use tracer_core::tracker::{Tracker, TrackerConfig};

    const SOCK: u64 = 0xffff_0000_1234;

    fn tuple(sport: u16) -> Tuple {
        Tuple {
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            sport,
            dst: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dport: 8080,
        }
    }

    fn task() -> Task {
        Task {
            pid: 42,
            tid: 42,
            comm: Comm::from("curl"),
        }
    }

    fn state(ts_ns: u64, sock: u64, sport: u16, old: TcpState, new: TcpState) -> Event {
        Event::StateChange {
            ts_ns,
            sock,
            netns: 4026531840,
            tuple: tuple(sport),
            old,
            new,
            task: task(),
        }
    }

    /// An active open with a 50 µs handshake, a fast retransmit, and a local close after 2 s.
    fn active_lifecycle() -> Vec<Event> {
        use TcpState::*;
        let t0 = 1_000_000_000;
        vec![
            state(t0, SOCK, 0, Close, SynSent),
            state(t0 + 50_000, SOCK, 40000, SynSent, Established),
            Event::Retransmit {
                ts_ns: t0 + 1_000_000,
                sock: SOCK,
                netns: 4026531840,
                tuple: tuple(40000),
                state: Established,
                kind: RetransmitKind::Fast,
                segs: 3,
            },
            state(t0 + 2_000_000_000, SOCK, 40000, Established, FinWait1),
            state(t0 + 2_000_100_000, SOCK, 40000, FinWait1, FinWait2),
            state(t0 + 2_000_200_000, SOCK, 40000, FinWait2, Close),
        ]
    }

    /// The value of the series `series` (name and labels exactly as rendered).
    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    fn feed(metrics: &Metrics, events: &[Event]) {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut observer = metrics;
        for event in events {
            metrics.event(event);
            tracker.on_event(event, &mut observer);
        }
        metrics.set_active(tracker.active());
    }

    #[test]
    fn series_exist_at_zero_from_the_start() {
        let metrics = Metrics::new().unwrap();
        let out = metrics.render().unwrap();
        for series in [
            r#"tracer_connections_opened_total{direction="active"}"#,
            r#"tracer_connections_opened_total{direction="passive"}"#,
            r#"tracer_connections_closed_total{close="unknown",direction="unknown"}"#,
            r#"tracer_connections_closed_total{close="reset_received",direction="passive"}"#,
            "tracer_connections_active",
            r#"tracer_connection_duration_seconds_count{direction="active"}"#,
            r#"tracer_connection_duration_seconds_bucket{direction="passive",le="3600"}"#,
            "tracer_handshake_duration_seconds_count",
            r#"tracer_handshake_duration_seconds_bucket{le="0.00001"}"#,
            r#"tracer_retransmits_total{kind="syn"}"#,
            r#"tracer_retransmits_total{kind="other"}"#,
            r#"tracer_resets_total{direction="sent"}"#,
            r#"tracer_resets_total{direction="received"}"#,
            r#"tracer_events_total{kind="state"}"#,
            r#"tracer_events_total{kind="retransmit"}"#,
            r#"tracer_events_total{kind="reset"}"#,
            "tracer_events_lost_total",
            "tracer_connections_evicted_total",
        ] {
            assert_eq!(value(&out, series), Some(0.0), "{series} in\n{out}");
        }
        let build_info = format!(
            r#"tracer_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&out, &build_info), Some(1.0), "{out}");
        for name in [
            "tracer_connections_opened_total",
            "tracer_connections_closed_total",
            "tracer_connections_active",
            "tracer_connection_duration_seconds",
            "tracer_handshake_duration_seconds",
            "tracer_tcp_state_transitions_total",
            "tracer_retransmits_total",
            "tracer_resets_total",
            "tracer_events_total",
            "tracer_events_lost_total",
            "tracer_connections_evicted_total",
            "tracer_build_info",
        ] {
            assert!(
                out.contains(&format!("# HELP {name} ")) || name.ends_with("transitions_total"),
                "no HELP for {name}"
            );
        }
        // No transition seen yet, so no transition series.
        assert!(
            !out.contains("tracer_tcp_state_transitions_total{"),
            "{out}"
        );
        // Per-connection identities never become labels (local listening ports are bounded
        // top-N labels of the listen-overflow series, issue 12).
        for label in ["pid=", "port=", "addr=", "comm="] {
            let found = out
                .lines()
                .filter(|l| !l.contains("tracer_listen_"))
                .any(|l| l.contains(label));
            assert!(!found, "{label} in\n{out}");
        }
    }

    #[test]
    fn observer_calls_show_in_the_rendered_series() {
        let metrics = Metrics::new().unwrap();
        feed(&metrics, &active_lifecycle());
        let out = metrics.render().unwrap();
        let expect = |series: &str, expected: f64| {
            assert_eq!(value(&out, series), Some(expected), "{series} in\n{out}");
        };
        expect(
            r#"tracer_connections_opened_total{direction="active"}"#,
            1.0,
        );
        expect(
            r#"tracer_connections_opened_total{direction="passive"}"#,
            0.0,
        );
        expect(
            r#"tracer_connections_closed_total{close="local",direction="active"}"#,
            1.0,
        );
        expect(
            r#"tracer_connections_closed_total{close="remote",direction="active"}"#,
            0.0,
        );
        expect("tracer_connections_active", 0.0);
        expect(
            r#"tracer_connection_duration_seconds_count{direction="active"}"#,
            1.0,
        );
        expect(
            r#"tracer_connection_duration_seconds_sum{direction="active"}"#,
            2.0002,
        );
        // 2.0002 s falls in the 5 s bucket, not the 1 s one.
        expect(
            r#"tracer_connection_duration_seconds_bucket{direction="active",le="1"}"#,
            0.0,
        );
        expect(
            r#"tracer_connection_duration_seconds_bucket{direction="active",le="5"}"#,
            1.0,
        );
        expect("tracer_handshake_duration_seconds_count", 1.0);
        expect("tracer_handshake_duration_seconds_sum", 0.00005);
        expect(
            r#"tracer_handshake_duration_seconds_bucket{le="0.00001"}"#,
            0.0,
        );
        expect(
            r#"tracer_handshake_duration_seconds_bucket{le="0.00005"}"#,
            1.0,
        );
        expect(
            r#"tracer_tcp_state_transitions_total{from="CLOSE",to="SYN_SENT"}"#,
            1.0,
        );
        expect(
            r#"tracer_tcp_state_transitions_total{from="FIN_WAIT2",to="CLOSE"}"#,
            1.0,
        );
        expect(r#"tracer_retransmits_total{kind="fast"}"#, 3.0);
        expect(r#"tracer_retransmits_total{kind="syn"}"#, 0.0);
        expect(r#"tracer_events_total{kind="state"}"#, 5.0);
        expect(r#"tracer_events_total{kind="retransmit"}"#, 1.0);
        expect(r#"tracer_events_total{kind="reset"}"#, 0.0);
    }

    #[test]
    fn passive_refused_reset_and_unknown_direction() {
        use TcpState::*;
        let metrics = Metrics::new().unwrap();
        let peer = 0xffff_0000_5678;
        let events = [
            // An accepted connection, closed by the peer.
            state(10, peer, 8080, Listen, SynRecv),
            state(20, peer, 8080, SynRecv, Established),
            state(30, peer, 8080, Established, CloseWait),
            state(40, peer, 8080, CloseWait, LastAck),
            state(50, peer, 8080, LastAck, Close),
            // A refused connect().
            state(100, SOCK, 0, Close, SynSent),
            Event::Reset {
                ts_ns: 110,
                sock: SOCK,
                netns: 4026531840,
                tuple: tuple(40001),
                state: SynSent,
                direction: ResetDirection::Received,
                reason: None,
                task: task(),
            },
            state(110, SOCK, 40001, SynSent, Close),
            // A connection open before the agent, aborted.
            state(200, 0xbeef, 40002, Established, Close),
        ];
        let mut observer = &metrics;
        let mut tracker = Tracker::new(TrackerConfig::default());
        // Something already open.
        observer.opened(Direction::Active);
        for event in &events {
            tracker.on_event(event, &mut observer);
        }
        tracker.flush_closed(&mut observer);
        metrics.set_active(7);
        let out = metrics.render().unwrap();
        let expect = |series: &str, expected: f64| {
            assert_eq!(value(&out, series), Some(expected), "{series} in\n{out}");
        };
        expect(
            r#"tracer_connections_opened_total{direction="active"}"#,
            2.0,
        );
        expect(
            r#"tracer_connections_opened_total{direction="passive"}"#,
            1.0,
        );
        expect(
            r#"tracer_connections_closed_total{close="remote",direction="passive"}"#,
            1.0,
        );
        expect(
            r#"tracer_connections_closed_total{close="refused",direction="active"}"#,
            1.0,
        );
        expect(
            r#"tracer_connections_closed_total{close="aborted",direction="unknown"}"#,
            1.0,
        );
        expect(
            r#"tracer_connection_duration_seconds_count{direction="passive"}"#,
            1.0,
        );
        // A refused connect() never completed its handshake; a passive one has none.
        expect("tracer_handshake_duration_seconds_count", 0.0);
        expect(r#"tracer_resets_total{direction="received"}"#, 1.0);
        expect(r#"tracer_resets_total{direction="sent"}"#, 0.0);
        expect("tracer_connections_active", 7.0);
    }

    #[test]
    fn cumulative_totals_add_only_their_growth() {
        let metrics = Metrics::new().unwrap();
        metrics.set_events_lost(5);
        metrics.set_events_lost(5);
        metrics.set_events_lost(12);
        metrics.set_events_lost(3); // never goes down
        let out = metrics.render().unwrap();
        assert_eq!(value(&out, "tracer_events_lost_total"), Some(12.0), "{out}");

        // Two evictions seen by the observer, then the tracker's total of 3 (one seed overflow).
        let conn = {
            struct Grab(Option<Connection>);
            impl Observer for Grab {
                fn closed(&mut self, conn: &Connection) {
                    self.0 = Some(conn.clone());
                }
            }
            let mut grab = Grab(None);
            let mut tracker = Tracker::new(TrackerConfig::default());
            for event in active_lifecycle() {
                tracker.on_event(&event, &mut grab);
            }
            grab.0.unwrap()
        };
        let mut observer = &metrics;
        observer.evicted(&conn);
        observer.evicted(&conn);
        metrics.set_evictions(2);
        let out = metrics.render().unwrap();
        assert_eq!(value(&out, "tracer_connections_evicted_total"), Some(2.0));
        metrics.set_evictions(3);
        let out = metrics.render().unwrap();
        assert_eq!(value(&out, "tracer_connections_evicted_total"), Some(3.0));
    }

    #[test]
    fn every_transition_pair_gets_one_series() {
        let metrics = Metrics::new().unwrap();
        let mut observer = &metrics;
        for from in TcpState::ALL {
            for to in TcpState::ALL {
                observer.transition(from, to);
                observer.transition(from, to);
            }
        }
        let out = metrics.render().unwrap();
        let lines: Vec<_> = out
            .lines()
            .filter(|l| l.starts_with("tracer_tcp_state_transitions_total{"))
            .collect();
        assert_eq!(lines.len(), TcpState::ALL.len() * TcpState::ALL.len());
        assert!(lines.iter().all(|l| l.ends_with(" 2")), "{lines:?}");
        assert_eq!(
            value(
                &out,
                r#"tracer_tcp_state_transitions_total{from="NEW_SYN_RECV",to="ESTABLISHED"}"#
            ),
            Some(2.0)
        );
    }

    #[test]
    fn event_kinds() {
        let metrics = Metrics::new().unwrap();
        metrics.event_received(EventKind::Reset);
        metrics.event_received(EventKind::Reset);
        metrics.event_received(EventKind::Retransmit);
        let out = metrics.render().unwrap();
        assert_eq!(
            value(&out, r#"tracer_events_total{kind="reset"}"#),
            Some(2.0)
        );
        assert_eq!(
            value(&out, r#"tracer_events_total{kind="retransmit"}"#),
            Some(1.0)
        );
    }
}
