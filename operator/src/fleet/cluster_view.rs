//! The operator's in-memory view of what decides assignments: Models, EdgePools,
//! ModelRollouts and the labels of Nodes, kept current by watches. Long-polls read
//! it and wait on its change counter, so thousands of waiting agents cost no API call.

use crate::placement::assignment::{
    CanaryOrders, assignment_for_node, canary_order_key, node_selector,
};
use crate::placement::cohort::CanaryOrder;
use crate::runtime::object_key;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::core::SelectorExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use shoal_api::agent_protocol::Assignment;
use shoal_api::{
    EdgePool, Model, ModelRollout, ModelRolloutStatus, ModelStatus, PoolProgress, RolloutPhase,
};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use tokio::sync::watch;

/// What the view keeps of a Node: only what pool membership and staleness need.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub labels: BTreeMap<String, String>,
    pub created: Option<Timestamp>,
}

pub struct ClusterView {
    state: RwLock<ViewState>,
    /// Counts changes that may alter an assignment; long-polls wait on it.
    changes: watch::Sender<u64>,
    /// Canary orders by [`canary_order_key`], each with the membership version it
    /// was computed at: after a rollout step every agent asks again, and the pool's
    /// ranking is computed once, not once per agent.
    canary_orders: Mutex<HashMap<String, (u64, Arc<CanaryOrder>)>>,
}

#[derive(Default)]
struct ViewState {
    models: Objects<Model>,
    pools: Objects<EdgePool>,
    rollouts: Objects<ModelRollout>,
    nodes: Objects<NodeInfo>,
    /// The change counter when something that may concern every node last changed.
    all_changed_at: u64,
    /// Counts changes of Nodes and EdgePools: which nodes a pool holds.
    membership_version: u64,
    /// The change counter when each node's labels last changed. A new node or a
    /// relabelled one wakes the long-polls of every agent, but only its own
    /// agents compute their assignment again: fleets grow a node at a time.
    node_changed_at: HashMap<String, u64>,
}

/// Which assignments a watch event may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    None,
    /// The object with this key changed.
    One(String),
    /// Several objects, or one that was deleted.
    Many,
}

impl ViewState {
    fn synced(&self) -> bool {
        self.models.synced && self.pools.synced && self.rollouts.synced && self.nodes.synced
    }
}

impl Default for ClusterView {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterView {
    pub fn new() -> Self {
        Self {
            state: RwLock::new(ViewState::default()),
            changes: watch::Sender::new(0),
            canary_orders: Mutex::new(HashMap::new()),
        }
    }

    /// A receiver that wakes whenever an assignment may have changed; its value is
    /// the change counter [`changed_for`](Self::changed_for) compares with.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether anything that decides `node`'s assignment changed after the change
    /// counter was at `seen`.
    pub fn changed_for(&self, node: &str, seen: u64) -> bool {
        let state = self.read();
        state.all_changed_at > seen || state.node_changed_at.get(node).is_some_and(|at| *at > seen)
    }

    /// True once every watch has listed its objects at least once. Before that an
    /// empty view would tell agents to unload everything.
    pub fn is_synced(&self) -> bool {
        self.read().synced()
    }

    /// Resolves once [`is_synced`](Self::is_synced) holds.
    pub async fn wait_synced(&self) {
        let mut changes = self.subscribe();
        while !self.is_synced() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// What the agent of `pool` (in `namespace`) on `node` must serve; None until
    /// the view has synced.
    pub fn assignment(&self, namespace: &str, pool: &str, node: &str) -> Option<Assignment> {
        let state = self.read();
        if !state.synced() {
            return None;
        }
        let pools: Vec<&EdgePool> = state
            .pools
            .items
            .get(&namespaced_key(namespace, pool))
            .into_iter()
            .collect();
        let rollouts: Vec<&ModelRollout> = state
            .rollouts
            .items
            .values()
            .filter(|rollout| rollout.namespace().as_deref() == Some(namespace))
            .collect();
        let models: Vec<&Model> = state
            .models
            .items
            .values()
            .filter(|model| model.namespace().as_deref() == Some(namespace))
            .collect();
        let no_labels = BTreeMap::new();
        let labels = state
            .nodes
            .items
            .get(node)
            .map_or(&no_labels, |info| &info.labels);
        // The canary ranking runs over the pool's nodes; only rollouts with a canary
        // need it, and only this agent's pool matters.
        let mut canary_orders = CanaryOrders::new();
        if let Some(pool) = pools.first() {
            let pool_name = pool.name_any();
            for rollout in &rollouts {
                let has_canary = rollout
                    .status
                    .as_ref()
                    .is_some_and(|s| s.canary_version.is_some());
                if has_canary && rollout.spec.pools.contains(&pool_name) {
                    let key = canary_order_key(namespace, &rollout.name_any(), &pool_name);
                    let order = self.canary_order(&state, &key, pool, rollout);
                    canary_orders.insert(key, order);
                }
            }
        }
        Some(assignment_for_node(
            node,
            labels,
            &pools,
            &rollouts,
            &models,
            &canary_orders,
        ))
    }

    /// The rollout's canary order of `pool`, from the cache while the pool's
    /// membership is unchanged. Orders of another membership version are dropped.
    fn canary_order(
        &self,
        state: &ViewState,
        key: &str,
        pool: &EdgePool,
        rollout: &ModelRollout,
    ) -> Arc<CanaryOrder> {
        let mut cache = crate::runtime::lock(&self.canary_orders);
        if let Some((version, order)) = cache.get(key)
            && *version == state.membership_version
        {
            return order.clone();
        }
        let members: Vec<&str> = match node_selector(&pool.spec.node_selector) {
            Some(selector) => state
                .nodes
                .items
                .iter()
                .filter(|(_, info)| selector.matches(&info.labels))
                .map(|(name, _)| name.as_str())
                .collect(),
            None => Vec::new(),
        };
        let order = Arc::new(CanaryOrder::new(
            &rollout.namespace().unwrap_or_default(),
            &rollout.name_any(),
            members,
        ));
        cache.retain(|_, (version, _)| *version == state.membership_version);
        cache.insert(key.to_string(), (state.membership_version, order.clone()));
        order
    }

    pub fn has_pool(&self, namespace: &str, pool: &str) -> bool {
        self.read()
            .pools
            .items
            .contains_key(&namespaced_key(namespace, pool))
    }

    /// The ModelRollouts of a namespace as the view keeps them (spec and plan only).
    pub fn rollouts_in(&self, namespace: &str) -> Vec<ModelRollout> {
        self.read()
            .rollouts
            .items
            .values()
            .filter(|rollout| rollout.namespace().as_deref() == Some(namespace))
            .cloned()
            .collect()
    }

    /// Every model version a rollout plan names (its stable and canary version), as
    /// (namespace, model, version).
    pub fn planned_versions(&self) -> Vec<(String, String, String)> {
        let state = self.read();
        let mut versions = Vec::new();
        for rollout in state.rollouts.items.values() {
            let namespace = rollout.namespace().unwrap_or_default();
            let Some(status) = &rollout.status else {
                continue;
            };
            for version in [&status.stable_version, &status.canary_version]
                .into_iter()
                .flatten()
            {
                versions.push((
                    namespace.clone(),
                    rollout.spec.model.clone(),
                    version.clone(),
                ));
            }
        }
        versions
    }

    /// A Model as the view keeps it (spec and Ready versions).
    pub fn model(&self, namespace: &str, name: &str) -> Option<Model> {
        self.read()
            .models
            .items
            .get(&namespaced_key(namespace, name))
            .cloned()
    }

    pub fn has_node(&self, node: &str) -> bool {
        self.read().nodes.items.contains_key(node)
    }

    /// Every pool, as (namespace, name).
    pub fn pools(&self) -> Vec<(String, String)> {
        self.read()
            .pools
            .items
            .values()
            .map(|pool| (pool.namespace().unwrap_or_default(), pool.name_any()))
            .collect()
    }

    /// The nodes a pool selects, by name; None when the pool is unknown.
    pub fn pool_nodes(&self, namespace: &str, pool: &str) -> Option<BTreeMap<String, NodeInfo>> {
        let state = self.read();
        let pool = state.pools.items.get(&namespaced_key(namespace, pool))?;
        let Some(selector) = node_selector(&pool.spec.node_selector) else {
            return Some(BTreeMap::new());
        };
        Some(
            state
                .nodes
                .items
                .iter()
                .filter(|(_, info)| selector.matches(&info.labels))
                .map(|(name, info)| (name.clone(), info.clone()))
                .collect(),
        )
    }

    /// How many nodes `selector` selects; None until the view has synced. An
    /// unsupported selector selects none (the EdgePool says why).
    pub fn count_selected_nodes(&self, selector: &LabelSelector) -> Option<usize> {
        let state = self.read();
        if !state.nodes.synced {
            return None;
        }
        let Some(selector) = node_selector(selector) else {
            return Some(0);
        };
        Some(
            state
                .nodes
                .items
                .values()
                .filter(|info| selector.matches(&info.labels))
                .count(),
        )
    }

    /// Follows the cluster until the process ends. `namespace` limits Models,
    /// EdgePools and ModelRollouts to one namespace; Nodes are cluster-wide.
    pub async fn run(&self, client: Client, namespace: Option<String>) {
        tokio::join!(
            self.follow(
                watch_objects::<Model>(&client, namespace.as_deref()),
                "Model",
                trim_model,
                |state| &mut state.models,
            ),
            self.follow(
                watch_objects::<EdgePool>(&client, namespace.as_deref()),
                "EdgePool",
                trim_pool,
                |state| &mut state.pools,
            ),
            self.follow(
                watch_objects::<ModelRollout>(&client, namespace.as_deref()),
                "ModelRollout",
                trim_rollout,
                |state| &mut state.rollouts,
            ),
            // Nodes: a label change concerns only the agents on that node.
            self.follow(
                // Metadata only: labels are all a node contributes, and status
                // heartbeats would otherwise stream whole Node objects.
                watcher(
                    Api::<PartialObjectMeta<Node>>::all(client.clone()),
                    watcher::Config::default().any_semantic()
                )
                .default_backoff(),
                "Node",
                |node| {
                    let info = NodeInfo {
                        labels: node.labels().clone(),
                        created: node.creation_timestamp().map(|time| time.0),
                    };
                    (node.name_any(), info)
                },
                |state| &mut state.nodes,
            ),
        );
    }

    /// Records a change under the write lock and publishes the new counter, so
    /// that a reader who saw counter `n` finds every change after `n` recorded.
    fn record(&self, state: &mut ViewState, kind: &'static str, change: Change) {
        let generation = *self.changes.borrow() + 1;
        if change != Change::None && (kind == "Node" || kind == "EdgePool") {
            state.membership_version += 1;
        }
        match change {
            Change::None => return,
            Change::One(node) if kind == "Node" => {
                state.node_changed_at.insert(node, generation);
            }
            Change::One(_) | Change::Many => {
                state.all_changed_at = generation;
                if kind == "Node" {
                    // Deleted nodes: forget them; their agents compare with all_changed_at.
                    let nodes = &state.nodes.items;
                    state
                        .node_changed_at
                        .retain(|node, _| nodes.contains_key(node));
                }
            }
        }
        self.changes.send_replace(generation);
    }

    async fn follow<K, V>(
        &self,
        events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
        kind: &'static str,
        keep: impl Fn(K) -> (String, V),
        objects: impl Fn(&mut ViewState) -> &mut Objects<V>,
    ) where
        V: PartialEq,
    {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let event = map_event(event, &keep);
                    let mut state = self.write();
                    let was_synced = state.synced();
                    let mut change = objects(&mut state).apply(event);
                    if was_synced != state.synced() {
                        // The first full view: every waiter must look.
                        change = Change::Many;
                    }
                    self.record(&mut state, kind, change);
                }
                // The watcher retries with backoff; until then the view keeps what it had.
                Err(error) => tracing::warn!(kind, %error, "agent API watch failed; retrying"),
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, ViewState> {
        // Every write is one map update, so a panic elsewhere cannot leave it torn.
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ViewState> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn watch_objects<K>(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + use<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let api = match namespace {
        Some(namespace) => Api::<K>::namespaced(client.clone(), namespace),
        None => Api::<K>::all(client.clone()),
    };
    watcher(api, watcher::Config::default().any_semantic()).default_backoff()
}

/// The objects of one kind, by key, with the buffer of a relist in progress.
struct Objects<V> {
    items: HashMap<String, V>,
    relist: Option<HashMap<String, V>>,
    synced: bool,
}

impl<V> Default for Objects<V> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<V: PartialEq> Objects<V> {
    /// Applies one watch event and says what readers see differently. A relist is
    /// buffered and swapped in whole, so objects deleted while the watch was down
    /// disappear too.
    fn apply(&mut self, event: Event<(String, V)>) -> Change {
        match event {
            Event::Apply((key, value)) => {
                if self.items.get(&key) == Some(&value) {
                    return Change::None;
                }
                self.items.insert(key.clone(), value);
                Change::One(key)
            }
            Event::Delete((key, _)) => match self.items.remove(&key) {
                Some(_) => Change::Many,
                None => Change::None,
            },
            Event::Init => {
                self.relist = Some(HashMap::new());
                Change::None
            }
            Event::InitApply((key, value)) => {
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(key, value);
                Change::None
            }
            Event::InitDone => {
                let fresh = self.relist.take().unwrap_or_default();
                let changed = fresh != self.items;
                self.items = fresh;
                self.synced = true;
                if changed { Change::Many } else { Change::None }
            }
        }
    }
}

fn map_event<K, V>(event: Event<K>, keep: impl Fn(K) -> (String, V)) -> Event<(String, V)> {
    match event {
        Event::Apply(object) => Event::Apply(keep(object)),
        Event::Delete(object) => Event::Delete(keep(object)),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(keep(object)),
        Event::InitDone => Event::InitDone,
    }
}

fn namespaced_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Metadata the view keeps: identity and age. Everything else (resourceVersion,
/// managedFields, status the controllers write) would make every write look like
/// a change and wake every waiting agent.
fn trimmed_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        creation_timestamp: meta.creation_timestamp.clone(),
        ..Default::default()
    }
}

fn trim_model(model: Model) -> (String, Model) {
    let versions = model
        .status
        .map(|status| status.versions)
        .unwrap_or_default();
    let trimmed = Model {
        metadata: trimmed_meta(&model.metadata),
        spec: model.spec,
        status: Some(ModelStatus {
            versions,
            ..Default::default()
        }),
    };
    (object_key(&trimmed), trimmed)
}

fn trim_pool(pool: EdgePool) -> (String, EdgePool) {
    let trimmed = EdgePool {
        metadata: trimmed_meta(&pool.metadata),
        spec: pool.spec,
        status: None,
    };
    (object_key(&trimmed), trimmed)
}

/// A rollout keeps its spec and the plan its controller wrote: the stable version,
/// the canary version while the rollout runs, and how many agents of each pool get
/// it. Counts of ready agents, analysis figures and messages change often and decide
/// no assignment: they are dropped so they wake no agent.
fn trim_rollout(rollout: ModelRollout) -> (String, ModelRollout) {
    let status = rollout.status.unwrap_or_default();
    let running = status
        .phase
        .is_some_and(|phase| !phase.is_finished() && phase != RolloutPhase::Unknown);
    let trimmed = ModelRollout {
        metadata: trimmed_meta(&rollout.metadata),
        spec: rollout.spec,
        status: Some(ModelRolloutStatus {
            stable_version: status.stable_version,
            canary_version: status.canary_version.filter(|_| running),
            pools: status
                .pools
                .into_iter()
                .filter(|_| running)
                .map(|progress| PoolProgress {
                    pool: progress.pool,
                    updated: progress.updated,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    (object_key(&trimmed), trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_all(objects: &mut Objects<u32>, events: Vec<Event<(String, u32)>>) -> Vec<Change> {
        events.into_iter().map(|e| objects.apply(e)).collect()
    }

    fn kv(key: &str, value: u32) -> (String, u32) {
        (key.to_string(), value)
    }

    #[test]
    fn events_report_only_visible_changes() {
        let mut objects = Objects::default();
        let changed = apply_all(
            &mut objects,
            vec![
                Event::Init,
                Event::InitApply(kv("a", 1)),
                Event::InitApply(kv("b", 2)),
                Event::InitDone,
                Event::Apply(kv("a", 1)),
                Event::Apply(kv("a", 3)),
                Event::Delete(kv("b", 2)),
                Event::Delete(kv("b", 2)),
            ],
        );
        use Change::{Many, None, One};
        assert_eq!(
            changed,
            [None, None, None, Many, None, One("a".into()), Many, None]
        );
        assert!(objects.synced);
        assert_eq!(objects.items.get("a"), Some(&3));
    }

    #[test]
    fn relist_drops_objects_deleted_while_away() {
        let mut objects = Objects::default();
        apply_all(
            &mut objects,
            vec![
                Event::Init,
                Event::InitApply(kv("a", 1)),
                Event::InitApply(kv("b", 2)),
                Event::InitDone,
            ],
        );
        let changed = apply_all(
            &mut objects,
            vec![Event::Init, Event::InitApply(kv("a", 1)), Event::InitDone],
        );
        assert_eq!(changed, [Change::None, Change::None, Change::Many]);
        assert_eq!(objects.items.len(), 1);
        let unchanged = apply_all(
            &mut objects,
            vec![Event::Init, Event::InitApply(kv("a", 1)), Event::InitDone],
        );
        assert_eq!(unchanged, [Change::None, Change::None, Change::None]);
    }

    #[test]
    fn a_node_label_change_concerns_only_that_node() {
        let view = ClusterView::new();
        let mut state = ViewState::default();
        let seen = *view.subscribe().borrow();
        view.record(&mut state, "Node", Change::One("n1".into()));
        *view.write() = state;
        assert!(view.changed_for("n1", seen));
        assert!(!view.changed_for("n2", seen));
        let later = *view.subscribe().borrow();
        assert!(!view.changed_for("n1", later));
        let mut state = std::mem::take(&mut *view.write());
        view.record(&mut state, "ModelRollout", Change::One("ns/r".into()));
        *view.write() = state;
        assert!(
            view.changed_for("n2", later),
            "a rollout change concerns every node"
        );
    }

    #[test]
    fn only_node_and_pool_changes_invalidate_canary_orders() {
        let view = ClusterView::new();
        let mut state = ViewState::default();
        view.record(&mut state, "ModelRollout", Change::One("ns/r".into()));
        view.record(&mut state, "Model", Change::Many);
        view.record(&mut state, "Node", Change::None);
        assert_eq!(state.membership_version, 0);
        view.record(&mut state, "Node", Change::One("n1".into()));
        view.record(&mut state, "EdgePool", Change::Many);
        assert_eq!(state.membership_version, 2);
    }

    #[test]
    fn status_writes_other_than_versions_are_not_changes() {
        let model: Model = serde_yaml::from_str(
            "apiVersion: shoal.dev/v1alpha1\nkind: Model\nmetadata: {name: m, namespace: ns, resourceVersion: '1'}\nspec: {version: '1', source: {configMap: {name: c, key: k}}}\nstatus: {phase: Fetching}\n",
        )
        .expect("parses");
        let mut rewritten = model.clone();
        rewritten.metadata.resource_version = Some("2".into());
        rewritten.status = Some(ModelStatus {
            phase: Some(shoal_api::ModelPhase::Ready),
            ..Default::default()
        });
        assert_eq!(trim_model(model), trim_model(rewritten));
    }
}
