//! The `ModelRollout` custom resource: moves one model in a set of pools from its
//! stable version to a target version, step by step, gated by live metrics.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::{
    DURATION_RULE, OBJECT_NAME_PATTERN, VERSION_MESSAGE, VERSION_RULE, object_name_rule,
};

/// Desired state of a ModelRollout: which model goes to which version in which pools,
/// through which steps, and what metrics it must hold on the way.
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "ModelRollout",
    namespaced,
    status = "ModelRolloutStatus",
    derive = "PartialEq",
    shortname = "mro",
    category = "shoal",
    doc = "Moves one Model in a set of EdgePools from its stable version to a target version, step by step. Canary agents are chosen deterministically; the canary's error rate and latency are compared with the stable cohort, and a bad version is rolled back automatically.",
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        description = "The Model being rolled out"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "The target version"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Progressing, Paused, Succeeded, Degraded, RolledBack or Aborted"
    ),
    printcolumn(
        name = "Step",
        type_ = "integer",
        json_path = ".status.currentStep",
        description = "Index of the current step in spec.steps"
    ),
    printcolumn(
        name = "Weight",
        type_ = "integer",
        json_path = ".status.weight",
        description = "Percent of agents on the target version"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutSpec {
    /// Name of the Model to roll out, in the same namespace. Cannot change: roll out
    /// another model with another ModelRollout.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(object_name_rule())
            .message("model must be the name of a Model in this namespace: lowercase letters, digits, '-' and '.'"),
        validation = Rule::new("self == oldSelf")
            .message("spec.model cannot change; create another ModelRollout to roll out another model")
    )]
    pub model: String,

    /// Target version: a version of the Model that is, or will become, Ready.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(VERSION_RULE).message(VERSION_MESSAGE))]
    pub version: String,

    /// Names of the EdgePools, in the same namespace, to roll out to. 1 to 50, no
    /// duplicates.
    #[schemars(length(min = 1, max = 50), inner(length(min = 1, max = 253)))]
    #[x_kube(
        validation = Rule::new(format!("self.all(p, p.matches('{OBJECT_NAME_PATTERN}'))"))
            .message("spec.pools must hold EdgePool names: lowercase letters, digits, '-' and '.'"),
        merge_strategy = ListMerge::Set
    )]
    pub pools: Vec<String>,

    /// Steps in order. setWeight: N moves N percent of the agents (cumulative) to the
    /// new version; pause: {duration: 10m} waits, and pause: {} waits for a promote;
    /// analysis: {} waits until the canary's metrics pass spec.analysis. After the
    /// last step every agent moves to the new version; with no steps at all they move
    /// at once. At most 50 steps; setWeight must not decrease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    #[x_kube(validation = Rule::new("self.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted()")
        .message("spec.steps: setWeight must not decrease from one step to the next"))]
    pub steps: Vec<RolloutStep>,

    /// Metrics the canary must hold, checked continuously while the rollout runs and
    /// at every analysis step. Absent: no metric gate, steps advance on time and
    /// promotes alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisSpec>,

    /// How many agents of a pool may be switching version at the same time: a number
    /// such as 5, or a percent of the pool's agents such as "25%". Default 25%.
    #[serde(
        default = "default_max_unavailable",
        skip_serializing_if = "Option::is_none"
    )]
    #[x_kube(validation = Rule::new("string(self).matches('^([0-9]+|(100|[1-9]?[0-9])%)$')")
        .message("maxUnavailable must be a number of agents (0 or more) or a percent from 0% to 100%"))]
    pub max_unavailable: Option<IntOrString>,

    /// Roll back to the stable version by itself when analysis fails. Default true.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,

    /// Hold the rollout where it is; set back to false to resume. Default false.
    #[serde(default)]
    pub paused: bool,
}

/// Annotation through which a person acts on a running rollout: `promote` skips the
/// current step (a pause, an analysis, or the wait at a setWeight) and leaves
/// Degraded once no agent is failing; `abort` sends every agent back to the stable
/// version. The operator removes it once acted upon.
/// (`spec.paused` pauses and resumes; `spec.version` set to an earlier version undoes.)
pub const ACTION_ANNOTATION: &str = "shoal.dev/action";
/// Value of [`ACTION_ANNOTATION`] that skips the current pause or analysis step.
pub const ACTION_PROMOTE: &str = "promote";
/// Value of [`ACTION_ANNOTATION`] that returns every agent to the stable version.
pub const ACTION_ABORT: &str = "abort";

/// The default of `spec.maxUnavailable`.
pub const DEFAULT_MAX_UNAVAILABLE: &str = "25%";

fn default_max_unavailable() -> Option<IntOrString> {
    Some(IntOrString::String(DEFAULT_MAX_UNAVAILABLE.to_owned()))
}

fn default_true() -> bool {
    true
}

impl ModelRolloutSpec {
    /// `maxUnavailable`, or 25% when unset.
    pub fn max_unavailable_or_default(&self) -> IntOrString {
        self.max_unavailable
            .clone()
            .unwrap_or_else(|| IntOrString::String(DEFAULT_MAX_UNAVAILABLE.to_owned()))
    }
}

/// One step of a rollout: exactly one of setWeight, pause or analysis.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(
    "(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.analysis) ? 1 : 0) == 1"
).message("each step must set exactly one of setWeight, pause or analysis"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Percent of each pool's agents (cumulative, 0 to 100) that serve the new version
    /// after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100")
        .message("setWeight is a percent of agents: use a whole number from 0 to 100"))]
    pub set_weight: Option<i32>,

    /// Wait: for the given duration, or until a person promotes the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,

    /// Wait until the canary's metrics pass spec.analysis (write `analysis: {}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStep>,
}

/// A wait in a rollout.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    /// How long to wait, such as 30s, 10m or 1h30m. Absent: wait until a person
    /// promotes the rollout (kubectl shoal promote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE)
        .message("pause.duration must be a duration such as 30s, 10m or 1h30m (units ms, s, m, h)"))]
    pub duration: Option<String>,
}

/// A step that waits until the canary passes spec.analysis. Written `analysis: {}`; it
/// has no settings of its own yet.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStep {}

/// Metrics the canary cohort must hold, compared with the stable cohort of the same
/// pools over the same time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// How often the metrics are evaluated, such as 30s or 1m. Default 30s.
    #[serde(default = "default_interval", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE)
        .message("analysis.interval must be a duration such as 30s, 1m or 1m30s (units ms, s, m, h)"))]
    pub interval: Option<String>,

    /// Requests the canary must have served before a verdict is given; until then the
    /// result is Inconclusive. Default 50.
    #[serde(
        default = "default_min_requests",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_requests: Option<u64>,

    /// Highest allowed fraction of canary requests that fail, from 0 to 1 (0.01 = 1%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: Option<f64>,

    /// Highest allowed p99 latency of the canary, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_p99_latency_ms: Option<f64>,

    /// Highest allowed ratio of canary p99 latency to stable p99 latency, 1 or more
    /// (1.2 = the canary may be 20% slower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub max_p99_regression: Option<f64>,
}

/// The default of `analysis.interval`.
pub const DEFAULT_ANALYSIS_INTERVAL: &str = "30s";
/// The default of `analysis.minRequests`.
pub const DEFAULT_MIN_REQUESTS: u64 = 50;

fn default_interval() -> Option<String> {
    Some(DEFAULT_ANALYSIS_INTERVAL.to_owned())
}

fn default_min_requests() -> Option<u64> {
    Some(DEFAULT_MIN_REQUESTS)
}

impl AnalysisSpec {
    /// `interval`, or 30s when unset.
    pub fn interval_or_default(&self) -> &str {
        self.interval
            .as_deref()
            .unwrap_or(DEFAULT_ANALYSIS_INTERVAL)
    }

    /// `minRequests`, or 50 when unset.
    pub fn min_requests_or_default(&self) -> u64 {
        self.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS)
    }
}

/// Observed state of a ModelRollout, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Progressing, Paused, Succeeded, Degraded, RolledBack or Aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,

    /// Index in spec.steps of the step being carried out; equal to the number of
    /// steps while the last agents move after the final step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,

    /// When the current step started (a timed pause ends from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,

    /// What the rollout is doing or waiting for, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Percent of agents (0 to 100) that serve the canary version now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,

    /// The version the pools served before this rollout, and go back to on rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<String>,

    /// The version being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_version: Option<String>,

    /// Progress in each pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolProgress>,

    /// The latest comparison of canary and stable cohorts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,

    /// Rollouts of this object that finished, oldest first; the operator keeps a
    /// bounded number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<FinishedRollout>,
}

/// Where a rollout is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[schemars(transform = crate::schema::without_description)]
pub enum RolloutPhase {
    /// Moving through the steps.
    #[default]
    Progressing,
    /// Held by spec.paused or by a pause step.
    Paused,
    /// Every agent serves the new version.
    Succeeded,
    /// Analysis failed and autoRollback is off: a person has to decide.
    Degraded,
    /// Analysis failed and the pools went back to the stable version.
    RolledBack,
    /// A person aborted the rollout; the pools went back to the stable version.
    Aborted,
    /// A phase this build does not know (written by a newer operator). Never valid in
    /// the schema; it exists so that reading a newer object does not fail.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl RolloutPhase {
    /// True when the rollout will not move any more without a spec change.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::RolledBack | Self::Aborted)
    }
}

/// Progress of a rollout in one pool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolProgress {
    /// Name of the EdgePool.
    pub pool: String,

    /// Agents in the pool.
    #[serde(default)]
    pub agents: i32,

    /// Agents assigned the new version.
    #[serde(default)]
    pub updated: i32,

    /// Agents that serve the new version.
    #[serde(default)]
    pub ready: i32,

    /// Agents assigned the new version that failed to load it or went silent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed: i32,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// One comparison of the canary cohort with the stable cohort.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    /// When the comparison was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,

    /// Figures of the agents on the new version.
    pub canary: CohortFigures,

    /// Figures of the agents on the stable version.
    pub stable: CohortFigures,

    /// Pass, Fail or Inconclusive (too few requests to judge).
    pub verdict: String,

    /// Why, in words: which threshold failed and by how much.
    #[serde(default)]
    pub message: String,
}

impl AnalysisResult {
    /// The canary holds every threshold.
    pub const PASS: &'static str = "Pass";
    /// The canary breaks a threshold.
    pub const FAIL: &'static str = "Fail";
    /// Too few requests to judge.
    pub const INCONCLUSIVE: &'static str = "Inconclusive";
}

/// Request figures of one cohort over the analysis window.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CohortFigures {
    /// Requests served in the window.
    pub requests: u64,

    /// Fraction of those requests that failed, 0 to 1.
    pub error_rate: f64,

    /// 99th percentile latency in milliseconds; absent without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// A rollout that finished.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FinishedRollout {
    /// The version that was rolled out.
    pub version: String,

    /// How it ended: Succeeded, RolledBack or Aborted.
    pub phase: RolloutPhase,

    /// The stable version it started from (what `kubectl shoal undo` goes back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,

    /// Why it ended, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
