//! Nagle + delayed ACK: small writes on this host that waited for an ACK the receiver held back,
//! per writer and per connection, with the time they lost.
use serde_json::json;

use crate::diagnose::render::{
    conn_json, extend, human_ns, ms, plural, proc_json, proc_label, sentence, tuple_label,
};
use crate::diagnose::tally::{Stalls, proc_key};
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_NAGLE};
use crate::export::events::NAGLE_FIX;

impl Diagnosis {
    pub(in crate::diagnose) fn nagle_finding(&self) -> Option<Finding> {
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
}

fn stalls_text(s: &Stalls) -> String {
    format!(
        "{}, {} lost",
        plural(s.stalls, "stall", "stalls"),
        human_ns(s.lost_ns)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::test_support::{Run, stalls, sysctls};
    use crate::diagnose::{DiagnoseConfig, TOPIC_DELAYED_ACK};

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
}
