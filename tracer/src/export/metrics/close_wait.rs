//! CLOSE_WAIT metrics: connections the peer closed and the local application has not.
use prometheus::{IntCounter, IntGauge, Opts, Registry};

pub struct CloseWaitMetrics {
    close_wait: IntGauge,
    close_wait_leaked: IntGauge,
    close_wait_leaks: IntCounter,
}

impl CloseWaitMetrics {
    pub fn register(registry: &Registry) -> Result<CloseWaitMetrics, prometheus::Error> {
        let close_wait = IntGauge::with_opts(Opts::new(
            "tracer_close_wait_sockets",
            "Connections in CLOSE_WAIT now: the peer closed and the local application has not yet.",
        ))?;
        registry.register(Box::new(close_wait.clone()))?;
        let close_wait_leaked = IntGauge::with_opts(Opts::new(
            "tracer_close_wait_leaked_sockets",
            "Connections in CLOSE_WAIT for longer than the leak threshold now.",
        ))?;
        registry.register(Box::new(close_wait_leaked.clone()))?;
        let close_wait_leaks = IntCounter::with_opts(Opts::new(
            "tracer_close_wait_leaks_total",
            "Connections that stayed in CLOSE_WAIT past the leak threshold.",
        ))?;
        registry.register(Box::new(close_wait_leaks.clone()))?;
        Ok(CloseWaitMetrics {
            close_wait,
            close_wait_leaked,
            close_wait_leaks,
        })
    }

    pub fn close_wait_leak(&self) {
        self.close_wait_leaks.inc();
    }

    /// `(in CLOSE_WAIT, of which past the threshold)`.
    pub fn set_close_wait(&self, (now, leaked): (usize, usize)) {
        self.close_wait.set(now as i64);
        self.close_wait_leaked.set(leaked as i64);
    }
}
