//! The agent wire protocol (HTTP/JSON under `/agent/v1`), shared by the operator
//! that serves it and the edge agents that dial home. Types only; docs/agent-protocol.md describes it.
//!
//! - `GET  /agent/v1/nodes/{node}/assignment?waitSeconds=N` with `If-None-Match`:
//!   long-poll for the [`Assignment`]; `304 Not Modified` when nothing changed.
//! - `GET  /agent/v1/artifacts/sha256/{hex}` with `Range`: immutable artifact bytes.
//! - `POST /agent/v1/nodes/{node}/report`: an [`AgentReport`].
//!
//! Every call carries `Authorization: Bearer <projected service-account token>`
//! (audience [`TOKEN_AUDIENCE`]); an agent may act only for its own node.

use serde::{Deserialize, Serialize};

/// Path prefix of every agent API route.
pub const PREFIX: &str = "/agent/v1";
/// The audience of the projected service-account token agents present.
pub const TOKEN_AUDIENCE: &str = "shoal";

/// A pool's agents run as the ServiceAccount `shoal-agent-<pool>` (their DaemonSet
/// has the same name); the operator recognises an agent's token by it.
pub const AGENT_ACCOUNT_PREFIX: &str = "shoal-agent-";

/// The name of a pool's agent ServiceAccount and DaemonSet: `shoal-agent-<pool>`.
pub fn agent_account_name(pool: &str) -> String {
    format!("{AGENT_ACCOUNT_PREFIX}{pool}")
}
/// Longest long-poll wait the operator grants, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Largest report body the operator accepts, in bytes; larger ones get 413.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Most entries a report's `models` may hold; more get 400.
pub const MAX_REPORTED_MODELS: usize = 64;
/// Most buckets one model's `latencyBuckets` may hold; more get 400.
pub const MAX_LATENCY_BUCKETS: usize = 64;

/// The assignment path of a node.
pub fn assignment_path(node: &str) -> String {
    format!("{PREFIX}/nodes/{node}/assignment")
}

/// The report path of a node.
pub fn report_path(node: &str) -> String {
    format!("{PREFIX}/nodes/{node}/report")
}

/// The download path of an artifact, by the bare hex of its sha256.
pub fn artifact_path(sha256_hex: &str) -> String {
    format!("{PREFIX}/artifacts/sha256/{sha256_hex}")
}

/// What one node must serve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// The node this assignment is for.
    pub node: String,
    /// Every model the node must serve, sorted by name.
    #[serde(default)]
    pub models: Vec<AssignedModel>,
}

/// One model version a node must serve.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedModel {
    /// The name clients use in `/v2/models/{name}`: the Model's metadata.name.
    pub name: String,
    /// The version to serve (the Model's spec.version that became Ready).
    pub version: String,
    /// `sha256:<hex>` of the artifact; the agent verifies the download against it.
    pub artifact_digest: String,
    /// Size of the artifact in bytes.
    pub artifact_bytes: u64,
    /// Where to download it, relative to the control-plane URL.
    pub download_path: String,
}

/// What an agent tells the operator about itself. Counters are cumulative since
/// `agentStartTime`, so a lost report loses nothing and a restart is visible.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// The reporting node.
    pub node: String,
    /// When the agent process started (RFC 3339).
    pub agent_start_time: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
    /// One entry per model version the agent holds.
    #[serde(default)]
    pub models: Vec<ModelReport>,
}

/// The state of one model version on one agent, with its request counters.
/// Aggregates only: never request payloads or features.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelReport {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    /// Why the state is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Inference requests answered since agent start.
    #[serde(default)]
    pub requests: u64,
    /// Of those, the ones answered with a 5xx status.
    #[serde(default)]
    pub errors: u64,
    /// Cumulative latency histogram: count of requests at or below each bound.
    #[serde(default)]
    pub latency_buckets: Vec<LatencyBucket>,
    /// Sum of all request latencies, in milliseconds.
    #[serde(default)]
    pub latency_sum_ms: f64,
}

/// One cumulative histogram bucket.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LatencyBucket {
    /// Upper bound in milliseconds. There is no +Inf bucket on the wire: its
    /// count is `requests`.
    pub le_ms: f64,
    pub count: u64,
}

/// Where a model version is on an agent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelState {
    /// Downloading, verifying, loading or warming up.
    #[default]
    Loading,
    /// Answering inference requests.
    Serving,
    /// Could not be served; `error` says why. The previous version keeps serving.
    Failed,
    /// A state this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_round_trips_in_camel_case() {
        let assignment = Assignment {
            node: "store-1".into(),
            models: vec![AssignedModel {
                name: "ranker".into(),
                version: "2.0".into(),
                artifact_digest: "sha256:ab".into(),
                artifact_bytes: 10,
                download_path: artifact_path("ab"),
            }],
        };
        let json = serde_json::to_string(&assignment).expect("serializes");
        assert!(json.contains("\"artifactDigest\":\"sha256:ab\""), "{json}");
        assert!(
            json.contains("\"downloadPath\":\"/agent/v1/artifacts/sha256/ab\""),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<Assignment>(&json).expect("parses"),
            assignment
        );
    }

    #[test]
    fn unknown_model_state_is_tolerated() {
        let report: ModelReport =
            serde_json::from_str(r#"{"name":"m","version":"1","state":"Draining"}"#)
                .expect("parses");
        assert_eq!(report.state, ModelState::Unknown);
    }

    #[test]
    fn paths() {
        assert_eq!(assignment_path("n1"), "/agent/v1/nodes/n1/assignment");
        assert_eq!(report_path("n1"), "/agent/v1/nodes/n1/report");
    }
}
