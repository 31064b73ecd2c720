//! The report of `tracer diagnose`: a `Diagnosis` watches a run as one more observer of the
//! tracker, then turns what it saw into a few findings a person can act on, each saying what was
//! measured, why it matters and what to do. Pure, apart from the owner lookup of leaked
//! CLOSE_WAIT sockets at report time (`report`), which tests replace (`report_with_owners`).
//!
//! Memory is bounded: every per-peer, per-process, per-reason and per-connection breakdown keeps
//! at most `DiagnoseConfig::max_keys` keys; what arrives for further keys is summed under
//! "other", and the events folded that way are counted.
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use tracer_core::model::Owner;

use tracer_core::observer::Observer;

use tracer_core::record::{CloseWaitLeak, Connection};

use crate::export::events::{CLOSE_WAIT_FIX, NAGLE_FIX};
use crate::kernel::system::TcpSysctls;
use tracer_core::model::{Comm, Direction, ResetDirection, RetransmitKind, TcpState, Tuple};
use tracer_core::record::{TimeWaitExit, TimeWaitRecord};
use tracer_core::tracker::Tracker;

/// Topics of the findings, as they appear in `Finding::topic`.
pub const TOPIC_TIME_WAIT: &str = "time_wait";
pub const TOPIC_NAGLE: &str = "nagle_delayed_ack";
pub const TOPIC_DELAYED_ACK: &str = "delayed_ack";
pub const TOPIC_RETRANSMISSIONS: &str = "retransmissions";
pub const TOPIC_CLOSE_WAIT: &str = "close_wait";
pub const TOPIC_RESETS: &str = "resets";

/// TIME_WAIT sockets from which a notice is given even when no limit is near.
pub const TIME_WAIT_NOTICE: usize = 1_000;
/// Share of `net.ipv4.tcp_max_tw_buckets` in use from which TIME_WAIT is a problem.
pub const TIME_WAIT_BUCKETS_WARNING: f64 = 0.8;
/// Delayed ACKs from which they are worth a notice (when no stall explains them already).
pub const DELAYED_ACK_NOTICE: u64 = 10;
/// RSTs (sent and received) from which resets are a problem rather than a notice.
pub const RESETS_PROBLEM: u64 = 100;
/// Leaked CLOSE_WAIT sockets whose unknown owner is looked up in /proc at report time, at most
/// (each lookup walks every process).
pub const MAX_OWNER_LOOKUPS: usize = 16;

/// Text width of the human report.
const WIDTH: usize = 96;

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

/// A process as a map key: pid and `comm`, or unknown.
type ProcKey = Option<(u32, [u8; 16])>;

/// A connection as a map key.
type ConnKey = (u32, Tuple);

const KINDS: usize = RetransmitKind::ALL.len();

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
        }
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
        let mut findings: Vec<Finding> = [
            self.time_wait_finding(tracker, &context.sysctls),
            self.nagle_finding(),
            self.delayed_ack_finding(),
            self.retransmit_finding(),
            self.close_wait_finding(tracker, owner_of),
            self.reset_finding(),
        ]
        .into_iter()
        .flatten()
        .collect();
        findings.sort_by_key(|f| f.severity);
        Report {
            duration_seconds: context.duration.as_secs_f64(),
            connections_opened: self.opened,
            connections_closed: self.closed,
            events_lost: context.events_lost,
            time_wait_sockets: tracker.time_wait().count(),
            close_wait_sockets: tracker.close_wait().0,
            findings,
        }
    }

    fn time_wait_finding(&self, tracker: &Tracker, sysctls: &TcpSysctls) -> Option<Finding> {
        let table = tracker.time_wait();
        let count = table.count();
        let range = sysctls.port_range_size().filter(|&size| size > 0);
        let ratio = |sockets: u32| range.map(|size| f64::from(sockets) / f64::from(size));
        // Enough peers to find the most pressed client-side one even when server-side peers
        // hold more sockets.
        let peers = table.top_peers(self.config.max_keys.max(self.config.top));
        let worst = peers
            .iter()
            .filter(|(peer, _)| peer.client)
            .filter_map(|(peer, sockets)| Some((*peer, *sockets, ratio(*sockets)?)))
            .max_by(|a, b| a.2.total_cmp(&b.2));
        let max_buckets = sysctls.tcp_max_tw_buckets.filter(|&max| max > 0);
        let buckets_used = max_buckets.map(|max| count as f64 / max as f64);
        let port_risk = worst.filter(|w| w.2 >= self.config.port_exhaustion_warning);
        let bucket_risk = buckets_used.filter(|&used| used >= TIME_WAIT_BUCKETS_WARNING);
        let severity = if port_risk.is_some() || bucket_risk.is_some() {
            Severity::Problem
        } else if count >= TIME_WAIT_NOTICE {
            Severity::Notice
        } else {
            return None;
        };
        let mut shown = peers[..self.config.top.min(peers.len())].to_vec();
        if let Some((peer, sockets, _)) = port_risk
            && !shown.iter().any(|(p, _)| *p == peer)
        {
            shown.push((peer, sockets));
        }
        let as_client = shown.iter().any(|(p, _)| p.client);
        let as_server = shown.iter().any(|(p, _)| !p.client);

        let title = match (port_risk, bucket_risk) {
            (Some((peer, _, r)), _) => format!(
                "TIME_WAIT holds {} of the local ports for connections to {}",
                percent(r),
                SocketAddr::new(peer.peer, peer.port)
            ),
            (None, Some(_)) => format!(
                "TIME_WAIT sockets near the tcp_max_tw_buckets limit ({} of {})",
                grouped(count as u64),
                max_buckets.map_or_else(|| "?".to_owned(), |m| grouped(m as u64))
            ),
            (None, None) => format!("{} sockets in TIME_WAIT", grouped(count as u64)),
        };

        let exited: u64 = self.tw_exited.iter().sum();
        let exit_counts = TimeWaitExit::ALL
            .iter()
            .zip(self.tw_exited)
            .filter(|(_, n)| *n > 0)
            .map(|(exit, n)| format!("{} {}", grouped(n), exit_label(*exit)))
            .collect::<Vec<_>>()
            .join(", ");
        let exit_counts = if exit_counts.is_empty() {
            exit_counts
        } else {
            format!(": {exit_counts}")
        };
        let fin_wait2 = if self.tw_fin_wait2_exits > 0 {
            format!(
                " ({} of them still in FIN_WAIT2: the peer never sent its FIN)",
                grouped(self.tw_fin_wait2_exits)
            )
        } else {
            String::new()
        };
        let mut measured = format!(
            "{} in TIME_WAIT now (as /proc/net/sockstat counts `tw`); during the run {} \
             entered it, {} left it{exit_counts}{fin_wait2}. Settings: {}.",
            plural(count as u64, "socket", "sockets"),
            grouped(self.tw_entered),
            grouped(exited),
            settings_text(sysctls),
        );
        if table.dropped() > 0 {
            measured.push_str(&format!(
                " {} more were not tracked (the agent's table was full).",
                grouped(table.dropped())
            ));
        }

        let mut why = "The side that closes first keeps the connection in TIME_WAIT for 2MSL \
                       (60 s on Linux), so that its late segments cannot corrupt a new \
                       connection on the same ports and its last ACK can be resent: normal."
            .to_owned();
        if let Some((peer, _, r)) = port_risk {
            why.push_str(&format!(
                " But a local port in TIME_WAIT cannot connect to the same peer address and \
                 port again: with {} of the range held, connect() to {} will soon fail with \
                 EADDRNOTAVAIL (\"Cannot assign requested address\").",
                percent(r),
                SocketAddr::new(peer.peer, peer.port)
            ));
        }
        if bucket_risk.is_some() {
            why.push_str(
                " Past net.ipv4.tcp_max_tw_buckets the kernel stops keeping closed connections \
                 in TIME_WAIT (\"time wait bucket table overflow\") and loses that protection.",
            );
        }
        if port_risk.is_none() && bucket_risk.is_none() {
            why.push_str(
                " So many of them mean many short connections: each costs a handshake and, on \
                 the client side, a local port for 60 s.",
            );
        }

        let mut action = Vec::new();
        if as_client || port_risk.is_some() {
            action.push(
                "Reuse connections (a pool, HTTP keep-alive) instead of one per request."
                    .to_owned(),
            );
            if sysctls.tcp_tw_reuse != Some(1) {
                let now = match sysctls.tcp_tw_reuse {
                    Some(2) => " (now 2: loopback only)".to_owned(),
                    Some(v) => format!(" (now {v})"),
                    None => String::new(),
                };
                action.push(format!(
                    "Set net.ipv4.tcp_tw_reuse=1{now}: connect() may then reuse a port in \
                     TIME_WAIT for over 1 s, safely, as TCP timestamps (on by default) tell old \
                     segments from new ones."
                ));
            }
            let range = sysctls
                .ip_local_port_range
                .map_or_else(String::new, |(lo, hi)| format!(" (now {lo}-{hi})"));
            action.push(format!(
                "Widen net.ipv4.ip_local_port_range{range}, keeping it clear of ports that \
                 services listen on."
            ));
        }
        if as_server {
            action.push(
                "On the server side TIME_WAIT holds no ephemeral port: let clients close first \
                 (keep-alive) to move it to them, and set SO_REUSEADDR before bind() so that a \
                 restarting server can listen again while old connections are in TIME_WAIT."
                    .to_owned(),
            );
        }
        if bucket_risk.is_some() {
            action.push(format!(
                "Raise net.ipv4.tcp_max_tw_buckets{} or open fewer short connections.",
                max_buckets.map_or_else(String::new, |m| format!(" (now {m})"))
            ));
        }

        let mut lines = Vec::new();
        let mut peer_rows = Vec::new();
        let mut in_shown = 0u64;
        for (peer, sockets) in &shown {
            in_shown += u64::from(*sockets);
            let r = if peer.client { ratio(*sockets) } else { None };
            if peer.client {
                let share = match (r, range) {
                    (Some(r), Some(size)) => {
                        format!(
                            ", {} of the {} local ports",
                            percent(r),
                            grouped(size.into())
                        )
                    }
                    _ => String::new(),
                };
                lines.push(format!(
                    "to {} (this host is the client): {}{share}",
                    SocketAddr::new(peer.peer, peer.port),
                    plural((*sockets).into(), "socket", "sockets"),
                ));
            } else {
                lines.push(format!(
                    "from {} to local port {} (this host is the server): {}",
                    peer.peer,
                    peer.port,
                    plural((*sockets).into(), "socket", "sockets"),
                ));
            }
            peer_rows.push(json!({
                "peer": peer.peer,
                "port": peer.port,
                "role": if peer.client { "client" } else { "server" },
                "sockets": sockets,
                "port_exhaustion_ratio": r,
            }));
        }
        let other_sockets = (count as u64).saturating_sub(in_shown);
        if other_sockets > 0 && !shown.is_empty() {
            lines.push(format!(
                "other peers: {}",
                plural(other_sockets, "socket", "sockets")
            ));
        }
        let closers = self.tw_closers.ranked(self.config.top);
        for (who, n) in &closers.top {
            lines.push(format!(
                "closed first by {}: {}",
                proc_label(who),
                plural(**n, "connection", "connections")
            ));
        }
        if closers.has_other() {
            lines.push(format!(
                "closed first by {}: {}",
                closers.other_label("processes"),
                plural(closers.other, "connection", "connections")
            ));
        }
        let details = json!({
            "sockets": count,
            "entered": self.tw_entered,
            "exited": TimeWaitExit::ALL
                .iter()
                .zip(self.tw_exited)
                .map(|(exit, n)| (exit.as_str().to_owned(), json!(n)))
                .collect::<serde_json::Map<String, Value>>(),
            "exited_in_fin_wait2": self.tw_fin_wait2_exits,
            "untracked": table.dropped(),
            "top_peers": peer_rows,
            "other_peers_sockets": other_sockets,
            "closed_first_by": closers.json(
                |who, n| json!({"process": proc_json(who), "connections": n}),
                |n| json!({"connections": n}),
            ),
            "sysctls": {
                "tcp_tw_reuse": sysctls.tcp_tw_reuse,
                "tcp_max_tw_buckets": sysctls.tcp_max_tw_buckets,
                "ip_local_port_range": sysctls.ip_local_port_range.map(|(lo, hi)| [lo, hi]),
                "ephemeral_ports": sysctls.port_range_size(),
            },
            "buckets_used_ratio": buckets_used,
        });
        Some(Finding {
            topic: TOPIC_TIME_WAIT,
            severity,
            title,
            measured,
            why,
            action: action.join(" "),
            details,
            lines,
        })
    }

    fn nagle_finding(&self) -> Option<Finding> {
        let total = self.stalls;
        if total.stalls == 0 {
            return None;
        }
        let average = total.lost_ns / total.stalls;
        let writers = self.stall_writers.ranked(self.config.top);
        let conns = self.stall_conns.ranked(self.config.top);
        let title = match writers.top.first() {
            Some((Some(key), _)) if writers.top.len() == 1 && !writers.has_other() => format!(
                "Small writes of {} wait for delayed ACKs (Nagle + delayed ACK)",
                proc_label(&Some(*key))
            ),
            _ => "Small writes wait for delayed ACKs (Nagle + delayed ACK)".to_owned(),
        };
        let measured = format!(
            "{} on {}: {} lost in total, about {} per stall.",
            plural(total.stalls, "stall", "stalls"),
            self.stall_conns.distinct("connection", "connections"),
            human_ns(total.lost_ns),
            human_ns(average),
        );
        let why = format!(
            "With Nagle's algorithm (on unless TCP_NODELAY is set) a small write waits until \
             earlier data is acknowledged, and the receiver held that ACK back (delayed ACK, \
             about 40 ms on Linux) hoping to send it with a reply. Each request written in \
             several pieces pays that wait: about {} here.",
            human_ns(average)
        );
        let mut lines = Vec::new();
        for (who, s) in &writers.top {
            lines.push(format!("writer {}: {}", proc_label(who), stalls_text(s)));
        }
        if writers.has_other() {
            lines.push(format!(
                "writers, {}: {}",
                writers.other_label("processes"),
                stalls_text(&writers.other)
            ));
        }
        for ((_, tuple), s) in &conns.top {
            lines.push(format!(
                "{} {}: {}",
                tuple_label(tuple),
                proc_label(&proc_key(s.who)),
                stalls_text(s)
            ));
        }
        if conns.has_other() {
            lines.push(format!(
                "{}: {}",
                conns.other_label("connections"),
                stalls_text(&conns.other)
            ));
        }
        let stalls_json = |s: &Stalls| json!({"stalls": s.stalls, "lost_ms": ms(s.lost_ns)});
        let details = json!({
            "stalls": total.stalls,
            "lost_ms": ms(total.lost_ns),
            "average_ms": ms(average),
            "writers": writers.json(
                |who, s| json!({
                    "process": proc_json(who),
                    "stalls": s.stalls,
                    "lost_ms": ms(s.lost_ns),
                }),
                stalls_json,
            ),
            "connections": conns.json(
                |(netns, tuple), s| {
                    let mut row = conn_json(*netns, tuple);
                    extend(&mut row, json!({
                        "writer": proc_json(&proc_key(s.who)),
                        "stalls": s.stalls,
                        "lost_ms": ms(s.lost_ns),
                    }));
                    row
                },
                stalls_json,
            ),
        });
        Some(Finding {
            topic: TOPIC_NAGLE,
            severity: Severity::Problem,
            title,
            measured,
            why,
            action: sentence(NAGLE_FIX),
            details,
            lines,
        })
    }

    fn delayed_ack_finding(&self) -> Option<Finding> {
        let total = self.delayed;
        // Stalls are the harm delayed ACKs do; when some were seen, that finding says it all.
        if total.acks < DELAYED_ACK_NOTICE || self.stalls.stalls > 0 {
            return None;
        }
        let procs = self.delayed_procs.ranked(self.config.top);
        let conns = self.delayed_conns.ranked(self.config.top);
        let mut measured = format!(
            "{} sent on {}",
            plural(total.acks, "delayed ACK", "delayed ACKs"),
            self.delayed_conns.distinct("connection", "connections"),
        );
        match total.average_ns() {
            Some(avg) => measured.push_str(&format!(", held about {} on average.", human_ns(avg))),
            None => measured.push('.'),
        }
        let why = "This host held ACKs back hoping to send them with a reply (delayed ACK): \
                   normal, but a sender using Nagle's algorithm that writes a request in small \
                   pieces waits for each one. No such stall was seen here; senders on other \
                   hosts are not visible."
            .to_owned();
        let action = "Nothing, if the latency of these connections is fine. If their peers see \
                      steps of about 40 ms: TCP_NODELAY on the sending side, or TCP_QUICKACK on \
                      this host's receiving socket."
            .to_owned();
        let mut lines = Vec::new();
        for (who, d) in &procs.top {
            lines.push(format!("receiver {}: {}", proc_label(who), delayed_text(d)));
        }
        if procs.has_other() {
            lines.push(format!(
                "receivers, {}: {}",
                procs.other_label("processes"),
                delayed_text(&procs.other)
            ));
        }
        for ((_, tuple), d) in &conns.top {
            lines.push(format!("{}: {}", tuple_label(tuple), delayed_text(d)));
        }
        if conns.has_other() {
            lines.push(format!(
                "{}: {}",
                conns.other_label("connections"),
                delayed_text(&conns.other)
            ));
        }
        let acks_json =
            |d: &DelayedAcks| json!({"acks": d.acks, "average_ms": d.average_ns().map(ms)});
        let details = json!({
            "acks": total.acks,
            "average_ms": total.average_ns().map(ms),
            "processes": procs.json(
                |who, d| json!({
                    "process": proc_json(who),
                    "acks": d.acks,
                    "average_ms": d.average_ns().map(ms),
                }),
                acks_json,
            ),
            "connections": conns.json(
                |(netns, tuple), d| {
                    let mut row = conn_json(*netns, tuple);
                    extend(&mut row, json!({
                        "process": proc_json(&proc_key(d.who)),
                        "acks": d.acks,
                        "average_ms": d.average_ns().map(ms),
                    }));
                    row
                },
                acks_json,
            ),
        });
        Some(Finding {
            topic: TOPIC_DELAYED_ACK,
            severity: Severity::Notice,
            title: format!("{} delayed ACKs sent; no stall seen", grouped(total.acks)),
            measured,
            why,
            action,
            details,
            lines,
        })
    }

    fn retransmit_finding(&self) -> Option<Finding> {
        let total: u64 = self.retransmits.iter().sum();
        if total == 0 {
            return None;
        }
        let count = |kind: RetransmitKind| self.retransmits[kind_index(kind)];
        let serious = count(RetransmitKind::Timeout)
            + count(RetransmitKind::Syn)
            + count(RetransmitKind::SynAck);
        let share = serious as f64 / total as f64;
        let severity = if share >= self.config.retransmit_warning_ratio {
            Severity::Problem
        } else {
            Severity::Notice
        };
        let peers = self.retransmit_peers.ranked(self.config.top);
        let title = if severity == Severity::Problem {
            format!(
                "Segments retransmitted, {} of them after timeouts or unanswered handshakes",
                percent(share)
            )
        } else {
            "Segments retransmitted".to_owned()
        };
        let measured = format!(
            "{} retransmitted to {} ({}).",
            plural(total, "segment", "segments"),
            self.retransmit_peers.distinct("peer", "peers"),
            kinds_text(&self.retransmits),
        );
        let mut why = vec![
            "TCP sends a segment again when it was not acknowledged in time; the connection \
             waits meanwhile."
                .to_owned(),
        ];
        for kind in RetransmitKind::ALL {
            if count(kind) > 0 {
                why.push(sentence(kind_explanation(kind)));
            }
        }
        let mut action = "Check the path to the peers below and their health: ping or mtr for \
                          loss, `ss -ti dst <peer>` for one connection (retrans, rto, cwnd), NIC \
                          drops with `ip -s link` and `ethtool -S`."
            .to_owned();
        if count(RetransmitKind::Syn) > 0 {
            action.push_str(
                " For SYN retransmits: check that the peer listens on the port and that no \
                 firewall drops the SYNs.",
            );
        }
        if count(RetransmitKind::SynAck) > 0 {
            action.push_str(
                " For SYN-ACK retransmits: check the clients' path, and for a SYN flood \
                 (net.ipv4.tcp_syncookies).",
            );
        }
        let mut lines = Vec::new();
        for (peer, kinds) in &peers.top {
            lines.push(format!(
                "{peer}: {} ({})",
                plural(kinds.iter().sum(), "segment", "segments"),
                kinds_text(kinds)
            ));
        }
        if peers.has_other() {
            lines.push(format!(
                "{}: {} ({})",
                peers.other_label("peers"),
                plural(peers.other.iter().sum(), "segment", "segments"),
                kinds_text(&peers.other)
            ));
        }
        let details = json!({
            "segments": total,
            "by_kind": kinds_json(&self.retransmits),
            "timeout_or_handshake_share": share,
            "peers": peers.json(
                |peer, kinds| {
                    let mut row = json!({"peer": peer, "segments": kinds.iter().sum::<u64>()});
                    extend(&mut row, kinds_json(kinds));
                    row
                },
                |kinds| {
                    let mut row = json!({"segments": kinds.iter().sum::<u64>()});
                    extend(&mut row, kinds_json(kinds));
                    row
                },
            ),
        });
        Some(Finding {
            topic: TOPIC_RETRANSMISSIONS,
            severity,
            title,
            measured,
            why: why.join(" "),
            action,
            details,
            lines,
        })
    }

    fn close_wait_finding(
        &self,
        tracker: &Tracker,
        mut owner_of: impl FnMut(u32, &Tuple) -> Option<Owner>,
    ) -> Option<Finding> {
        let (now, leaked_now) = tracker.close_wait();
        if self.leaks_total == 0 && leaked_now == 0 {
            return None;
        }
        // Sockets still in CLOSE_WAIT are looked up first: the others may be gone.
        let live: HashMap<ConnKey, Option<Owner>> = tracker
            .connections()
            .filter(|c| c.close_wait_since.is_some())
            .map(|c| ((c.netns, c.tuple), c.owner))
            .collect();
        let mut owners: Vec<Option<Owner>> = self
            .leaks
            .iter()
            .map(|l| {
                l.owner
                    .or_else(|| live.get(&(l.netns, l.tuple)).copied().flatten())
            })
            .collect();
        let still_open = |l: &CloseWaitLeak| live.contains_key(&(l.netns, l.tuple));
        let mut lookups = 0usize;
        let mut not_looked_up = 0usize;
        for pass_live in [true, false] {
            for (leak, owner) in self.leaks.iter().zip(owners.iter_mut()) {
                if owner.is_some() || still_open(leak) != pass_live {
                    continue;
                }
                if lookups < MAX_OWNER_LOOKUPS {
                    lookups += 1;
                    *owner = owner_of(leak.netns, &leak.tuple);
                } else {
                    not_looked_up += 1;
                }
            }
        }
        let mut by_proc: Capped<ProcKey, u64> = Capped::new(self.config.max_keys);
        for owner in &owners {
            *by_proc.slot(proc_key(*owner)) += 1;
        }
        let unkept = self.leaks_total.saturating_sub(self.leaks.len() as u64);
        by_proc.folded += unkept;
        by_proc.folded_events += unkept;
        let procs = by_proc.ranked(self.config.top);

        let title = match procs.top.first() {
            Some((Some(key), _)) if procs.top.len() == 1 && !procs.has_other() => format!(
                "{} leaves sockets in CLOSE_WAIT: it does not close them",
                proc_label(&Some(*key))
            ),
            _ => "Sockets left in CLOSE_WAIT: the application does not close them".to_owned(),
        };
        let measured = format!(
            "{} stayed in CLOSE_WAIT past the leak threshold during the run; {} in CLOSE_WAIT \
             now, {} of them past the threshold.",
            plural(self.leaks_total, "connection", "connections"),
            grouped(now as u64),
            grouped(leaked_now as u64),
        );
        let why = "The peer closed its side (its FIN arrived) but the application never called \
                   close(). Each such socket holds a file descriptor and memory until the \
                   process exits; enough of them end in \"Too many open files\"."
            .to_owned();
        let action = format!(
            "{} `ss -tanp state close-wait` lists them with their process.",
            sentence(CLOSE_WAIT_FIX)
        );
        let mut lines = Vec::new();
        for (who, n) in &procs.top {
            lines.push(format!(
                "{}: {}",
                proc_label(who),
                plural(**n, "socket", "sockets")
            ));
        }
        if procs.has_other() {
            lines.push(format!(
                "{}: {}",
                procs.other_label("processes"),
                plural(procs.other, "socket", "sockets")
            ));
        }
        let mut oldest: Vec<(&CloseWaitLeak, Option<Owner>)> =
            self.leaks.iter().zip(owners.iter().copied()).collect();
        oldest.sort_by_key(|(l, _)| l.since_ns);
        let mut leak_rows = Vec::new();
        for (leak, owner) in oldest.iter().take(self.config.top) {
            let state = if still_open(leak) {
                ", still there"
            } else if leak.seeded {
                ""
            } else {
                ", closed since"
            };
            lines.push(format!(
                "{} {}: in CLOSE_WAIT for {} when detected{state}",
                tuple_label(&leak.tuple),
                proc_label(&proc_key(*owner)),
                human_ns(leak.detected_ns.saturating_sub(leak.since_ns)),
            ));
            let mut row = conn_json(leak.netns, &leak.tuple);
            extend(
                &mut row,
                json!({
                    "process": proc_json(&proc_key(*owner)),
                    "direction": leak.direction.as_str(),
                    "close_wait_seconds": secs(leak.detected_ns.saturating_sub(leak.since_ns)),
                    "seeded": leak.seeded,
                    "still_in_close_wait": still_open(leak),
                }),
            );
            leak_rows.push(row);
        }
        if not_looked_up > 0 {
            lines.push(format!(
                "owners of {} more not looked up (at most {MAX_OWNER_LOOKUPS} lookups)",
                plural(not_looked_up as u64, "socket", "sockets")
            ));
        }
        let details = json!({
            "leaks": self.leaks_total,
            "close_wait_now": now,
            "leaked_now": leaked_now,
            "processes": procs.json(
                |who, n| json!({"process": proc_json(who), "sockets": n}),
                |n| json!({"sockets": n}),
            ),
            "oldest": leak_rows,
            "owner_lookups": lookups,
            "owners_not_looked_up": not_looked_up,
        });
        Some(Finding {
            topic: TOPIC_CLOSE_WAIT,
            severity: Severity::Problem,
            title,
            measured,
            why,
            action,
            details,
            lines,
        })
    }

    fn reset_finding(&self) -> Option<Finding> {
        let total = self.resets_sent + self.resets_received;
        if total == 0 {
            return None;
        }
        let severity = if total >= RESETS_PROBLEM {
            Severity::Problem
        } else {
            Severity::Notice
        };
        let reasons = self.reset_reasons.ranked(self.config.top);
        let peers = self.reset_peers.ranked(self.config.top);
        let main_reason = reasons
            .top
            .first()
            .map(|(code, _)| self.reason_name(**code));
        let mut measured = format!(
            "{} sent by this host, {} received from peers.",
            plural(self.resets_sent, "RST", "RSTs"),
            grouped(self.resets_received)
        );
        if let (Some(name), Some((_, n))) = (&main_reason, reasons.top.first()) {
            measured.push_str(&format!(" Most sent: {name} ({}).", grouped(**n)));
        }
        let mut why = "A RST ends a connection at once: the application on the other side gets \
                       \"connection reset by peer\" (or \"connection refused\" on connect), and \
                       data still in flight is lost."
            .to_owned();
        if let Some(text) = main_reason.as_deref().and_then(reason_explanation) {
            why.push_str(&format!(" Most were sent because {text}."));
        }
        let action = main_reason
            .as_deref()
            .and_then(reason_action)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                if self.resets_sent >= self.resets_received {
                    "Look at the reasons below; `ss -tan` and the application's logs around \
                     the resets tell which connections they hit."
                        .to_owned()
                } else {
                    "Look at the peers below: their application aborts connections, nothing \
                     listens on the port, or a firewall or load balancer resets idle \
                     connections."
                        .to_owned()
                }
            });
        let mut lines = Vec::new();
        for (code, n) in &reasons.top {
            let name = self.reason_name(**code);
            let explained = reason_explanation(&name)
                .map(|text| format!(": {text}"))
                .unwrap_or_default();
            lines.push(format!("sent, {name}: {}{explained}", grouped(**n)));
        }
        if reasons.has_other() {
            lines.push(format!(
                "sent, {}: {}",
                reasons.other_label("reasons"),
                grouped(reasons.other)
            ));
        }
        for (peer, n) in &peers.top {
            lines.push(format!("received from {peer}: {}", grouped(**n)));
        }
        if peers.has_other() {
            lines.push(format!(
                "received from {}: {}",
                peers.other_label("peers"),
                grouped(peers.other)
            ));
        }
        let details = json!({
            "sent": self.resets_sent,
            "received": self.resets_received,
            "sent_by_reason": reasons.json(
                |code, n| json!({"reason": self.reason_name(*code), "code": code, "resets": n}),
                |n| json!({"resets": n}),
            ),
            "received_by_peer": peers.json(
                |peer, n| json!({"peer": peer, "resets": n}),
                |n| json!({"resets": n}),
            ),
        });
        Some(Finding {
            topic: TOPIC_RESETS,
            severity,
            title: format!(
                "Connections reset: {} sent, {} received",
                plural(self.resets_sent, "RST", "RSTs"),
                grouped(self.resets_received)
            ),
            measured,
            why,
            action,
            details,
            lines,
        })
    }

    fn reason_name(&self, code: Option<u16>) -> String {
        match code {
            Some(code) => self
                .rst_reasons
                .get(&code)
                .cloned()
                .unwrap_or_else(|| format!("reason {code}")),
            None => "unknown".to_owned(),
        }
    }
}

impl Observer for Diagnosis {
    fn opened(&mut self, _direction: Direction) {
        self.opened += 1;
    }

    fn closed(&mut self, conn: &Connection) {
        self.closed += 1;
        if conn.time_wait {
            *self.tw_closers.slot(proc_key(conn.owner)) += 1;
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
        self.delayed_procs.slot(proc_key(conn.owner)).add(held_ns);
        let per_conn = self.delayed_conns.slot((conn.netns, conn.tuple));
        per_conn.add(held_ns);
        per_conn.who = conn.owner.or(per_conn.who);
    }

    fn nagle_stall(&mut self, conn: &Connection, lost_ns: u64) {
        let writer = conn.acks.writer;
        self.stalls.add(lost_ns);
        self.stall_writers.slot(proc_key(writer)).add(lost_ns);
        let per_conn = self.stall_conns.slot((conn.netns, conn.tuple));
        per_conn.add(lost_ns);
        per_conn.who = writer.or(per_conn.who);
    }

    // Every stall arrives through `nagle_stall`; the rate-limited summaries add nothing.
    fn nagle_stall_report(&mut self, _conn: &Connection) {}

    fn close_wait_leak(&mut self, leak: &CloseWaitLeak) {
        self.leaks_total += 1;
        if self.leaks.len() < self.config.max_keys {
            self.leaks.push(*leak);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let watched = human_seconds(self.duration_seconds);
        let conns = format!(
            "{} opened, {} closed",
            plural(self.connections_opened, "connection", "connections"),
            grouped(self.connections_closed)
        );
        if self.findings.is_empty() {
            wrap(
                &mut out,
                "",
                "",
                &format!("No TCP problems seen in {watched} ({conns})."),
            );
        } else {
            let problems = self.problems() as u64;
            let notices = self.findings.len() as u64 - problems;
            wrap(
                &mut out,
                "",
                "",
                &format!(
                    "TCP diagnosis over {watched} ({conns}): {}, {}.",
                    plural(problems, "problem", "problems"),
                    plural(notices, "notice", "notices")
                ),
            );
        }
        if self.events_lost > 0 {
            wrap(
                &mut out,
                "warning: ",
                "         ",
                &format!(
                    "{} lost (the kernel's ring buffer was full): the numbers in this report \
                     are lower bounds.",
                    plural(self.events_lost, "event was", "events were")
                ),
            );
        }
        for finding in &self.findings {
            out.push('\n');
            let tag = match finding.severity {
                Severity::Problem => "[PROBLEM] ",
                Severity::Notice => "[NOTICE] ",
            };
            wrap(&mut out, tag, &" ".repeat(tag.len()), &finding.title);
            const INDENT: &str = "            ";
            wrap(&mut out, "  measured: ", INDENT, &finding.measured);
            wrap(&mut out, "  why:      ", INDENT, &finding.why);
            wrap(&mut out, "  do:       ", INDENT, &finding.action);
            for line in &finding.lines {
                wrap(&mut out, "    ", "      ", line);
            }
        }
        f.write_str(out.trim_end_matches('\n'))
    }
}

/// Figures that can be summed into "other" and ranked.
trait Tally: Default + Clone {
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
struct Stalls {
    stalls: u64,
    lost_ns: u64,
    who: Option<Owner>,
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
struct DelayedAcks {
    acks: u64,
    held_ns: u64,
    timed: u64,
    who: Option<Owner>,
}

impl DelayedAcks {
    fn add(&mut self, held_ns: Option<u64>) {
        self.acks += 1;
        if let Some(held) = held_ns {
            self.timed += 1;
            self.held_ns = self.held_ns.saturating_add(held);
        }
    }

    fn average_ns(&self) -> Option<u64> {
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
struct Capped<K, V> {
    cap: usize,
    map: HashMap<K, V>,
    folded: V,
    /// Events that went to `folded`.
    folded_events: u64,
}

impl<K: Eq + Hash + Ord, V: Tally> Capped<K, V> {
    fn new(cap: usize) -> Self {
        Capped {
            cap,
            map: HashMap::new(),
            folded: V::default(),
            folded_events: 0,
        }
    }

    fn slot(&mut self, key: K) -> &mut V {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.folded_events += 1;
            return &mut self.folded;
        }
        self.map.entry(key).or_default()
    }

    /// How many keys, as text: exact unless some were folded.
    fn distinct(&self, one: &str, many: &str) -> String {
        if self.folded_events > 0 {
            format!("more than {} {many}", grouped(self.map.len() as u64))
        } else {
            plural(self.map.len() as u64, one, many)
        }
    }

    /// The `n` largest, and the rest (folded keys included) summed.
    fn ranked(&self, n: usize) -> Ranked<'_, K, V> {
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

struct Ranked<'a, K, V> {
    top: Vec<(&'a K, &'a V)>,
    other: V,
    /// Kept keys outside the top.
    other_keys: usize,
    /// Events for keys past the cap, included in `other`.
    folded_events: u64,
}

impl<K, V> Ranked<'_, K, V> {
    fn has_other(&self) -> bool {
        self.other_keys > 0 || self.folded_events > 0
    }

    fn other_label(&self, things: &str) -> String {
        if self.folded_events > 0 {
            format!("other {things} (past the per-report limit too)")
        } else {
            format!("{} other {things}", grouped(self.other_keys as u64))
        }
    }

    fn json(&self, row: impl Fn(&K, &V) -> Value, totals: impl Fn(&V) -> Value) -> Value {
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

/// Adds the fields of the object `more` to the object `row`.
fn extend(row: &mut Value, more: Value) {
    if let (Value::Object(row), Value::Object(more)) = (row, more) {
        row.extend(more);
    }
}

fn kind_index(kind: RetransmitKind) -> usize {
    RetransmitKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0)
}

fn kind_explanation(kind: RetransmitKind) -> &'static str {
    match kind {
        RetransmitKind::Syn => {
            "SYN retransmits are connection attempts that got no answer: the peer is down or \
             unreachable, a firewall drops the SYNs, or its accept queue is full; connect() \
             waits 1 s, then 2 s, 4 s... each time"
        }
        RetransmitKind::SynAck => {
            "SYN-ACK retransmits mean this host answered a connection attempt but the client's \
             final ACK did not come: loss on the path, a client that gave up, or a SYN flood"
        }
        RetransmitKind::Timeout => {
            "timeout retransmits mean nothing was acknowledged for a whole retransmission \
             timeout (200 ms or more): heavy loss, a stalled peer or a broken path"
        }
        RetransmitKind::Fast => {
            "fast retransmits repair a lost segment quickly, from duplicate ACKs: some loss or \
             congestion on the path"
        }
        RetransmitKind::Other => {
            "other retransmits (tail-loss probes and the like) are mostly harmless on their own"
        }
    }
}

fn kinds_text(kinds: &[u64; KINDS]) -> String {
    let parts: Vec<String> = RetransmitKind::ALL
        .iter()
        .zip(kinds)
        .filter(|(_, n)| **n > 0)
        .map(|(kind, n)| format!("{} {}", kind_label(*kind), grouped(*n)))
        .collect();
    parts.join(", ")
}

fn kind_label(kind: RetransmitKind) -> &'static str {
    match kind {
        RetransmitKind::Syn => "SYN",
        RetransmitKind::SynAck => "SYN-ACK",
        RetransmitKind::Timeout => "timeout",
        RetransmitKind::Fast => "fast",
        RetransmitKind::Other => "other",
    }
}

fn kinds_json(kinds: &[u64; KINDS]) -> Value {
    Value::Object(
        RetransmitKind::ALL
            .iter()
            .zip(kinds)
            .map(|(kind, n)| (kind.as_str().to_owned(), json!(n)))
            .collect(),
    )
}

/// Why the kernel sent a RST, for the common `enum sk_rst_reason` values.
fn reason_explanation(name: &str) -> Option<&'static str> {
    Some(match name {
        "no_socket" => {
            "a segment arrived for which no socket exists: a connection attempt to a port \
             nothing listens on, or data for a connection this host has already closed"
        }
        "tcp_abort_on_close" => {
            "the application closed its socket while received data was still unread"
        }
        "tcp_abort_on_data" => {
            "data arrived after the application had closed the socket or shut down reading, or \
             it closed with SO_LINGER set to 0"
        }
        "tcp_abort_on_linger" => {
            "an orphaned connection in FIN_WAIT2 was aborted at once because TCP_LINGER2 is \
             negative"
        }
        "tcp_abort_on_memory" => {
            "the kernel was short of memory for TCP or had too many orphaned sockets \
             (net.ipv4.tcp_mem, tcp_max_orphans)"
        }
        "tcp_keepalive_timeout" => "keepalive probes went unanswered: the peer is gone",
        "tcp_state" => {
            "the connection was torn down in a state that requires a RST (an abortive close, \
             e.g. SO_LINGER 0, or a disconnect)"
        }
        "tcp_disconnect_with_data" => "the connection was disconnected with data not yet sent",
        "tcp_timewait_socket" => "a segment reached a TIME_WAIT socket that had to reject it",
        "invalid_syn" => "an unexpected SYN arrived on an established connection",
        "tcp_invalid_ack_sequence"
        | "tcp_too_old_ack"
        | "tcp_ack_unsent_data"
        | "tcp_old_ack"
        | "tcp_rfc7323_paws"
        | "tcp_flags" => {
            "a segment did not fit the connection (ACK number, timestamps or flags): often a \
             peer or a middlebox that forgot the connection (restart, NAT or idle timeout)"
        }
        "not_specified" => "the kernel gave no reason",
        _ => return None,
    })
}

fn reason_action(name: &str) -> Option<&'static str> {
    Some(match name {
        "no_socket" => {
            "Check that the service listens on the port its clients use (`ss -ltn`), and that \
             clients do not keep using connections the server has already closed (idle \
             timeouts)."
        }
        "tcp_abort_on_close" => {
            "Make the application read what the peer sent (until EOF) before it closes the \
             socket, or have the protocol end cleanly so nothing is left unread."
        }
        "tcp_abort_on_data" => {
            "Make both sides agree on when the conversation ends: shutdown(SHUT_WR), then read \
             until EOF before close(); avoid SO_LINGER 0 unless an abortive close is wanted."
        }
        "tcp_abort_on_linger" => {
            "Leave TCP_LINGER2 at its default unless aborting orphaned connections is wanted."
        }
        "tcp_abort_on_memory" => {
            "Find what leaves so many orphaned sockets, or raise net.ipv4.tcp_max_orphans / \
             tcp_mem."
        }
        "tcp_keepalive_timeout" => {
            "Check the peers and the path (NAT and firewall idle timeouts) behind these \
             connections."
        }
        _ => return None,
    })
}

fn exit_label(exit: TimeWaitExit) -> &'static str {
    match exit {
        TimeWaitExit::Expired => "expired",
        TimeWaitExit::Reused => "reused",
        TimeWaitExit::Killed => "ended early",
    }
}

fn settings_text(sysctls: &TcpSysctls) -> String {
    let show = |v: Option<i64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let range = match (sysctls.ip_local_port_range, sysctls.port_range_size()) {
        (Some((lo, hi)), Some(size)) => format!("{lo}-{hi} ({}\u{a0}ports)", grouped(size.into())),
        (Some((lo, hi)), None) => format!("{lo}-{hi}"),
        _ => "unknown".to_owned(),
    };
    format!(
        "tcp_tw_reuse={}, tcp_max_tw_buckets={}, ip_local_port_range={range}",
        show(sysctls.tcp_tw_reuse),
        show(sysctls.tcp_max_tw_buckets),
    )
}

fn stalls_text(s: &Stalls) -> String {
    format!(
        "{}, {} lost",
        plural(s.stalls, "stall", "stalls"),
        human_ns(s.lost_ns)
    )
}

fn delayed_text(d: &DelayedAcks) -> String {
    match d.average_ns() {
        Some(avg) => format!(
            "{}, about {} each",
            plural(d.acks, "delayed ACK", "delayed ACKs"),
            human_ns(avg)
        ),
        None => plural(d.acks, "delayed ACK", "delayed ACKs"),
    }
}

fn proc_key(owner: Option<Owner>) -> ProcKey {
    owner.map(|o| (o.pid, o.comm.0))
}

fn proc_label(key: &ProcKey) -> String {
    match key {
        Some((pid, comm)) => format!("{} (pid {pid})", Comm(*comm).as_str()),
        None => "unknown process".to_owned(),
    }
}

fn proc_json(key: &ProcKey) -> Value {
    match key {
        Some((pid, comm)) => json!({"pid": pid, "comm": Comm(*comm).as_str().into_owned()}),
        None => Value::Null,
    }
}

fn tuple_label(tuple: &Tuple) -> String {
    format!(
        "{} -> {}",
        SocketAddr::new(tuple.src, tuple.sport),
        SocketAddr::new(tuple.dst, tuple.dport)
    )
}

fn conn_json(netns: u32, tuple: &Tuple) -> Value {
    json!({
        "netns": netns,
        "local": SocketAddr::new(tuple.src, tuple.sport).to_string(),
        "remote": SocketAddr::new(tuple.dst, tuple.dport).to_string(),
    })
}

/// Capitalised, ending with a full stop.
fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// `1 234 567`, grouped with no-break spaces so that a line is never wrapped inside a number.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 2);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{a0}');
        }
        out.push(c);
    }
    out
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", grouped(n), if n == 1 { one } else { many })
}

fn percent(ratio: f64) -> String {
    format!("{:.0}%", ratio * 100.0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A duration in the unit a person would use: `0.35 ms`, `41 ms`, `1.5 s`, `2 min 5 s`.
fn human_ns(ns: u64) -> String {
    let ms = ms(ns);
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else {
        human_seconds(ms / 1_000.0)
    }
}

fn human_seconds(s: f64) -> String {
    if s < 10.0 {
        let text = format!("{s:.1}");
        format!("{} s", text.strip_suffix(".0").unwrap_or(&text))
    } else if s < 120.0 {
        format!("{s:.0} s")
    } else {
        let whole = s.round() as u64;
        match whole % 60 {
            0 => format!("{} min", whole / 60),
            rest => format!("{} min {rest} s", whole / 60),
        }
    }
}

/// Appends `text` wrapped at `WIDTH` columns: `first` starts the first line, `rest` the others.
/// Breaks only at ASCII spaces.
fn wrap(out: &mut String, first: &str, rest: &str, text: &str) {
    let mut line = first.to_owned();
    let mut width = first.chars().count();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !empty && width + 1 + len > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = rest.to_owned();
            width = rest.chars().count();
            empty = true;
        }
        if !empty {
            line.push(' ');
            width += 1;
        }
        line.push_str(word);
        width += len;
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use tracer_core::model::{Event, SockId, Task, TcpState, TcpState::*, TimerPhase};
    use tracer_core::tracker::TrackerConfig;

    const NS: u32 = 4_026_531_840;
    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;
    const CLIENT: SockId = 0x1000;
    const SERVER: SockId = 0x2000;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn tuple(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Tuple {
        Tuple {
            src,
            sport,
            dst,
            dport,
        }
    }

    fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: Comm::from(comm),
        }
    }

    fn state(ts_ns: u64, sock: SockId, t: Tuple, old: TcpState, new: TcpState, who: Task) -> Event {
        Event::StateChange {
            ts_ns,
            sock,
            netns: NS,
            tuple: t,
            old,
            new,
            task: who,
        }
    }

    fn time_wait(ts_ns: u64, tw: SockId, t: Tuple) -> Event {
        Event::TimeWait {
            ts_ns,
            tw,
            netns: NS,
            tuple: t,
            substate: TimeWait,
            timer: TimerPhase::Start,
        }
    }

    fn retransmit(sock: SockId, t: Tuple, kind: RetransmitKind, segs: u32) -> Event {
        Event::Retransmit {
            ts_ns: 1,
            sock,
            netns: NS,
            tuple: t,
            state: if kind == RetransmitKind::Syn {
                SynSent
            } else {
                Established
            },
            kind,
            segs,
        }
    }

    fn reset(t: Tuple, direction: ResetDirection, reason: Option<u16>) -> Event {
        Event::Reset {
            ts_ns: 1,
            sock: 0x9000,
            netns: NS,
            tuple: t,
            state: Close,
            direction,
            reason,
            task: task(0, "swapper/0"),
        }
    }

    fn sysctls() -> TcpSysctls {
        TcpSysctls {
            tcp_tw_reuse: Some(2),
            tcp_max_tw_buckets: Some(262_144),
            ip_local_port_range: Some((32768, 60999)),
        }
    }

    fn context(sysctls: TcpSysctls) -> ReportContext {
        ReportContext {
            duration: Duration::from_secs(30),
            sysctls,
            events_lost: 0,
        }
    }

    struct Run {
        tracker: Tracker,
        diagnosis: Diagnosis,
    }

    impl Run {
        fn new(config: DiagnoseConfig) -> Run {
            Run::with_tracker(config, TrackerConfig::default())
        }

        fn with_tracker(config: DiagnoseConfig, tracker: TrackerConfig) -> Run {
            let reasons = HashMap::from([
                (1, "no_socket".to_owned()),
                (11, "tcp_abort_on_close".to_owned()),
            ]);
            Run {
                tracker: Tracker::new(tracker),
                diagnosis: Diagnosis::new(config, reasons),
            }
        }

        fn feed(&mut self, events: &[Event]) {
            for e in events {
                self.tracker.on_event(e, &mut self.diagnosis);
            }
        }

        fn report(&self, sysctls: TcpSysctls) -> Report {
            self.diagnosis
                .report_with_owners(&self.tracker, &context(sysctls), |_, _| None)
        }
    }

    /// A client connection from `sport` to 10.0.0.2:80 by `who`, closed by the client. With
    /// `tw`, it goes into TIME_WAIT as timewait socket `tw`.
    fn short_connection(
        at: u64,
        sock: SockId,
        sport: u16,
        who: Task,
        tw: Option<SockId>,
    ) -> Vec<Event> {
        let t = tuple(ip(1), sport, ip(2), 80);
        let mut events = vec![
            state(at, sock, tuple(ip(1), 0, ip(2), 80), Close, SynSent, who),
            state(at + 1, sock, t, SynSent, Established, task(0, "swapper/0")),
            state(at + 2, sock, t, Established, FinWait1, who),
            state(at + 3, sock, t, FinWait1, FinWait2, task(0, "swapper/0")),
        ];
        if let Some(tw) = tw {
            events.push(time_wait(at + 4, tw, t));
        }
        events.push(state(
            at + 4,
            sock,
            t,
            FinWait2,
            Close,
            task(0, "swapper/0"),
        ));
        events
    }

    /// `rounds` Nagle + delayed-ACK stalls between a client (pid 5) and a server on this host.
    fn stalls(rounds: u64) -> Vec<Event> {
        let client_t = tuple(ip(1), 40000, ip(1), 8080);
        let server_t = tuple(ip(1), 8080, ip(1), 40000);
        let mut events = vec![
            state(
                0,
                CLIENT,
                tuple(ip(1), 0, ip(1), 8080),
                Close,
                SynSent,
                task(5, "client"),
            ),
            state(1, CLIENT, client_t, SynSent, Established, task(0, "x")),
            state(1, SERVER, server_t, Listen, SynRecv, task(0, "x")),
            state(2, SERVER, server_t, SynRecv, Established, task(0, "x")),
        ];
        for round in 0..rounds {
            let at = (round + 1) * 100 * MS;
            events.push(Event::NagleHeld {
                ts_ns: at,
                sock: CLIENT,
                netns: NS,
                tuple: client_t,
                bytes: 10,
                task: task(5, "client"),
            });
            events.push(Event::DelayedAck {
                ts_ns: at + 40 * MS,
                sock: SERVER,
                netns: NS,
                tuple: server_t,
                held_ns: Some(41 * MS),
                pingpong: false,
            });
        }
        events
    }

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
    fn lost_events_make_the_numbers_lower_bounds() {
        let run = Run::new(DiagnoseConfig::default());
        let report = run.diagnosis.report_with_owners(
            &run.tracker,
            &ReportContext {
                events_lost: 1234,
                ..context(sysctls())
            },
            |_, _| None,
        );
        let text = report.to_string();
        assert!(
            text.contains("warning: 1\u{a0}234 events were lost"),
            "{text}"
        );
        assert!(text.contains("lower bounds"), "{text}");
    }

    #[test]
    fn nagle_stalls_name_the_writer_and_the_time_lost() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&stalls(12));
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_NAGLE).expect("stall finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.title.contains("client (pid 5)"), "{}", f.title);
        assert!(f.measured.contains("12 stalls"), "{}", f.measured);
        assert!(f.measured.contains("480 ms lost"), "{}", f.measured);
        assert!(
            f.measured.contains("about 40 ms per stall"),
            "{}",
            f.measured
        );
        assert!(f.action.contains("TCP_NODELAY") && f.action.contains("TCP_QUICKACK"));
        assert_eq!(f.details["writers"]["top"][0]["process"]["comm"], "client");
        assert_eq!(f.details["writers"]["top"][0]["stalls"], 12);
        assert_eq!(
            f.details["connections"]["top"][0]["local"],
            "10.0.0.1:40000"
        );
        assert!(
            report.finding(TOPIC_DELAYED_ACK).is_none(),
            "the 12 delayed ACKs are explained by the stalls"
        );
        let text = report.to_string();
        assert!(
            text.contains("[PROBLEM] Small writes of client (pid 5)"),
            "{text}"
        );
        assert!(
            text.contains("writer client (pid 5): 12 stalls, 480 ms lost"),
            "{text}"
        );
    }

    #[test]
    fn delayed_acks_without_stalls_are_a_notice_when_many() {
        let server_t = tuple(ip(1), 8080, ip(3), 40000);
        let mut events = vec![
            state(1, SERVER, server_t, Listen, SynRecv, task(0, "x")),
            state(2, SERVER, server_t, SynRecv, Established, task(0, "x")),
        ];
        for i in 0..DELAYED_ACK_NOTICE {
            events.push(Event::DelayedAck {
                ts_ns: 10 + i * 100 * MS,
                sock: SERVER,
                netns: NS,
                tuple: server_t,
                held_ns: Some(40 * MS),
                pingpong: true,
            });
        }
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&events[..events.len() - 1]);
        assert!(run.report(sysctls()).finding(TOPIC_DELAYED_ACK).is_none());
        run.feed(&events[events.len() - 1..]);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_DELAYED_ACK).expect("notice");
        assert_eq!(f.severity, Severity::Notice);
        assert!(f.measured.contains("10 delayed ACKs"), "{}", f.measured);
        assert!(f.measured.contains("about 40 ms"), "{}", f.measured);
        assert_eq!(
            f.details["connections"]["top"][0]["remote"],
            "10.0.0.3:40000"
        );
    }

    #[test]
    fn time_wait_toward_one_peer_with_a_small_port_range_is_a_problem() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.tracker
            .time_wait_mut()
            .set_ephemeral_ports((40000, 40099));
        let mut events = Vec::new();
        for i in 0..79u16 {
            let t = tuple(ip(1), 40000 + i, ip(2), 80);
            events.push(time_wait(u64::from(i), 0xa000 + SockId::from(i), t));
        }
        // One seen from connect() to close, so its process is known.
        events.extend(short_connection(
            100,
            CLIENT,
            40090,
            task(42, "loadgen"),
            Some(0xb000),
        ));
        // Server side: a client of ours that we closed on.
        events.push(time_wait(200, 0xc000, tuple(ip(1), 8080, ip(7), 50000)));
        run.feed(&events);
        let small = TcpSysctls {
            ip_local_port_range: Some((40000, 40099)),
            ..sysctls()
        };
        let report = run.report(small);
        assert_eq!(report.time_wait_sockets, 81);
        let f = report.finding(TOPIC_TIME_WAIT).expect("time_wait finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.title.contains("80% of the local ports"), "{}", f.title);
        assert!(f.title.contains("10.0.0.2:80"), "{}", f.title);
        let top = &f.details["top_peers"][0];
        assert_eq!(top["role"], "client");
        assert_eq!(top["sockets"], 80);
        assert_eq!(top["port_exhaustion_ratio"], 0.8);
        assert_eq!(f.details["top_peers"][1]["role"], "server");
        assert_eq!(f.details["entered"], 81);
        assert_eq!(
            f.details["sysctls"]["ip_local_port_range"],
            json!([40000, 40099])
        );
        assert_eq!(
            f.details["closed_first_by"]["top"][0]["process"]["comm"],
            "loadgen"
        );
        assert!(
            f.why.contains("60 s") && f.why.contains("EADDRNOTAVAIL"),
            "{}",
            f.why
        );
        for advice in [
            "keep-alive",
            "net.ipv4.tcp_tw_reuse=1 (now 2: loopback only)",
            "TCP timestamps",
            "ip_local_port_range (now 40000-40099)",
            "SO_REUSEADDR",
        ] {
            assert!(f.action.contains(advice), "{advice}: {}", f.action);
        }
        let text = report.to_string();
        assert!(
            text.contains(
                "to 10.0.0.2:80 (this host is the client): 80 sockets, 80% of the 100 local ports"
            ),
            "{text}"
        );
        assert!(
            text.contains("closed first by loadgen (pid 42): 1 connection"),
            "{text}"
        );
    }

    #[test]
    fn time_wait_without_pressure_is_a_notice_only_when_many() {
        let mut run = Run::new(DiagnoseConfig::default());
        let few: Vec<Event> = (0..10u16)
            .map(|i| {
                time_wait(
                    1,
                    0xa000 + SockId::from(i),
                    tuple(ip(1), 40000 + i, ip(2), 80),
                )
            })
            .collect();
        run.feed(&few);
        assert!(run.report(sysctls()).finding(TOPIC_TIME_WAIT).is_none());
        let many: Vec<Event> = (0..TIME_WAIT_NOTICE as u16)
            .map(|i| {
                let t = tuple(
                    ip(1),
                    8080,
                    IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)),
                    50000,
                );
                time_wait(2, 0x10_0000 + SockId::from(i), t)
            })
            .collect();
        run.feed(&many);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_TIME_WAIT).expect("notice");
        assert_eq!(f.severity, Severity::Notice);
        assert!(f.action.contains("SO_REUSEADDR"), "{}", f.action);
    }

    #[test]
    fn time_wait_near_the_bucket_limit_is_a_problem() {
        let mut run = Run::new(DiagnoseConfig::default());
        let events: Vec<Event> = (0..9u16)
            .map(|i| {
                time_wait(
                    1,
                    0xa000 + SockId::from(i),
                    tuple(ip(1), 8080, ip(i as u8 + 10), 50000),
                )
            })
            .collect();
        run.feed(&events);
        let report = run.report(TcpSysctls {
            tcp_max_tw_buckets: Some(10),
            ..sysctls()
        });
        let f = report.finding(TOPIC_TIME_WAIT).expect("problem");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.title.contains("tcp_max_tw_buckets"), "{}", f.title);
        assert!(
            f.action
                .contains("Raise net.ipv4.tcp_max_tw_buckets (now 10)"),
            "{}",
            f.action
        );
    }

    #[test]
    fn retransmits_aggregate_per_peer_and_kind() {
        let a = tuple(ip(1), 40000, ip(2), 443);
        let a2 = tuple(ip(1), 40001, ip(2), 443);
        let b = tuple(ip(1), 40002, ip(3), 80);
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&[
            retransmit(0x10, a, RetransmitKind::Fast, 10),
            retransmit(0x11, a2, RetransmitKind::Fast, 5),
            retransmit(0x10, a, RetransmitKind::Timeout, 1),
            retransmit(0x12, b, RetransmitKind::Syn, 2),
        ]);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_RETRANSMISSIONS).expect("finding");
        assert_eq!(f.severity, Severity::Notice, "3 of 18 are timeouts or SYNs");
        assert_eq!(f.details["segments"], 18);
        let top = &f.details["peers"]["top"];
        assert_eq!(top[0]["peer"], "10.0.0.2");
        assert_eq!(
            (top[0]["fast"].clone(), top[0]["timeout"].clone()),
            (json!(15), json!(1))
        );
        assert_eq!(top[1]["peer"], "10.0.0.3");
        assert_eq!(top[1]["syn"], 2);
        assert!(
            f.measured.contains("18 segments retransmitted to 2 peers"),
            "{}",
            f.measured
        );
        assert!(
            f.action.contains("ss -ti") && f.action.contains("listens"),
            "{}",
            f.action
        );
        let text = report.to_string();
        assert!(
            text.contains("10.0.0.2: 16 segments (fast 15, timeout 1)"),
            "{text}"
        );

        // Mostly timeouts: a problem.
        run.feed(&[retransmit(0x10, a, RetransmitKind::Timeout, 40)]);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_RETRANSMISSIONS).expect("finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.why.contains("retransmission timeout"), "{}", f.why);
    }

    fn close_wait_tracker() -> TrackerConfig {
        TrackerConfig {
            close_wait_threshold_ns: 5 * SEC,
            ..TrackerConfig::default()
        }
    }

    #[test]
    fn close_wait_leak_names_the_process() {
        let mut run = Run::with_tracker(DiagnoseConfig::default(), close_wait_tracker());
        let t = tuple(ip(1), 40000, ip(2), 5432);
        run.feed(&[
            state(
                0,
                CLIENT,
                tuple(ip(1), 0, ip(2), 5432),
                Close,
                SynSent,
                task(7, "app"),
            ),
            state(1, CLIENT, t, SynSent, Established, task(0, "x")),
            state(2 * SEC, CLIENT, t, Established, CloseWait, task(0, "x")),
        ]);
        run.tracker.tick(10 * SEC, &mut run.diagnosis);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_CLOSE_WAIT).expect("leak finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(
            f.title
                .starts_with("app (pid 7) leaves sockets in CLOSE_WAIT"),
            "{}",
            f.title
        );
        assert!(f.action.contains("closes the socket"), "{}", f.action);
        assert_eq!(f.details["leaks"], 1);
        assert_eq!(f.details["leaked_now"], 1);
        assert_eq!(f.details["oldest"][0]["still_in_close_wait"], true);
        assert_eq!(f.details["owner_lookups"], 0, "the owner was known");
        assert!(
            f.lines.contains(
                &"10.0.0.1:40000 -> 10.0.0.2:5432 app (pid 7): in CLOSE_WAIT for 8 s when \
                  detected, still there"
                    .to_owned()
            ),
            "{:?}",
            f.lines
        );
    }

    #[test]
    fn unknown_close_wait_owners_are_looked_up_at_report_time_a_bounded_number_of_times() {
        let mut run = Run::with_tracker(DiagnoseConfig::default(), close_wait_tracker());
        let n = MAX_OWNER_LOOKUPS as u16 + 4;
        for i in 0..n {
            let sock = 0x5000 + SockId::from(i);
            let t = tuple(ip(1), 8080, ip(9), 50000 + i);
            run.feed(&[
                state(0, sock, t, Listen, SynRecv, task(0, "x")),
                state(1, sock, t, SynRecv, Established, task(0, "x")),
                state(2, sock, t, Established, CloseWait, task(0, "x")),
            ]);
        }
        run.tracker.tick(10 * SEC, &mut run.diagnosis);
        let mut calls = 0;
        let report = run
            .diagnosis
            .report_with_owners(&run.tracker, &context(sysctls()), |_, _| {
                calls += 1;
                Some(Owner {
                    pid: 9,
                    comm: Comm::from("srv"),
                })
            });
        assert_eq!(calls, MAX_OWNER_LOOKUPS);
        let f = report.finding(TOPIC_CLOSE_WAIT).expect("leak finding");
        let top = &f.details["processes"]["top"];
        assert_eq!(top[0]["process"]["comm"], "srv");
        assert_eq!(top[0]["sockets"], MAX_OWNER_LOOKUPS);
        assert_eq!(top[1]["process"], Value::Null);
        assert_eq!(top[1]["sockets"], 4);
        assert_eq!(f.details["owners_not_looked_up"], 4);
    }

    #[test]
    fn resets_by_reason_name_and_by_peer() {
        let t = tuple(ip(1), 8080, ip(4), 50000);
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&[
            reset(t, ResetDirection::Sent, Some(1)),
            reset(t, ResetDirection::Sent, Some(1)),
            reset(t, ResetDirection::Sent, Some(11)),
            reset(t, ResetDirection::Sent, Some(99)),
            reset(t, ResetDirection::Sent, None),
            reset(t, ResetDirection::Received, None),
        ]);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_RESETS).expect("reset finding");
        assert_eq!(f.severity, Severity::Notice);
        let reasons: Vec<(String, u64)> = f.details["sent_by_reason"]["top"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["reason"].as_str().unwrap_or("").to_owned(),
                    r["resets"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(reasons[0], ("no_socket".to_owned(), 2));
        assert!(reasons.contains(&("tcp_abort_on_close".to_owned(), 1)));
        assert!(reasons.contains(&("reason 99".to_owned(), 1)));
        assert!(reasons.contains(&("unknown".to_owned(), 1)));
        assert_eq!(f.details["received_by_peer"]["top"][0]["peer"], "10.0.0.4");
        assert!(f.why.contains("no socket exists"), "{}", f.why);
        assert!(f.action.contains("listens on the port"), "{}", f.action);
        let text = report.to_string();
        assert!(
            text.contains("sent, tcp_abort_on_close: 1: the application closed"),
            "{text}"
        );
        assert!(text.contains("received from 10.0.0.4: 1"), "{text}");
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

    #[test]
    fn text_stays_within_the_terminal_width() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.tracker
            .time_wait_mut()
            .set_ephemeral_ports((40000, 40099));
        run.feed(&stalls(12));
        for i in 0..80u16 {
            let t = tuple(ip(1), 40000 + i, ip(2), 80);
            run.feed(&[time_wait(u64::from(i), 0xa000 + SockId::from(i), t)]);
        }
        let report = run.report(TcpSysctls {
            ip_local_port_range: Some((40000, 40099)),
            ..sysctls()
        });
        let text = report.to_string();
        println!("{text}");
        for line in text.lines() {
            assert!(line.chars().count() < 100, "too wide: {line}");
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(grouped(1_234_567), "1\u{a0}234\u{a0}567");
        assert_eq!(grouped(999), "999");
        assert_eq!(human_ns(41 * MS), "41 ms");
        assert_eq!(human_ns(1_500 * MS), "1.5 s");
        assert_eq!(human_ns(350_000), "0.35 ms");
        assert_eq!(human_seconds(30.0), "30 s");
        assert_eq!(human_seconds(125.0), "2 min 5 s");
        assert_eq!(sentence("set it"), "Set it.");
    }
}
