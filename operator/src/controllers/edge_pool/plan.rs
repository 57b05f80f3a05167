//! The EdgePool controller's decisions, apart from I/O: whether the agent objects
//! must be applied again, when a changed status is written, and the status itself.
//! Every function here is pure and unit-tested.

use crate::controllers::edge_pool::daemonset::UnsupportedSelector;
use crate::fleet::pool_agents::PoolAgents;
use crate::runtime::conditions;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sha2::{Digest, Sha256};
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{EdgePool, EdgePoolStatus};
use std::time::{Duration, Instant};

/// A status that differs from the written one only in its counts (nodes, agents
/// ready or stale, versions served) waits this long after the previous write.
/// Conditions and observedGeneration are written at once.
pub const COUNTS_WRITE_INTERVAL: Duration = Duration::from_secs(15);

/// The agent objects are applied again at least this often, changed or not.
pub const APPLY_RESYNC: Duration = Duration::from_secs(600);

/// Whether the agent objects with `digest` must be applied: they differ from the
/// last apply, or that apply is [`APPLY_RESYNC`] old (a hand edit gets repaired).
/// `digest` covers the objects and the DaemonSet generation the watch shows, so an
/// edit of the DaemonSet's spec by someone else is repaired at once.
pub fn needs_apply(last: Option<&(String, Instant)>, digest: &str, now: Instant) -> bool {
    match last {
        Some((applied, at)) => {
            applied != digest || now.saturating_duration_since(*at) >= APPLY_RESYNC
        }
        None => true,
    }
}

/// When to write `new` over `old`: None when nothing changed, `Some(ZERO)` for now,
/// else how long to wait. Counts alone wait [`COUNTS_WRITE_INTERVAL`] after the
/// last write; the Ready condition's status or reason, observedGeneration and the
/// DaemonSet and Service names go out at once.
pub fn status_write_delay(
    old: Option<&EdgePoolStatus>,
    new: &EdgePoolStatus,
    last_write: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let Some(old) = old else {
        return Some(Duration::ZERO);
    };
    if old == new {
        return None;
    }
    let ready = |status: &EdgePoolStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let significant = ready(old) != ready(new)
        || old.observed_generation != new.observed_generation
        || old.daemon_set != new.daemon_set
        || old.service_name != new.service_name;
    let since = last_write.map(|at| now.saturating_duration_since(at));
    match since {
        Some(since) if !significant && since < COUNTS_WRITE_INTERVAL => {
            Some(COUNTS_WRITE_INTERVAL - since)
        }
        _ => Some(Duration::ZERO),
    }
}

/// A digest of the agent objects applied for a pool.
pub fn objects_digest(
    account: &ServiceAccount,
    ca_config_map: Option<&ConfigMap>,
    daemon_set: &DaemonSet,
    service: Option<&Service>,
) -> String {
    let mut hasher = Sha256::new();
    for part in [
        serde_json::to_vec(account),
        serde_json::to_vec(&ca_config_map),
        serde_json::to_vec(daemon_set),
        serde_json::to_vec(&service),
    ] {
        hasher.update(part.unwrap_or_default());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// The pool's status from what the cluster shows: selected nodes and the DaemonSet's
/// counts, and from the agents' reports: stale agents and the versions served.
/// Without `agents` (the operator has not read the cluster yet) those two stay as
/// they were.
pub fn pool_status(
    pool: &EdgePool,
    daemon_set: &str,
    service: Option<&str>,
    nodes: usize,
    ds_status: Option<&DaemonSetStatus>,
    agents: Option<&PoolAgents>,
    now: Time,
) -> EdgePoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    if let Some(agents) = agents {
        status.agents_stale = agents.stale;
        status.versions = agents.versions.clone();
    }
    let ready = ds_status.map_or(0, |s| s.number_ready);
    let scheduled = ds_status.map_or(0, |s| s.desired_number_scheduled);
    status.nodes = i32::try_from(nodes).unwrap_or(i32::MAX);
    status.agents_ready = ready;
    status.daemon_set = Some(daemon_set.to_string());
    status.service_name = service.map(str::to_string);
    status.observed_generation = pool.metadata.generation;
    let (condition_status, reason, message) = if nodes == 0 {
        (
            ConditionStatus::False,
            conditions::edge_pool::NO_NODES,
            "spec.nodeSelector matches no nodes; label your edge nodes to match it, or fix the selector".to_string(),
        )
    } else if ready < scheduled || scheduled == 0 {
        (
            ConditionStatus::False,
            conditions::edge_pool::AGENTS_NOT_READY,
            format!("{ready} of {scheduled} agents ready on {nodes} selected nodes"),
        )
    } else {
        (
            ConditionStatus::True,
            conditions::edge_pool::AGENTS_READY,
            format!("{ready} agents ready on {nodes} selected nodes"),
        )
    };
    set_condition(
        &mut status.conditions,
        condition(condition_status, reason, &message, pool, now),
    );
    status
}

pub fn invalid_status(pool: &EdgePool, invalid: &UnsupportedSelector, now: Time) -> EdgePoolStatus {
    refused_status(
        pool,
        conditions::edge_pool::INVALID_SELECTOR,
        &invalid.to_string(),
        now,
    )
}

/// The status of a pool whose agents the operator will not run as asked: Ready
/// False with `reason` and the message that says what to change; counts kept.
pub fn refused_status(pool: &EdgePool, reason: &str, message: &str, now: Time) -> EdgePoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(ConditionStatus::False, reason, message, pool, now),
    );
    status
}

fn condition(
    status: ConditionStatus,
    reason: &str,
    message: &str,
    pool: &EdgePool,
    now: Time,
) -> Condition {
    new_condition(
        conditions::READY,
        status,
        reason,
        message,
        pool.metadata.generation,
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::edge_pool::daemonset;

    fn pool() -> EdgePool {
        serde_yaml::from_str(
            "apiVersion: shoal.dev/v1alpha1\nkind: EdgePool\nmetadata: {name: stores, namespace: shop, generation: 2}\nspec:\n  nodeSelector: {matchLabels: {site: store}}\n",
        )
        .expect("parses")
    }

    fn ds(ready: i32, scheduled: i32) -> DaemonSetStatus {
        DaemonSetStatus {
            number_ready: ready,
            desired_number_scheduled: scheduled,
            ..Default::default()
        }
    }

    fn ready_condition(status: &EdgePoolStatus) -> (&str, &str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn all_agents_ready() {
        let status = pool_status(
            &pool(),
            "shoal-agent-stores",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(3, 3)),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!((status.nodes, status.agents_ready), (3, 3));
        assert_eq!(status.daemon_set.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(status.service_name.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(ready_condition(&status), ("True", "AgentsReady"));
    }

    #[test]
    fn some_agents_not_ready() {
        let status = pool_status(
            &pool(),
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(1, 3)),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(ready_condition(&status), ("False", "AgentsNotReady"));
        let status = pool_status(
            &pool(),
            "ds",
            Some("shoal-agent-stores"),
            3,
            None,
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(ready_condition(&status), ("False", "AgentsNotReady"));
    }

    #[test]
    fn agent_reports_fill_stale_and_versions_or_leave_them() {
        let mut reported = pool();
        reported.status = Some(EdgePoolStatus {
            agents_stale: 4,
            versions: vec![shoal_api::VersionCount {
                model: "ranker".into(),
                version: "1".into(),
                agents: 2,
            }],
            ..Default::default()
        });
        let agents = PoolAgents {
            connected: 2,
            stale: 1,
            versions: vec![shoal_api::VersionCount {
                model: "ranker".into(),
                version: "2".into(),
                agents: 2,
            }],
        };
        let now = || Time(k8s_openapi::jiff::Timestamp::now());
        let status = pool_status(
            &reported,
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(3, 3)),
            Some(&agents),
            now(),
        );
        assert_eq!(status.agents_stale, 1);
        assert_eq!(status.versions, agents.versions);
        assert_eq!(
            status.agents_ready, 3,
            "agentsReady stays the DaemonSet's count"
        );
        let kept = pool_status(
            &reported,
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(3, 3)),
            None,
            now(),
        );
        assert_eq!(kept.agents_stale, 4);
        assert_eq!(kept.versions[0].version, "1");
    }

    #[test]
    fn no_nodes_says_how_to_fix() {
        let status = pool_status(
            &pool(),
            "ds",
            Some("shoal-agent-stores"),
            0,
            Some(&ds(0, 0)),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(ready_condition(&status), ("False", "NoNodes"));
        assert!(
            status.conditions[0]
                .message
                .contains("label your edge nodes")
        );
    }

    #[test]
    fn agent_objects_are_applied_again_only_when_changed_or_a_resync_old() {
        let now = Instant::now();
        assert!(needs_apply(None, "a", now), "never applied");
        let applied = ("a".to_string(), now);
        assert!(!needs_apply(
            Some(&applied),
            "a",
            now + Duration::from_secs(5)
        ));
        assert!(needs_apply(
            Some(&applied),
            "b",
            now + Duration::from_secs(5)
        ));
        assert!(
            needs_apply(Some(&applied), "a", now + APPLY_RESYNC),
            "resync repairs hand edits"
        );
    }

    #[test]
    fn a_changed_service_changes_the_digest_so_it_is_applied_again() {
        let pool = pool();
        let defaults = daemonset::AgentDefaults {
            control_plane_url: "https://shoal:8443".into(),
            control_plane_ca: None,
        };
        let daemon_set = daemonset::build_daemon_set(&pool, &defaults).expect("builds");
        let account = daemonset::build_service_account(&pool);
        let service = daemonset::build_service(&pool).expect("a Service");
        let digest =
            |service: Option<&Service>| objects_digest(&account, None, &daemon_set, service);
        assert_eq!(digest(Some(&service)), digest(Some(&service)));
        let mut other_port = service.clone();
        if let Some(port) = other_port
            .spec
            .as_mut()
            .and_then(|s| s.ports.as_mut())
            .and_then(|p| p.first_mut())
        {
            port.port = 9001;
        }
        assert_ne!(digest(Some(&service)), digest(Some(&other_port)));
        assert_ne!(digest(Some(&service)), digest(None));
    }

    #[test]
    fn count_changes_are_coalesced_but_condition_changes_are_written_at_once() {
        let at = Time(k8s_openapi::jiff::Timestamp::now());
        let written = pool_status(
            &pool(),
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(3, 3)),
            None,
            at.clone(),
        );
        let now = Instant::now();
        let just_now = Some(now - Duration::from_secs(2));
        let long_ago = Some(now - COUNTS_WRITE_INTERVAL);

        assert_eq!(
            status_write_delay(None, &written, None, now),
            Some(Duration::ZERO),
            "a pool without status gets one at once"
        );
        assert_eq!(
            status_write_delay(Some(&written), &written, just_now, now),
            None
        );

        let mut counts = written.clone();
        counts.agents_stale = 1;
        counts.versions = vec![shoal_api::VersionCount {
            model: "ranker".into(),
            version: "2".into(),
            agents: 3,
        }];
        assert_eq!(
            status_write_delay(Some(&written), &counts, just_now, now),
            Some(COUNTS_WRITE_INTERVAL - Duration::from_secs(2))
        );
        assert_eq!(
            status_write_delay(Some(&written), &counts, long_ago, now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            status_write_delay(Some(&written), &counts, None, now),
            Some(Duration::ZERO),
            "after a restart nothing was written yet"
        );

        let not_ready = pool_status(
            &pool(),
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(1, 3)),
            None,
            at.clone(),
        );
        assert_eq!(
            status_write_delay(Some(&written), &not_ready, just_now, now),
            Some(Duration::ZERO)
        );
        let no_service = pool_status(&pool(), "ds", None, 3, Some(&ds(3, 3)), None, at.clone());
        assert_eq!(no_service.service_name, None);
        assert_eq!(
            status_write_delay(Some(&written), &no_service, just_now, now),
            Some(Duration::ZERO),
            "the Service name goes out at once"
        );
        let mut new_generation = pool();
        new_generation.metadata.generation = Some(3);
        let regenerated = pool_status(
            &new_generation,
            "ds",
            Some("shoal-agent-stores"),
            3,
            Some(&ds(3, 3)),
            None,
            at,
        );
        assert_eq!(
            status_write_delay(Some(&written), &regenerated, just_now, now),
            Some(Duration::ZERO)
        );
    }
}
