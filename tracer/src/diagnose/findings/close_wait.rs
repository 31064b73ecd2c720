//! CLOSE_WAIT leaks: sockets the peer closed but the application did not, per owning process,
//! oldest first; owners the events could not name are looked up at report time.
use std::collections::HashMap;

use serde_json::json;
use tracer_core::model::{Owner, Tuple};
use tracer_core::record::CloseWaitLeak;
use tracer_core::tracker::Tracker;

use crate::diagnose::render::{
    conn_json, extend, grouped, human_ns, plural, proc_json, proc_label, secs, sentence,
    tuple_label,
};
use crate::diagnose::tally::{Capped, proc_key};
use crate::diagnose::{ConnKey, Diagnosis, Finding, ProcKey, Severity, TOPIC_CLOSE_WAIT};
use crate::export::events::CLOSE_WAIT_FIX;

/// Leaked CLOSE_WAIT sockets whose unknown owner is looked up in /proc at report time, at most
/// (each lookup walks every process).
pub const MAX_OWNER_LOOKUPS: usize = 16;

impl Diagnosis {
    pub(in crate::diagnose) fn close_wait_finding(
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
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tracer_core::model::{Comm, SockId, TcpState::*};
    use tracer_core::testkit::{SEC, state, task, tuple};
    use tracer_core::tracker::TrackerConfig;

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{CLIENT, Run, context, ip, sysctls};

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
}
