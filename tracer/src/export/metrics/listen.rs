//! Listen-queue overflows: host-wide from `TcpExtListenOverflows`, and per listening port from
//! each listener's `sk_drops` (top N ports, the rest under port="other"), with the accept-queue
//! fill of those ports. Fed from sock_diag snapshots (`host::listeners`), never per event.
//!
//! Counters stay monotonic although the kernel's values come and go with their namespaces and
//! sockets: each namespace and each listener socket is remembered with the value last read, and
//! only growth is added (a namespace or socket seen for the first time adds all it has counted,
//! so the totals match the kernel's: `TcpExtListenOverflows` summed over namespaces, `ss -tlnm`
//! `d<N>` summed over a port's listeners).
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::host::listeners::NamespaceListeners;

/// Label value for the listening ports outside the top N.
pub const OTHER_PORT: &str = "other";

/// Namespaces and listener sockets remembered at most; past it new ones are counted from the
/// value first read (they are not lost, only their past before that read is).
const MAX_REMEMBERED: usize = 1 << 20;

pub struct ListenMetrics {
    overflows: IntCounter,
    by_listener: IntCounterVec,
    queue_length: IntGaugeVec,
    queue_limit: IntGaugeVec,
    state: Mutex<Accounts>,
}

/// What a port's listeners add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortFill {
    pub port: u16,
    /// `sk_drops` of the port's listeners since each opened, those closed since included.
    pub drops: u64,
    /// Accept queues now: connections waiting, and the limit, summed over the port's live
    /// listeners (IPv4 and IPv6, `SO_REUSEPORT` groups, every namespace).
    pub queue_length: u64,
    pub queue_limit: u64,
}

/// The running totals behind the counters.
#[derive(Debug, Default)]
pub struct Accounts {
    /// `TcpExtListenOverflows` last read, per namespace inode.
    namespaces: HashMap<u32, u64>,
    overflows: u64,
    /// `sk_drops` last read, per listener socket (namespace, cookie).
    sockets: HashMap<(u32, u64), (u16, u64)>,
    /// Drops per port, sockets gone since included; only ports with a live listener are kept.
    port_drops: HashMap<u16, u64>,
    /// Drops counted under port="other": growth of ports while they were outside the top N.
    other: u64,
    /// Ports exported last time.
    shown: Vec<u16>,
}

impl Accounts {
    /// Takes one snapshot of every namespace; returns the top `top_n` ports (by drops, then by
    /// queue length; ports with neither are left out) and updates `other`.
    pub fn update(&mut self, snapshot: &[NamespaceListeners], top_n: usize) -> Vec<PortFill> {
        // Host-wide overflows.
        let mut seen_ns = HashSet::new();
        for ns in snapshot {
            let Some(value) = ns.listen_overflows else {
                continue;
            };
            seen_ns.insert(ns.netns);
            let grown = match self.namespaces.get(&ns.netns) {
                // A smaller value is a new namespace that reused the inode: all of it is new.
                Some(&last) if value >= last => value - last,
                Some(_) => value,
                None if self.namespaces.len() >= MAX_REMEMBERED => 0,
                None => value,
            };
            self.overflows += grown;
            if self.namespaces.contains_key(&ns.netns) || self.namespaces.len() < MAX_REMEMBERED {
                self.namespaces.insert(ns.netns, value);
            }
        }
        // Namespaces gone keep what they counted in the total.
        self.namespaces.retain(|netns, _| seen_ns.contains(netns));

        // Per port.
        let mut fills: HashMap<u16, PortFill> = HashMap::new();
        let mut growth: HashMap<u16, u64> = HashMap::new();
        let mut seen_sockets = HashSet::new();
        for listener in snapshot.iter().flat_map(|ns| &ns.listeners) {
            let fill = fills.entry(listener.port).or_insert(PortFill {
                port: listener.port,
                ..PortFill::default()
            });
            fill.queue_length += u64::from(listener.queue_length);
            fill.queue_limit += u64::from(listener.queue_limit);
            let Some(drops) = listener.drops.map(u64::from) else {
                continue;
            };
            let key = (listener.netns, listener.cookie);
            seen_sockets.insert(key);
            let grown = match self.sockets.get(&key) {
                Some(&(port, last)) if port == listener.port && drops >= last => drops - last,
                Some(_) => drops,
                None if self.sockets.len() >= MAX_REMEMBERED => 0,
                None => drops,
            };
            if self.sockets.contains_key(&key) || self.sockets.len() < MAX_REMEMBERED {
                self.sockets.insert(key, (listener.port, drops));
            }
            *growth.entry(listener.port).or_default() += grown;
        }
        self.sockets.retain(|key, _| seen_sockets.contains(key));
        for (port, grown) in &growth {
            *self.port_drops.entry(*port).or_default() += grown;
        }
        // A port with no listener left is forgotten: its series goes away.
        self.port_drops.retain(|port, _| fills.contains_key(port));
        for (port, fill) in fills.iter_mut() {
            fill.drops = self.port_drops.get(port).copied().unwrap_or(0);
        }

        let mut ranked: Vec<PortFill> = fills
            .into_values()
            .filter(|fill| fill.drops > 0 || fill.queue_length > 0)
            .collect();
        ranked.sort_by(|a, b| {
            (b.drops, b.queue_length, a.port).cmp(&(a.drops, a.queue_length, b.port))
        });
        ranked.truncate(top_n);
        let in_top: HashSet<u16> = ranked.iter().map(|fill| fill.port).collect();
        self.other += growth
            .iter()
            .filter(|(port, _)| !in_top.contains(port))
            .map(|(_, grown)| grown)
            .sum::<u64>();
        ranked
    }

    /// `TcpExtListenOverflows` summed over namespaces (those gone included).
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Drops of listeners while their port was outside the top N.
    pub fn other(&self) -> u64 {
        self.other
    }
}

impl ListenMetrics {
    pub fn register(registry: &Registry) -> Result<ListenMetrics, prometheus::Error> {
        let overflows = IntCounter::with_opts(Opts::new(
            "tracer_listen_overflows_total",
            "Connection attempts (SYNs and handshake ACKs) dropped because a listener's accept queue was full, host-wide: TcpExtListenOverflows (/proc/net/netstat) summed over network namespaces, since each was created.",
        ))?;
        registry.register(Box::new(overflows.clone()))?;
        let by_listener = IntCounterVec::new(
            Opts::new(
                "tracer_listen_overflows_by_listener_total",
                "Connection attempts dropped by the listeners of a local port (their sk_drops, ss -tlnm d<N>: accept-queue overflows above all), for the top ports; port=\"other\" counts the rest while they were outside the top.",
            ),
            &["port"],
        )?;
        registry.register(Box::new(by_listener.clone()))?;
        let queue_length = IntGaugeVec::new(
            Opts::new(
                "tracer_listen_queue_length",
                "Connections waiting in the accept queue of a top port's listeners, for accept() to take them (ss -tln Recv-Q).",
            ),
            &["port"],
        )?;
        registry.register(Box::new(queue_length.clone()))?;
        let queue_limit = IntGaugeVec::new(
            Opts::new(
                "tracer_listen_queue_limit",
                "Accept queue limit of a top port's listeners: the listen() backlog capped by net.core.somaxconn (ss -tln Send-Q).",
            ),
            &["port"],
        )?;
        registry.register(Box::new(queue_limit.clone()))?;
        // The rest exists from the start, at zero.
        by_listener.get_metric_with_label_values(&[OTHER_PORT])?;
        Ok(ListenMetrics {
            overflows,
            by_listener,
            queue_length,
            queue_limit,
            state: Mutex::new(Accounts::default()),
        })
    }

    /// Takes one snapshot of every namespace's listeners.
    pub fn update(&self, snapshot: &[NamespaceListeners], top_n: usize) {
        let Ok(mut accounts) = self.state.lock() else {
            return;
        };
        let top = accounts.update(snapshot, top_n);
        catch_up(&self.overflows, accounts.overflows());
        catch_up(
            &self.by_listener.with_label_values(&[OTHER_PORT]),
            accounts.other(),
        );
        let ports: Vec<u16> = top.iter().map(|fill| fill.port).collect();
        // Bounded series: ports that left the top N go away.
        for old in &accounts.shown {
            if !ports.contains(old) {
                let label = old.to_string();
                let _ = self.by_listener.remove_label_values(&[&label]);
                let _ = self.queue_length.remove_label_values(&[&label]);
                let _ = self.queue_limit.remove_label_values(&[&label]);
            }
        }
        for fill in &top {
            let label = fill.port.to_string();
            catch_up(&self.by_listener.with_label_values(&[&label]), fill.drops);
            self.queue_length
                .with_label_values(&[&label])
                .set(i64::try_from(fill.queue_length).unwrap_or(i64::MAX));
            self.queue_limit
                .with_label_values(&[&label])
                .set(i64::try_from(fill.queue_limit).unwrap_or(i64::MAX));
        }
        accounts.shown = ports;
    }
}

/// Raises `counter` to `total` (never lowers it).
fn catch_up(counter: &IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::host::listeners::Listener;

    fn listener(netns: u32, port: u16, cookie: u64, drops: u32, queue: u32) -> Listener {
        Listener {
            netns,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            inode: 1000 + u32::from(port),
            cookie,
            queue_length: queue,
            queue_limit: 128,
            drops: Some(drops),
        }
    }

    fn ns(netns: u32, overflows: u64, listeners: Vec<Listener>) -> NamespaceListeners {
        NamespaceListeners {
            netns,
            listen_overflows: Some(overflows),
            somaxconn: Some(4096),
            listeners,
        }
    }

    fn value(rendered: &str, series: &str) -> Option<f64> {
        rendered.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    fn render(registry: &Registry) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encodes")
    }

    #[test]
    fn host_wide_overflows_sum_namespaces_and_never_go_down() {
        let mut accounts = Accounts::default();
        accounts.update(&[ns(1, 10, vec![]), ns(2, 5, vec![])], 10);
        assert_eq!(accounts.overflows(), 15, "since each namespace was created");
        accounts.update(&[ns(1, 12, vec![]), ns(2, 5, vec![])], 10);
        assert_eq!(accounts.overflows(), 17);
        // Namespace 2 is deleted: what it counted stays.
        accounts.update(&[ns(1, 12, vec![])], 10);
        assert_eq!(accounts.overflows(), 17);
        // A new namespace reusing inode 2 starts from its own count.
        accounts.update(&[ns(1, 12, vec![]), ns(2, 1, vec![])], 10);
        assert_eq!(accounts.overflows(), 18);
        // Same inode, lower value than last read: a new namespace again.
        accounts.update(&[ns(1, 3, vec![]), ns(2, 1, vec![])], 10);
        assert_eq!(accounts.overflows(), 21);
    }

    #[test]
    fn ports_sum_their_listeners_and_keep_closed_sockets_drops() {
        let mut accounts = Accounts::default();
        // IPv4 and IPv6 listeners on 80 in two namespaces, one on 8080.
        let top = accounts.update(
            &[
                ns(
                    1,
                    0,
                    vec![listener(1, 80, 1, 4, 2), listener(1, 80, 2, 1, 0)],
                ),
                ns(
                    2,
                    0,
                    vec![listener(2, 80, 1, 2, 0), listener(2, 8080, 3, 7, 1)],
                ),
            ],
            10,
        );
        assert_eq!(
            top,
            vec![
                PortFill {
                    port: 80,
                    drops: 7,
                    queue_length: 2,
                    queue_limit: 384
                },
                PortFill {
                    port: 8080,
                    drops: 7,
                    queue_length: 1,
                    queue_limit: 128
                },
            ]
        );
        // The listener with cookie 2 closes and one reopens on 80 (cookie 9): nothing is lost.
        let top = accounts.update(
            &[
                ns(
                    1,
                    0,
                    vec![listener(1, 80, 1, 5, 0), listener(1, 80, 9, 3, 0)],
                ),
                ns(
                    2,
                    0,
                    vec![listener(2, 80, 1, 2, 0), listener(2, 8080, 3, 7, 0)],
                ),
            ],
            10,
        );
        assert_eq!(top[0].port, 80);
        assert_eq!(top[0].drops, 11);
        // 8080 closes: it leaves the table; a port with no drops and an empty queue is not shown.
        let top = accounts.update(&[ns(1, 0, vec![listener(1, 22, 5, 0, 0)])], 10);
        assert!(top.is_empty(), "{top:?}");
        assert_eq!(accounts.other(), 0);
    }

    #[test]
    fn more_listeners_than_n_give_n_plus_one_series() {
        let registry = Registry::new();
        let metrics = ListenMetrics::register(&registry).expect("registers");
        let n = 3;
        let listeners: Vec<Listener> = (0..20u16)
            .map(|i| listener(1, 9000 + i, u64::from(i), u32::from(i) + 1, 0))
            .collect();
        metrics.update(&[ns(1, 210, listeners.clone())], n);
        let out = render(&registry);
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("tracer_listen_overflows_by_listener_total{"))
            .collect();
        assert_eq!(series.len(), n + 1, "{series:?}");
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="9019"}"#
            ),
            Some(20.0)
        );
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="9017"}"#
            ),
            Some(18.0)
        );
        // The 17 others: 1 + 2 + ... + 17.
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="other"}"#
            ),
            Some(153.0)
        );
        for gauge in ["tracer_listen_queue_length{", "tracer_listen_queue_limit{"] {
            assert_eq!(
                out.lines().filter(|l| l.starts_with(gauge)).count(),
                n,
                "{gauge}"
            );
        }
        assert_eq!(value(&out, "tracer_listen_overflows_total"), Some(210.0));

        // Port 9000 surges to the top: 9017 leaves, its series goes away; "other" grows by the
        // growth of ports outside the top only, and never goes down.
        let mut next = listeners;
        next[0].drops = Some(100);
        metrics.update(&[ns(1, 309, next)], n);
        let out = render(&registry);
        let series: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("tracer_listen_overflows_by_listener_total{"))
            .collect();
        assert_eq!(series.len(), n + 1, "{series:?}");
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="9000"}"#
            ),
            Some(100.0)
        );
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="9017"}"#
            ),
            None
        );
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="other"}"#
            ),
            Some(153.0)
        );
        assert_eq!(value(&out, "tracer_listen_overflows_total"), Some(309.0));
    }

    #[test]
    fn series_exist_at_zero_from_the_start() {
        let registry = Registry::new();
        let _metrics = ListenMetrics::register(&registry).expect("registers");
        let out = render(&registry);
        assert_eq!(value(&out, "tracer_listen_overflows_total"), Some(0.0));
        assert_eq!(
            value(
                &out,
                r#"tracer_listen_overflows_by_listener_total{port="other"}"#
            ),
            Some(0.0)
        );
    }
}
