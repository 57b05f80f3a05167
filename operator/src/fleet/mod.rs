//! The fleet as the operator knows it: the cluster view and the agents' latest
//! reports. A periodic pass turns them into per-pool summaries for the fleet gauges
//! and asks the EdgePool controller to rewrite a pool's status only when its summary
//! changed — never one status write per report.

pub mod cluster_view;
pub mod counter_deltas;
pub mod deleted_pods;
pub mod pool_agents;
pub mod recent_assignments;
pub mod reports;
pub mod series_pruning;

use crate::fleet::cluster_view::ClusterView;
use crate::fleet::deleted_pods::DeletedPods;
use crate::fleet::pool_agents::{PoolAgents, PoolNode, pool_agents};
use crate::fleet::recent_assignments::{NamespacedVersion, RecentAssignments};
use crate::fleet::reports::{Agent, ReportIndex};
use crate::fleet::series_pruning::UnnamedSeries;
use crate::runtime::metrics::Metrics;
use k8s_openapi::jiff::Timestamp;
use shoal_api::agent_protocol::Assignment;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often pool summaries are recomputed.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

pub struct Fleet {
    pub cluster: ClusterView,
    pub reports: ReportIndex,
    /// What each agent was assigned lately: what it may download and report.
    pub assigned: RecentAssignments,
    /// Agent pods deleted lately: their tokens are checked again, not cached.
    pub deleted_pods: DeletedPods,
    /// An agent silent for longer than this counts as stale.
    pub stale_after: Duration,
    pub started: Timestamp,
    /// Whether this replica leads (always, without leader election). Only the
    /// leader takes reports: it is the one that writes status from them.
    leading: AtomicBool,
}

impl Fleet {
    pub fn new(stale_after: Duration) -> Self {
        let started = Timestamp::now();
        Self {
            cluster: ClusterView::new(),
            reports: ReportIndex::new(started),
            assigned: RecentAssignments::new(),
            deleted_pods: DeletedPods::default(),
            stale_after,
            started,
            leading: AtomicBool::new(true),
        }
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    /// What `agent`'s node must serve now, noted in [`Fleet::assigned`]; None until
    /// the cluster view has synced.
    pub fn assignment_for(&self, agent: &Agent, now: Timestamp) -> Option<Assignment> {
        let assignment = self
            .cluster
            .assignment(&agent.namespace, &agent.pool, &agent.node)?;
        self.assigned.note(agent, &assignment, now);
        Some(assignment)
    }

    /// Whether `agent` may download the artifact `digest` (`sha256:<hex>`): its node
    /// is assigned it now, or was within [`recent_assignments::RECENTLY`] (a
    /// download that resumes after the rollout moved on). False until the cluster
    /// view has synced.
    pub fn may_download(&self, agent: &Agent, digest: &str, now: Timestamp) -> bool {
        self.assignment_for(agent, now).is_some() && self.assigned.has_artifact(agent, digest, now)
    }

    /// Every model version something still names, as (namespace, model, version): a
    /// rollout plan, an agent's recent assignment or an agent's latest report.
    pub fn named_versions(&self, now: Timestamp) -> HashSet<NamespacedVersion> {
        let mut named = self.assigned.versions(now);
        named.extend(self.cluster.planned_versions());
        named.extend(self.reports.versions());
        named
    }

    /// Starts the watches that keep the cluster view current, in the background.
    pub fn follow_cluster(self: &Arc<Self>, client: kube::Client, namespace: Option<String>) {
        let fleet = self.clone();
        let pods = (self.clone(), client.clone(), namespace.clone());
        tokio::spawn(async move { fleet.cluster.run(client, namespace).await });
        tokio::spawn(async move {
            let (fleet, client, namespace) = pods;
            fleet.deleted_pods.follow(client, namespace).await
        });
    }

    /// The agents of one pool, aggregated; None until the cluster view has synced
    /// or when the pool is unknown.
    pub fn pool_summary(&self, namespace: &str, pool: &str, now: Timestamp) -> Option<PoolAgents> {
        if !self.cluster.is_synced() {
            return None;
        }
        let nodes = self.cluster.pool_nodes(namespace, pool)?;
        let reports = self.reports.for_pool(namespace, pool);
        let pool_nodes = nodes.iter().map(|(name, info)| PoolNode {
            created: info.created,
            last_report: reports
                .get(name)
                .map(|latest| (latest.received, &latest.report)),
        });
        Some(pool_agents(pool_nodes, now, self.stale_after, self.started))
    }

    /// Every [`SUMMARY_INTERVAL`]: forgets the reports and assignments of agents
    /// whose pool or node is gone, drops fleet series of versions nothing names any
    /// more, sets the fleet gauges, and calls `pool_changed(namespace, pool)` for each
    /// pool whose summary differs from the last pass. Runs until the process ends.
    pub async fn summarize_periodically(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        mut pool_changed: impl FnMut(&str, &str) -> bool,
    ) {
        let mut last: HashMap<(String, String), PoolAgents> = HashMap::new();
        let mut unnamed = UnnamedSeries::new();
        let mut interval = tokio::time::interval(SUMMARY_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if !self.cluster.is_synced() {
                continue;
            }
            let agent_exists = |agent: &Agent| {
                self.cluster.has_pool(&agent.namespace, &agent.pool)
                    && self.cluster.has_node(&agent.node)
            };
            self.reports.retain(agent_exists);
            self.assigned.retain(agent_exists);
            let now = Timestamp::now();
            let gone = unnamed.expired(metrics.fleet_series(), &self.named_versions(now), now);
            if !gone.is_empty() {
                tracing::info!(
                    series = gone.len(),
                    "dropping fleet series of model versions nothing has named for a while"
                );
                metrics.forget_fleet_series(&gone);
            }
            let mut current = HashMap::new();
            for (namespace, pool) in self.cluster.pools() {
                let Some(summary) = self.pool_summary(&namespace, &pool, now) else {
                    continue;
                };
                metrics.set_fleet_agents(&namespace, &pool, summary.connected, summary.stale);
                let key = (namespace, pool);
                // Only a pool whose trigger was accepted counts as told: a full
                // queue is retried on the next pass.
                let told = last.get(&key) == Some(&summary) || pool_changed(&key.0, &key.1);
                if told {
                    current.insert(key, summary);
                }
            }
            for (namespace, pool) in last.keys() {
                if !current.contains_key(&(namespace.clone(), pool.clone()))
                    && !self.cluster.has_pool(namespace, pool)
                {
                    metrics.forget_fleet_agents(namespace, pool);
                }
            }
            last = current;
        }
    }
}
