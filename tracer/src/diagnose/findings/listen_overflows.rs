//! Listen-queue overflows: an application that accepts too slowly. The kernel counts the
//! connection attempts it dropped because a listener's accept queue was full
//! (`TcpExtListenOverflows`, and per listener `sk_drops`); two readings of every namespace's
//! listeners, at the start and the end of the run, say which ports dropped during it. The
//! process holding each is looked up in /proc by the caller (`app::diagnose`).
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::json;
use tracer_core::model::Owner;

use crate::diagnose::render::{grouped, plural, proc_json, proc_label};
use crate::diagnose::tally::proc_key;
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_LISTEN_OVERFLOWS};
use crate::host::listeners::NamespaceListeners;

/// A listener that dropped connection attempts during the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverflowingListener {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket file's inode, to find its owner.
    pub inode: u32,
    /// `sk_drops` growth during the run.
    pub drops: u64,
    /// `sk_drops` since the listener opened (`ss -tlnm` `d<N>`).
    pub drops_total: u64,
    /// Accept queue at the end of the run: waiting connections and the limit (the backlog
    /// given to listen(), capped by somaxconn).
    pub queue_length: u32,
    pub backlog: u32,
    /// `net.core.somaxconn` in the listener's namespace.
    pub somaxconn: Option<u32>,
    pub owner: Option<Owner>,
}

/// What the two readings showed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenOverflows {
    /// `TcpExtListenOverflows` growth during the run, summed over the namespaces read both
    /// times.
    pub overflows: u64,
    /// Listeners whose drops grew, most first.
    pub listeners: Vec<OverflowingListener>,
}

impl ListenOverflows {
    /// Compares the readings taken at the start and at the end of a run. A listener opened
    /// during the run counts all its drops; one closed meanwhile is not seen.
    pub fn between(before: &[NamespaceListeners], after: &[NamespaceListeners]) -> Self {
        let earlier_ns: HashMap<u32, u64> = before
            .iter()
            .filter_map(|ns| Some((ns.netns, ns.listen_overflows?)))
            .collect();
        let earlier: HashMap<(u32, u64), u64> = before
            .iter()
            .flat_map(|ns| &ns.listeners)
            .filter_map(|l| Some(((l.netns, l.cookie), u64::from(l.drops?))))
            .collect();
        let mut overflows = 0;
        let mut listeners = Vec::new();
        for ns in after {
            if let (Some(now), Some(then)) = (ns.listen_overflows, earlier_ns.get(&ns.netns)) {
                overflows += now.saturating_sub(*then);
            }
            for l in &ns.listeners {
                let Some(total) = l.drops.map(u64::from) else {
                    continue;
                };
                let drops =
                    total.saturating_sub(earlier.get(&(l.netns, l.cookie)).copied().unwrap_or(0));
                if drops > 0 {
                    listeners.push(OverflowingListener {
                        netns: l.netns,
                        addr: l.addr,
                        port: l.port,
                        inode: l.inode,
                        drops,
                        drops_total: total,
                        queue_length: l.queue_length,
                        backlog: l.queue_limit,
                        somaxconn: ns.somaxconn,
                        owner: None,
                    });
                }
            }
        }
        listeners.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.port.cmp(&b.port)));
        ListenOverflows {
            overflows,
            listeners,
        }
    }
}

impl Diagnosis {
    pub(in crate::diagnose) fn listen_overflow_finding(&self) -> Option<Finding> {
        let seen = &self.listen;
        let dropped: u64 = seen.listeners.iter().map(|l| l.drops).sum();
        if seen.overflows == 0 && dropped == 0 {
            return None;
        }
        let top = &seen.listeners[..seen.listeners.len().min(self.config.top)];
        let name = |l: &OverflowingListener| match l.owner {
            Some(owner) => format!("port {} of {}", l.port, proc_label(&proc_key(Some(owner)))),
            None => format!("port {} (process not found)", l.port),
        };
        let title = match top.first() {
            Some(worst) => format!(
                "An application accepts too slowly: {} dropped by {}",
                plural(worst.drops, "connection attempt", "connection attempts"),
                name(worst)
            ),
            None => format!(
                "Listen queues overflowed: {} dropped",
                plural(seen.overflows, "connection attempt", "connection attempts")
            ),
        };
        let mut measured = format!(
            "{} dropped because a listener's accept queue was full (TcpExtListenOverflows, all \
             network namespaces).",
            plural(
                seen.overflows,
                "connection attempt was",
                "connection attempts were"
            )
        );
        if let Some(worst) = top.first() {
            measured.push_str(&format!(
                " Port {} dropped {} during the run; its accept queue holds {} with a backlog \
                 of {} (net.core.somaxconn {}).",
                worst.port,
                grouped(worst.drops),
                grouped(u64::from(worst.queue_length)),
                grouped(u64::from(worst.backlog)),
                worst
                    .somaxconn
                    .map_or_else(|| "unknown".to_owned(), |n| grouped(u64::from(n)))
            ));
        }
        let why = "When a listener's accept queue is full the kernel drops new connection \
                   attempts without a word: clients resend their SYN after 1 s, then 3 s, 7 s..., \
                   so connecting takes seconds or times out although the service is up. The \
                   application calls accept() more slowly than connections arrive, or its \
                   backlog is too small for the bursts it gets."
            .to_owned();
        let mut action = "Accept faster: more accepting threads or worker processes, and less \
                          work between two accept() calls. "
            .to_owned();
        let worst = top.first();
        match (worst.map(|l| l.backlog), worst.and_then(|l| l.somaxconn)) {
            // The application asked for less than the kernel allows.
            (Some(backlog), Some(somaxconn)) if backlog < somaxconn => action.push_str(&format!(
                "Raise the backlog the application passes to listen() ({}; its configuration, \
                 e.g. nginx `listen ... backlog=`): net.core.somaxconn allows up to {}. Then \
                 restart the service so that it listens again.",
                grouped(u64::from(backlog)),
                grouped(u64::from(somaxconn))
            )),
            // somaxconn caps the backlog (or it is unknown): raise both.
            (_, somaxconn) => action.push_str(&format!(
                "Raise net.core.somaxconn, which caps every backlog (`sysctl -w \
                 net.core.somaxconn={}`, in the listener's network namespace), and the backlog \
                 the application passes to listen() (its configuration, e.g. nginx \
                 `listen ... backlog=`), then restart the service so that it listens again.",
                somaxconn.map_or(4096, |n| n.saturating_mul(2).max(4096))
            )),
        }
        let mut lines = Vec::new();
        let mut rows = Vec::new();
        for l in top {
            let somaxconn = l
                .somaxconn
                .map_or_else(|| "unknown".to_owned(), |n| grouped(u64::from(n)));
            let owner = l.owner.map_or_else(
                || "process not found".to_owned(),
                |o| proc_label(&proc_key(Some(o))),
            );
            lines.push(format!(
                "{} ({owner}, netns {}): {} dropped during the run, {} since it opened; accept \
                 queue {} / backlog {}; net.core.somaxconn {somaxconn}",
                SocketAddr::new(l.addr, l.port),
                l.netns,
                grouped(l.drops),
                grouped(l.drops_total),
                grouped(u64::from(l.queue_length)),
                grouped(u64::from(l.backlog)),
            ));
            rows.push(json!({
                "port": l.port,
                "address": l.addr.to_string(),
                "netns": l.netns,
                "process": proc_json(&proc_key(l.owner)),
                "drops": l.drops,
                "drops_since_open": l.drops_total,
                "queue_length": l.queue_length,
                "backlog": l.backlog,
                "somaxconn": l.somaxconn,
            }));
        }
        if seen.listeners.len() > top.len() {
            let rest = &seen.listeners[top.len()..];
            lines.push(format!(
                "{} more listeners: {} dropped",
                rest.len(),
                grouped(rest.iter().map(|l| l.drops).sum())
            ));
        }
        Some(Finding {
            topic: TOPIC_LISTEN_OVERFLOWS,
            severity: Severity::Problem,
            title,
            measured,
            why,
            action,
            details: json!({
                "overflows": seen.overflows,
                "listeners": rows,
                "listeners_dropping": seen.listeners.len(),
            }),
            lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tracer_core::model::Comm;

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{Run, sysctls};
    use crate::host::listeners::Listener;

    fn listener(port: u16, cookie: u64, drops: u32, queue: u32) -> Listener {
        Listener {
            netns: 7,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            inode: 500,
            cookie,
            queue_length: queue,
            queue_limit: 1,
            drops: Some(drops),
        }
    }

    fn reading(overflows: u64, listeners: Vec<Listener>) -> Vec<NamespaceListeners> {
        vec![NamespaceListeners {
            netns: 7,
            listen_overflows: Some(overflows),
            somaxconn: Some(4096),
            listeners,
        }]
    }

    #[test]
    fn growth_between_two_readings() {
        let before = reading(10, vec![listener(8080, 1, 10, 0), listener(22, 2, 0, 0)]);
        let after = reading(
            58,
            vec![
                listener(8080, 1, 58, 2),
                listener(22, 2, 0, 0),
                // Opened during the run.
                listener(9090, 3, 3, 1),
            ],
        );
        let seen = ListenOverflows::between(&before, &after);
        assert_eq!(seen.overflows, 48);
        let ports: Vec<(u16, u64, u64)> = seen
            .listeners
            .iter()
            .map(|l| (l.port, l.drops, l.drops_total))
            .collect();
        assert_eq!(ports, vec![(8080, 48, 58), (9090, 3, 3)]);
    }

    #[test]
    fn names_port_process_backlog_and_somaxconn() {
        let mut run = Run::new(DiagnoseConfig::default());
        let mut seen = ListenOverflows::between(
            &reading(0, vec![listener(8080, 1, 0, 0)]),
            &reading(48, vec![listener(8080, 1, 48, 2)]),
        );
        seen.listeners[0].owner = Some(Owner {
            pid: 4242,
            comm: Comm::from("slow-server"),
        });
        run.diagnosis.set_listen_overflows(seen);
        let report = run.report(sysctls());
        let f = report
            .finding(TOPIC_LISTEN_OVERFLOWS)
            .expect("listen overflow finding");
        assert_eq!(f.severity, Severity::Problem);
        assert!(f.title.contains("port 8080"), "{}", f.title);
        assert!(f.title.contains("slow-server (pid 4242)"), "{}", f.title);
        assert!(f.measured.contains("backlog of 1"), "{}", f.measured);
        assert!(
            f.measured.contains("somaxconn 4\u{a0}096"),
            "{}",
            f.measured
        );
        assert!(
            f.action.contains("listen() (1;") && f.action.contains("allows up to 4\u{a0}096"),
            "{}",
            f.action
        );
        assert_eq!(f.details["overflows"], 48);
        assert_eq!(f.details["listeners"][0]["port"], 8080);
        assert_eq!(f.details["listeners"][0]["process"]["pid"], 4242);
        assert_eq!(f.details["listeners"][0]["backlog"], 1);
        assert_eq!(f.details["listeners"][0]["somaxconn"], 4096);
        let text = report.to_string();
        assert!(
            text.contains("[PROBLEM] An application accepts too slowly"),
            "{text}"
        );
    }

    #[test]
    fn nothing_dropped_no_finding() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.diagnosis.set_listen_overflows(ListenOverflows::between(
            &reading(5, vec![listener(8080, 1, 5, 0)]),
            &reading(5, vec![listener(8080, 1, 5, 0)]),
        ));
        let report = run.report(sysctls());
        assert!(report.finding(TOPIC_LISTEN_OVERFLOWS).is_none());
    }

    #[test]
    fn a_backlog_capped_by_somaxconn_asks_to_raise_both() {
        let mut run = Run::new(DiagnoseConfig::default());
        let capped = |drops| Listener {
            queue_limit: 4096,
            ..listener(443, 1, drops, 4097)
        };
        run.diagnosis.set_listen_overflows(ListenOverflows::between(
            &reading(0, vec![capped(0)]),
            &reading(9, vec![capped(9)]),
        ));
        let report = run.report(sysctls());
        let f = report.finding(TOPIC_LISTEN_OVERFLOWS).expect("finding");
        assert!(
            f.title.contains("port 443 (process not found)"),
            "{}",
            f.title
        );
        assert!(
            f.action.contains("sysctl -w net.core.somaxconn=8192"),
            "{}",
            f.action
        );
    }
}
