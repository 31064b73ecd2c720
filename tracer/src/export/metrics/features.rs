//! Which features run on this kernel: older kernels lack some hooks, and the agent switches
//! those features off instead of refusing to start.
use prometheus::{IntGaugeVec, Opts, Registry};

pub struct FeatureMetrics {
    enabled: IntGaugeVec,
}

impl FeatureMetrics {
    pub fn register(registry: &Registry) -> Result<FeatureMetrics, prometheus::Error> {
        let enabled = IntGaugeVec::new(
            Opts::new(
                "tracer_feature_enabled",
                "1 when a feature runs on this kernel, 0 when the kernel lacks what it needs \
                 (the agent logs what at start-up).",
            ),
            &["feature"],
        )?;
        registry.register(Box::new(enabled.clone()))?;
        Ok(FeatureMetrics { enabled })
    }

    /// Records whether `feature` runs; the set of features is fixed, so the series are bounded.
    pub fn set(&self, feature: &str, on: bool) {
        if let Ok(gauge) = self.enabled.get_metric_with_label_values(&[feature]) {
            gauge.set(i64::from(on));
        }
    }
}
