//! How a pool's agents are doing, from their latest reports: connected or stale, and
//! how many serve each model version. Pure; the EdgePool status and the fleet gauges
//! are written from it.

use k8s_openapi::jiff::Timestamp;
use shoal_api::VersionCount;
use shoal_api::agent_protocol::{AgentReport, ModelState};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where one node's agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Reported within the stale timeout.
    Connected,
    /// Silent for longer than the stale timeout.
    Stale,
    /// Never reported, but the node is newer than the timeout (an agent starting up).
    Starting,
}

/// One node a pool selects, with its agent's latest report if any.
pub struct PoolNode<'a> {
    /// The Node's creationTimestamp.
    pub created: Option<Timestamp>,
    /// When the latest report arrived, and the report.
    pub last_report: Option<(Timestamp, &'a AgentReport)>,
}

/// A pool's agents, aggregated: never one entry per node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolAgents {
    pub connected: i32,
    pub stale: i32,
    /// Connected agents per model and version they report Serving, sorted.
    pub versions: Vec<VersionCount>,
}

/// The rule for `agentsStale`: a node's agent is stale when nothing was heard from
/// it for longer than `stale_after`. An agent that never reported is measured from
/// the later of its node's creation and the operator's start, so new nodes and a
/// restarted operator give agents that long to report first.
pub fn agent_state(
    last_report: Option<Timestamp>,
    node_created: Option<Timestamp>,
    now: Timestamp,
    stale_after: Duration,
    operator_started: Timestamp,
) -> AgentState {
    let silent_since = |since: Timestamp| older_than(now, since, stale_after);
    match last_report {
        Some(received) if silent_since(received) => AgentState::Stale,
        Some(_) => AgentState::Connected,
        None => {
            let since = node_created.map_or(operator_started, |c| c.max(operator_started));
            if silent_since(since) {
                AgentState::Stale
            } else {
                AgentState::Starting
            }
        }
    }
}

/// Aggregates the agents of one pool's nodes.
pub fn pool_agents<'a>(
    nodes: impl IntoIterator<Item = PoolNode<'a>>,
    now: Timestamp,
    stale_after: Duration,
    operator_started: Timestamp,
) -> PoolAgents {
    let mut agents = PoolAgents::default();
    let mut serving: BTreeMap<(&str, &str), i32> = BTreeMap::new();
    for node in nodes {
        let received = node.last_report.map(|(received, _)| received);
        match agent_state(received, node.created, now, stale_after, operator_started) {
            AgentState::Stale => agents.stale += 1,
            AgentState::Starting => {}
            AgentState::Connected => {
                agents.connected += 1;
                let models = node.last_report.map_or(&[][..], |(_, r)| &r.models[..]);
                for model in models.iter().filter(|m| m.state == ModelState::Serving) {
                    *serving
                        .entry((model.name.as_str(), model.version.as_str()))
                        .or_default() += 1;
                }
            }
        }
    }
    agents.versions = serving
        .into_iter()
        .map(|((model, version), count)| VersionCount {
            model: model.to_string(),
            version: version.to_string(),
            agents: count,
        })
        .collect();
    agents
}

/// True when more than `limit` passed from `then` to `now` (never for a future `then`).
fn older_than(now: Timestamp, then: Timestamp, limit: Duration) -> bool {
    Duration::try_from(now.duration_since(then)).is_ok_and(|age| age > limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::ModelReport;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + seconds).expect("timestamp")
    }

    #[test]
    fn staleness_table() {
        use AgentState::*;
        let started = at(0);
        // (what, last report, node created, now, want)
        let cases = [
            ("fresh report", Some(at(100)), None, at(130), Connected),
            (
                "report exactly at the limit",
                Some(at(100)),
                None,
                at(160),
                Connected,
            ),
            ("report too old", Some(at(100)), None, at(161), Stale),
            (
                "report from the future",
                Some(at(500)),
                None,
                at(100),
                Connected,
            ),
            (
                "never reported, operator just started",
                None,
                None,
                at(30),
                Starting,
            ),
            (
                "never reported, operator up long",
                None,
                None,
                at(61),
                Stale,
            ),
            (
                "never reported, old node",
                None,
                Some(at(-1000)),
                at(61),
                Stale,
            ),
            (
                "never reported, new node",
                None,
                Some(at(100)),
                at(150),
                Starting,
            ),
            (
                "never reported, node new long ago",
                None,
                Some(at(100)),
                at(161),
                Stale,
            ),
        ];
        for (what, last, created, now, want) in cases {
            assert_eq!(
                agent_state(last, created, now, MINUTE, started),
                want,
                "{what}"
            );
        }
    }

    fn report(models: &[(&str, &str, ModelState)]) -> AgentReport {
        AgentReport {
            node: "n".into(),
            agent_start_time: "2025-01-01T00:00:00Z".into(),
            models: models
                .iter()
                .map(|(name, version, state)| ModelReport {
                    name: name.to_string(),
                    version: version.to_string(),
                    state: *state,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn counts_connected_agents_per_serving_version() {
        use ModelState::*;
        let a = report(&[("ranker", "2", Serving), ("fraud", "1", Serving)]);
        let b = report(&[("ranker", "2", Serving), ("ranker", "3", Loading)]);
        let c = report(&[("ranker", "1", Serving), ("fraud", "2", Failed)]);
        let silent = report(&[("ranker", "1", Serving)]);
        let now = at(1000);
        let nodes = vec![
            PoolNode {
                created: None,
                last_report: Some((at(990), &a)),
            },
            PoolNode {
                created: None,
                last_report: Some((at(995), &b)),
            },
            PoolNode {
                created: None,
                last_report: Some((at(999), &c)),
            },
            PoolNode {
                created: None,
                last_report: Some((at(100), &silent)),
            },
            PoolNode {
                created: None,
                last_report: None,
            },
            PoolNode {
                created: Some(at(980)),
                last_report: None,
            },
        ];
        let agents = pool_agents(nodes, now, MINUTE, at(0));
        assert_eq!((agents.connected, agents.stale), (3, 2));
        let versions: Vec<_> = agents
            .versions
            .iter()
            .map(|v| (v.model.as_str(), v.version.as_str(), v.agents))
            .collect();
        assert_eq!(
            versions,
            [("fraud", "1", 1), ("ranker", "1", 1), ("ranker", "2", 2)],
            "stale agents and versions not Serving do not count"
        );
    }
}
