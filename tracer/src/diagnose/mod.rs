//! The report of `tracer diagnose`: what a run saw, as a few findings a person can act on.
//!
//! A `Diagnosis` watches a run as one more observer of the tracker and tallies what it reports
//! (`tally`). At the end each topic (`findings`, one file per topic) turns the tallies into a
//! `Finding` saying what was measured, why it matters and what to do, in the words of `advice`;
//! `render` lays the `Report` out as text, serde gives its JSON. Pure, apart from the owner
//! lookup of leaked CLOSE_WAIT sockets at report time (`report`), which tests replace
//! (`report_with_owners`).
//!
//! Memory is bounded: every per-peer, per-process, per-reason and per-connection breakdown keeps
//! at most `DiagnoseConfig::max_keys` keys; what arrives for further keys is summed under
//! "other", and the events folded that way are counted.
mod advice;
mod findings;
mod render;
mod tally;
#[cfg(test)]
mod test_support;
mod workloads;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracer_core::model::{Owner, Tuple};
use tracer_core::record::{CloseWaitLeak, TimeWaitExit};
use tracer_core::tracker::Tracker;

use crate::kernel::system::TcpSysctls;
use findings::{PeerCost, WindowStall};
use tally::{Capped, DelayedAcks, KINDS, Stalls};

pub use findings::{
    DELAYED_ACK_NOTICE, ListenOverflows, MAX_OWNER_LOOKUPS, OverflowingListener, RESETS_PROBLEM,
    TIME_WAIT_BUCKETS_WARNING, TIME_WAIT_NOTICE,
};

/// Topics of the findings, as they appear in `Finding::topic`.
pub const TOPIC_TIME_WAIT: &str = "time_wait";
pub const TOPIC_NAGLE: &str = "nagle_delayed_ack";
pub const TOPIC_DELAYED_ACK: &str = "delayed_ack";
pub const TOPIC_RETRANSMISSIONS: &str = "retransmissions";
pub const TOPIC_CLOSE_WAIT: &str = "close_wait";
pub const TOPIC_RESETS: &str = "resets";
pub const TOPIC_LISTEN_OVERFLOWS: &str = "listen_overflows";
pub const TOPIC_SLOW_PEERS: &str = "slow_peers";
pub const TOPIC_ZERO_WINDOW: &str = "zero_window";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiagnoseConfig {
    /// Rows shown per breakdown (peers, processes, connections, reasons).
    pub top: usize,
    /// A peer this host connects to whose TIME_WAIT sockets hold at least this share of
    /// `ip_local_port_range` makes TIME_WAIT a problem.
    pub port_exhaustion_warning: f64,
    /// Retransmissions are a problem, not a notice, when timeouts and SYN / SYN-ACK
    /// retransmits make up at least this share of the retransmitted segments. (The tracer sees
    /// retransmissions only, not every segment sent, so the share is within retransmissions.)
    pub retransmit_warning_ratio: f64,
    /// Keys kept per breakdown; past it, further keys are folded into "other".
    pub max_keys: usize,
}

impl Default for DiagnoseConfig {
    fn default() -> Self {
        DiagnoseConfig {
            top: 5,
            port_exhaustion_warning: 0.5,
            retransmit_warning_ratio: 0.5,
            max_keys: 1024,
        }
    }
}

/// What the report needs besides what the `Diagnosis` observed.
#[derive(Clone, Copy, Debug)]
pub struct ReportContext {
    /// How long the run watched.
    pub duration: Duration,
    pub sysctls: TcpSysctls,
    /// Events the kernel dropped (ring buffer full): every count is then a lower bound.
    pub events_lost: u64,
    /// Softirq runs the kernel made without the programs: their events are missing too.
    pub softirqs_unobserved: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something to fix.
    Problem,
    /// Worth knowing; nothing is broken.
    Notice,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Problem => "problem",
            Severity::Notice => "notice",
        }
    }
}

/// One thing the run showed.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// One of the `TOPIC_*` constants.
    pub topic: &'static str,
    pub severity: Severity,
    pub title: String,
    /// What was measured, in numbers.
    pub measured: String,
    /// Why it matters.
    pub why: String,
    /// What to do about it.
    pub action: String,
    /// The figures behind it (top peers, processes, connections, settings), per topic.
    pub details: Value,
    /// `details` as short lines for the text report.
    #[serde(skip)]
    pub lines: Vec<String>,
}

/// The result of a run. `Display` gives the human report (no trailing newline), serde the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub duration_seconds: f64,
    /// Connections opened while the run watched.
    pub connections_opened: u64,
    /// Connections that closed while the run watched (opened before it or during it).
    pub connections_closed: u64,
    pub events_lost: u64,
    /// Softirq runs the kernel made without the tracer's programs while the run watched.
    pub softirqs_unobserved: u64,
    /// Sockets in TIME_WAIT at the end of the run.
    pub time_wait_sockets: usize,
    /// Connections in CLOSE_WAIT at the end of the run.
    pub close_wait_sockets: usize,
    /// Problems first, then notices.
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .count()
    }

    pub fn finding(&self, topic: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.topic == topic)
    }
}

/// A process as a map key: pid and `comm`, or unknown. (The breakdown keys live here, with the
/// `Diagnosis` that holds them, for the tallies, the findings and the text helpers alike.)
type ProcKey = Option<(u32, [u8; 16])>;

/// A connection as a map key.
type ConnKey = (u32, Tuple);

/// Collects what a `tracer diagnose` run sees, as an observer of the tracker.
pub struct Diagnosis {
    config: DiagnoseConfig,
    rst_reasons: HashMap<u16, String>,
    opened: u64,
    closed: u64,
    tw_entered: u64,
    tw_exited: [u64; TimeWaitExit::ALL.len()],
    /// Of those exits, the ones still in FIN_WAIT2: the peer never sent its FIN.
    tw_fin_wait2_exits: u64,
    /// Processes whose connections closed first and went into TIME_WAIT.
    tw_closers: Capped<ProcKey, u64>,
    stalls: Stalls,
    stall_writers: Capped<ProcKey, Stalls>,
    stall_conns: Capped<ConnKey, Stalls>,
    delayed: DelayedAcks,
    delayed_procs: Capped<ProcKey, DelayedAcks>,
    delayed_conns: Capped<ConnKey, DelayedAcks>,
    retransmits: [u64; KINDS],
    retransmit_peers: Capped<IpAddr, [u64; KINDS]>,
    resets_sent: u64,
    resets_received: u64,
    reset_reasons: Capped<Option<u16>, u64>,
    reset_peers: Capped<IpAddr, u64>,
    /// The first `max_keys` leaks, in the order reported.
    leaks: Vec<CloseWaitLeak>,
    leaks_total: u64,
    /// Listeners that dropped connection attempts, read from the host by the caller.
    listen: ListenOverflows,
    /// What connections cost (read at close): per peer, and the window-limited ones.
    costed_conns: u64,
    peer_costs: Capped<IpAddr, PeerCost>,
    window_total: WindowStall,
    window_conns: Capped<ConnKey, WindowStall>,
    /// Length of the kernel's jiffy, when its HZ is known.
    jiffy_ns: Option<u64>,
    /// The topics' tallies by workload.
    workloads: workloads::ByWorkload,
}

impl Diagnosis {
    /// `rst_reasons` names the kernel's `enum sk_rst_reason` values (`KernelBtf::rst_reasons`).
    pub fn new(config: DiagnoseConfig, rst_reasons: HashMap<u16, String>) -> Diagnosis {
        let cap = config.max_keys;
        Diagnosis {
            config,
            rst_reasons,
            opened: 0,
            closed: 0,
            tw_entered: 0,
            tw_exited: [0; TimeWaitExit::ALL.len()],
            tw_fin_wait2_exits: 0,
            tw_closers: Capped::new(cap),
            stalls: Stalls::default(),
            stall_writers: Capped::new(cap),
            stall_conns: Capped::new(cap),
            delayed: DelayedAcks::default(),
            delayed_procs: Capped::new(cap),
            delayed_conns: Capped::new(cap),
            retransmits: [0; KINDS],
            retransmit_peers: Capped::new(cap),
            resets_sent: 0,
            resets_received: 0,
            reset_reasons: Capped::new(cap),
            reset_peers: Capped::new(cap),
            leaks: Vec::new(),
            leaks_total: 0,
            listen: ListenOverflows::default(),
            costed_conns: 0,
            peer_costs: Capped::new(cap),
            window_total: WindowStall::default(),
            window_conns: Capped::new(cap),
            jiffy_ns: None,
            workloads: workloads::ByWorkload::new(cap),
        }
    }

    /// The length of the kernel's jiffy (`host::hz`), for the window-limited times.
    pub fn set_jiffy_ns(&mut self, jiffy_ns: Option<u64>) {
        self.jiffy_ns = jiffy_ns;
    }

    /// Names the workloads the run saw (`name_of`: a cgroup id's workload name, if known), for
    /// the findings to show. Call it before [`Diagnosis::report`].
    pub fn name_workloads(&mut self, name_of: impl Fn(u64) -> Option<String>) {
        self.workloads.name(name_of);
    }

    /// The cgroup ids the run saw, to be named.
    pub fn workload_ids(&self) -> Vec<u64> {
        self.workloads.ids()
    }

    /// What the host's listeners dropped during the run (`ListenOverflows::between`, owners
    /// filled in by the caller).
    pub fn set_listen_overflows(&mut self, seen: ListenOverflows) {
        self.listen = seen;
    }

    /// The report as of now. Owners of leaked CLOSE_WAIT sockets that the events could not
    /// name are looked up in /proc (at most `MAX_OWNER_LOOKUPS`).
    pub fn report(&self, tracker: &Tracker, context: &ReportContext) -> Report {
        self.report_with_owners(tracker, context, crate::host::proc_owners::socket_owner)
    }

    /// `report` with the owner lookup of leaked CLOSE_WAIT sockets given by the caller.
    pub fn report_with_owners(
        &self,
        tracker: &Tracker,
        context: &ReportContext,
        owner_of: impl FnMut(u32, &Tuple) -> Option<Owner>,
    ) -> Report {
        // One builder per topic (`findings/`). The sort is stable: within a severity, findings
        // keep this order.
        let mut findings: Vec<Finding> = [
            self.time_wait_finding(tracker, &context.sysctls),
            self.nagle_finding(),
            self.delayed_ack_finding(),
            self.retransmit_finding(),
            self.close_wait_finding(tracker, owner_of),
            self.reset_finding(),
            self.listen_overflow_finding(),
            self.slow_peer_finding(),
            self.zero_window_finding(),
        ]
        .into_iter()
        .flatten()
        .collect();
        findings.sort_by_key(|f| f.severity);
        for finding in &mut findings {
            self.workloads.annotate(finding, self.config.top);
        }
        Report {
            duration_seconds: context.duration.as_secs_f64(),
            connections_opened: self.opened,
            connections_closed: self.closed,
            events_lost: context.events_lost,
            softirqs_unobserved: context.softirqs_unobserved,
            time_wait_sockets: tracker.time_wait().count(),
            close_wait_sockets: tracker.close_wait().0,
            findings,
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_core::model::ResetDirection;
    use tracer_core::testkit::{task, tuple};

    use super::*;
    use crate::diagnose::test_support::{
        CLIENT, Run, ip, reset, short_connection, stalls, sysctls,
    };

    #[test]
    fn quiet_run_has_no_findings() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&short_connection(0, CLIENT, 40000, task(5, "curl"), None));
        let report = run.report(sysctls());
        assert!(report.findings.is_empty());
        assert_eq!(
            (report.connections_opened, report.connections_closed),
            (1, 1)
        );
        assert_eq!(
            report.to_string(),
            "No TCP problems seen in 30 s (1 connection opened, 1 closed)."
        );
    }

    #[test]
    fn json_has_the_findings() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&stalls(3));
        run.feed(&[reset(
            tuple(ip(1), 1, ip(2), 2),
            ResetDirection::Received,
            None,
        )]);
        let report = run.report(sysctls());
        let text = serde_json::to_string_pretty(&report).expect("serializes");
        let parsed: Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(parsed["duration_seconds"], 30.0);
        assert_eq!(parsed["connections_opened"], 2);
        let topics: Vec<&str> = parsed["findings"]
            .as_array()
            .expect("findings")
            .iter()
            .filter_map(|f| f["topic"].as_str())
            .collect();
        assert_eq!(topics, vec![TOPIC_NAGLE, TOPIC_RESETS], "problems first");
        let nagle = &parsed["findings"][0];
        assert_eq!(nagle["severity"], "problem");
        for field in ["title", "measured", "why", "action"] {
            assert!(
                nagle[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field}"
            );
        }
        assert_eq!(nagle["details"]["stalls"], 3);
        assert!(
            nagle.get("lines").is_none(),
            "the text rendering stays out of the JSON"
        );
    }
}
