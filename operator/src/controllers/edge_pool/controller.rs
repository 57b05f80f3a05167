//! The EdgePool controller: server-side applies one agent DaemonSet (with its
//! ServiceAccount, CA ConfigMap and Service) per pool and reports how many nodes the pool selects, how many agents are ready or stale, and
//! which model versions they serve (from the agents' reports).
//!
//! At fleet scale a pool reconciles every few seconds (report summaries, DaemonSet
//! status, node labels), so a reconcile costs no API call unless something changed:
//! the agent objects are applied again only when they differ from the last apply,
//! when the DaemonSet's generation moved (someone edited its spec), or once per
//! [`APPLY_RESYNC`](super::plan::APPLY_RESYNC) (which also repairs other hand edits); node counts come from
//! the fleet's in-memory view, DaemonSet status from a watch, and a status whose
//! only change is in its counts is written at most once per [`COUNTS_WRITE_INTERVAL`](super::plan::COUNTS_WRITE_INTERVAL).

use super::daemonset::{self, AgentDefaults};
use super::plan::{
    invalid_status, needs_apply, objects_digest, pool_status, refused_status, status_write_delay,
};
use super::policy::PoolPolicy;
use crate::fleet::Fleet;
use crate::runtime::conditions;
use crate::runtime::context::{Context, FIELD_MANAGER};
use crate::runtime::reconcile;
use crate::runtime::status::write_status;
use crate::runtime::{lock, object_key};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};
use shoal_api::EdgePool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// The image, control-plane URL and CA every pool's agents get.
    pub agent_defaults: AgentDefaults,
    /// What a pool may ask the operator to run, and where.
    pub policy: PoolPolicy,
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
        lock(&self.last)
    }
}

/// A reconcile of this controller fails only when an API call does.
pub use crate::runtime::reconcile::ApiCallFailed as Error;

pub async fn run(
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    agent_defaults: AgentDefaults,
    policy: PoolPolicy,
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
    tokio::spawn(crate::runtime::context::signal_when_synced(
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
                agent_defaults,
                policy,
                daemon_sets: daemon_set_store,
                applied: WriteMemo::default(),
                status_written: WriteMemo::default(),
            }),
        )
        .for_each(|_| async {})
        .await;
}

async fn reconcile(pool: Arc<EdgePool>, pool_ctx: Arc<PoolContext>) -> Result<Action, Error> {
    let ctx = &pool_ctx.ctx;
    reconcile::timed(
        CONTROLLER,
        ctx,
        pool.as_ref(),
        reconcile_pool(&pool, &pool_ctx),
    )
    .await
}

fn error_policy(pool: Arc<EdgePool>, error: &Error, pool_ctx: Arc<PoolContext>) -> Action {
    Action::requeue(reconcile::retry_delay(
        CONTROLLER,
        &pool_ctx.ctx,
        pool.as_ref(),
        error,
    ))
}

async fn reconcile_pool(pool: &EdgePool, pool_ctx: &PoolContext) -> Result<Action, Error> {
    let ctx = &pool_ctx.ctx;
    let key = object_key(pool);
    let namespace = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let now = Instant::now();
    if let Some(refusal) = pool_ctx.policy.refusal(pool) {
        // Nothing is applied: agents from before keep running as they were.
        tracing::warn!(pool = %key, %refusal, "edge pool refused");
        let status = refused_status(
            pool,
            conditions::edge_pool::NOT_ALLOWED,
            &refusal,
            Time(k8s_openapi::jiff::Timestamp::now()),
        );
        if pool.status.as_ref() != Some(&status) {
            write_status(&ctx.client, pool, &status).await?;
        }
        return Ok(Action::await_change());
    }
    let daemon_set = match daemonset::build_daemon_set(pool, &pool_ctx.agent_defaults) {
        Ok(daemon_set) => daemon_set,
        Err(invalid) => {
            let status = invalid_status(pool, &invalid, Time(k8s_openapi::jiff::Timestamp::now()));
            if pool.status.as_ref() != Some(&status) {
                write_status(&ctx.client, pool, &status).await?;
            }
            return Ok(Action::await_change());
        }
    };
    let ds_name = daemonset::daemon_set_name(&name);
    let account = daemonset::build_service_account(pool);
    let ca_config_map = pool_ctx
        .agent_defaults
        .control_plane_ca
        .as_ref()
        .map(|ca| daemonset::build_ca_config_map(pool, ca));
    let service = daemonset::build_service(pool);
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
            let query = daemonset::label_query(&pool.spec.node_selector);
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
            write_status(&ctx.client, pool, &status).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
