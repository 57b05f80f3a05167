//! The EdgePool controller: server-side applies one agent DaemonSet (with its
//! ServiceAccount, CA ConfigMap and Service) per pool and reports how many nodes the pool selects, how many agents are ready or stale, and
//! which model versions they serve (from the agents' reports).
//!
//! At fleet scale a pool reconciles every few seconds (report summaries, DaemonSet
//! status, node labels), so a reconcile costs no API call unless something changed:
//! the agent objects are applied again only when they differ from the last apply,
//! when the DaemonSet's generation moved (someone edited its spec), or once per
//! [`APPLY_RESYNC`] (which also repairs other hand edits); node counts come from
//! the fleet's in-memory view, DaemonSet status from a watch, and a status whose
//! only change is in its counts is written at most once per [`COUNTS_WRITE_INTERVAL`].

use crate::agent_api::fleet::Fleet;
use crate::agent_api::pool_agents::PoolAgents;
use crate::context::{Context, FIELD_MANAGER};
use crate::edge_pool_daemonset::{self, UnsupportedSelector};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{EdgePool, EdgePoolStatus};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const CONTROLLER: &str = "edgepool";
/// Node deletions and agent readiness are also picked up by this periodic pass.
const RESYNC: Duration = Duration::from_secs(60);
/// Pools whose agent summary changed, waiting for a reconcile; when full, the
/// fleet pass tries again on its next tick.
const SUMMARY_TRIGGERS: usize = 1024;
/// A status that differs from the written one only in its counts (nodes, agents
/// ready or stale, versions served) waits this long after the previous write.
/// Conditions and observedGeneration are written at once.
pub const COUNTS_WRITE_INTERVAL: Duration = Duration::from_secs(15);

/// What the EdgePool reconciler works with: the shared context, and the fleet's
/// reports for the agent counts in status.
pub struct PoolContext {
    pub ctx: Arc<Context>,
    pub fleet: Arc<Fleet>,
    /// The agent DaemonSets, from the watch that also triggers reconciles.
    pub daemon_sets: Store<DaemonSet>,
    pub applied: WriteMemo,
    pub status_written: WriteMemo,
}

/// When something was last written for each pool, and what (a digest). Entries
/// of pools not written for [`FORGET_AFTER`] are dropped, so deleted pools do not
/// accumulate.
#[derive(Default)]
pub struct WriteMemo {
    last: Mutex<HashMap<String, (String, Instant)>>,
}

const FORGET_AFTER: Duration = Duration::from_secs(2 * 600);
/// The agent objects are applied again at least this often, changed or not.
pub const APPLY_RESYNC: Duration = Duration::from_secs(600);

impl WriteMemo {
    /// The digest and time of the last write for `pool`.
    pub fn last(&self, pool: &str) -> Option<(String, Instant)> {
        self.lock().get(pool).cloned()
    }

    pub fn record(&self, pool: &str, digest: String, now: Instant) {
        let mut last = self.lock();
        last.retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
        last.insert(pool.to_string(), (digest, now));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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
            .find(|c| c.type_ == "Ready")
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
    // The agent DaemonSets: a reconcile reads their status here instead of asking
    // the API server, and any change of one reconciles its pool.
    let (daemon_set_store, daemon_set_writer) = reflector::store();
    let daemon_set_changes = reflector::reflector(
        daemon_set_writer,
        watcher(
            daemon_sets,
            watcher::Config::default()
                .labels("app.kubernetes.io/managed-by=shoal-operator")
                .any_semantic(),
        ),
    )
    .default_backoff()
    .touched_objects();
    controller
        .owns_stream(daemon_set_changes)
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
            Arc::new(PoolContext {
                ctx,
                fleet,
                daemon_sets: daemon_set_store,
                applied: WriteMemo::default(),
                status_written: WriteMemo::default(),
            }),
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
    let result = reconcile_pool(&pool, &pool_ctx).await;
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

async fn reconcile_pool(pool: &EdgePool, pool_ctx: &PoolContext) -> Result<Action, Error> {
    let ctx = &pool_ctx.ctx;
    let key = object_key(pool);
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let now = Instant::now();
    let daemon_set = match edge_pool_daemonset::build_daemon_set(pool, &ctx.agent_defaults) {
        Ok(daemon_set) => daemon_set,
        Err(invalid) => {
            let status = invalid_status(pool, &invalid, Time(k8s_openapi::jiff::Timestamp::now()));
            if pool.status.as_ref() != Some(&status) {
                write_status(pool, ctx, &status).await?;
            }
            return Ok(Action::await_change());
        }
    };
    let ds_name = edge_pool_daemonset::daemon_set_name(&name);
    let account = edge_pool_daemonset::build_service_account(pool);
    let ca_config_map = ctx
        .agent_defaults
        .control_plane_ca
        .as_ref()
        .map(|ca| edge_pool_daemonset::build_ca_config_map(pool, ca));
    let service = edge_pool_daemonset::build_service(pool);
    let digest = objects_digest(
        &account,
        ca_config_map.as_ref(),
        &daemon_set,
        service.as_ref(),
    );
    let watched = ObjectRef::<DaemonSet>::new(&ds_name).within(&namespace);
    let watched = pool_ctx.daemon_sets.get(&watched);
    let mut ds_status = watched.as_ref().and_then(|ds| ds.status.clone());
    let generation = |ds: &DaemonSet| ds.metadata.generation.unwrap_or(0);
    let seen = format!("{digest} {}", watched.as_deref().map_or(0, generation));
    // A DaemonSet deleted by hand comes back at once, not at the next resync.
    if watched.is_none() || needs_apply(pool_ctx.applied.last(&key).as_ref(), &seen, now) {
        if service.is_none() {
            tracing::warn!(
                pool = %key,
                "the pool's name cannot name a Service (shoal-agent-<pool> must be a DNS label of at most 63 characters, no dots); its agents run without one: recreate the pool under a shorter name without dots to get one"
            );
        }
        let applied = apply_agent_objects(
            ctx,
            &namespace,
            &account,
            ca_config_map.as_ref(),
            &daemon_set,
            service.as_ref(),
        )
        .await?;
        pool_ctx
            .applied
            .record(&key, format!("{digest} {}", generation(&applied)), now);
        ds_status = applied.status;
    }

    let node_count = match pool_ctx
        .fleet
        .cluster
        .count_selected_nodes(&pool.spec.node_selector)
    {
        Some(count) => count,
        // The fleet's view of the nodes has not synced yet: ask the API server.
        None => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            let query = edge_pool_daemonset::label_query(&pool.spec.node_selector);
            nodes
                .list_metadata(&ListParams::default().labels(&query))
                .await?
                .items
                .len()
        }
    };
    let timestamp = k8s_openapi::jiff::Timestamp::now();
    let agents = pool_ctx.fleet.pool_summary(&namespace, &name, timestamp);
    let service_name = service.as_ref().and_then(|s| s.metadata.name.as_deref());
    let status = pool_status(
        pool,
        &ds_name,
        service_name,
        node_count,
        ds_status.as_ref(),
        agents.as_ref(),
        Time(timestamp),
    );
    let last_write = pool_ctx.status_written.last(&key).map(|(_, at)| at);
    match status_write_delay(pool.status.as_ref(), &status, last_write, now) {
        Some(Duration::ZERO) => {
            write_status(pool, ctx, &status).await?;
            pool_ctx.status_written.record(&key, String::new(), now);
        }
        Some(wait) => return Ok(Action::requeue(wait)),
        None => {}
    }
    Ok(Action::requeue(RESYNC))
}

/// Server-side applies a pool's agent ServiceAccount, CA ConfigMap (when the agent
/// API has a private CA), DaemonSet and Service (when the pool's name can name
/// one); returns the DaemonSet as applied. The Service goes last: the agents serve
/// their nodes without it, so a Service the API server refuses does not keep
/// them from being updated.
async fn apply_agent_objects(
    ctx: &Context,
    namespace: &str,
    account: &ServiceAccount,
    ca_config_map: Option<&ConfigMap>,
    daemon_set: &DaemonSet,
    service: Option<&Service>,
) -> Result<DaemonSet, Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    accounts
        .patch(&account.name_any(), &apply, &Patch::Apply(account))
        .await?;
    if let Some(config_map) = ca_config_map {
        let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
        config_maps
            .patch(&config_map.name_any(), &apply, &Patch::Apply(config_map))
            .await?;
    }
    let daemon_sets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), namespace);
    let applied = daemon_sets
        .patch(&daemon_set.name_any(), &apply, &Patch::Apply(daemon_set))
        .await?;
    if let Some(service) = service {
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
        services
            .patch(&service.name_any(), &apply, &Patch::Apply(service))
            .await?;
    }
    Ok(applied)
}

/// A digest of the agent objects applied for a pool.
fn objects_digest(
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
        let defaults = edge_pool_daemonset::AgentDefaults {
            control_plane_url: "https://shoal:8443".into(),
            control_plane_ca: None,
        };
        let daemon_set = edge_pool_daemonset::build_daemon_set(&pool, &defaults).expect("builds");
        let account = edge_pool_daemonset::build_service_account(&pool);
        let service = edge_pool_daemonset::build_service(&pool).expect("a Service");
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
    fn write_memo_forgets_pools_not_written_for_a_long_time() {
        let memo = WriteMemo::default();
        let now = Instant::now();
        memo.record("shop/gone", "a".into(), now);
        memo.record(
            "shop/stores",
            "b".into(),
            now + FORGET_AFTER - Duration::from_secs(1),
        );
        assert!(memo.last("shop/gone").is_some());
        memo.record("shop/stores", "c".into(), now + FORGET_AFTER);
        assert!(memo.last("shop/gone").is_none());
        assert_eq!(
            memo.last("shop/stores").map(|(d, _)| d).as_deref(),
            Some("c")
        );
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
