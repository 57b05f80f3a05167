//! The operator's Prometheus metrics: reconcile counts, durations and errors per
//! controller, what the Model controller fetched, the agent API's requests and the
//! fleet totals aggregated from agent reports. Rendered as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// Most distinct {namespace, model, version, pool} series the fleet totals keep.
/// Model names and versions come from agent reports; this bounds what a
/// misbehaving agent can do to the operator's memory and to Prometheus.
pub const MAX_FLEET_SERIES: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

/// One model version served in one pool, as agents report it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetLabels {
    pub namespace: String,
    pub model: String,
    pub version: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentStateLabels {
    pub namespace: String,
    pub pool: String,
    /// `connected` or `stale`.
    pub state: &'static str,
}

/// One EdgePool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub namespace: String,
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentApiLabels {
    /// `assignment`, `artifact`, `report` or `unmatched`.
    pub route: &'static str,
    pub code: u16,
}

/// One ModelRollout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub namespace: String,
    pub rollout: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutPhaseLabels {
    pub namespace: String,
    pub rollout: String,
    pub model: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutEventLabels {
    pub namespace: String,
    pub rollout: String,
    pub model: String,
    /// The Event reason: RolloutStarted, StepStarted, Succeeded, RolledBack, ...
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CohortLabels {
    pub namespace: String,
    pub rollout: String,
    pub model: String,
    /// `canary` or `stable`.
    pub cohort: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompressionLabels {
    /// `int8` or `fp16`.
    pub mode: &'static str,
    /// `passed`, `gate_failed` or `error`.
    pub result: &'static str,
}

/// Every phase a rollout can be in, for the one-hot `shoal_rollout_phase` gauge.
pub const ROLLOUT_PHASES: [&str; 6] = [
    "Progressing",
    "Paused",
    "Succeeded",
    "Degraded",
    "RolledBack",
    "Aborted",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenReviewLabels {
    /// `authenticated`, `rejected` or `error`.
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram>,
    artifact_bytes_fetched: Counter,
    /// Fleet and agent API metrics, named `shoal_fleet_*` and `shoal_agent_api_*`
    /// (no `shoal_operator_` prefix): they describe the fleet, not this process.
    fleet_registry: Registry,
    fleet_requests: Family<FleetLabels, Counter>,
    fleet_errors: Family<FleetLabels, Counter>,
    fleet_series: Mutex<HashSet<FleetLabels>>,
    fleet_agents: Family<AgentStateLabels, Gauge>,
    unassigned_report_entries: Family<PoolLabels, Counter>,
    agent_api_requests: Family<AgentApiLabels, Counter>,
    long_polls: Gauge,
    token_reviews: Family<TokenReviewLabels, Counter>,
    compressions: Family<CompressionLabels, Counter>,
    rollout_phase: Family<RolloutPhaseLabels, Gauge>,
    rollout_weight: Family<RolloutLabels, Gauge>,
    rollout_step_started: Family<RolloutLabels, Gauge>,
    rollout_events: Family<RolloutEventLabels, Counter>,
    rollout_error_ratio: Family<CohortLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rollout_p99: Family<CohortLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Every rollout and event label set written, so that a deleted rollout's
    /// series can be dropped ([`Metrics::retain_rollouts`]).
    rollout_series: Mutex<HashSet<RolloutLabels>>,
    rollout_event_series: Mutex<HashSet<RolloutEventLabels>>,
}

/// Counts one long-poll in flight until dropped.
pub struct LongPollGuard(Gauge);

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
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
        let mut fleet_registry = Registry::default();
        let fleet_requests = Family::<FleetLabels, Counter>::default();
        let fleet_errors = Family::<FleetLabels, Counter>::default();
        let fleet_agents = Family::<AgentStateLabels, Gauge>::default();
        let unassigned_report_entries = Family::<PoolLabels, Counter>::default();
        let agent_api_requests = Family::<AgentApiLabels, Counter>::default();
        let long_polls = Gauge::default();
        let token_reviews = Family::<TokenReviewLabels, Counter>::default();
        fleet_registry.register(
            "shoal_fleet_requests",
            "Inference requests edge agents answered, from their reports",
            fleet_requests.clone(),
        );
        fleet_registry.register(
            "shoal_fleet_errors",
            "Inference requests edge agents answered with a 5xx status, from their reports",
            fleet_errors.clone(),
        );
        fleet_registry.register(
            "shoal_fleet_agents",
            "Agents of each pool that reported within the stale timeout (connected) or not (stale)",
            fleet_agents.clone(),
        );
        fleet_registry.register(
            "shoal_fleet_unassigned_report_entries",
            "Entries of agent reports naming a model version the agent's node was not assigned (now or in the last hour); dropped, not counted",
            unassigned_report_entries.clone(),
        );
        fleet_registry.register(
            "shoal_agent_api_requests",
            "Requests to the agent API, per route and status code",
            agent_api_requests.clone(),
        );
        fleet_registry.register(
            "shoal_agent_api_long_polls_in_flight",
            "Assignment long-polls waiting for a change",
            long_polls.clone(),
        );
        fleet_registry.register(
            "shoal_agent_api_token_reviews",
            "TokenReviews the agent API sent to the API server (cache misses), per outcome",
            token_reviews.clone(),
        );
        let compressions = Family::<CompressionLabels, Counter>::default();
        registry.register(
            "compressions",
            "Model compressions run, by mode and result (passed, gate_failed, error)",
            compressions.clone(),
        );
        let rollout_phase = Family::<RolloutPhaseLabels, Gauge>::default();
        fleet_registry.register(
            "shoal_rollout_phase",
            "1 for the phase each ModelRollout is in, 0 for the others",
            rollout_phase.clone(),
        );
        let rollout_weight = Family::<RolloutLabels, Gauge>::default();
        fleet_registry.register(
            "shoal_rollout_weight",
            "Percent of agents each ModelRollout assigns its canary version (status.weight)",
            rollout_weight.clone(),
        );
        let rollout_step_started = Family::<RolloutLabels, Gauge>::default();
        fleet_registry.register(
            "shoal_rollout_step_started_timestamp_seconds",
            "Unix time the current step of each ModelRollout started",
            rollout_step_started.clone(),
        );
        let rollout_events = Family::<RolloutEventLabels, Counter>::default();
        fleet_registry.register(
            "shoal_rollout_events",
            "ModelRollout transitions (the Events the operator emitted), by reason",
            rollout_events.clone(),
        );
        let rollout_error_ratio =
            Family::<CohortLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        fleet_registry.register(
            "shoal_rollout_analysis_error_ratio",
            "Error rate (0 to 1) of each cohort in the last analysis of each ModelRollout",
            rollout_error_ratio.clone(),
        );
        let rollout_p99 =
            Family::<CohortLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        fleet_registry.register(
            "shoal_rollout_analysis_p99_seconds",
            "p99 latency of each cohort in the last analysis of each ModelRollout",
            rollout_p99.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            artifact_bytes_fetched,
            fleet_registry,
            fleet_requests,
            fleet_errors,
            fleet_series: Mutex::new(HashSet::new()),
            rollout_series: Mutex::new(HashSet::new()),
            rollout_event_series: Mutex::new(HashSet::new()),
            fleet_agents,
            unassigned_report_entries,
            agent_api_requests,
            long_polls,
            token_reviews,
            compressions,
            rollout_phase,
            rollout_weight,
            rollout_step_started,
            rollout_events,
            rollout_error_ratio,
            rollout_p99,
        }
    }

    pub fn compressed(&self, mode: &'static str, result: &'static str) {
        self.compressions
            .get_or_create(&CompressionLabels { mode, result })
            .inc();
    }

    /// Sets the gauges of one rollout from its status.
    pub fn rollout_status(&self, rollout: &RolloutLabels, status: &shoal_api::ModelRolloutStatus) {
        lock_set(&self.rollout_series).insert(rollout.clone());
        let current = status.phase.map(|phase| format!("{phase:?}"));
        for phase in ROLLOUT_PHASES {
            let labels = RolloutPhaseLabels {
                namespace: rollout.namespace.clone(),
                rollout: rollout.rollout.clone(),
                model: rollout.model.clone(),
                phase,
            };
            let value = i64::from(current.as_deref() == Some(phase));
            self.rollout_phase.get_or_create(&labels).set(value);
        }
        self.rollout_weight
            .get_or_create(rollout)
            .set(i64::from(status.weight.unwrap_or(0)));
        if let Some(started) = &status.step_started_at {
            self.rollout_step_started
                .get_or_create(rollout)
                .set(started.0.as_second());
        }
        if let Some(analysis) = &status.last_analysis {
            for (cohort, figures) in [("canary", &analysis.canary), ("stable", &analysis.stable)] {
                let labels = CohortLabels {
                    namespace: rollout.namespace.clone(),
                    rollout: rollout.rollout.clone(),
                    model: rollout.model.clone(),
                    cohort,
                };
                self.rollout_error_ratio
                    .get_or_create(&labels)
                    .set(figures.error_rate);
                if let Some(p99) = figures.p99_ms {
                    self.rollout_p99.get_or_create(&labels).set(p99 / 1000.0);
                }
            }
        }
    }

    pub fn rollout_event(&self, rollout: &RolloutLabels, reason: &'static str) {
        let labels = RolloutEventLabels {
            namespace: rollout.namespace.clone(),
            rollout: rollout.rollout.clone(),
            model: rollout.model.clone(),
            reason,
        };
        self.rollout_events.get_or_create(&labels).inc();
        lock_set(&self.rollout_event_series).insert(labels);
    }

    /// Drops every series of the rollouts `keep` refuses: deleted rollouts, or a
    /// rollout's old `model` label after its spec.model changed.
    pub fn retain_rollouts(&self, keep: impl Fn(&RolloutLabels) -> bool) {
        let gone: Vec<RolloutLabels> = {
            let mut series = lock_set(&self.rollout_series);
            let gone = series.iter().filter(|r| !keep(r)).cloned().collect();
            series.retain(|r| keep(r));
            gone
        };
        for rollout in &gone {
            for phase in ROLLOUT_PHASES {
                self.rollout_phase.remove(&RolloutPhaseLabels {
                    namespace: rollout.namespace.clone(),
                    rollout: rollout.rollout.clone(),
                    model: rollout.model.clone(),
                    phase,
                });
            }
            self.rollout_weight.remove(rollout);
            self.rollout_step_started.remove(rollout);
            for cohort in ["canary", "stable"] {
                let labels = CohortLabels {
                    namespace: rollout.namespace.clone(),
                    rollout: rollout.rollout.clone(),
                    model: rollout.model.clone(),
                    cohort,
                };
                self.rollout_error_ratio.remove(&labels);
                self.rollout_p99.remove(&labels);
            }
        }
        lock_set(&self.rollout_event_series).retain(|event| {
            let rollout = RolloutLabels {
                namespace: event.namespace.clone(),
                rollout: event.rollout.clone(),
                model: event.model.clone(),
            };
            let kept = keep(&rollout);
            if !kept {
                self.rollout_events.remove(event);
            }
            kept
        });
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

    /// Adds what agents served since their last report to the fleet totals. Returns
    /// false when the series is new and the limit of [`MAX_FLEET_SERIES`] is reached.
    pub fn fleet_served(&self, labels: FleetLabels, requests: u64, errors: u64) -> bool {
        {
            let mut series = crate::runtime::lock(&self.fleet_series);
            if !series.contains(&labels) {
                if series.len() >= MAX_FLEET_SERIES {
                    return false;
                }
                series.insert(labels.clone());
            }
        }
        self.fleet_requests.get_or_create(&labels).inc_by(requests);
        self.fleet_errors.get_or_create(&labels).inc_by(errors);
        true
    }

    /// Every fleet series that counts, for [`Metrics::forget_fleet_series`].
    pub fn fleet_series(&self) -> Vec<FleetLabels> {
        crate::runtime::lock(&self.fleet_series)
            .iter()
            .cloned()
            .collect()
    }

    /// Drops fleet series whose version nothing names any more, making room under
    /// [`MAX_FLEET_SERIES`] for new versions. Counted again, a series starts from 0
    /// (a counter reset, which Prometheus' `rate` and `increase` handle).
    pub fn forget_fleet_series(&self, gone: &[FleetLabels]) {
        let mut series = crate::runtime::lock(&self.fleet_series);
        for labels in gone {
            series.remove(labels);
            self.fleet_requests.remove(labels);
            self.fleet_errors.remove(labels);
        }
    }

    /// Counts `count` report entries of pool `pool`'s agents that named a model
    /// version not assigned to their node.
    pub fn unassigned_report_entries(&self, namespace: &str, pool: &str, count: u64) {
        self.unassigned_report_entries
            .get_or_create(&PoolLabels {
                namespace: namespace.to_string(),
                pool: pool.to_string(),
            })
            .inc_by(count);
    }

    pub fn set_fleet_agents(&self, namespace: &str, pool: &str, connected: i32, stale: i32) {
        for (state, count) in [("connected", connected), ("stale", stale)] {
            self.fleet_agents
                .get_or_create(&agent_state_labels(namespace, pool, state))
                .set(i64::from(count));
        }
    }

    /// Drops the agent gauges and the unassigned-entry count of a pool that no
    /// longer exists.
    pub fn forget_fleet_agents(&self, namespace: &str, pool: &str) {
        for state in ["connected", "stale"] {
            self.fleet_agents
                .remove(&agent_state_labels(namespace, pool, state));
        }
        self.unassigned_report_entries.remove(&PoolLabels {
            namespace: namespace.to_string(),
            pool: pool.to_string(),
        });
    }

    pub fn agent_api_request(&self, route: &'static str, code: u16) {
        self.agent_api_requests
            .get_or_create(&AgentApiLabels { route, code })
            .inc();
    }

    pub fn long_poll_started(&self) -> LongPollGuard {
        self.long_polls.inc();
        LongPollGuard(self.long_polls.clone())
    }

    pub fn token_reviewed(&self, outcome: &'static str) {
        self.token_reviews
            .get_or_create(&TokenReviewLabels { outcome })
            .inc();
    }

    /// Metrics with one example series in every family, so that the exposition lists
    /// every metric this binary exports (families without a series print nothing).
    /// What `shoal-operator metrics` prints; the chart checks its queries against it.
    pub fn with_example_series() -> Self {
        let metrics = Self::new();
        metrics.reconciled("model", Duration::from_millis(1));
        metrics.reconcile_failed("model", "example");
        metrics.fetched(0);
        metrics.fleet_served(
            FleetLabels {
                namespace: "example".into(),
                model: "example".into(),
                version: "example".into(),
                pool: "example".into(),
            },
            0,
            0,
        );
        metrics.set_fleet_agents("example", "example", 0, 0);
        metrics.unassigned_report_entries("example", "example", 0);
        metrics.agent_api_request("assignment", 200);
        metrics.token_reviewed("authenticated");
        metrics.compressed("int8", "passed");
        let rollout = RolloutLabels {
            namespace: "example".into(),
            rollout: "example".into(),
            model: "example".into(),
        };
        let figures = shoal_api::CohortFigures {
            requests: 0,
            error_rate: 0.0,
            p99_ms: Some(0.0),
        };
        metrics.rollout_status(
            &rollout,
            &shoal_api::ModelRolloutStatus {
                step_started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                )),
                last_analysis: Some(shoal_api::AnalysisResult {
                    canary: figures.clone(),
                    stable: figures,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        metrics.rollout_event(&rollout, "Succeeded");
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut text = String::new();
        // Encoding into a String cannot fail; an error here would be a bug in the library.
        let encoded = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &self.fleet_registry))
            .and_then(|()| encode_eof(&mut text));
        if encoded.is_err() {
            text.clear();
        }
        text
    }
}

fn lock_set<T>(set: &Mutex<HashSet<T>>) -> std::sync::MutexGuard<'_, HashSet<T>> {
    crate::runtime::lock(set)
}

fn agent_state_labels(namespace: &str, pool: &str, state: &'static str) -> AgentStateLabels {
    AgentStateLabels {
        namespace: namespace.to_string(),
        pool: pool.to_string(),
        state,
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

    #[test]
    fn a_deleted_rollouts_series_are_dropped() {
        let metrics = Metrics::new();
        let rollout = |name: &str| RolloutLabels {
            namespace: "shop".into(),
            rollout: name.into(),
            model: "ranker".into(),
        };
        let status: shoal_api::ModelRolloutStatus = serde_json::from_value(serde_json::json!({
            "phase": "Progressing",
            "weight": 20,
            "lastAnalysis": {
                "canary": { "requests": 10, "errors": 0, "errorRate": 0.0, "p99Ms": 4.0 },
                "stable": { "requests": 10, "errors": 0, "errorRate": 0.0 },
                "verdict": "Pass"
            }
        }))
        .expect("status parses");
        for name in ["kept", "deleted"] {
            metrics.rollout_status(&rollout(name), &status);
            metrics.rollout_event(&rollout(name), "RolloutStarted");
        }
        metrics.retain_rollouts(|r| r.rollout == "kept");
        let text = metrics.render();
        assert!(text.contains("rollout=\"kept\""), "{text}");
        assert!(!text.contains("rollout=\"deleted\""), "{text}");
    }

    #[test]
    fn renders_fleet_metrics_without_the_operator_prefix() {
        let metrics = Metrics::new();
        let labels = FleetLabels {
            namespace: "shop".into(),
            model: "ranker".into(),
            version: "2.0".into(),
            pool: "stores".into(),
        };
        assert!(metrics.fleet_served(labels.clone(), 10, 1));
        assert!(metrics.fleet_served(labels, 5, 0));
        metrics.set_fleet_agents("shop", "stores", 3, 1);
        metrics.agent_api_request("report", 204);
        let polling = metrics.long_poll_started();
        let text = metrics.render();
        for line in [
            "shoal_fleet_requests_total{namespace=\"shop\",model=\"ranker\",version=\"2.0\",pool=\"stores\"} 15",
            "shoal_fleet_errors_total{namespace=\"shop\",model=\"ranker\",version=\"2.0\",pool=\"stores\"} 1",
            "shoal_fleet_agents{namespace=\"shop\",pool=\"stores\",state=\"stale\"} 1",
            "shoal_agent_api_requests_total{route=\"report\",code=\"204\"} 1",
            "shoal_agent_api_long_polls_in_flight 1",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        drop(polling);
        assert!(
            metrics
                .render()
                .contains("shoal_agent_api_long_polls_in_flight 0")
        );
        metrics.forget_fleet_agents("shop", "stores");
        assert!(!metrics.render().contains("shoal_fleet_agents{"));
    }

    #[test]
    fn fleet_series_are_bounded() {
        let metrics = Metrics::new();
        let labels = |version: usize| FleetLabels {
            namespace: "shop".into(),
            model: "m".into(),
            version: version.to_string(),
            pool: "p".into(),
        };
        for version in 0..MAX_FLEET_SERIES {
            assert!(metrics.fleet_served(labels(version), 1, 0));
        }
        assert!(!metrics.fleet_served(labels(MAX_FLEET_SERIES), 1, 0));
        assert!(
            metrics.fleet_served(labels(0), 1, 0),
            "known series keep counting"
        );
    }
}
