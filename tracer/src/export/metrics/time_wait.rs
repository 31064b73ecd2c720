//! TIME_WAIT metrics: the live count, entries and exits, a bounded per-peer breakdown and the
//! port-exhaustion risk, with the sysctls that govern them.
use std::sync::Mutex;

use prometheus::{GaugeVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use crate::kernel::system::TcpSysctls;
use tracer_core::model::TcpState;
use tracer_core::record::{PeerKey, TimeWaitExit};
use tracer_core::tracker::TimeWaitTable;

/// Label value for every peer outside the top N.
pub const OTHER_PEER: &str = "other";

/// A top peer's share of the ephemeral port range held in TIME_WAIT.
#[derive(Clone, Debug, PartialEq)]
pub struct PortPressure {
    pub peer: PeerKey,
    pub sockets: u32,
    /// `sockets / size of ip_local_port_range`.
    pub ratio: f64,
}

pub struct TimeWaitMetrics {
    sockets: IntGauge,
    entered: IntCounter,
    exited: [IntCounter; TimeWaitExit::ALL.len()],
    fin_wait2_exits: IntCounter,
    /// Resync corrections: [dropped, added].
    reconciled: [IntCounter; 2],
    by_peer: IntGaugeVec,
    exhaustion: GaugeVec,
    untracked: IntCounter,
    untracked_seen: std::sync::atomic::AtomicU64,
    settings: IntGaugeVec,
    port_range_size: IntGauge,
    max_buckets: IntGauge,
    /// Label sets exported last time, so peers that left the top N are removed.
    shown: Mutex<Vec<[String; 2]>>,
    shown_settings: Mutex<Option<[String; 3]>>,
}

impl TimeWaitMetrics {
    pub fn register(registry: &Registry) -> Result<TimeWaitMetrics, prometheus::Error> {
        let sockets = IntGauge::with_opts(Opts::new(
            "tracer_time_wait_sockets",
            "Timewait sockets now, host-wide (all network namespaces), in either substate: /proc/net/sockstat `tw` summed over namespaces; `ss` shows them as TIME-WAIT, or FIN-WAIT-2 with a timewait timer while the peer's FIN is outstanding.",
        ))?;
        registry.register(Box::new(sockets.clone()))?;
        let entered = IntCounter::with_opts(Opts::new(
            "tracer_time_wait_entered_total",
            "Timewait sockets created (a closed connection's TIME_WAIT, or FIN_WAIT2 that becomes TIME_WAIT when the peer's FIN arrives).",
        ))?;
        registry.register(Box::new(entered.clone()))?;
        let fin_wait2_exits = IntCounter::with_opts(Opts::new(
            "tracer_time_wait_fin_wait2_exits_total",
            "Timewait sockets that left while still in FIN_WAIT2: the peer never sent its FIN (also counted in tracer_time_wait_exited_total).",
        ))?;
        registry.register(Box::new(fin_wait2_exits.clone()))?;
        let exited = super::labelled_counters(
            registry,
            "tracer_time_wait_exited_total",
            "Sockets that left TIME_WAIT, by reason: expired (2MSL ran out), reused (a new connection took the 4-tuple), killed (RST, namespace teardown, bucket pressure).",
            "reason",
            ["expired", "reused", "killed"],
        )?;
        let reconciled = super::labelled_counters(
            registry,
            "tracer_time_wait_reconciled_total",
            "Timewait sockets the agent's table corrected from a sock_diag dump (a resync): dropped (their exit was never seen) or added (their birth was never seen). Not zero: the kernel ran TIME_WAIT timers or closes without the agent's programs.",
            "change",
            ["dropped", "added"],
        )?;
        let by_peer = IntGaugeVec::new(
            Opts::new(
                "tracer_time_wait_sockets_by_peer",
                "Timewait sockets for the top peers (remote address and service port); the rest under peer=\"other\".",
            ),
            &["peer", "port"],
        )?;
        registry.register(Box::new(by_peer.clone()))?;
        let exhaustion = GaugeVec::new(
            Opts::new(
                "tracer_time_wait_port_exhaustion_ratio",
                "For top peers this host connects to: ephemeral ports held in TIME_WAIT toward the peer over the size of net.ipv4.ip_local_port_range. At 1 connect() fails with EADDRNOTAVAIL.",
            ),
            &["peer", "port"],
        )?;
        registry.register(Box::new(exhaustion.clone()))?;
        let untracked = IntCounter::with_opts(Opts::new(
            "tracer_time_wait_untracked_total",
            "TIME_WAIT sockets not tracked because the agent's table was full.",
        ))?;
        registry.register(Box::new(untracked.clone()))?;
        let settings = IntGaugeVec::new(
            Opts::new(
                "tracer_time_wait_settings_info",
                "The sysctls that govern TIME_WAIT, in the agent's network namespace.",
            ),
            &["tcp_tw_reuse", "tcp_max_tw_buckets", "ip_local_port_range"],
        )?;
        registry.register(Box::new(settings.clone()))?;
        let port_range_size = IntGauge::with_opts(Opts::new(
            "tracer_ephemeral_ports",
            "Ports in net.ipv4.ip_local_port_range.",
        ))?;
        registry.register(Box::new(port_range_size.clone()))?;
        let max_buckets = IntGauge::with_opts(Opts::new(
            "tracer_tcp_max_tw_buckets",
            "net.ipv4.tcp_max_tw_buckets: TIME_WAIT sockets allowed per network namespace.",
        ))?;
        registry.register(Box::new(max_buckets.clone()))?;
        Ok(TimeWaitMetrics {
            sockets,
            entered,
            exited,
            fin_wait2_exits,
            reconciled,
            by_peer,
            exhaustion,
            untracked,
            untracked_seen: std::sync::atomic::AtomicU64::new(0),
            settings,
            port_range_size,
            max_buckets,
            shown: Mutex::new(Vec::new()),
            shown_settings: Mutex::new(None),
        })
    }

    /// The live count alone: cheap enough for every batch of events.
    pub fn set_sockets(&self, count: usize) {
        self.sockets.set(count as i64);
    }

    pub fn entered(&self) {
        self.entered.inc();
    }

    pub fn exited(&self, exit: TimeWaitExit, substate: TcpState) {
        self.exited[exit as usize].inc();
        if substate == TcpState::FinWait2 {
            self.fin_wait2_exits.inc();
        }
    }

    /// A resync dropped and added this many timewait sockets.
    pub fn reconciled(&self, dropped: usize, added: usize) {
        self.reconciled[0].inc_by(dropped as u64);
        self.reconciled[1].inc_by(added as u64);
    }

    /// Refreshes the gauges from the table; returns the port pressure of the top client-side
    /// peers so that the caller can warn.
    pub fn update(
        &self,
        table: &TimeWaitTable,
        top_n: usize,
        port_range_size: u32,
    ) -> Vec<PortPressure> {
        let total = table.count();
        self.set_sockets(total);
        super::add_delta(&self.untracked, &self.untracked_seen, table.dropped());

        let top = table.top_peers(top_n);
        let mut labels: Vec<[String; 2]> = Vec::with_capacity(top.len() + 1);
        let mut pressure = Vec::new();
        let mut in_top = 0u64;
        for (peer, sockets) in &top {
            let set = [peer.peer.to_string(), peer.port.to_string()];
            self.by_peer
                .with_label_values(&[set[0].as_str(), set[1].as_str()])
                .set(i64::from(*sockets));
            in_top += u64::from(*sockets);
            if peer.client && port_range_size > 0 {
                let ratio = f64::from(*sockets) / f64::from(port_range_size);
                self.exhaustion
                    .with_label_values(&[set[0].as_str(), set[1].as_str()])
                    .set(ratio);
                pressure.push(PortPressure {
                    peer: *peer,
                    sockets: *sockets,
                    ratio,
                });
            }
            labels.push(set);
        }
        let other = (total as u64).saturating_sub(in_top);
        self.by_peer
            .with_label_values(&[OTHER_PEER, ""])
            .set(other as i64);
        labels.push([OTHER_PEER.to_owned(), String::new()]);

        // Bounded cardinality: series of peers that left the top N go away.
        if let Ok(mut shown) = self.shown.lock() {
            for old in shown.iter() {
                if !labels.contains(old) {
                    let _ = self
                        .by_peer
                        .remove_label_values(&[old[0].as_str(), old[1].as_str()]);
                    let _ = self
                        .exhaustion
                        .remove_label_values(&[old[0].as_str(), old[1].as_str()]);
                }
            }
            for current in &labels {
                let is_client = pressure.iter().any(|p| {
                    p.peer.peer.to_string() == current[0] && p.peer.port.to_string() == current[1]
                });
                if !is_client {
                    let _ = self
                        .exhaustion
                        .remove_label_values(&[current[0].as_str(), current[1].as_str()]);
                }
            }
            *shown = labels;
        }
        pressure
    }

    pub fn set_settings(&self, sysctls: &TcpSysctls) {
        let show = |v: Option<i64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
        let range = sysctls
            .ip_local_port_range
            .map_or_else(|| "unknown".to_owned(), |(lo, hi)| format!("{lo}-{hi}"));
        let set = [
            show(sysctls.tcp_tw_reuse),
            show(sysctls.tcp_max_tw_buckets),
            range,
        ];
        if let Ok(mut shown) = self.shown_settings.lock()
            && shown.as_ref() != Some(&set)
        {
            if let Some(old) = shown.as_ref() {
                let _ = self.settings.remove_label_values(&[
                    old[0].as_str(),
                    old[1].as_str(),
                    old[2].as_str(),
                ]);
            }
            self.settings
                .with_label_values(&[set[0].as_str(), set[1].as_str(), set[2].as_str()])
                .set(1);
            *shown = Some(set);
        }
        if let Some(size) = sysctls.port_range_size() {
            self.port_range_size.set(i64::from(size));
        }
        if let Some(max) = sysctls.tcp_max_tw_buckets {
            self.max_buckets.set(max);
        }
    }
}
