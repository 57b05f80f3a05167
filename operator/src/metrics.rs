//! The operator's Prometheus metrics: reconcile counts, durations and errors per
//! controller, and what the Model controller fetched. Rendered in the text
//! exposition format on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram>,
    artifact_bytes_fetched: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0])
        });
        let artifact_bytes_fetched = Counter::default();
        registry.register(
            "reconciles",
            "Reconciliations run, per controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, per controller and error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation, per controller",
            reconcile_seconds.clone(),
        );
        registry.register(
            "artifact_fetched_bytes",
            "Bytes of model sources fetched and stored",
            artifact_bytes_fetched.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            artifact_bytes_fetched,
        }
    }

    pub fn reconciled(&self, controller: &'static str, took: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self, controller: &'static str, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { controller, reason })
            .inc();
    }

    pub fn fetched(&self, bytes: u64) {
        self.artifact_bytes_fetched.inc_by(bytes);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Encoding into a String cannot fail; an error here would be a bug in the library.
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::new();
        metrics.reconciled("model", Duration::from_millis(20));
        metrics.reconcile_failed("model", "fetch");
        let text = metrics.render();
        assert!(
            text.contains("shoal_operator_reconciles_total{controller=\"model\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "shoal_operator_reconcile_errors_total{controller=\"model\",reason=\"fetch\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("shoal_operator_reconcile_duration_seconds_bucket"),
            "{text}"
        );
    }
}
