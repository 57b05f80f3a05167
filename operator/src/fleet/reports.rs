//! The latest report of every agent, in memory, and the checks a report must pass
//! to get there. One entry per agent (pool and node), pruned when the pool or the
//! node goes away, so it is bounded by the fleet's size.

use crate::fleet::counter_deltas::{ModelDelta, counter_deltas};
use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::{
    AgentReport, MAX_LATENCY_BUCKETS, MAX_REPORTED_MODELS, ModelReport,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Longest `error` text kept from a report; the rest is cut off.
const MAX_ERROR_CHARS: usize = 1024;

/// One agent: the pool whose ServiceAccount it runs as, and its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Agent {
    pub namespace: String,
    pub pool: String,
    pub node: String,
}

/// An agent's latest report and when it arrived.
#[derive(Debug, Clone)]
pub struct LatestReport {
    pub received: Timestamp,
    pub report: AgentReport,
}

pub struct ReportIndex {
    operator_started: Timestamp,
    /// Shared, so that the controllers' passes over a pool copy no report.
    latest: Mutex<HashMap<Agent, Arc<LatestReport>>>,
}

impl ReportIndex {
    pub fn new(operator_started: Timestamp) -> Self {
        Self {
            operator_started,
            latest: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `report` as the agent's latest and returns what it adds to the fleet
    /// totals since the agent's previous report. A report whose `agentStartTime` is
    /// before the previous one's is refused (the error says why) and nothing is kept:
    /// start times that alternate would otherwise count the whole counters again on
    /// every report.
    pub fn record(
        &self,
        agent: Agent,
        report: AgentReport,
        now: Timestamp,
    ) -> Result<Vec<ModelDelta>, String> {
        let mut latest = self.lock();
        let previous = latest.get(&agent).map(|entry| &entry.report);
        if let Some(previous) = previous {
            start_time_not_earlier(previous, &report)?;
        }
        let deltas = counter_deltas(previous, &report, self.operator_started);
        latest.insert(
            agent,
            Arc::new(LatestReport {
                received: now,
                report,
            }),
        );
        Ok(deltas)
    }

    /// The latest reports of one pool's agents, by node.
    pub fn for_pool(&self, namespace: &str, pool: &str) -> HashMap<String, Arc<LatestReport>> {
        self.lock()
            .iter()
            .filter(|(key, _)| key.namespace == namespace && key.pool == pool)
            .map(|(key, entry)| (key.node.clone(), entry.clone()))
            .collect()
    }

    /// Every model version some agent's latest report names, as (namespace, model,
    /// version).
    pub fn versions(&self) -> Vec<(String, String, String)> {
        let latest = self.lock();
        let mut versions = Vec::new();
        for (agent, entry) in latest.iter() {
            for model in &entry.report.models {
                versions.push((
                    agent.namespace.clone(),
                    model.name.clone(),
                    model.version.clone(),
                ));
            }
        }
        versions
    }

    /// Forgets the agents `keep` says no longer exist (their pool or node is gone).
    pub fn retain(&self, keep: impl Fn(&Agent) -> bool) {
        self.lock().retain(|key, _| keep(key));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Agent, Arc<LatestReport>>> {
        // A panic while holding the lock cannot leave the map half-updated: every
        // change is one insert or retain. Keep serving.
        crate::runtime::lock(&self.latest)
    }
}

/// Checks a report sent to `/nodes/{node}/report` and trims what it may keep. The
/// error says what to fix in the agent.
pub fn validate_report(mut report: AgentReport, node: &str) -> Result<AgentReport, String> {
    if report.node != node {
        return Err(format!(
            "the report is for node {:?} but was sent to the path of node {node:?}; an agent reports only for its own node",
            report.node
        ));
    }
    if report.agent_start_time.parse::<Timestamp>().is_err() {
        return Err(format!(
            "agentStartTime {:?} is not an RFC 3339 time such as 2025-06-01T12:00:00Z",
            report.agent_start_time
        ));
    }
    if report.models.len() > MAX_REPORTED_MODELS {
        return Err(format!(
            "the report lists {} models; at most {MAX_REPORTED_MODELS} are accepted",
            report.models.len()
        ));
    }
    for model in &mut report.models {
        validate_model(model)?;
    }
    // Counter deltas match a model version to its entry of the last report by name
    // and version: a second entry for the same version would be compared with the
    // first one and re-add its difference on every report (found by fuzz/).
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = report
        .models
        .iter()
        .find(|model| !seen.insert((model.name.as_str(), model.version.as_str())))
    {
        return Err(format!(
            "the report lists model {} version {} twice; an agent reports each model version once",
            twice.name, twice.version
        ));
    }
    Ok(report)
}

/// Refuses a report whose `agentStartTime` is before the one of the same agent's
/// previous report. The error says what to check.
fn start_time_not_earlier(previous: &AgentReport, report: &AgentReport) -> Result<(), String> {
    let started = |report: &AgentReport| report.agent_start_time.parse::<Timestamp>().ok();
    match (started(previous), started(report)) {
        (Some(before), Some(now)) if now < before => Err(format!(
            "agentStartTime {} is before {}, the start time this agent reported last; a restarted agent reports a later start time, never an earlier one. Check the node's clock (NTP); the agent's reports are taken again once it reports a start time at or after {}",
            report.agent_start_time, previous.agent_start_time, previous.agent_start_time
        )),
        _ => Ok(()),
    }
}

/// Drops the entries of `report` whose model version `is_assigned(model, version)`
/// refuses (not assigned to the agent's node now or lately) and returns the rest
/// with the number dropped. The report itself is kept: a real agent with one stray
/// entry still reports its other versions.
pub fn keep_assigned(
    mut report: AgentReport,
    is_assigned: impl Fn(&str, &str) -> bool,
) -> (AgentReport, usize) {
    let listed = report.models.len();
    report
        .models
        .retain(|model| is_assigned(&model.name, &model.version));
    let dropped = listed - report.models.len();
    (report, dropped)
}

fn validate_model(model: &mut ModelReport) -> Result<(), String> {
    // Names and versions become metric labels: keep them to what the CRDs allow.
    if !is_object_name(&model.name) {
        return Err(format!(
            "model name {:?} is not a Model name (lowercase letters, digits, '-' and '.', at most 253)",
            model.name
        ));
    }
    if !is_version(&model.version) {
        return Err(format!(
            "model {} reports version {:?}; versions are 1 to 63 letters, digits, '.', '_' and '-'",
            model.name, model.version
        ));
    }
    if model.errors > model.requests {
        return Err(format!(
            "model {} {} reports {} errors out of {} requests; errors are counted among requests",
            model.name, model.version, model.errors, model.requests
        ));
    }
    if model.latency_buckets.len() > MAX_LATENCY_BUCKETS {
        return Err(format!(
            "model {} {} reports {} latency buckets; at most {MAX_LATENCY_BUCKETS} are accepted",
            model.name,
            model.version,
            model.latency_buckets.len()
        ));
    }
    if let Some(error) = &mut model.error
        && error.chars().count() > MAX_ERROR_CHARS
    {
        *error = error.chars().take(MAX_ERROR_CHARS).collect();
    }
    Ok(())
}

fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn is_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 63
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::{LatencyBucket, ModelState};

    fn report(node: &str) -> AgentReport {
        AgentReport {
            node: node.into(),
            agent_start_time: "2025-06-01T12:30:00Z".into(),
            agent_version: "0.1.0".into(),
            models: vec![ModelReport {
                name: "ranker".into(),
                version: "2.0".into(),
                state: ModelState::Serving,
                requests: 10,
                errors: 1,
                ..Default::default()
            }],
        }
    }

    fn key(pool: &str, node: &str) -> Agent {
        Agent {
            namespace: "shop".into(),
            pool: pool.into(),
            node: node.into(),
        }
    }

    #[test]
    fn valid_report_passes() {
        assert_eq!(validate_report(report("n1"), "n1"), Ok(report("n1")));
    }

    /// Breaks one thing in a valid report.
    type Spoil = fn(&mut AgentReport);

    #[test]
    fn invalid_reports_say_what_to_fix() {
        let cases: Vec<(&str, Spoil, &str)> = vec![
            ("other node", (|r| r.node = "n2".into()), "its own node"),
            (
                "start time",
                (|r| r.agent_start_time = "noon".into()),
                "RFC 3339",
            ),
            (
                "too many models",
                (|r| r.models = vec![r.models[0].clone(); MAX_REPORTED_MODELS + 1]),
                "at most",
            ),
            (
                "name",
                (|r| r.models[0].name = "Ranker!".into()),
                "not a Model name",
            ),
            (
                "version",
                (|r| r.models[0].version = "2 0".into()),
                "versions are",
            ),
            (
                "errors over requests",
                (|r| r.models[0].errors = 11),
                "counted among requests",
            ),
            (
                "buckets",
                (|r| {
                    r.models[0].latency_buckets =
                        vec![LatencyBucket::default(); MAX_LATENCY_BUCKETS + 1]
                }),
                "latency buckets",
            ),
        ];
        for (what, spoil, says) in cases {
            let mut bad = report("n1");
            spoil(&mut bad);
            let error = validate_report(bad, "n1").expect_err(what);
            assert!(error.contains(says), "{what}: {error}");
        }
    }

    /// Regression (fuzz/ agent_protocol): a report with one model version twice,
    /// counters 1 then 5, re-added 4 requests to the fleet totals on every report.
    #[test]
    fn a_model_version_listed_twice_is_refused() {
        let mut twice = report("n1");
        twice.models.push(ModelReport {
            requests: 50,
            ..twice.models[0].clone()
        });
        let error = validate_report(twice, "n1").expect_err("refused");
        assert!(error.contains("ranker version 2.0 twice"), "{error}");
        // The same name at another version is a different entry.
        let mut two_versions = report("n1");
        two_versions.models.push(ModelReport {
            version: "1.0".into(),
            ..two_versions.models[0].clone()
        });
        assert!(validate_report(two_versions, "n1").is_ok());
    }

    #[test]
    fn long_errors_are_cut() {
        let mut long = report("n1");
        long.models[0].error = Some("x".repeat(5000));
        let kept = validate_report(long, "n1").expect("valid");
        assert_eq!(
            kept.models[0].error.as_ref().map(String::len),
            Some(MAX_ERROR_CHARS)
        );
    }

    #[test]
    fn entries_of_versions_not_assigned_are_dropped() {
        let mut mixed = report("n1");
        for (name, version) in [("ranker", "made-up-1"), ("other", "2.0"), ("ranker", "1.0")] {
            mixed.models.push(ModelReport {
                name: name.into(),
                version: version.into(),
                ..mixed.models[0].clone()
            });
        }
        let assigned = |model: &str, version: &str| {
            model == "ranker" && (version == "2.0" || version == "1.0")
        };
        let (kept, dropped) = keep_assigned(mixed, assigned);
        assert_eq!(dropped, 2);
        let versions: Vec<(&str, &str)> = kept
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.version.as_str()))
            .collect();
        assert_eq!(versions, [("ranker", "2.0"), ("ranker", "1.0")]);
        assert_eq!(
            (kept.node.as_str(), kept.agent_version.as_str()),
            ("n1", "0.1.0")
        );
    }

    #[test]
    fn a_start_time_that_goes_back_is_refused_and_nothing_is_kept() {
        let started: Timestamp = "2025-06-01T12:00:00Z".parse().expect("timestamp");
        let now: Timestamp = "2025-06-01T13:00:00Z".parse().expect("timestamp");
        let index = ReportIndex::new(started);
        let at = |start: &str, requests: u64| {
            let mut r = report("n1");
            r.agent_start_time = start.into();
            r.models[0].requests = requests;
            r
        };
        let agent = key("stores", "n1");
        let first = index.record(agent.clone(), at("2025-06-01T12:30:00Z", 10), now);
        assert_eq!(first.map(|d| d[0].requests), Ok(10));
        // The same start time written another way is not earlier.
        let same = index.record(agent.clone(), at("2025-06-01T14:30:00+02:00", 12), now);
        assert_eq!(same.map(|d| d[0].requests), Ok(2));
        let error = index
            .record(agent.clone(), at("2025-06-01T12:10:00Z", 500), now)
            .expect_err("an earlier start time is refused");
        assert!(
            error.contains("2025-06-01T12:10:00Z") && error.contains("before"),
            "{error}"
        );
        assert_eq!(
            index.for_pool("shop", "stores")["n1"].report.models[0].requests,
            12,
            "the refused report is not kept"
        );
        // A later start time is a restart: it counts from zero.
        let restarted = index.record(agent, at("2025-06-01T12:50:00Z", 3), now);
        assert_eq!(restarted.map(|d| d[0].requests), Ok(3));
    }

    #[test]
    fn index_keeps_the_latest_report_per_agent_and_prunes() {
        let started: Timestamp = "2025-06-01T12:00:00Z".parse().expect("timestamp");
        let now: Timestamp = "2025-06-01T13:00:00Z".parse().expect("timestamp");
        let index = ReportIndex::new(started);
        let first = index
            .record(key("stores", "n1"), report("n1"), now)
            .expect("recorded");
        assert_eq!(
            first.len(),
            1,
            "an agent newer than the operator counts in full"
        );
        let mut more = report("n1");
        more.models[0].requests = 15;
        let second = index
            .record(key("stores", "n1"), more, now)
            .expect("recorded");
        assert_eq!(second[0].requests, 5);
        for (pool, node) in [("stores", "n2"), ("kiosks", "n1")] {
            index
                .record(key(pool, node), report(node), now)
                .expect("recorded");
        }
        assert_eq!(index.len(), 3);
        let stores = index.for_pool("shop", "stores");
        assert_eq!(stores.len(), 2);
        assert_eq!(stores["n1"].report.models[0].requests, 15);
        index.retain(|agent| agent.node != "n1");
        assert_eq!(index.len(), 1);
    }
}
