//! The agent's metrics: Prometheus text for `/metrics`, and the same request
//! counters kept per model version for the reports managed mode sends home.
//! Only counts and durations are recorded, never anything from a request body.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shoal_api::agent_protocol::{LatencyBucket, ModelReport, ModelState};

/// Upper bounds of the latency buckets, in milliseconds; the Prometheus
/// histogram uses the same bounds in seconds, so both views agree.
pub const LATENCY_BOUNDS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    version: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
}

impl ModelLabels {
    fn new(model: &str, version: &str) -> ModelLabels {
        ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        }
    }
}

/// Cumulative request counters of one model version since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestCounters {
    pub requests: u64,
    /// Requests answered with a 5xx status.
    pub errors: u64,
    /// Requests at or below each bound of `LATENCY_BOUNDS_MS` (cumulative).
    pub buckets: [u64; LATENCY_BOUNDS_MS.len()],
    pub latency_sum_ms: f64,
}

/// The state of one model version, as the registry knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionStatus {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    pub error: Option<String>,
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: HistogramFamily,
    load_seconds: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    loaded: Family<ModelLabels, Gauge>,
    queue_depth: Gauge,
    counters: Mutex<BTreeMap<(String, String), RequestCounters>>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BOUNDS_MS.iter().map(|ms| ms / 1000.0))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let load_seconds = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        let loaded = Family::<ModelLabels, Gauge>::default();
        let queue_depth = Gauge::default();
        // The Counter encoder appends `_total`.
        registry.register(
            "shoal_agent_requests",
            "Inference requests answered, by model, version and HTTP status code",
            requests.clone(),
        );
        registry.register(
            "shoal_agent_request_duration_seconds",
            "Time from receiving an inference request to answering it",
            durations.clone(),
        );
        registry.register(
            "shoal_agent_model_load_seconds",
            "Time the model version took to parse, optimize and warm up",
            load_seconds.clone(),
        );
        registry.register(
            "shoal_agent_model_loaded",
            "1 for the model version being served",
            loaded.clone(),
        );
        registry.register(
            "shoal_agent_queue_depth",
            "Inference requests waiting for a free worker",
            queue_depth.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            load_seconds,
            loaded,
            queue_depth,
            counters: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one answered inference request of a known model version.
    pub fn record_request(&self, model: &str, version: &str, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                version: version.to_string(),
                code,
            })
            .inc();
        self.durations
            .get_or_create(&ModelLabels::new(model, version))
            .observe(elapsed.as_secs_f64());
        let ms = elapsed.as_secs_f64() * 1000.0;
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = counters
            .entry((model.to_string(), version.to_string()))
            .or_default();
        entry.requests += 1;
        if code >= 500 {
            entry.errors += 1;
        }
        for (bound, count) in LATENCY_BOUNDS_MS.iter().zip(entry.buckets.iter_mut()) {
            if ms <= *bound {
                *count += 1;
            }
        }
        entry.latency_sum_ms += ms;
    }

    /// Records a request for a model this agent does not serve. Its labels are
    /// empty on purpose: client-chosen names must not create new series.
    pub fn record_unknown_model(&self, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                model: String::new(),
                version: String::new(),
                code,
            })
            .inc();
    }

    /// Records how long a version took to parse, optimize and warm up.
    pub fn record_load(&self, model: &str, version: &str, load_time: Duration) {
        self.load_seconds
            .get_or_create(&ModelLabels::new(model, version))
            .set(load_time.as_secs_f64());
    }

    pub fn model_serving(&self, model: &str, version: &str) {
        self.loaded
            .get_or_create(&ModelLabels::new(model, version))
            .set(1);
    }

    /// The version stopped serving: its loaded series goes away; its request
    /// series stay, they are cumulative.
    pub fn model_retired(&self, model: &str, version: &str) {
        self.loaded.remove(&ModelLabels::new(model, version));
    }

    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn counters(&self, model: &str, version: &str) -> RequestCounters {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(model.to_string(), version.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// One report per model version in `statuses`, with its cumulative counters.
    /// A version that no longer has a status (replaced by a newer one) is not
    /// reported, though its counters stay in `/metrics`.
    pub fn model_reports(&self, statuses: &[VersionStatus]) -> Vec<ModelReport> {
        statuses
            .iter()
            .map(|status| {
                let counters = self.counters(&status.name, &status.version);
                ModelReport {
                    name: status.name.clone(),
                    version: status.version.clone(),
                    state: status.state,
                    error: status.error.clone(),
                    requests: counters.requests,
                    errors: counters.errors,
                    latency_buckets: LATENCY_BOUNDS_MS
                        .iter()
                        .zip(counters.buckets)
                        .map(|(le_ms, count)| LatencyBucket {
                            le_ms: *le_ms,
                            count,
                        })
                        .collect(),
                    latency_sum_ms: counters.latency_sum_ms,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_cumulative_and_count_5xx_as_errors() {
        let metrics = Metrics::new();
        metrics.record_request("m", "1", 200, Duration::from_millis(3));
        metrics.record_request("m", "1", 400, Duration::from_micros(200));
        metrics.record_request("m", "1", 500, Duration::from_secs(20));
        let counters = metrics.counters("m", "1");
        assert_eq!(counters.requests, 3);
        assert_eq!(counters.errors, 1);
        // 0.2 ms is in every bucket, 3 ms from 5 ms on, 20 s in none.
        assert_eq!(counters.buckets[0], 1);
        assert_eq!(counters.buckets[3], 2);
        assert_eq!(counters.buckets[13], 2);
        assert!((counters.latency_sum_ms - 20003.2).abs() < 1e-6);
    }

    #[test]
    fn reports_follow_statuses() {
        let metrics = Metrics::new();
        metrics.record_request("m", "1", 200, Duration::from_millis(1));
        let reports = metrics.model_reports(&[
            VersionStatus {
                name: "m".into(),
                version: "1".into(),
                state: ModelState::Serving,
                error: None,
            },
            VersionStatus {
                name: "m".into(),
                version: "2".into(),
                state: ModelState::Failed,
                error: Some("bad".into()),
            },
        ]);
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].requests, 1);
        assert_eq!(reports[0].latency_buckets.len(), LATENCY_BOUNDS_MS.len());
        assert_eq!(reports[0].latency_buckets[1].le_ms, 1.0);
        assert_eq!(reports[0].latency_buckets[1].count, 1);
        assert_eq!(reports[1].state, ModelState::Failed);
        assert_eq!(reports[1].requests, 0);
    }

    #[test]
    fn exposition_names() {
        let metrics = Metrics::new();
        metrics.record_request("m", "1", 200, Duration::from_millis(1));
        metrics.record_load("m", "1", Duration::from_millis(120));
        metrics.model_serving("m", "1");
        metrics.set_queue_depth(2);
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(r#"shoal_agent_requests_total{model="m",version="1",code="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"shoal_agent_request_duration_seconds_bucket{le="0.001",model="m",version="1"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"shoal_agent_model_load_seconds{model="m",version="1"} 0.12"#),
            "{text}"
        );
        assert!(
            text.contains(r#"shoal_agent_model_loaded{model="m",version="1"} 1"#),
            "{text}"
        );
        assert!(text.contains("shoal_agent_queue_depth 2"), "{text}");
        metrics.model_retired("m", "1");
        let text = metrics.encode().expect("encodes");
        assert!(!text.contains("shoal_agent_model_loaded{"), "{text}");
    }
}
