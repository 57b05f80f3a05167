//! What the step machine needs to know about a rollout, read from the fleet's
//! in-memory state: conflicting rollouts of the same model, whether the target
//! version is Ready, and per pool how many canary agents serve or failed it, plus
//! the counters the analysis compares. Pure: [`FleetFacts::read`] copies the facts
//! out of the fleet, [`observe`] decides from them alone.

use super::analysis::Counters;
use super::steps::{Action, Observation, PoolObservation};
use crate::fleet::Fleet;
use crate::fleet::cluster_view::NodeInfo;
use crate::fleet::pool_agents::{AgentState, agent_state};
use crate::fleet::reports::LatestReport;
use crate::placement::cohort::CanaryOrder;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use shoal_api::agent_protocol::{ModelReport, ModelState};
use shoal_api::{AnalysisSpec, Model, ModelRollout, ModelRolloutStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// What the fleet shows about one of a rollout's pools.
pub struct PoolFacts {
    pub pool: String,
    /// The nodes the pool selects.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// The latest report of each of its agents, by node.
    pub reports: HashMap<String, Arc<LatestReport>>,
}

/// What the fleet shows about a rollout, copied out of memory.
pub struct FleetFacts {
    /// Every rollout of the rollout's namespace (itself included).
    pub rollouts: Vec<ModelRollout>,
    /// The Model the rollout rolls out, when it exists.
    pub model: Option<Model>,
    /// One entry per `spec.pools` entry, in that order.
    pub pools: Vec<PoolFacts>,
    /// An agent silent for this long is stale.
    pub stale_after: Duration,
    /// When this operator started (agents get a grace period from then).
    pub started: Timestamp,
}

impl FleetFacts {
    pub fn read(fleet: &Fleet, rollout: &ModelRollout) -> FleetFacts {
        let namespace = rollout.namespace().unwrap_or_default();
        FleetFacts {
            rollouts: fleet.cluster.rollouts_in(&namespace),
            model: fleet.cluster.model(&namespace, &rollout.spec.model),
            pools: rollout
                .spec
                .pools
                .iter()
                .map(|pool| PoolFacts {
                    pool: pool.clone(),
                    nodes: fleet
                        .cluster
                        .pool_nodes(&namespace, pool)
                        .unwrap_or_default(),
                    reports: fleet.reports.for_pool(&namespace, pool),
                })
                .collect(),
            stale_after: fleet.stale_after,
            started: fleet.started,
        }
    }
}

/// An [`Observation`] (without an analysis verdict: the window decides that) and the
/// cumulative counters of the canary and stable versions per node, for the window.
pub struct Observed {
    pub observation: Observation,
    pub canary_counters: HashMap<String, Counters>,
    pub stable_counters: HashMap<String, Counters>,
}

/// Observes `rollout` in `facts` at `now`; `action` is what a person asked for.
pub fn observe(
    rollout: &ModelRollout,
    facts: &FleetFacts,
    now: Timestamp,
    action: Option<Action>,
) -> Observed {
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let spec = &rollout.spec;
    let status = rollout.status.clone().unwrap_or_default();
    let others: Vec<&ModelRollout> = facts
        .rollouts
        .iter()
        .filter(|other| {
            other.name_any() != name
                && other.spec.model == spec.model
                && other.spec.pools.iter().any(|p| spec.pools.contains(p))
        })
        .collect();
    // The view keeps a canary version only for running rollouts.
    let conflict = if is_running(&status) {
        None
    } else {
        others
            .iter()
            .find(|other| {
                other
                    .status
                    .as_ref()
                    .is_some_and(|s| s.canary_version.is_some())
            })
            .map(|other| {
                format!(
                    "ModelRollout {} is rolling out Model {} in the same pools; this one waits \
                     until it finishes (or abort it: kubectl shoal abort {})",
                    other.name_any(),
                    spec.model,
                    other.name_any()
                )
            })
    };
    let inherited_stable = others
        .iter()
        .filter_map(|other| {
            let stable = other.status.as_ref()?.stable_version.clone()?;
            Some((other.creation_timestamp().map(|t| t.0), stable))
        })
        .max()
        .map(|(_, stable)| stable);
    let target_ready = facts
        .model
        .as_ref()
        .and_then(|model| model.status.as_ref())
        .is_some_and(|s| s.versions.iter().any(|v| v.version == spec.version));

    let canary = status.canary_version.clone();
    let mut pools = Vec::with_capacity(facts.pools.len());
    let mut canary_counters = HashMap::new();
    let mut stable_counters = HashMap::new();
    for pool in &facts.pools {
        let updated = status
            .pools
            .iter()
            .find(|p| p.pool == pool.pool)
            .map_or(0, |p| p.updated.max(0) as usize);
        let order = CanaryOrder::new(&namespace, &name, pool.nodes.keys().map(String::as_str));
        let mut observed = PoolObservation {
            pool: pool.pool.clone(),
            agents: pool.nodes.len() as i32,
            ready: 0,
            failed: 0,
        };
        for (rank, node) in order.nodes().enumerate() {
            let latest = pool.reports.get(node);
            let model_report = |version: &str| -> Option<&ModelReport> {
                latest.and_then(|l| {
                    l.report
                        .models
                        .iter()
                        .find(|m| m.name == spec.model && m.version == version)
                })
            };
            // Only the first `updated` nodes of the canary order were assigned the
            // canary; the others serve stable. A node counts only for the version the
            // plan assigned it: a node that reports the canary without having been
            // given it (or the stable after its swap) cannot sway the analysis.
            let assigned_canary = canary.is_some() && rank < updated;
            if !assigned_canary
                && let Some(stable) = &status.stable_version
                && let Some(report) = model_report(stable)
            {
                stable_counters.insert(node.to_string(), Counters::from_report(report));
            }
            let Some(canary) = &canary else { continue };
            if !assigned_canary {
                continue;
            }
            if let Some(report) = model_report(canary) {
                canary_counters.insert(node.to_string(), Counters::from_report(report));
            }
            let state = agent_state(
                latest.map(|l| l.received),
                pool.nodes.get(node).and_then(|info| info.created),
                now,
                facts.stale_after,
                facts.started,
            );
            match (state, model_report(canary).map(|m| m.state)) {
                (AgentState::Stale, _) if latest.is_some() => observed.failed += 1,
                (AgentState::Connected, Some(ModelState::Serving)) => observed.ready += 1,
                (AgentState::Connected, Some(ModelState::Failed)) => observed.failed += 1,
                _ => {}
            }
        }
        pools.push(observed);
    }
    Observed {
        observation: Observation {
            now,
            target_ready,
            inherited_stable,
            pools,
            analysis: None,
            action,
            conflict,
        },
        canary_counters,
        stable_counters,
    }
}

/// The analysis spec, canary version and weight of a rollout whose canary takes
/// traffic and which has an analysis: a window applies to it. None otherwise.
pub fn analysis_due(rollout: &ModelRollout) -> Option<(&AnalysisSpec, &str, i32)> {
    let status = rollout.status.as_ref()?;
    let spec = rollout.spec.analysis.as_ref()?;
    let canary = status.canary_version.as_deref()?;
    let weight = status.weight.unwrap_or(0);
    (is_running(status) && weight > 0).then_some((spec, canary, weight))
}

fn is_running(status: &ModelRolloutStatus) -> bool {
    status.canary_version.is_some() && status.phase.is_some_and(|phase| !phase.is_finished())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::AgentReport;

    const T0: i64 = 1_800_000_000;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(T0 + seconds).expect("timestamp")
    }

    /// A rollout `name` of model `ranker` to v2 in `pools`, with `status` (YAML flow, or "").
    fn rollout(name: &str, model: &str, pools: &str, status: &str) -> ModelRollout {
        serde_yaml::from_str(&format!(
            "apiVersion: shoal.dev/v1alpha1\nkind: ModelRollout\n\
             metadata: {{name: {name}, namespace: shop, creationTimestamp: '2027-01-01T00:00:00Z'}}\n\
             spec: {{model: {model}, version: v2, pools: {pools}, steps: [{{setWeight: 50}}]}}\n{status}"
        ))
        .expect("rollout parses")
    }

    /// Running at weight 50, v1 → v2, with `updated` canary agents in pool a.
    fn running(updated: i32) -> String {
        format!(
            "status: {{phase: Progressing, weight: 50, stableVersion: v1, canaryVersion: v2, \
             pools: [{{pool: a, agents: 2, updated: {updated}}}]}}"
        )
    }

    fn report(node: &str, received: i64, models: &[(&str, ModelState, u64)]) -> Arc<LatestReport> {
        Arc::new(LatestReport {
            received: at(received),
            report: AgentReport {
                node: node.into(),
                agent_start_time: "2027-01-01T00:00:00Z".into(),
                agent_version: "test".into(),
                models: models
                    .iter()
                    .map(|&(version, state, requests)| ModelReport {
                        name: "ranker".into(),
                        version: version.into(),
                        state,
                        requests,
                        ..ModelReport::default()
                    })
                    .collect(),
            },
        })
    }

    fn facts(rollouts: Vec<ModelRollout>, reports: Vec<Arc<LatestReport>>) -> FleetFacts {
        let nodes = ["n1", "n2"]
            .into_iter()
            .map(|n| {
                let info = NodeInfo {
                    labels: BTreeMap::new(),
                    created: Some(at(-3600)),
                };
                (n.to_string(), info)
            })
            .collect();
        FleetFacts {
            rollouts,
            model: None,
            pools: vec![PoolFacts {
                pool: "a".into(),
                nodes,
                reports: reports
                    .into_iter()
                    .map(|r| (r.report.node.clone(), r))
                    .collect(),
            }],
            stale_after: Duration::from_secs(60),
            started: at(-3600),
        }
    }

    /// The node that is first in the canary order of rollout `r` in pool a.
    fn first_canary() -> (String, String) {
        let order = CanaryOrder::new("shop", "r", ["n1", "n2"]);
        let nodes: Vec<&str> = order.nodes().collect();
        (nodes[0].to_string(), nodes[1].to_string())
    }

    #[test]
    fn canary_agents_count_as_ready_or_failed_by_their_reports() {
        let (first, second) = first_canary();
        use ModelState::{Failed, Loading, Serving};
        // (what the first canary node reports: age in seconds and models; ready, failed)
        type Case = (
            &'static str,
            Option<(i64, Vec<(&'static str, ModelState, u64)>)>,
            i32,
            i32,
        );
        let cases: Vec<Case> = vec![
            (
                "serving the canary",
                Some((-5, vec![("v2", Serving, 1)])),
                1,
                0,
            ),
            (
                "failing the canary",
                Some((-5, vec![("v2", Failed, 0)])),
                0,
                1,
            ),
            (
                "still loading it",
                Some((-5, vec![("v2", Loading, 0)])),
                0,
                0,
            ),
            (
                "serving only stable",
                Some((-5, vec![("v1", Serving, 9)])),
                0,
                0,
            ),
            (
                "silent past stale_after",
                Some((-120, vec![("v2", Serving, 1)])),
                0,
                1,
            ),
            ("never reported", None, 0, 0),
        ];
        for (what, first_report, ready, failed) in cases {
            let mut reports = vec![
                // The second node is not in the cohort (updated = 1): its failure does not count.
                report(&second, -5, &[("v2", Failed, 0)]),
            ];
            if let Some((age, models)) = first_report {
                reports.push(report(&first, age, &models));
            }
            let r = rollout("r", "ranker", "[a]", &running(1));
            let observed = observe(&r, &facts(vec![r.clone()], reports), at(0), None);
            let pool = &observed.observation.pools[0];
            assert_eq!(
                (pool.agents, pool.ready, pool.failed),
                (2, ready, failed),
                "{what}"
            );
        }
    }

    #[test]
    fn each_node_counts_only_for_the_version_the_plan_assigned_it() {
        let (first, second) = first_canary();
        let reports = vec![
            report(
                &first,
                -5,
                &[
                    ("v1", ModelState::Serving, 7),
                    ("v2", ModelState::Serving, 3),
                ],
            ),
            report(
                &second,
                -5,
                &[
                    ("v1", ModelState::Serving, 5),
                    ("v2", ModelState::Serving, 4),
                ],
            ),
        ];
        let r = rollout("r", "ranker", "[a]", &running(1));
        let observed = observe(&r, &facts(vec![], reports), at(0), None);
        let requests = |counters: &HashMap<String, Counters>, node: &str| {
            counters.get(node).map(|c| c.requests)
        };
        // The first node was assigned the canary, the second keeps stable.
        assert_eq!(requests(&observed.canary_counters, &first), Some(3));
        assert_eq!(requests(&observed.canary_counters, &second), None);
        assert_eq!(requests(&observed.stable_counters, &first), None);
        assert_eq!(requests(&observed.stable_counters, &second), Some(5));
    }

    /// Reports of both nodes at `seconds`: the first (the canary) serves v2 with
    /// `canary` (requests, errors); the second (stable) serves v1 and claims v2 too.
    fn window_reports(seconds: i64, canary: (u64, u64), claimed: u64) -> Vec<Arc<LatestReport>> {
        let (first, second) = first_canary();
        let mut canary_report = report(&first, seconds, &[("v2", ModelState::Serving, canary.0)]);
        Arc::make_mut(&mut canary_report).report.models[0].errors = canary.1;
        vec![
            canary_report,
            report(
                &second,
                seconds,
                &[
                    ("v1", ModelState::Serving, 100),
                    ("v2", ModelState::Serving, claimed),
                ],
            ),
        ]
    }

    #[test]
    fn a_node_outside_the_canary_cohort_cannot_pass_a_failing_canary() {
        let mut r = rollout("r", "ranker", "[a]", &running(1));
        r.spec.analysis = Some(
            serde_yaml::from_str("{interval: 30s, minRequests: 100, maxErrorRate: 0.05}")
                .expect("analysis"),
        );
        let (spec, canary, weight) = analysis_due(&r).expect("a window applies");
        let mut windows = HashMap::new();
        let mut close = |seconds: i64, reports| {
            let observed = observe(&r, &facts(vec![], reports), at(seconds), None);
            super::super::analysis::close_window(
                &mut windows,
                "shop/r",
                spec,
                (canary, weight),
                at(seconds),
                observed.canary_counters,
                observed.stable_counters,
            )
        };
        assert!(
            close(0, window_reports(0, (0, 0), 0)).is_none(),
            "the window opens"
        );
        // The canary fails half its requests; the other node claims 10^9 clean ones.
        let result =
            close(31, window_reports(31, (200, 100), 1_000_000_000)).expect("the window closes");
        assert_eq!(result.verdict, "Fail", "{}", result.message);
        assert_eq!(result.canary.requests, 200);
    }

    #[test]
    fn a_rollout_waits_for_another_running_one_of_the_same_model_in_its_pools() {
        let other_running =
            |name: &str, model: &str, pools: &str| rollout(name, model, pools, &running(1));
        // (the other rollout, whether this one is running, conflict expected)
        let cases = [
            (other_running("other", "ranker", "[a, b]"), false, true),
            (other_running("other", "ranker", "[a, b]"), true, false),
            (other_running("other", "fraud", "[a]"), false, false),
            (other_running("other", "ranker", "[b]"), false, false),
            (rollout("other", "ranker", "[a]", ""), false, false),
        ];
        for (other, this_running, conflict) in cases {
            let status = if this_running {
                running(0)
            } else {
                String::new()
            };
            let this = rollout("r", "ranker", "[a]", &status);
            let observed = observe(
                &this,
                &facts(vec![this.clone(), other.clone()], vec![]),
                at(0),
                None,
            );
            let found = observed.observation.conflict;
            assert_eq!(
                found.is_some(),
                conflict,
                "other {:?}, this running {this_running}",
                other.spec
            );
            if let Some(why) = found {
                assert!(why.contains("kubectl shoal abort other"), "{why}");
            }
        }
    }

    #[test]
    fn a_new_rollout_inherits_the_stable_version_of_the_newest_finished_one() {
        let finished = |name: &str, created: &str, stable: &str| {
            let mut r = rollout(
                name,
                "ranker",
                "[a]",
                &format!("status: {{phase: Succeeded, stableVersion: {stable}}}"),
            );
            r.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    created.parse().expect("timestamp"),
                ));
            r
        };
        let this = rollout("r", "ranker", "[a]", "");
        let others = vec![
            finished("old", "2027-01-01T00:00:00Z", "v0"),
            finished("newer", "2027-02-01T00:00:00Z", "v1"),
            this.clone(),
        ];
        let observed = observe(&this, &facts(others, vec![]), at(0), None);
        assert_eq!(observed.observation.inherited_stable.as_deref(), Some("v1"));
        let alone = observe(&this, &facts(vec![this.clone()], vec![]), at(0), None);
        assert_eq!(alone.observation.inherited_stable, None);
    }

    #[test]
    fn the_target_is_ready_once_the_model_lists_its_version() {
        let this = rollout("r", "ranker", "[a]", "");
        let model = |versions: &str| -> Model {
            serde_yaml::from_str(&format!(
                "apiVersion: shoal.dev/v1alpha1\nkind: Model\nmetadata: {{name: ranker, namespace: shop}}\n\
                 spec: {{version: v2, source: {{configMap: {{name: m, key: k}}}}}}\n\
                 status: {{versions: {versions}}}"
            ))
            .expect("model parses")
        };
        let version = |v: &str| {
            format!(
                "[{{version: {v}, sourceDigest: 'sha256:a', artifactDigest: 'sha256:a', sourceBytes: 1, artifactBytes: 1, compression: none, compressionRatio: 1.0}}]"
            )
        };
        for (model, ready) in [
            (None, false),
            (Some(model("[]")), false),
            (Some(model(&version("v1"))), false),
            (Some(model(&version("v2"))), true),
        ] {
            let mut facts = facts(vec![], vec![]);
            facts.model = model;
            assert_eq!(
                observe(&this, &facts, at(0), None).observation.target_ready,
                ready
            );
        }
    }

    #[test]
    fn an_analysis_window_applies_only_to_a_canary_taking_traffic() {
        let with_analysis = |status: &str| {
            let mut r = rollout("r", "ranker", "[a]", status);
            r.spec.analysis = Some(AnalysisSpec::default());
            r
        };
        assert!(
            analysis_due(&with_analysis(&running(1)))
                .is_some_and(|(_, canary, weight)| canary == "v2" && weight == 50)
        );
        assert!(
            analysis_due(&rollout("r", "ranker", "[a]", &running(1))).is_none(),
            "no analysis"
        );
        assert!(analysis_due(&with_analysis("")).is_none(), "no status");
        assert!(
            analysis_due(&with_analysis(
                "status: {phase: Progressing, weight: 0, canaryVersion: v2}"
            ))
            .is_none(),
            "weight 0"
        );
        assert!(
            analysis_due(&with_analysis(
                "status: {phase: Succeeded, weight: 50, canaryVersion: v2}"
            ))
            .is_none(),
            "finished"
        );
    }
}
