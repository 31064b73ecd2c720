//! Retransmissions: segments sent again, per peer and per kind; a problem when timeouts and
//! unanswered handshakes dominate.
use serde_json::{Value, json};
use tracer_core::model::RetransmitKind;

use crate::diagnose::advice::{kind_explanation, kind_label};
use crate::diagnose::render::{extend, grouped, percent, plural, sentence};
use crate::diagnose::tally::{KINDS, kind_index};
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_RETRANSMISSIONS};

impl Diagnosis {
    pub(in crate::diagnose) fn retransmit_finding(&self) -> Option<Finding> {
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

fn kinds_json(kinds: &[u64; KINDS]) -> Value {
    Value::Object(
        RetransmitKind::ALL
            .iter()
            .zip(kinds)
            .map(|(kind, n)| (kind.as_str().to_owned(), json!(n)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use tracer_core::testkit::{retransmit, tuple};

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{Run, ip, sysctls};

    #[test]
    fn retransmits_aggregate_per_peer_and_kind() {
        let a = tuple(ip(1), 40000, ip(2), 443);
        let a2 = tuple(ip(1), 40001, ip(2), 443);
        let b = tuple(ip(1), 40002, ip(3), 80);
        let mut run = Run::new(DiagnoseConfig::default());
        run.feed(&[
            retransmit(1, 0x10, a, RetransmitKind::Fast, 10),
            retransmit(1, 0x11, a2, RetransmitKind::Fast, 5),
            retransmit(1, 0x10, a, RetransmitKind::Timeout, 1),
            retransmit(1, 0x12, b, RetransmitKind::Syn, 2),
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
        run.feed(&[retransmit(1, 0x10, a, RetransmitKind::Timeout, 40)]);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_RETRANSMISSIONS).expect("finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.why.contains("retransmission timeout"), "{}", f.why);
    }
}
