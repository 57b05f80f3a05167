//! What each agent was assigned lately: every model version, with its artifact, that
//! the operator computed for the agent's node within [`RECENTLY`]. An agent may
//! download only these artifacts and report only these versions. A version stays
//! here for a while after the assignment moved on, so that a download in progress
//! can resume and the version that still serves while the next one loads still
//! counts.

use crate::fleet::reports::Agent;
use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::Assignment;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// How long a model version stays usable for an agent after its node's assignment
/// last named it.
pub const RECENTLY: Duration = Duration::from_secs(60 * 60);

/// Most versions kept per agent; beyond it the one assigned longest ago goes. A
/// node's assignment names one version per model, so only a very busy hour of
/// rollouts comes near it.
const MAX_VERSIONS_PER_AGENT: usize = 256;

/// One model version an agent was assigned, with its artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedVersion {
    pub model: String,
    pub version: String,
    /// `sha256:<hex>`.
    pub artifact_digest: String,
}

/// One agent's recent assignments: each version and when an assignment last named it.
#[derive(Debug, Clone, Default)]
pub struct AgentHistory {
    entries: Vec<(AssignedVersion, Timestamp)>,
}

impl AgentHistory {
    /// Notes every model of `assignment` as assigned at `now` and forgets versions
    /// not assigned within [`RECENTLY`].
    pub fn note(&mut self, assignment: &Assignment, now: Timestamp) {
        for model in &assignment.models {
            let assigned = AssignedVersion {
                model: model.name.clone(),
                version: model.version.clone(),
                artifact_digest: model.artifact_digest.clone(),
            };
            match self
                .entries
                .iter_mut()
                .find(|(known, _)| *known == assigned)
            {
                Some((_, at)) => *at = now,
                None => self.entries.push((assigned, now)),
            }
        }
        self.entries.retain(|(_, at)| is_recent(*at, now));
        if self.entries.len() > MAX_VERSIONS_PER_AGENT {
            self.entries.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
            self.entries.truncate(MAX_VERSIONS_PER_AGENT);
        }
    }

    /// Whether the artifact `digest` (`sha256:<hex>`) was assigned within [`RECENTLY`].
    pub fn has_artifact(&self, digest: &str, now: Timestamp) -> bool {
        self.recent(now)
            .any(|assigned| assigned.artifact_digest == digest)
    }

    /// Whether `version` of `model` was assigned within [`RECENTLY`].
    pub fn has_version(&self, model: &str, version: &str, now: Timestamp) -> bool {
        self.recent(now)
            .any(|assigned| assigned.model == model && assigned.version == version)
    }

    fn recent(&self, now: Timestamp) -> impl Iterator<Item = &AssignedVersion> {
        self.entries
            .iter()
            .filter(move |(_, at)| is_recent(*at, now))
            .map(|(assigned, _)| assigned)
    }
}

fn is_recent(at: Timestamp, now: Timestamp) -> bool {
    // A time in the future (a clock step back) counts as now.
    Duration::try_from(now.duration_since(at)).unwrap_or_default() <= RECENTLY
}

/// A model version in a namespace: (namespace, model, version).
pub type NamespacedVersion = (String, String, String);

/// Every agent's [`AgentHistory`]. One entry per agent, pruned with the agents'
/// reports when the pool or the node goes away.
#[derive(Default)]
pub struct RecentAssignments {
    by_agent: Mutex<HashMap<Agent, AgentHistory>>,
}

impl RecentAssignments {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes `assignment`, just computed for `agent`'s node, as assigned at `now`.
    pub fn note(&self, agent: &Agent, assignment: &Assignment, now: Timestamp) {
        let mut by_agent = self.lock();
        match by_agent.get_mut(agent) {
            Some(history) => history.note(assignment, now),
            None => {
                let mut history = AgentHistory::default();
                history.note(assignment, now);
                by_agent.insert(agent.clone(), history);
            }
        }
    }

    /// See [`AgentHistory::has_artifact`]; false for an agent never assigned anything.
    pub fn has_artifact(&self, agent: &Agent, digest: &str, now: Timestamp) -> bool {
        self.lock()
            .get(agent)
            .is_some_and(|history| history.has_artifact(digest, now))
    }

    /// See [`AgentHistory::has_version`]; false for an agent never assigned anything.
    pub fn has_version(&self, agent: &Agent, model: &str, version: &str, now: Timestamp) -> bool {
        self.lock()
            .get(agent)
            .is_some_and(|history| history.has_version(model, version, now))
    }

    /// Every model version some agent was assigned within [`RECENTLY`].
    pub fn versions(&self, now: Timestamp) -> HashSet<NamespacedVersion> {
        let by_agent = self.lock();
        let mut versions = HashSet::new();
        for (agent, history) in by_agent.iter() {
            for assigned in history.recent(now) {
                versions.insert((
                    agent.namespace.clone(),
                    assigned.model.clone(),
                    assigned.version.clone(),
                ));
            }
        }
        versions
    }

    /// Forgets the agents `keep` refuses (their pool or node is gone).
    pub fn retain(&self, keep: impl Fn(&Agent) -> bool) {
        self.lock().retain(|agent, _| keep(agent));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Agent, AgentHistory>> {
        // Every change is one update of one agent's entry: keep serving after a panic.
        crate::runtime::lock(&self.by_agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::agent_protocol::AssignedModel;

    fn assignment(models: &[(&str, &str, &str)]) -> Assignment {
        Assignment {
            node: "n1".into(),
            models: models
                .iter()
                .map(|(name, version, digest)| AssignedModel {
                    name: name.to_string(),
                    version: version.to_string(),
                    artifact_digest: digest.to_string(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + seconds).expect("a valid time")
    }

    const HOUR: i64 = 3600;

    #[test]
    fn a_version_stays_usable_for_an_hour_after_its_last_assignment() {
        let mut history = AgentHistory::default();
        history.note(&assignment(&[("ranker", "1.0", "sha256:aa")]), at(0));
        // The rollout moves on to 2.0 ten minutes later.
        history.note(&assignment(&[("ranker", "2.0", "sha256:bb")]), at(600));
        for (when, one_usable, two_usable) in [
            (at(600), true, true),
            (at(HOUR), true, true),
            (at(HOUR + 1), false, true),
            (at(600 + HOUR + 1), false, false),
        ] {
            assert_eq!(history.has_version("ranker", "1.0", when), one_usable);
            assert_eq!(history.has_artifact("sha256:aa", when), one_usable);
            assert_eq!(history.has_version("ranker", "2.0", when), two_usable);
            assert_eq!(history.has_artifact("sha256:bb", when), two_usable);
        }
        assert!(!history.has_version("ranker", "3.0", at(600)));
        assert!(!history.has_version("other", "1.0", at(600)));
        assert!(!history.has_artifact("sha256:cc", at(600)));
    }

    #[test]
    fn assigning_again_renews_and_old_entries_are_forgotten() {
        let mut history = AgentHistory::default();
        let one = assignment(&[("ranker", "1.0", "sha256:aa")]);
        history.note(&one, at(0));
        history.note(&one, at(HOUR));
        assert!(history.has_version("ranker", "1.0", at(2 * HOUR)));
        history.note(&assignment(&[("ranker", "2.0", "sha256:bb")]), at(3 * HOUR));
        assert_eq!(history.entries.len(), 1, "1.0 was last assigned 2 h ago");
    }

    #[test]
    fn an_agent_keeps_a_bounded_number_of_versions() {
        let mut history = AgentHistory::default();
        for i in 0..(MAX_VERSIONS_PER_AGENT + 10) {
            let version = i.to_string();
            history.note(
                &assignment(&[("ranker", &version, &format!("sha256:{i}"))]),
                at(i as i64),
            );
        }
        assert_eq!(history.entries.len(), MAX_VERSIONS_PER_AGENT);
        let newest = (MAX_VERSIONS_PER_AGENT + 9).to_string();
        let now = at(MAX_VERSIONS_PER_AGENT as i64 + 9);
        assert!(history.has_version("ranker", &newest, now));
        assert!(!history.has_version("ranker", "0", now), "the oldest went");
    }

    #[test]
    fn agents_are_kept_apart() {
        let agent = |namespace: &str, pool: &str| Agent {
            namespace: namespace.into(),
            pool: pool.into(),
            node: "n1".into(),
        };
        let recent = RecentAssignments::new();
        recent.note(
            &agent("x", "a"),
            &assignment(&[("ranker", "1.0", "sha256:aa")]),
            at(0),
        );
        recent.note(
            &agent("y", "b"),
            &assignment(&[("ranker", "1.0", "sha256:bb")]),
            at(0),
        );
        assert!(recent.has_artifact(&agent("x", "a"), "sha256:aa", at(1)));
        assert!(!recent.has_artifact(&agent("x", "a"), "sha256:bb", at(1)));
        assert!(!recent.has_artifact(&agent("x", "b"), "sha256:aa", at(1)));
        assert_eq!(recent.versions(at(1)).len(), 2);
        recent.retain(|agent| agent.namespace == "x");
        assert!(!recent.has_artifact(&agent("y", "b"), "sha256:bb", at(1)));
        assert_eq!(
            recent.versions(at(1)),
            HashSet::from([("x".into(), "ranker".into(), "1.0".into())])
        );
    }
}
