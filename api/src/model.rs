//! The `Model` custom resource: a named model, where its bytes come from, how the
//! operator compresses and checks it, and the immutable history of its versions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::{VERSION_MESSAGE, VERSION_RULE, object_name_rule};

/// Desired state of a Model: the version to serve, where its ONNX bytes come from and
/// how to compress them. Changing `version` makes a new version; a version string that
/// once became Ready stays bound to the bytes it had.
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "Model",
    namespaced,
    status = "ModelStatus",
    derive = "PartialEq",
    shortname = "mdl",
    category = "shoal",
    doc = "A named ONNX model and the immutable history of its versions. The operator fetches the declared version, compresses and validates it, and keeps it ready for ModelRollouts to ship to EdgePools.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "The declared version"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the declared version is in fetch, compress and validate"
    ),
    printcolumn(
        name = "Serving",
        type_ = "string",
        json_path = ".status.latestVersion",
        description = "The newest version that became Ready"
    ),
    printcolumn(
        name = "Artifact",
        type_ = "string",
        json_path = ".status.artifactDigest",
        description = "Digest of the artifact of the newest Ready version",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Version of the model, for example "1.4.0" or "2025-06-01". Changing it makes a
    /// new version. Once a version is Ready it is bound to its content digest:
    /// declaring the same version with other bytes is refused (VersionConflict), never
    /// a silent replacement. 1 to 63 characters: letters, digits, '.', '_' and '-',
    /// starting with a letter or digit.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(VERSION_RULE).message(VERSION_MESSAGE))]
    pub version: String,

    /// Where the ONNX file of this version comes from. Set exactly one of http,
    /// configMap or oci.
    pub source: ModelSource,

    /// How to compress the model before shipping it to edge nodes, and the check the
    /// compressed model must pass. Absent: the model ships as it is (mode none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,

    /// How many Ready versions to keep in status and in the artifact store; older
    /// ones are forgotten first. 1 to 100, default 10.
    #[serde(
        default = "default_revision_history_limit",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub revision_history_limit: Option<u32>,
}

/// The default of `spec.revisionHistoryLimit`.
pub const DEFAULT_REVISION_HISTORY_LIMIT: u32 = 10;

fn default_revision_history_limit() -> Option<u32> {
    Some(DEFAULT_REVISION_HISTORY_LIMIT)
}

impl ModelSpec {
    /// `spec.revisionHistoryLimit`, or its default when unset.
    pub fn revision_history_limit_or_default(&self) -> u32 {
        self.revision_history_limit
            .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT)
    }
}

/// Where a model's ONNX file comes from. Exactly one of http, configMap or oci.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(
    "(has(self.http) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.oci) ? 1 : 0) == 1"
).message("spec.source must set exactly one of http, configMap or oci"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Download the file over HTTP(S) and check it against a SHA-256 digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,

    /// Read the file from a binaryData entry of a ConfigMap in the Model's namespace.
    /// A ConfigMap holds at most about 1 MiB, so this suits small models and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapSource>,

    /// Pull the file from an OCI registry. Not yet supported: the schema accepts it so
    /// manifests can be written ahead, but the current operator does not fetch it and
    /// marks the Model Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
}

/// An ONNX file downloaded over HTTP(S).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// URL of the ONNX file; must start with http:// or https://.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("url must start with http:// or https://"))]
    pub url: String,

    /// Lowercase hex SHA-256 of the file (64 characters, as printed by
    /// `sha256sum model.onnx`). The download is refused when it does not match.
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[a-f0-9]{64}$')")
        .message("sha256 must be the lowercase hex SHA-256 of the file: 64 characters 0-9 and a-f, as printed by sha256sum"))]
    pub sha256: String,
}

/// One entry of a ConfigMap in the same namespace as the object that refers to it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapSource {
    /// Name of the ConfigMap, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(object_name_rule())
        .message("name must be a ConfigMap name: lowercase letters, digits, '-' and '.'"))]
    pub name: String,

    /// Key of the entry in the ConfigMap's binaryData that holds the bytes.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')")
        .message("key must be a ConfigMap key: letters, digits, '-', '_' and '.'"))]
    pub key: String,
}

/// An ONNX file stored as an artifact in an OCI registry (not yet supported).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OciSource {
    /// Image reference, for example registry.example.com/models/ranker:1.4.0 or
    /// name@sha256:…
    #[schemars(length(min = 1, max = 1024))]
    pub reference: String,
}

/// How a model is compressed before it ships, and the gate the result must pass.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// none ships the model as it is; fp16 stores float weights as float16; int8
    /// quantizes weights to int8 with a scale (weight-only, standard ONNX
    /// DequantizeLinear). Default none.
    #[serde(default)]
    pub mode: CompressionMode,

    /// int8 only: one scale per output channel of each weight instead of one per
    /// tensor. More accurate on tensors whose channels differ in range (embedding
    /// tables, conv filters); needs the model's ONNX opset to be 13 or newer.
    /// Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_channel: bool,

    /// The check the compressed model must pass before the version becomes Ready: it
    /// runs next to the original on the same inputs. A threshold that is not set is
    /// not enforced; the figures are recorded in status either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationGate>,
}

/// Compression applied to a model's weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum CompressionMode {
    /// Ship the model as it is.
    #[default]
    None,
    /// Float weights stored as float16.
    Fp16,
    /// Weight-only int8 quantization.
    Int8,
    /// A mode this build does not know (written by a newer operator). Never valid in
    /// the schema; it exists so that reading a newer object does not fail.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// Thresholds the compressed model must meet against the original.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValidationGate {
    /// Number of inputs to compare on: synthetic ones generated from the model's input
    /// signature, or the first ones of dataset. 1 to 10000, default 32.
    #[serde(default = "default_samples", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub samples: Option<u32>,

    /// Real inputs to compare on instead of synthetic ones: a ConfigMap binaryData
    /// entry in the Model's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<ConfigMapSource>,

    /// Largest allowed absolute difference between any output value of the original
    /// and the compressed model. 0 or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_abs_error: Option<f64>,

    /// Smallest allowed fraction of inputs on which both models pick the same top-1
    /// class, from 0 to 1 (0.99 = 99%). For classifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_top1_agreement: Option<f64>,
}

/// The default of `validation.samples`.
pub const DEFAULT_VALIDATION_SAMPLES: u32 = 32;

fn default_samples() -> Option<u32> {
    Some(DEFAULT_VALIDATION_SAMPLES)
}

impl ValidationGate {
    /// `samples`, or its default when unset.
    pub fn samples_or_default(&self) -> u32 {
        self.samples.unwrap_or(DEFAULT_VALIDATION_SAMPLES)
    }
}

/// Observed state of a Model, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the declared version is: Pending, Fetching, Compressing, Validating,
    /// Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelPhase>,

    /// Standard conditions, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The newest version that became Ready: the one a rollout can ship.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<String>,

    /// Digest (sha256:…) of the artifact of latestVersion, the bytes agents download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_digest: Option<String>,

    /// Ready versions, oldest first, at most spec.revisionHistoryLimit of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<ModelVersion>,
}

/// Where a Model's declared version is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[schemars(transform = crate::schema::without_description)]
pub enum ModelPhase {
    /// Accepted, not started yet.
    #[default]
    Pending,
    /// Downloading or reading the source.
    Fetching,
    /// Compressing the weights.
    Compressing,
    /// Comparing the compressed model with the original.
    Validating,
    /// The version is stored and can be rolled out.
    Ready,
    /// The version failed; the conditions say why.
    Failed,
    /// A phase this build does not know (written by a newer operator). Never valid in
    /// the schema; it exists so that reading a newer object does not fail.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// One Ready version of a model and what the operator measured on it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelVersion {
    /// The version string from spec.version.
    pub version: String,

    /// Digest (sha256:…) of the source file as fetched.
    pub source_digest: String,

    /// Digest (sha256:…) of the artifact agents download, after compression.
    pub artifact_digest: String,

    /// Size of the source file in bytes.
    pub source_bytes: u64,

    /// Size of the artifact in bytes.
    pub artifact_bytes: u64,

    /// Compression that produced the artifact.
    #[serde(default)]
    pub compression: CompressionMode,

    /// sourceBytes divided by artifactBytes (1 without compression).
    pub compression_ratio: f64,

    /// What the validation gate measured, when the model was compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationFigures>,

    /// The model's inputs: name, datatype and shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<TensorSpec>,

    /// The model's outputs: name, datatype and shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<TensorSpec>,

    /// When this version became Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
}

/// Figures of the compressed model measured against the original.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValidationFigures {
    /// Number of inputs both models ran on.
    pub samples: u32,

    /// Largest absolute difference between any output value of the two models.
    pub max_abs_error: f64,

    /// Mean absolute difference over all output values.
    pub mean_abs_error: f64,

    /// Fraction of inputs (0 to 1) on which both models pick the same top-1 class;
    /// absent when the outputs are not class scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// Name, datatype and shape of one input or output tensor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TensorSpec {
    /// Tensor name as in the ONNX graph.
    pub name: String,

    /// Open Inference Protocol datatype: BOOL, UINT8, UINT16, UINT32, UINT64, INT8,
    /// INT16, INT32, INT64, FP16, FP32 or FP64 (agents serve no string tensors).
    pub datatype: String,

    /// Dimensions; -1 marks a dynamic one (such as the batch size). Empty for a scalar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shape: Vec<i64>,
}
