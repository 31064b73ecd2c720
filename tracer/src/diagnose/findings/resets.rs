//! Resets: RSTs this host sent, by the kernel's reason, and RSTs received, by peer, with what
//! the most common reason means.
use serde_json::json;

use crate::diagnose::advice::{reason_action, reason_explanation};
use crate::diagnose::render::{grouped, plural};
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_RESETS};

/// RSTs (sent and received) from which resets are a problem rather than a notice.
pub const RESETS_PROBLEM: u64 = 100;

impl Diagnosis {
    pub(in crate::diagnose) fn reset_finding(&self) -> Option<Finding> {
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

    /// The kernel's name for a RST reason code (from its BTF), or the bare code.
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

#[cfg(test)]
mod tests {
    use tracer_core::model::ResetDirection;
    use tracer_core::testkit::tuple;

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{Run, ip, reset, sysctls};

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
}
