//! TIME_WAIT: how many sockets wait, toward which peers, who closed first, and whether the local
//! ports or the kernel's timewait buckets run out.
use std::net::SocketAddr;

use serde_json::{Value, json};
use tracer_core::record::TimeWaitExit;
use tracer_core::tracker::Tracker;

use crate::diagnose::advice::{exit_label, settings_text};
use crate::diagnose::render::{grouped, percent, plural, proc_json, proc_label};
use crate::diagnose::{Diagnosis, Finding, Severity, TOPIC_TIME_WAIT};
use crate::kernel::system::TcpSysctls;

/// TIME_WAIT sockets from which a notice is given even when no limit is near.
pub const TIME_WAIT_NOTICE: usize = 1_000;
/// Share of `net.ipv4.tcp_max_tw_buckets` in use from which TIME_WAIT is a problem.
pub const TIME_WAIT_BUCKETS_WARNING: f64 = 0.8;

impl Diagnosis {
    pub(in crate::diagnose) fn time_wait_finding(
        &self,
        tracker: &Tracker,
        sysctls: &TcpSysctls,
    ) -> Option<Finding> {
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
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tracer_core::model::{Event, SockId, TcpState::TimeWait, TimerPhase::Start};
    use tracer_core::testkit::{task, time_wait, tuple};

    use super::*;
    use crate::diagnose::DiagnoseConfig;
    use crate::diagnose::test_support::{CLIENT, Run, ip, short_connection, sysctls};

    #[test]
    fn time_wait_toward_one_peer_with_a_small_port_range_is_a_problem() {
        let mut run = Run::new(DiagnoseConfig::default());
        run.tracker
            .time_wait_mut()
            .set_ephemeral_ports((40000, 40099));
        let mut events = Vec::new();
        for i in 0..79u16 {
            let t = tuple(ip(1), 40000 + i, ip(2), 80);
            events.push(time_wait(
                u64::from(i),
                0xa000 + SockId::from(i),
                t,
                TimeWait,
                Start,
            ));
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
        events.push(time_wait(
            200,
            0xc000,
            tuple(ip(1), 8080, ip(7), 50000),
            TimeWait,
            Start,
        ));
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
                    TimeWait,
                    Start,
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
                time_wait(2, 0x10_0000 + SockId::from(i), t, TimeWait, Start)
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
                    TimeWait,
                    Start,
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
}
