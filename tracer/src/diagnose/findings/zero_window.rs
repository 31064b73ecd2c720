//! Zero-window stalls: connections whose sender was held back by the peer's receive window
//! (the kernel's rwnd-limited time, read at close): the receiving application reads too slowly,
//! or its receive buffer is too small for the path. Per connection, worst first.
use serde_json::json;
use tracer_core::record::Connection;

use crate::diagnose::render::{
    conn_json, extend, grouped, human_ns, ms, plural, proc_json, proc_label, tuple_label,
};
use crate::diagnose::tally::{Tally, proc_key};
use crate::diagnose::{Diagnosis, Finding, ProcKey, Severity, TOPIC_ZERO_WINDOW};

/// A connection held back for at least this share of its life makes stalls a problem...
pub const ZERO_WINDOW_PROBLEM_SHARE: f64 = 0.2;
/// ...when it was held at least this long in all.
pub const ZERO_WINDOW_PROBLEM_NS: u64 = 100_000_000;

/// Time a connection's sender was held by the peer's window, and its life.
#[derive(Clone, Copy, Debug, Default)]
pub(in crate::diagnose) struct WindowStall {
    conns: u64,
    /// In jiffies, as the kernel counts.
    jiffies: u64,
    life_ns: u64,
    sender: ProcKey,
}

impl WindowStall {
    /// Counts `conn` when its sender was window-limited at all.
    pub(in crate::diagnose) fn of(conn: &Connection) -> Option<WindowStall> {
        let cost = conn.cost.as_deref()?;
        (cost.rwnd_limited_jiffies > 0).then(|| WindowStall {
            conns: 1,
            jiffies: u64::from(cost.rwnd_limited_jiffies),
            life_ns: conn.duration_ns().unwrap_or(0),
            sender: proc_key(conn.owner),
        })
    }
}

impl Tally for WindowStall {
    fn merge(&mut self, o: &Self) {
        self.conns += o.conns;
        self.jiffies = self.jiffies.saturating_add(o.jiffies);
        self.life_ns = self.life_ns.saturating_add(o.life_ns);
        self.sender = self.sender.or(o.sender);
    }
    fn weight(&self) -> u64 {
        self.jiffies
    }
}

impl Diagnosis {
    pub(in crate::diagnose) fn zero_window_finding(&self) -> Option<Finding> {
        let total = self.window_total;
        if total.conns == 0 {
            return None;
        }
        let jiffy = self.jiffy_ns;
        // Durations need HZ; without it the kernel's jiffies are shown as they are.
        let held = |w: &WindowStall| match jiffy {
            Some(j) => human_ns(w.jiffies.saturating_mul(j)),
            None => format!("{} jiffies", grouped(w.jiffies)),
        };
        let held_ms = |w: &WindowStall| jiffy.map(|j| ms(w.jiffies.saturating_mul(j)));
        let conns = self.window_conns.ranked(self.config.top);
        let problem = jiffy.is_some_and(|j| {
            self.window_conns.map.values().any(|w| {
                let ns = w.jiffies.saturating_mul(j);
                ns >= ZERO_WINDOW_PROBLEM_NS
                    && w.life_ns > 0
                    && ns as f64 >= ZERO_WINDOW_PROBLEM_SHARE * w.life_ns as f64
            })
        });
        let measured = format!(
            "{} closed after their sender waited {} in all for the peer's receive window to \
             open.",
            plural(total.conns, "connection", "connections"),
            held(&total)
        );
        let why = "The peer advertised a zero (or too small) receive window: its application \
                   does not read the socket as fast as data arrives, or its receive buffer is \
                   too small for the bandwidth and RTT. The sender can only wait, and \
                   the peer's application sees the data late."
            .to_owned();
        let action = "On the receiving side (the peer of each connection below): find why the \
                      process reads slowly (blocked on a disk, a lock, a slow consumer \
                      downstream); `ss -tm` there shows a full Recv-Q. If it keeps up but the \
                      path is long, raise net.ipv4.tcp_rmem's maximum."
            .to_owned();
        let mut lines = Vec::new();
        for ((_, tuple), w) in &conns.top {
            lines.push(format!(
                "{} sending on {}: held {} of its {} (the receiver is behind {}:{})",
                proc_label(&w.sender),
                tuple_label(tuple),
                held(w),
                human_ns(w.life_ns),
                tuple.dst,
                tuple.dport,
            ));
        }
        if conns.has_other() {
            lines.push(format!(
                "{}: held {}",
                conns.other_label("connections"),
                held(&conns.other)
            ));
        }
        let details = json!({
            "connections": total.conns,
            "held_ms": held_ms(&total),
            "held_jiffies": total.jiffies,
            "connections_by_time": conns.json(
                |(netns, tuple), w| {
                    let mut row = conn_json(*netns, tuple);
                    extend(&mut row, json!({
                        "sender": proc_json(&w.sender),
                        "held_ms": held_ms(w),
                        "held_jiffies": w.jiffies,
                        "life_ms": ms(w.life_ns),
                    }));
                    row
                },
                |w| json!({"connections": w.conns, "held_ms": held_ms(w)}),
            ),
        });
        Some(Finding {
            topic: TOPIC_ZERO_WINDOW,
            severity: if problem {
                Severity::Problem
            } else {
                Severity::Notice
            },
            title: format!(
                "Receivers too slow: {} held back by a zero window for {}",
                plural(total.conns, "connection", "connections"),
                held(&total)
            ),
            measured,
            why,
            action,
            details,
            lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use tracer_core::model::{ConnectionCost, Event};
    use tracer_core::testkit::task;

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{CLIENT, Run, short_connection, sysctls};

    #[test]
    fn a_window_limited_sender_is_named_with_its_peer() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.diagnosis.set_jiffy_ns(Some(4_000_000));
        let mut events = short_connection(0, CLIENT, 40000, task(5, "writer"), None);
        let close = events.pop().expect("close");
        events.push(Event::SocketInfo {
            ts_ns: 3,
            sock: CLIENT,
            cgroup: 0,
            cost: Some(ConnectionCost {
                rwnd_limited_jiffies: 250,
                ..ConnectionCost::default()
            }),
        });
        events.push(close);
        run.feed(&events);
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_ZERO_WINDOW).expect("finding");
        assert_eq!(f.details["connections"], 1);
        assert_eq!(f.details["held_ms"], 1000.0);
        let row = &f.details["connections_by_time"]["top"][0];
        assert_eq!(row["sender"]["comm"], "writer");
        assert!(
            f.title
                .contains("1 connection held back by a zero window for 1 s"),
            "{}",
            f.title
        );
        assert!(report.to_string().contains("writer"), "{report}");
    }
}
