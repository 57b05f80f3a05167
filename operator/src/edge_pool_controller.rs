//! The EdgePool controller: server-side applies one agent DaemonSet per pool and
//! reports how many nodes the pool selects, how many agents are ready or stale, and
//! which model versions they serve (from the agents' reports).

use crate::agent_api::fleet::Fleet;
use crate::agent_api::pool_agents::PoolAgents;
use crate::context::{Context, FIELD_MANAGER};
use crate::edge_pool_daemonset::{self, UnsupportedSelector};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{EdgePool, EdgePoolStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CONTROLLER: &str = "edgepool";
/// Node deletions and agent readiness are also picked up by this periodic pass.
const RESYNC: Duration = Duration::from_secs(60);
/// Pools whose agent summary changed, waiting for a reconcile; when full, the
/// fleet pass tries again on its next tick.
const SUMMARY_TRIGGERS: usize = 1024;

/// What the EdgePool reconciler works with: the shared context, and the fleet's
/// reports for the agent counts in status.
pub struct PoolContext {
    pub ctx: Arc<Context>,
    pub fleet: Arc<Fleet>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
        }
    }
}

pub async fn run(
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    namespace: Option<String>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let client = ctx.client.clone();
    // The fleet pass asks for a reconcile when a pool's agent summary changed, so
    // status follows reports within seconds with at most one write per pool per pass.
    let (mut trigger, summary_changes) = futures::channel::mpsc::channel(SUMMARY_TRIGGERS);
    tokio::spawn(fleet.clone().summarize_periodically(
        ctx.metrics.clone(),
        move |namespace, pool| {
            let pool = ObjectRef::<EdgePool>::new(pool).within(namespace);
            trigger.try_send(pool).is_ok()
        },
    ));
    let (pools, daemon_sets): (Api<EdgePool>, Api<DaemonSet>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let nodes: Api<PartialObjectMeta<Node>> = Api::all(client);
    let controller = Controller::new(pools, watcher::Config::default().any_semantic());
    let pool_store = controller.store();
    // Only a node's labels decide which pools it belongs to; its frequent status
    // heartbeats must not wake every pool.
    let node_changes = watcher(nodes, watcher::Config::default().any_semantic())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::labels, Default::default());
    let ready_store = pool_store.clone();
    tokio::spawn(crate::context::signal_when_synced(
        ready_store,
        "edge pool",
        synced,
    ));
    controller
        .owns(
            daemon_sets,
            watcher::Config::default()
                .labels("app.kubernetes.io/managed-by=shoal-operator")
                .any_semantic(),
        )
        .watches_stream(node_changes, move |_node| {
            pool_store
                .state()
                .into_iter()
                .map(|pool| ObjectRef::from_obj(pool.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(summary_changes)
        .shutdown_on_signal()
        .run(
            reconcile,
            error_policy,
            Arc::new(PoolContext { ctx, fleet }),
        )
        .for_each(|_| async {})
        .await;
}

fn object_key(pool: &EdgePool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

async fn reconcile(pool: Arc<EdgePool>, pool_ctx: Arc<PoolContext>) -> Result<Action, Error> {
    let ctx = &pool_ctx.ctx;
    let started = Instant::now();
    let result = reconcile_pool(&pool, ctx, &pool_ctx.fleet).await;
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.backoff.reset(&object_key(&pool));
    }
    result
}

fn error_policy(pool: Arc<EdgePool>, error: &Error, pool_ctx: Arc<PoolContext>) -> Action {
    let ctx = &pool_ctx.ctx;
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let delay = ctx.backoff.next_delay(&object_key(&pool));
    tracing::warn!(pool = %object_key(&pool), %error, retry_in = ?delay, "edge pool reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_pool(pool: &EdgePool, ctx: &Context, fleet: &Fleet) -> Result<Action, Error> {
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let daemon_set = match edge_pool_daemonset::build_daemon_set(pool, &ctx.agent_defaults) {
        Ok(daemon_set) => daemon_set,
        Err(invalid) => {
            let status = invalid_status(pool, &invalid, Time(k8s_openapi::jiff::Timestamp::now()));
            write_status(pool, ctx, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let ds_name = edge_pool_daemonset::daemon_set_name(&name);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    accounts
        .patch(
            &ds_name,
            &apply,
            &Patch::Apply(&edge_pool_daemonset::build_service_account(pool)),
        )
        .await?;
    if let Some(ca) = &ctx.agent_defaults.control_plane_ca {
        let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
        config_maps
            .patch(
                &edge_pool_daemonset::ca_config_map_name(&name),
                &apply,
                &Patch::Apply(&edge_pool_daemonset::build_ca_config_map(pool, ca)),
            )
            .await?;
    }
    let daemon_sets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let applied = daemon_sets
        .patch(&ds_name, &apply, &Patch::Apply(&daemon_set))
        .await?;

    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let query = edge_pool_daemonset::label_query(&pool.spec.node_selector);
    let node_count = nodes
        .list_metadata(&ListParams::default().labels(&query))
        .await?
        .items
        .len();
    let now = k8s_openapi::jiff::Timestamp::now();
    let agents = fleet.pool_summary(&namespace, &name, now);
    let status = pool_status(
        pool,
        &ds_name,
        node_count,
        applied.status.as_ref(),
        agents.as_ref(),
        Time(now),
    );
    // Reconciles come often at fleet scale (report summaries, DaemonSet and node
    // changes); an unchanged status is not written again.
    if pool.status.as_ref() != Some(&status) {
        write_status(pool, ctx, &status).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// The pool's status from what the cluster shows: selected nodes and the DaemonSet's
/// counts, and from the agents' reports: stale agents and the versions served.
/// Without `agents` (the operator has not read the cluster yet) those two stay as
/// they were.
pub fn pool_status(
    pool: &EdgePool,
    daemon_set: &str,
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
    status.observed_generation = pool.metadata.generation;
    let (condition_status, reason, message) = if nodes == 0 {
        (
            ConditionStatus::False,
            "NoNodes",
            "spec.nodeSelector matches no nodes; label your edge nodes to match it, or fix the selector".to_string(),
        )
    } else if ready < scheduled || scheduled == 0 {
        (
            ConditionStatus::False,
            "AgentsNotReady",
            format!("{ready} of {scheduled} agents ready on {nodes} selected nodes"),
        )
    } else {
        (
            ConditionStatus::True,
            "AgentsReady",
            format!("{ready} agents ready on {nodes} selected nodes"),
        )
    };
    set_condition(
        &mut status.conditions,
        condition(condition_status, reason, &message, pool, now),
    );
    status
}

fn invalid_status(pool: &EdgePool, invalid: &UnsupportedSelector, now: Time) -> EdgePoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = pool.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(
            ConditionStatus::False,
            "InvalidSelector",
            &invalid.to_string(),
            pool,
            now,
        ),
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
        "Ready",
        status,
        reason,
        message,
        pool.metadata.generation,
        now,
    )
}

async fn write_status(
    pool: &EdgePool,
    ctx: &Context,
    status: &EdgePoolStatus,
) -> Result<(), Error> {
    let api: Api<EdgePool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let patch = json!({ "apiVersion": "shoal.dev/v1alpha1", "kind": "EdgePool", "status": status });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            3,
            Some(&ds(3, 3)),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!((status.nodes, status.agents_ready), (3, 3));
        assert_eq!(status.daemon_set.as_deref(), Some("shoal-agent-stores"));
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(ready_condition(&status), ("True", "AgentsReady"));
    }

    #[test]
    fn some_agents_not_ready() {
        let status = pool_status(
            &pool(),
            "ds",
            3,
            Some(&ds(1, 3)),
            None,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        assert_eq!(ready_condition(&status), ("False", "AgentsNotReady"));
        let status = pool_status(
            &pool(),
            "ds",
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
        let status = pool_status(&reported, "ds", 3, Some(&ds(3, 3)), Some(&agents), now());
        assert_eq!(status.agents_stale, 1);
        assert_eq!(status.versions, agents.versions);
        assert_eq!(
            status.agents_ready, 3,
            "agentsReady stays the DaemonSet's count"
        );
        let kept = pool_status(&reported, "ds", 3, Some(&ds(3, 3)), None, now());
        assert_eq!(kept.agents_stale, 4);
        assert_eq!(kept.versions[0].version, "1");
    }

    #[test]
    fn no_nodes_says_how_to_fix() {
        let status = pool_status(
            &pool(),
            "ds",
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
}
