//! Slow peers: per remote address, the RTT its connections had at close and the share of
//! their segments sent again, from what each connection cost (read from the kernel's socket
//! at close). Only peers past a threshold are shown, worst first, top-N plus the rest.
use std::net::IpAddr;

use serde_json::{Value, json};
use tracer_core::record::Connection;

use crate::diagnose::render::{extend, grouped, human_ns, ms, plural};
use crate::diagnose::tally::Tally;
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_SLOW_PEERS};

/// A peer whose connections' mean smoothed RTT at close reaches this is slow.
pub const SLOW_PEER_RTT_NS: u64 = 100_000_000;
/// A peer with at least this share of its segments retransmitted is lossy...
pub const SLOW_PEER_RETRANSMIT_SHARE: f64 = 0.01;
/// ...once this many segments were sent to it (a handful of segments says nothing).
pub const SLOW_PEER_MIN_SEGMENTS: u64 = 100;
/// A share from which loss is a problem rather than a notice: TCP throughput falls with the
/// square root of the loss rate, so a few per cent cuts a connection to a fraction.
pub const SLOW_PEER_PROBLEM_SHARE: f64 = 0.05;

/// What the connections to one peer cost, summed at their close.
#[derive(Clone, Copy, Debug, Default)]
pub(in crate::diagnose) struct PeerCost {
    conns: u64,
    /// Connections with an RTT sample, and the sum of their smoothed RTTs.
    rtt_conns: u64,
    srtt_sum_ns: u64,
    srtt_max_ns: u64,
    /// The smallest minimum RTT seen (0: none).
    min_rtt_ns: u64,
    segs_out: u64,
    retransmits: u64,
}

impl PeerCost {
    pub(in crate::diagnose) fn add(&mut self, conn: &Connection) {
        let Some(cost) = conn.cost.as_deref() else {
            return;
        };
        self.conns += 1;
        if cost.srtt_ns > 0 {
            self.rtt_conns += 1;
            self.srtt_sum_ns = self.srtt_sum_ns.saturating_add(cost.srtt_ns);
            self.srtt_max_ns = self.srtt_max_ns.max(cost.srtt_ns);
        }
        if cost.min_rtt_ns > 0 && (self.min_rtt_ns == 0 || cost.min_rtt_ns < self.min_rtt_ns) {
            self.min_rtt_ns = cost.min_rtt_ns;
        }
        self.segs_out = self.segs_out.saturating_add(u64::from(cost.segs_out));
        self.retransmits = self
            .retransmits
            .saturating_add(u64::from(cost.total_retrans));
    }

    fn mean_srtt_ns(&self) -> Option<u64> {
        (self.rtt_conns > 0).then(|| self.srtt_sum_ns / self.rtt_conns)
    }

    fn share(&self) -> f64 {
        if self.segs_out == 0 {
            0.0
        } else {
            self.retransmits as f64 / self.segs_out as f64
        }
    }

    fn lossy(&self) -> bool {
        self.segs_out >= SLOW_PEER_MIN_SEGMENTS && self.share() >= SLOW_PEER_RETRANSMIT_SHARE
    }

    fn slow(&self) -> bool {
        self.mean_srtt_ns().is_some_and(|ns| ns >= SLOW_PEER_RTT_NS)
    }

    fn text(&self) -> String {
        let mut parts = vec![plural(self.conns, "connection", "connections")];
        if let Some(mean) = self.mean_srtt_ns() {
            parts.push(format!(
                "RTT {} mean, {} max, {} min",
                human_ns(mean),
                human_ns(self.srtt_max_ns),
                human_ns(self.min_rtt_ns)
            ));
        }
        parts.push(format!(
            "{} of {} retransmitted ({})",
            grouped(self.retransmits),
            plural(self.segs_out, "segment", "segments"),
            pct(self.share())
        ));
        parts.join(", ")
    }

    fn json(&self) -> Value {
        json!({
            "connections": self.conns,
            "srtt_mean_ms": self.mean_srtt_ns().map(ms),
            "srtt_max_ms": ms(self.srtt_max_ns),
            "min_rtt_ms": (self.min_rtt_ns > 0).then(|| ms(self.min_rtt_ns)),
            "segments_out": self.segs_out,
            "retransmitted": self.retransmits,
            "retransmit_share": self.share(),
        })
    }
}

impl Tally for PeerCost {
    fn merge(&mut self, o: &Self) {
        self.conns += o.conns;
        self.rtt_conns += o.rtt_conns;
        self.srtt_sum_ns = self.srtt_sum_ns.saturating_add(o.srtt_sum_ns);
        self.srtt_max_ns = self.srtt_max_ns.max(o.srtt_max_ns);
        if o.min_rtt_ns > 0 && (self.min_rtt_ns == 0 || o.min_rtt_ns < self.min_rtt_ns) {
            self.min_rtt_ns = o.min_rtt_ns;
        }
        self.segs_out = self.segs_out.saturating_add(o.segs_out);
        self.retransmits = self.retransmits.saturating_add(o.retransmits);
    }
    fn weight(&self) -> u64 {
        self.retransmits
    }
}

impl Diagnosis {
    pub(in crate::diagnose) fn slow_peer_finding(&self) -> Option<Finding> {
        let mut bad: Vec<(&IpAddr, &PeerCost)> = self
            .peer_costs
            .map
            .iter()
            .filter(|(_, p)| p.lossy() || p.slow())
            .collect();
        if bad.is_empty() {
            return None;
        }
        // Worst first: the loss share, then the RTT.
        bad.sort_by(|a, b| {
            b.1.share()
                .total_cmp(&a.1.share())
                .then(b.1.mean_srtt_ns().cmp(&a.1.mean_srtt_ns()))
                .then(a.0.cmp(b.0))
        });
        let problem = bad
            .iter()
            .any(|(_, p)| p.lossy() && p.share() >= SLOW_PEER_PROBLEM_SHARE);
        let n_bad = bad.len() as u64;
        let rest = bad.split_off(self.config.top.min(bad.len()));
        let mut other = PeerCost::default();
        for (_, p) in &rest {
            other.merge(p);
        }
        let (worst_ip, worst) = bad[0];
        let title = format!(
            "Slow or lossy peers: {} (worst {worst_ip}: {} retransmitted{})",
            grouped(n_bad),
            pct(worst.share()),
            worst
                .mean_srtt_ns()
                .map(|ns| format!(", RTT {}", human_ns(ns)))
                .unwrap_or_default()
        );
        let measured = format!(
            "Of the peers of {} closed with their cost known, {} had a mean RTT of at least \
             {} or at least {} of their segments retransmitted.",
            plural(self.costed_conns, "connection", "connections"),
            plural(n_bad, "peer", "peers"),
            human_ns(SLOW_PEER_RTT_NS),
            pct(SLOW_PEER_RETRANSMIT_SHARE)
        );
        let why = "A long RTT makes every request wait; lost segments make TCP wait for a \
                   retransmission and halve its sending rate: throughput to a peer falls \
                   with its loss rate and RTT."
            .to_owned();
        let action = "Look at the path to these peers: `mtr <peer>` for where loss and delay \
                      start, `ss -ti dst <peer>` for live connections (rtt, retrans, cwnd), \
                      NIC and queue drops with `ip -s link` and `tc -s qdisc`. A peer far away \
                      by RTT but without loss needs larger windows (tcp_rmem / tcp_wmem) or \
                      fewer round trips, not a fix of the network."
            .to_owned();
        let mut lines: Vec<String> = bad
            .iter()
            .map(|(peer, p)| format!("{peer}: {}", p.text()))
            .collect();
        if !rest.is_empty() {
            lines.push(format!(
                "{} other slow peers: {}",
                grouped(rest.len() as u64),
                other.text()
            ));
        }
        let top: Vec<Value> = bad
            .iter()
            .map(|(peer, p)| {
                let mut row = json!({"peer": peer});
                extend(&mut row, p.json());
                row
            })
            .collect();
        let details = json!({
            "slow_peers": n_bad,
            "thresholds": {
                "srtt_ms": ms(SLOW_PEER_RTT_NS),
                "retransmit_share": SLOW_PEER_RETRANSMIT_SHARE,
                "min_segments": SLOW_PEER_MIN_SEGMENTS,
            },
            "peers": {
                "top": top,
                "other": if rest.is_empty() { Value::Null } else {
                    let mut o = other.json();
                    extend(&mut o, json!({"keys": rest.len()}));
                    o
                },
            },
            "peers_past_the_limit": self.peer_costs.folded_events,
        });
        Some(Finding {
            topic: TOPIC_SLOW_PEERS,
            severity: if problem {
                Severity::Problem
            } else {
                Severity::Notice
            },
            title,
            measured,
            why,
            action,
            details,
            lines,
        })
    }
}

/// A share with one decimal: retransmit shares of a few per cent need it.
fn pct(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

#[cfg(test)]
mod tests {
    use tracer_core::model::{ConnectionCost, Event};
    use tracer_core::testkit::task;

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{CLIENT, Run, ip, short_connection, sysctls};

    /// A client connection to 10.0.0.2 that closes with `cost`.
    fn costed(sock: u64, sport: u16, cost: ConnectionCost) -> Vec<Event> {
        let mut events = short_connection(0, sock, sport, task(5, "curl"), None);
        let close = events.pop().expect("close");
        events.push(Event::SocketInfo {
            ts_ns: 3,
            sock,
            cgroup: 0,
            cost: Some(cost),
        });
        events.push(close);
        events
    }

    #[test]
    fn a_lossy_peer_is_named_with_its_rtt_and_share() {
        let mut run = Run::new(DiagnoseConfig::default());
        let lossy = ConnectionCost {
            segs_out: 1_000,
            total_retrans: 60,
            srtt_ns: 2_000_000,
            min_rtt_ns: 1_000_000,
            ..ConnectionCost::default()
        };
        run.feed(&costed(CLIENT, 40000, lossy));
        run.feed(&costed(CLIENT + 1, 40001, lossy));
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_SLOW_PEERS).expect("finding");
        assert_eq!(f.severity, Severity::Problem, "6 % lost");
        let row = &f.details["peers"]["top"][0];
        assert_eq!(row["peer"], "10.0.0.2");
        assert_eq!(row["connections"], 2);
        assert_eq!(row["retransmitted"], 120);
        assert_eq!(row["srtt_mean_ms"], 2.0);
        assert!(
            f.title.contains("10.0.0.2: 6.0% retransmitted"),
            "{}",
            f.title
        );
        assert!(report.to_string().contains("10.0.0.2: 2 connections"));
    }

    #[test]
    fn a_fast_clean_peer_is_not_a_finding() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&costed(
            CLIENT,
            40000,
            ConnectionCost {
                segs_out: 10_000,
                total_retrans: 5,
                srtt_ns: 50_000,
                ..ConnectionCost::default()
            },
        ));
        let _ = ip(2);
        assert!(run.report(sysctls()).finding(TOPIC_SLOW_PEERS).is_none());
    }
}
