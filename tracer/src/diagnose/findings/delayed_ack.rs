//! Delayed ACKs this host sent while no stall was seen: a notice, per receiving process and per
//! connection, with how long the ACKs were held.
use serde_json::json;

use crate::diagnose::render::{
    conn_json, extend, grouped, human_ns, ms, plural, proc_json, proc_label, tuple_label,
};
use crate::diagnose::tally::{DelayedAcks, proc_key};
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_DELAYED_ACK};

/// Delayed ACKs from which they are worth a notice (when no stall explains them already).
pub const DELAYED_ACK_NOTICE: u64 = 10;

impl Diagnosis {
    pub(in crate::diagnose) fn delayed_ack_finding(&self) -> Option<Finding> {
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

#[cfg(test)]
mod tests {
    use tracer_core::model::{Event, TcpState::*};
    use tracer_core::testkit::{MS, NETNS, state, task, tuple};

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{Run, SERVER, ip, sysctls};

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
                netns: NETNS,
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
}
