//! The `EdgePool` custom resource: a set of edge nodes, chosen by labels, that run a
//! Shoal agent each (one DaemonSet per pool) and serve the models rolled out to them.

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of an EdgePool: which nodes belong to it and how their agents run.
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "EdgePool",
    namespaced,
    status = "EdgePoolStatus",
    derive = "PartialEq",
    shortname = "epool",
    category = "shoal",
    doc = "A set of edge nodes, chosen by labels, that serve models. The operator runs one Shoal agent on each node through a DaemonSet it owns, and counts the agents and the model versions they serve.",
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes",
        description = "Nodes the selector matches"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.agentsReady",
        description = "Agents that reported recently and serve their assignment"
    ),
    printcolumn(
        name = "Stale",
        type_ = "integer",
        json_path = ".status.agentsStale",
        description = "Agents that have not reported within the timeout"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgePoolSpec {
    /// Nodes of the pool, chosen by their labels (for example
    /// matchLabels: {shoal.dev/pool: store-eu}). Required, and it must not be empty: an
    /// empty selector would match every node in the cluster.
    #[x_kube(validation = Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("spec.nodeSelector must select nodes with matchLabels or matchExpressions; an empty selector would match every node in the cluster"))]
    pub node_selector: LabelSelector,

    /// Tolerations for the agent pods; edge nodes are often tainted to keep other
    /// workloads off them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// How the agent runs on each node: image, port, cache size, resources, extra
    /// environment.
    #[serde(default)]
    pub agent: AgentSettings,
}

/// Image repository of the agent; the tag is the operator's own version.
pub const AGENT_IMAGE_REPOSITORY: &str = "ghcr.io/shoal-dev/shoal-agent";
/// The default of `spec.agent.port`.
pub const DEFAULT_AGENT_PORT: i32 = 8000;
/// The default of `spec.agent.cacheSize`.
pub const DEFAULT_AGENT_CACHE_SIZE: &str = "2Gi";

/// How the Shoal agent runs on each node of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// Agent container image. Default: ghcr.io/shoal-dev/shoal-agent tagged with the
    /// operator's own version, so that upgrading the operator upgrades the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// When the kubelet pulls the agent image: Always, IfNotPresent or Never. Default:
    /// the Kubernetes default for the image's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,

    /// Port the agent serves inference (Open Inference Protocol) and metrics on,
    /// on the node's network. 1 to 65535, default 8000.
    #[serde(default = "default_port", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Also publish the agent's port on this port of each selected node's own
    /// address (the container's hostPort), for store devices outside the cluster
    /// such as tills, kiosks and scanners, which cannot reach the pool's Service.
    /// It binds on every node the pool selects: pick a port nothing else on those
    /// nodes uses (an agent whose node has it taken stays Pending), and note that
    /// anything that can reach a node's address can then call its agent. Needs the
    /// CNI portmap plugin on the nodes. 1 to 65535; unset (the default) publishes
    /// nothing on the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub host_port: Option<i32>,

    /// Disk the agent may use for model artifacts and its last-known-good
    /// assignment, a Kubernetes quantity such as 2Gi. Default 2Gi.
    #[serde(
        default = "default_cache_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_size: Option<Quantity>,

    /// CPU and memory requests and limits of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables for the agent container, for example RUST_LOG.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<EnvVar>,
}

fn default_port() -> Option<i32> {
    Some(DEFAULT_AGENT_PORT)
}

fn default_cache_size() -> Option<Quantity> {
    Some(Quantity(DEFAULT_AGENT_CACHE_SIZE.to_owned()))
}

impl AgentSettings {
    /// `port`, or 8000 when unset.
    pub fn port_or_default(&self) -> i32 {
        self.port.unwrap_or(DEFAULT_AGENT_PORT)
    }

    /// `image`, or the agent image of this very build when unset.
    pub fn image_or_default(&self) -> String {
        match &self.image {
            Some(image) => image.clone(),
            None => default_agent_image(),
        }
    }

    /// `cacheSize`, or 2Gi when unset.
    pub fn cache_size_or_default(&self) -> Quantity {
        self.cache_size
            .clone()
            .unwrap_or_else(|| Quantity(DEFAULT_AGENT_CACHE_SIZE.to_owned()))
    }
}

/// The agent image that matches this build: `ghcr.io/shoal-dev/shoal-agent:<version>`.
pub fn default_agent_image() -> String {
    format!("{AGENT_IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Observed state of an EdgePool, written by the operator. Counts are aggregated over
/// the pool, never listed per node, so that a pool of 10,000 nodes stays small.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgePoolStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Nodes the selector matches.
    #[serde(default)]
    pub nodes: i32,

    /// Agents that reported within the timeout and serve their assignment.
    #[serde(default)]
    pub agents_ready: i32,

    /// Agents that have not reported within the timeout (for example a node whose
    /// link is down); they keep serving what they had.
    #[serde(default)]
    pub agents_stale: i32,

    /// Name of the DaemonSet that runs the pool's agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_set: Option<String>,

    /// Name of the Service in front of the pool's agents (ClusterIP, with
    /// internalTrafficPolicy Local, so an app that calls it is answered by the
    /// agent of its own node). Unset when the pool's name cannot name a Service:
    /// shoal-agent-<pool> must be a DNS label, so a pool name with dots or longer
    /// than 51 characters gets no Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,

    /// How many agents serve each model version, one entry per model and version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionCount>,
}

/// The number of agents of a pool that serve one version of one model.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VersionCount {
    /// Name of the Model.
    pub model: String,

    /// Version being served.
    pub version: String,

    /// Number of agents serving it.
    pub agents: i32,
}
