//! The pure part of `tracer top`: what one refresh read ([`Sample`]), and the text of the screen
//! computed from two consecutive samples ([`View`]). No terminal, no clock, no kernel: the unit
//! tests build samples by hand.
use std::time::Duration;

use prometheus::proto::MetricFamily;
use tracer_core::model::{ResetDirection, RetransmitKind};
use tracer_core::record::PeerKey;

use crate::diagnose::{Report, Severity};
use crate::export::metrics::Metrics;

/// The agent's cumulative counters at one instant, read from its own [`Metrics`] (the numbers
/// `/metrics` would serve).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub opened: u64,
    pub closed: u64,
    /// Retransmitted segments, indexed by `RetransmitKind as usize`.
    pub retransmits: [u64; RetransmitKind::ALL.len()],
    pub resets_sent: u64,
    pub resets_received: u64,
    pub delayed_acks: u64,
    pub nagle_stalls: u64,
    pub events_lost: u64,
    pub softirqs_unobserved: u64,
}

impl Counters {
    pub fn read(metrics: &Metrics) -> Counters {
        Counters::from_families(&metrics.registry().gather())
    }

    /// Sums the counters of `families` (every label set of a name, or the ones named).
    pub fn from_families(families: &[MetricFamily]) -> Counters {
        let sum = |name: &str, label: Option<(&str, &str)>| -> u64 {
            families
                .iter()
                .filter(|family| family.name() == name)
                .flat_map(|family| family.get_metric())
                .filter(|metric| {
                    label.is_none_or(|(key, value)| {
                        metric
                            .get_label()
                            .iter()
                            .any(|pair| pair.name() == key && pair.value() == value)
                    })
                })
                .map(|metric| metric.get_counter().get_value())
                .sum::<f64>() as u64
        };
        let mut retransmits = [0; RetransmitKind::ALL.len()];
        for kind in RetransmitKind::ALL {
            retransmits[kind as usize] =
                sum("tracer_retransmits_total", Some(("kind", kind.as_str())));
        }
        Counters {
            opened: sum("tracer_connections_opened_total", None),
            closed: sum("tracer_connections_closed_total", None),
            retransmits,
            resets_sent: sum(
                "tracer_resets_total",
                Some(("direction", ResetDirection::Sent.as_str())),
            ),
            resets_received: sum(
                "tracer_resets_total",
                Some(("direction", ResetDirection::Received.as_str())),
            ),
            delayed_acks: sum("tracer_delayed_acks_total", None),
            nagle_stalls: sum("tracer_nagle_stalls_total", None),
            events_lost: sum("tracer_events_lost_total", None),
            softirqs_unobserved: sum("tracer_softirqs_unobserved_total", None),
        }
    }
}

/// What one refresh read: the counters, the tracker's gauges, the TIME_WAIT peers and the
/// findings as `tracer diagnose` would report them now.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Time since `tracer top` started watching.
    pub at: Duration,
    pub counters: Counters,
    pub active: usize,
    pub time_wait: usize,
    /// CLOSE_WAIT connections now, and those of them past the threshold.
    pub close_wait: (usize, usize),
    /// TIME_WAIT sockets per peer (the most first, bounded).
    pub peers: Vec<(PeerKey, u32)>,
    /// Size of `ip_local_port_range`, when known.
    pub port_range: Option<u32>,
    pub report: Report,
}

/// How the TIME_WAIT peers table is sorted; a key cycles through them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Most TIME_WAIT sockets first.
    #[default]
    Sockets,
    /// Highest port-exhaustion ratio first (peers this host connects to), then the others.
    Ratio,
    /// By address, then service port.
    Peer,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::Sockets => SortKey::Ratio,
            SortKey::Ratio => SortKey::Peer,
            SortKey::Peer => SortKey::Sockets,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Sockets => "sockets",
            SortKey::Ratio => "ratio",
            SortKey::Peer => "peer",
        }
    }

    /// The column it sorts, in `PEER_COLUMNS`.
    fn column(self) -> usize {
        match self {
            SortKey::Sockets => 3,
            SortKey::Ratio => 4,
            SortKey::Peer => 0,
        }
    }
}

/// Headers of the TIME_WAIT peers table.
pub const PEER_COLUMNS: [&str; 5] = ["PEER", "PORT", "SIDE", "SOCKETS", "PORTS USED"];

/// One finding, in `tracer diagnose`'s words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FindingLines {
    pub problem: bool,
    /// `[PROBLEM] title` or `[NOTICE] title`.
    pub title: String,
    pub measured: String,
    pub action: String,
    /// The figures behind it (top peers, processes, reasons), one per line.
    pub details: Vec<String>,
}

/// The text of one screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub title: String,
    /// The figures, one line each.
    pub summary: Vec<String>,
    /// Column headers; the sorted one carries a `*`.
    pub peer_header: [String; 5],
    pub peers: Vec<[String; 5]>,
    /// `tracer diagnose`'s opening sentence for what was seen so far.
    pub headline: String,
    pub findings: Vec<FindingLines>,
}

impl View {
    /// The findings box as lines of at most `width` columns: the headline, then per finding
    /// its title, what was measured and what to do, continuation lines indented. `true` marks
    /// the title of a problem.
    pub fn finding_lines(&self, width: usize) -> Vec<(bool, String)> {
        let mut lines: Vec<(bool, String)> = wrap(&self.headline, "", "", width)
            .into_iter()
            .map(|l| (false, l))
            .collect();
        for finding in &self.findings {
            for line in wrap(&finding.title, "", "          ", width) {
                lines.push((finding.problem, line));
            }
            for text in [&finding.measured, &finding.action] {
                for line in wrap(text, "  ", "    ", width) {
                    lines.push((false, line));
                }
            }
            for detail in &finding.details {
                for line in wrap(detail, "    ", "      ", width) {
                    lines.push((false, line));
                }
            }
        }
        lines
    }
}

/// `text` broken at spaces into lines of at most `width` columns (a longer word gets a line
/// of its own), the first starting with `first`, the others with `rest`.
pub fn wrap(text: &str, first: &str, rest: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = first.to_owned();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !empty && line.chars().count() + 1 + len > width {
            lines.push(std::mem::replace(&mut line, rest.to_owned()));
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    if !empty || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// What to show before the first sample.
pub fn waiting(interval: Duration) -> View {
    View {
        title: title(interval, Duration::ZERO, SortKey::default()),
        summary: vec!["waiting for the first sample...".to_owned()],
        peer_header: header(SortKey::default()),
        peers: Vec::new(),
        headline: String::new(),
        findings: Vec::new(),
    }
}

/// The screen for `now`, with rates over the time since `before` (the previous sample's
/// counters and time).
pub fn view(
    before: (Duration, &Counters),
    now: &Sample,
    sort: SortKey,
    interval: Duration,
) -> View {
    let (then, old) = before;
    let secs = now.at.saturating_sub(then).as_secs_f64();
    let rate = |new: u64, old: u64| -> String {
        let per_second = if secs > 0.0 {
            new.saturating_sub(old) as f64 / secs
        } else {
            0.0
        };
        format!("{per_second:.1}")
    };
    let c = &now.counters;
    let retransmits = RetransmitKind::ALL
        .iter()
        .map(|kind| {
            let i = *kind as usize;
            format!(
                "{} {}",
                kind.as_str(),
                rate(c.retransmits[i], old.retransmits[i])
            )
        })
        .collect::<Vec<_>>()
        .join("  ");
    let mut summary = vec![
        format!(
            "connections/s: opened {}  closed {}    active {}    since start: {} opened, {} closed",
            rate(c.opened, old.opened),
            rate(c.closed, old.closed),
            now.active,
            c.opened,
            c.closed
        ),
        format!("retransmitted segments/s: {retransmits}"),
        format!(
            "resets/s: sent {}  received {}    delayed ACKs/s {}    Nagle stalls/s {}",
            rate(c.resets_sent, old.resets_sent),
            rate(c.resets_received, old.resets_received),
            rate(c.delayed_acks, old.delayed_acks),
            rate(c.nagle_stalls, old.nagle_stalls)
        ),
        format!(
            "TIME_WAIT {}    CLOSE_WAIT {} now, {} leaked",
            now.time_wait, now.close_wait.0, now.close_wait.1
        ),
    ];
    if c.events_lost > 0 {
        summary.push(format!(
            "warning: {} kernel events lost (ring buffer full): counts are lower bounds",
            c.events_lost
        ));
    }
    if c.softirqs_unobserved > 0 {
        summary.push(format!(
            "warning: the kernel ran {} softirqs without BPF programs: counts are lower bounds",
            c.softirqs_unobserved
        ));
    }
    View {
        title: title(interval, now.at, sort),
        summary,
        peer_header: header(sort),
        peers: peer_rows(&now.peers, now.port_range, sort),
        headline: headline(&now.report),
        findings: now
            .report
            .findings
            .iter()
            .map(|f| {
                let problem = f.severity == Severity::Problem;
                FindingLines {
                    problem,
                    title: format!(
                        "{} {}",
                        if problem { "[PROBLEM]" } else { "[NOTICE]" },
                        f.title
                    ),
                    measured: format!("measured: {}", f.measured),
                    action: format!("do: {}", f.action),
                    details: f.lines.clone(),
                }
            })
            .collect(),
    }
}

fn title(interval: Duration, at: Duration, sort: SortKey) -> String {
    format!(
        "tracer top - every {} s - watching for {} s - sort: {} (s: next sort, q: quit)",
        interval.as_secs(),
        at.as_secs(),
        sort.as_str()
    )
}

fn header(sort: SortKey) -> [String; 5] {
    let mut header = PEER_COLUMNS.map(str::to_owned);
    header[sort.column()].push('*');
    header
}

/// The opening sentence of `tracer diagnose`'s text report (its first paragraph, unwrapped).
fn headline(report: &Report) -> String {
    let text = report.to_string();
    let first = text.split("\n\n").next().unwrap_or_default();
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The TIME_WAIT peers as table rows, sorted by `sort`.
pub fn peer_rows(
    peers: &[(PeerKey, u32)],
    port_range: Option<u32>,
    sort: SortKey,
) -> Vec<[String; 5]> {
    let ratio = |peer: &PeerKey, sockets: u32| -> Option<f64> {
        match port_range {
            Some(size) if peer.client && size > 0 => Some(f64::from(sockets) / f64::from(size)),
            _ => None,
        }
    };
    let mut sorted: Vec<&(PeerKey, u32)> = peers.iter().collect();
    match sort {
        SortKey::Sockets => sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0))),
        SortKey::Ratio => sorted.sort_by(|a, b| {
            let (ra, rb) = (ratio(&a.0, a.1), ratio(&b.0, b.1));
            rb.partial_cmp(&ra)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.1.cmp(&a.1))
                .then(a.0.cmp(&b.0))
        }),
        SortKey::Peer => sorted.sort_by(|a, b| {
            (a.0.peer, a.0.port, a.0.client).cmp(&(b.0.peer, b.0.port, b.0.client))
        }),
    }
    sorted
        .into_iter()
        .map(|(peer, sockets)| {
            [
                peer.peer.to_string(),
                peer.port.to_string(),
                if peer.client { "client" } else { "server" }.to_owned(),
                sockets.to_string(),
                ratio(peer, *sockets)
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0)),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr};

    use tracer_core::model::Direction;
    use tracer_core::observer::Observer;
    use tracer_core::testkit::tuple;

    use super::*;
    use crate::diagnose::{DiagnoseConfig, Diagnosis, ReportContext};
    use crate::kernel::system::TcpSysctls;

    fn peer(last: u8, port: u16, client: bool) -> PeerKey {
        PeerKey {
            peer: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            port,
            client,
        }
    }

    fn report(resets: u64) -> Report {
        let mut diagnosis = Diagnosis::new(DiagnoseConfig::default(), HashMap::new());
        for i in 0..resets {
            diagnosis.reset(
                &tuple(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    1,
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    2 + i as u16,
                ),
                ResetDirection::Received,
                None,
            );
        }
        let tracker = tracer_core::tracker::Tracker::new(Default::default());
        diagnosis.report_with_owners(
            &tracker,
            &ReportContext {
                duration: Duration::from_secs(3),
                sysctls: TcpSysctls::default(),
                events_lost: 0,
                softirqs_unobserved: 0,
            },
            |_, _| None,
        )
    }

    fn sample(at: u64, counters: Counters) -> Sample {
        Sample {
            at: Duration::from_secs(at),
            counters,
            active: 7,
            time_wait: 40,
            close_wait: (2, 1),
            peers: vec![
                (peer(9, 80, true), 30),
                (peer(1, 443, true), 10),
                (peer(5, 22, false), 50),
            ],
            port_range: Some(1000),
            report: report(0),
        }
    }

    #[test]
    fn counters_are_read_from_the_agents_metrics() {
        let metrics = Metrics::new().expect("metrics");
        let mut observer = &metrics;
        observer.opened(Direction::Active);
        observer.opened(Direction::Passive);
        let t = tuple(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            1,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            2,
        );
        observer.retransmit(&t, RetransmitKind::Timeout, 3);
        observer.retransmit(&t, RetransmitKind::Syn, 1);
        observer.reset(&t, ResetDirection::Sent, None);
        observer.reset(&t, ResetDirection::Received, None);
        observer.reset(&t, ResetDirection::Received, None);
        metrics.set_events_lost(4);
        let counters = Counters::read(&metrics);
        assert_eq!(counters.opened, 2);
        assert_eq!(counters.retransmits[RetransmitKind::Timeout as usize], 3);
        assert_eq!(counters.retransmits[RetransmitKind::Syn as usize], 1);
        assert_eq!(counters.retransmits[RetransmitKind::Fast as usize], 0);
        assert_eq!((counters.resets_sent, counters.resets_received), (1, 2));
        assert_eq!(counters.events_lost, 4);
    }

    #[test]
    fn rates_are_per_second_between_samples() {
        let old = Counters {
            opened: 10,
            closed: 4,
            ..Counters::default()
        };
        let mut new = Counters {
            opened: 30,
            closed: 8,
            delayed_acks: 6,
            nagle_stalls: 2,
            resets_sent: 1,
            ..Counters::default()
        };
        new.retransmits[RetransmitKind::Fast as usize] = 5;
        let view = view(
            (Duration::from_secs(2), &old),
            &sample(4, new),
            SortKey::Sockets,
            Duration::from_secs(1),
        );
        assert_eq!(
            view.summary[0],
            "connections/s: opened 10.0  closed 2.0    active 7    since start: 30 opened, 8 closed"
        );
        assert_eq!(
            view.summary[1],
            "retransmitted segments/s: syn 0.0  fast 2.5  timeout 0.0  other 0.0  synack 0.0"
        );
        assert_eq!(
            view.summary[2],
            "resets/s: sent 0.5  received 0.0    delayed ACKs/s 3.0    Nagle stalls/s 1.0"
        );
        assert_eq!(
            view.summary[3],
            "TIME_WAIT 40    CLOSE_WAIT 2 now, 1 leaked"
        );
        assert_eq!(view.summary.len(), 4, "no loss warning");
        assert!(view.title.contains("watching for 4 s") && view.title.contains("sort: sockets"));
    }

    #[test]
    fn no_time_elapsed_gives_zero_rates_and_loss_is_warned() {
        let counters = Counters {
            opened: 5,
            events_lost: 3,
            softirqs_unobserved: 2,
            ..Counters::default()
        };
        let view = view(
            (Duration::from_secs(1), &Counters::default()),
            &sample(1, counters),
            SortKey::Sockets,
            Duration::from_secs(1),
        );
        assert!(view.summary[0].starts_with("connections/s: opened 0.0 "));
        assert!(view.summary[4].starts_with("warning: 3 kernel events lost"));
        assert!(view.summary[5].starts_with("warning: the kernel ran 2 softirqs without BPF"));
    }

    #[test]
    fn the_sort_key_cycles_and_orders_the_peers() {
        let s = sample(1, Counters::default());
        let column = |sort: SortKey, i: usize| -> Vec<String> {
            peer_rows(&s.peers, s.port_range, sort)
                .iter()
                .map(|row| row[i].clone())
                .collect()
        };
        assert_eq!(column(SortKey::Sockets, 3), ["50", "30", "10"]);
        assert_eq!(column(SortKey::Ratio, 4), ["3.00%", "1.00%", "-"]);
        assert_eq!(
            column(SortKey::Peer, 0),
            ["10.0.0.1", "10.0.0.5", "10.0.0.9"]
        );
        assert_eq!(column(SortKey::Sockets, 2), ["server", "client", "client"]);
        assert_eq!(SortKey::Sockets.next(), SortKey::Ratio);
        assert_eq!(SortKey::Ratio.next(), SortKey::Peer);
        assert_eq!(SortKey::Peer.next(), SortKey::Sockets);
        assert_eq!(header(SortKey::Peer)[0], "PEER*");
        assert_eq!(header(SortKey::Sockets)[3], "SOCKETS*");
        assert_eq!(header(SortKey::Ratio)[4], "PORTS USED*");
        assert_eq!(
            peer_rows(&s.peers, None, SortKey::Ratio)[0][4],
            "-",
            "no ratio without the port range"
        );
    }

    #[test]
    fn findings_are_worded_as_diagnose_words_them() {
        let mut s = sample(3, Counters::default());
        let quiet = view(
            (Duration::ZERO, &Counters::default()),
            &s,
            SortKey::Sockets,
            Duration::from_secs(1),
        );
        assert!(quiet.findings.is_empty());
        assert_eq!(
            quiet.headline,
            "No TCP problems seen in 3 s (0 connections opened, 0 closed)."
        );
        s.report = report(2);
        let noisy = view(
            (Duration::ZERO, &Counters::default()),
            &s,
            SortKey::Sockets,
            Duration::from_secs(1),
        );
        let finding = &s.report.findings[0];
        assert_eq!(noisy.findings.len(), 1);
        assert_eq!(
            noisy.findings[0].title,
            format!("[NOTICE] {}", finding.title)
        );
        assert_eq!(
            noisy.findings[0].measured,
            format!("measured: {}", finding.measured)
        );
        assert_eq!(noisy.findings[0].action, format!("do: {}", finding.action));
        assert_eq!(noisy.findings[0].details, finding.lines);
        assert!(
            noisy.findings[0]
                .details
                .iter()
                .any(|l| l.contains("received from 127.0.0.1")),
            "{:?}",
            noisy.findings[0].details
        );
        assert!(!noisy.findings[0].problem);
        assert!(
            noisy.headline.starts_with("TCP diagnosis over 3 s"),
            "{}",
            noisy.headline
        );
    }

    #[test]
    fn findings_are_wrapped_with_indented_continuations() {
        assert_eq!(
            wrap("one two three four", "  ", "    ", 10),
            ["  one two", "    three", "    four"]
        );
        assert_eq!(wrap("", "", "", 10), [""]);
        assert_eq!(
            wrap("averyverylongword x", "", "  ", 5),
            ["averyverylongword", "  x"]
        );
        let view = View {
            title: String::new(),
            summary: Vec::new(),
            peer_header: header(SortKey::Sockets),
            peers: Vec::new(),
            headline: "All quiet.".to_owned(),
            findings: vec![FindingLines {
                problem: true,
                title: "[PROBLEM] Something wrong".to_owned(),
                measured: "measured: 3 things".to_owned(),
                action: "do: fix it now".to_owned(),
                details: vec!["peer a: 3 more".to_owned()],
            }],
        };
        assert_eq!(
            view.finding_lines(16),
            [
                (false, "All quiet.".to_owned()),
                (true, "[PROBLEM]".to_owned()),
                (true, "          Something".to_owned()),
                (true, "          wrong".to_owned()),
                (false, "  measured: 3".to_owned()),
                (false, "    things".to_owned()),
                (false, "  do: fix it now".to_owned()),
                (false, "    peer a: 3".to_owned()),
                (false, "      more".to_owned()),
            ]
        );
    }

    #[test]
    fn the_waiting_screen_has_a_title_and_no_rows() {
        let view = waiting(Duration::from_secs(2));
        assert!(view.title.starts_with("tracer top - every 2 s"));
        assert!(view.peers.is_empty() && view.findings.is_empty());
    }
}
