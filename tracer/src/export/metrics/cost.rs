//! What connections cost, observed once per connection as it closes: RTT histograms, bytes
//! per connection, RSTs sent by reason, and the time senders were held by their peer's receive
//! window.
use std::collections::HashMap;
use std::sync::OnceLock;

use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use tracer_core::cost::{payload_received, payload_sent};
use tracer_core::record::Connection;

use crate::export::cost::CostContext;

/// RTT buckets: 10 µs (loopback) to 10 s (a path in trouble).
pub const RTT_BUCKETS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bytes per connection: 100 B to 10 GB, a decade a bucket.
pub const BYTES_BUCKETS: [f64; 9] = [1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

pub struct CostMetrics {
    srtt: Histogram,
    min_rtt: Histogram,
    /// `[sent, received]`.
    bytes: [Histogram; 2],
    resets_sent: IntCounterVec,
    /// RSTs sent for no socket, and the kernel's totals by reason code seen so far.
    resets_no_socket: IntCounterVec,
    resets_no_socket_seen: std::sync::Mutex<HashMap<u32, u64>>,
    rwnd_limited_conns: IntCounter,
    rwnd_limited_seconds: Counter,
    /// Set once at start-up; until then RST reasons are `unknown` and rwnd time is not counted.
    context: OnceLock<CostContext>,
}

impl CostMetrics {
    pub fn register(registry: &Registry) -> Result<CostMetrics, prometheus::Error> {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(RTT_BUCKETS.to_vec()))
        };
        let srtt = histogram(
            "tracer_connection_srtt_seconds",
            "Smoothed RTT of each connection as it closed (the kernel's srtt, as tcpi_rtt).",
        )?;
        registry.register(Box::new(srtt.clone()))?;
        let min_rtt = histogram(
            "tracer_connection_min_rtt_seconds",
            "Minimum RTT of each connection as it closed (the kernel's windowed min, as tcpi_min_rtt).",
        )?;
        registry.register(Box::new(min_rtt.clone()))?;
        let bytes_vec = HistogramVec::new(
            HistogramOpts::new(
                "tracer_connection_bytes",
                "Bytes each connection sent (acknowledged by the peer) or received, at close: \
                 the payload when the state path tells which SYN/FIN the kernel counted, its \
                 sequence-space count (at most 2 more) otherwise.",
            )
            .buckets(BYTES_BUCKETS.to_vec()),
            &["direction"],
        )?;
        registry.register(Box::new(bytes_vec.clone()))?;
        let bytes = [
            bytes_vec.get_metric_with_label_values(&["sent"])?,
            bytes_vec.get_metric_with_label_values(&["received"])?,
        ];
        let resets_sent = IntCounterVec::new(
            Opts::new(
                "tracer_resets_sent_total",
                "RSTs sent by this host's sockets, by the kernel's reason (enum sk_rst_reason, \
                 lower case without the SK_RST_REASON_ prefix; unknown when the kernel gives none).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(resets_sent.clone()))?;
        let resets_no_socket = IntCounterVec::new(
            Opts::new(
                "tracer_resets_sent_no_socket_total",
                "RSTs this host sent answering a segment no socket matched (a connection \
                 refused by a closed port, a scan), by the kernel's reason (unknown on kernels \
                 that give none).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(resets_no_socket.clone()))?;
        let rwnd_limited_conns = IntCounter::with_opts(Opts::new(
            "tracer_connections_rwnd_limited_total",
            "Connections closed that spent some time with data to send held back by the \
             peer's receive window (a zero or full window: the receiving application reads too \
             slowly).",
        ))?;
        registry.register(Box::new(rwnd_limited_conns.clone()))?;
        let rwnd_limited_seconds = Counter::with_opts(Opts::new(
            "tracer_connection_rwnd_limited_seconds_total",
            "Time senders were held back by their peer's receive window, summed over \
             connections as they close (the kernel's TCP_CHRONO_RWND_LIMITED).",
        ))?;
        registry.register(Box::new(rwnd_limited_seconds.clone()))?;
        Ok(CostMetrics {
            srtt,
            min_rtt,
            bytes,
            resets_sent,
            resets_no_socket,
            resets_no_socket_seen: std::sync::Mutex::new(HashMap::new()),
            rwnd_limited_conns,
            rwnd_limited_seconds,
            context: OnceLock::new(),
        })
    }

    /// The jiffy length and reason names (once, at start-up; later calls are ignored). Every
    /// reason the kernel names gets its series at once, at 0.
    pub fn configure(&self, context: CostContext) {
        let names: Vec<String> = context.rst_reasons.values().cloned().collect();
        let no_socket = names.iter().any(|name| name == "no_socket");
        if self.context.set(context).is_ok() {
            for name in names.iter().map(String::as_str).chain(["unknown"]) {
                let _ = self.resets_sent.get_metric_with_label_values(&[name]);
            }
            // A RST for no socket names `no_socket` where the kernel gives reasons: that series
            // (or `unknown`) exists from the start.
            let first = if no_socket { "no_socket" } else { "unknown" };
            let _ = self.resets_no_socket.get_metric_with_label_values(&[first]);
        }
    }

    fn reasons(&self) -> Option<&HashMap<u16, String>> {
        self.context.get().map(|c| &*c.rst_reasons)
    }

    /// A RST sent, with the kernel's reason code when it gave one.
    pub fn reset_sent(&self, reason: Option<u16>) {
        let name = reason
            .and_then(|code| self.reasons()?.get(&code))
            .map_or("unknown", String::as_str);
        if let Ok(counter) = self.resets_sent.get_metric_with_label_values(&[name]) {
            counter.inc();
        }
    }

    /// Takes the kernel's cumulative counts of RSTs sent for no socket, `(reason code, total)`
    /// (the code `RST_NO_SOCKET_SLOTS - 1` stands for unknown); adds what each grew by.
    pub fn set_resets_no_socket(&self, totals: &[(u32, u64)]) {
        let Ok(mut seen) = self.resets_no_socket_seen.lock() else {
            return;
        };
        for &(code, total) in totals {
            let grown = super::growth(&mut seen, code, total);
            if grown == 0 {
                continue;
            }
            let name = u16::try_from(code)
                .ok()
                .and_then(|code| self.reasons()?.get(&code))
                .map_or("unknown", String::as_str);
            if let Ok(counter) = self.resets_no_socket.get_metric_with_label_values(&[name]) {
                counter.inc_by(grown);
            }
        }
    }

    pub fn closed(&self, conn: &Connection) {
        let Some(cost) = conn.cost.as_deref() else {
            return;
        };
        // 0: the kernel had no RTT sample.
        if cost.srtt_ns > 0 {
            self.srtt.observe(cost.srtt_ns as f64 / 1e9);
        }
        if cost.min_rtt_ns > 0 {
            self.min_rtt.observe(cost.min_rtt_ns as f64 / 1e9);
        }
        let sent = payload_sent(conn, cost.bytes_sent).unwrap_or(cost.bytes_sent);
        let received = payload_received(conn, cost.bytes_received).unwrap_or(cost.bytes_received);
        self.bytes[0].observe(sent as f64);
        self.bytes[1].observe(received as f64);
        if cost.rwnd_limited_jiffies > 0 {
            self.rwnd_limited_conns.inc();
            if let Some(ns) = self.context.get().and_then(|c| c.rwnd_limited_ns(cost)) {
                self.rwnd_limited_seconds.inc_by(ns as f64 / 1e9);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracer_core::model::{ConnectionCost, Event, TcpState};
    use tracer_core::testkit::{loopback, replay, state, task};

    use super::*;
    use crate::export::metrics::Metrics;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn a_closed_connection_feeds_the_histograms_and_a_reset_its_reason() {
        use TcpState::*;
        let metrics = Metrics::new().unwrap();
        metrics.cost.configure(CostContext {
            jiffy_ns: Some(4_000_000),
            rst_reasons: Arc::new([(3, "tcp_state".to_owned())].into_iter().collect()),
        });
        let t = loopback(40000, 8080);
        let (_, rec) = replay(&[
            state(1, 0x10, t, Close, SynSent, task(1, "c")),
            state(2, 0x10, t, SynSent, Established, task(1, "c")),
            Event::SocketInfo {
                ts_ns: 3,
                sock: 0x10,
                cgroup: 0,
                cost: Some(ConnectionCost {
                    bytes_sent: 1_001,
                    bytes_received: 20,
                    srtt_ns: 300_000,
                    min_rtt_ns: 20_000,
                    rwnd_limited_jiffies: 50,
                    ..ConnectionCost::default()
                }),
            },
            state(4, 0x10, t, Established, Close, task(1, "c")),
        ]);
        metrics.cost.closed(&rec.closed[0]);
        metrics.cost.reset_sent(Some(3));
        metrics.cost.reset_sent(Some(999));
        metrics.cost.reset_sent(None);
        let out = metrics.render().unwrap();
        assert_eq!(value(&out, "tracer_connection_srtt_seconds_sum"), 0.0003);
        assert_eq!(
            value(
                &out,
                r#"tracer_connection_srtt_seconds_bucket{le="0.0005"}"#
            ),
            1.0
        );
        assert_eq!(value(&out, "tracer_connection_min_rtt_seconds_count"), 1.0);
        // An abort: the SYN comes off what was acknowledged, nothing off what was received.
        assert_eq!(
            value(&out, r#"tracer_connection_bytes_sum{direction="sent"}"#),
            1000.0
        );
        assert_eq!(
            value(&out, r#"tracer_connection_bytes_sum{direction="received"}"#),
            20.0
        );
        assert_eq!(value(&out, "tracer_connections_rwnd_limited_total"), 1.0);
        assert_eq!(
            value(&out, "tracer_connection_rwnd_limited_seconds_total"),
            0.2
        );
        assert_eq!(
            value(&out, r#"tracer_resets_sent_total{reason="tcp_state"}"#),
            1.0
        );
        assert_eq!(
            value(&out, r#"tracer_resets_sent_total{reason="unknown"}"#),
            2.0,
            "an unnamed code and no code"
        );
    }

    #[test]
    fn resets_for_no_socket_follow_the_kernels_totals_by_reason() {
        let metrics = Metrics::new().unwrap();
        metrics.cost.configure(CostContext {
            jiffy_ns: None,
            rst_reasons: Arc::new([(2, "no_socket".to_owned())].into_iter().collect()),
        });
        metrics.cost.set_resets_no_socket(&[(2, 5), (63, 1)]);
        metrics.cost.set_resets_no_socket(&[(2, 7), (63, 1)]);
        let out = metrics.render().unwrap();
        assert_eq!(
            value(
                &out,
                r#"tracer_resets_sent_no_socket_total{reason="no_socket"}"#
            ),
            7.0
        );
        assert_eq!(
            value(
                &out,
                r#"tracer_resets_sent_no_socket_total{reason="unknown"}"#
            ),
            1.0
        );
    }
}
