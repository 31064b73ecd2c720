//! Delayed-ACK and Nagle-stall metrics.
use prometheus::{Histogram, HistogramOpts, IntCounter, Opts, Registry};

/// Delayed ACKs are held up to 200 ms on Linux (40 ms typical), 500 ms on some stacks.
pub const DELAYED_ACK_BUCKETS: [f64; 10] =
    [0.001, 0.004, 0.01, 0.02, 0.04, 0.05, 0.1, 0.2, 0.3, 0.5];

pub struct AckMetrics {
    delayed_acks: IntCounter,
    delayed_ack_delay: Histogram,
    pingpong_exits: IntCounter,
    nagle_stalls: IntCounter,
    nagle_lost: prometheus::Counter,
}

impl AckMetrics {
    pub fn register(registry: &Registry) -> Result<AckMetrics, prometheus::Error> {
        let delayed_acks = IntCounter::with_opts(Opts::new(
            "tracer_delayed_acks_total",
            "Delayed ACKs sent: the delayed-ACK timer fired with an ACK pending (the kernel's TcpExtDelayedACKs).",
        ))?;
        registry.register(Box::new(delayed_acks.clone()))?;
        let delayed_ack_delay = Histogram::with_opts(
            HistogramOpts::new(
                "tracer_delayed_ack_delay_seconds",
                "How long each delayed ACK was held before the timer sent it.",
            )
            .buckets(DELAYED_ACK_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(delayed_ack_delay.clone()))?;
        let pingpong_exits = IntCounter::with_opts(Opts::new(
            "tracer_delayed_ack_pingpong_exits_total",
            "Delayed ACKs that fired in interactive (pingpong) mode, which makes the kernel leave it and ACK quickly again.",
        ))?;
        registry.register(Box::new(pingpong_exits.clone()))?;
        let nagle_stalls = IntCounter::with_opts(Opts::new(
            "tracer_nagle_stalls_total",
            "Small writes held back by Nagle that waited for the peer's delayed ACK (both ends on this host).",
        ))?;
        registry.register(Box::new(nagle_stalls.clone()))?;
        let nagle_lost = prometheus::Counter::with_opts(Opts::new(
            "tracer_nagle_stall_seconds_total",
            "Time writes waited in Nagle + delayed-ACK stalls.",
        ))?;
        registry.register(Box::new(nagle_lost.clone()))?;
        Ok(AckMetrics {
            delayed_acks,
            delayed_ack_delay,
            pingpong_exits,
            nagle_stalls,
            nagle_lost,
        })
    }

    pub fn delayed_ack(&self, held_ns: Option<u64>, pingpong: bool) {
        self.delayed_acks.inc();
        if let Some(ns) = held_ns {
            self.delayed_ack_delay.observe(ns as f64 / 1e9);
        }
        if pingpong {
            self.pingpong_exits.inc();
        }
    }

    pub fn nagle_stall(&self, lost_ns: u64) {
        self.nagle_stalls.inc();
        self.nagle_lost.inc_by(lost_ns as f64 / 1e9);
    }
}
