//! The Model controller's decisions, apart from I/O: whether a Model needs work,
//! whether a fetched source may become its version, and the status that results.
//! Every function here is pure and unit-tested.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{CompressionMode, Model, ModelPhase, ModelStatus, ModelVersion};

pub const DEFAULT_REVISION_HISTORY_LIMIT: u32 = 10;

/// Status carries digests as `sha256:<hex>` (as OCI does); the artifact store keys
/// blobs by the bare hex.
pub fn digest_reference(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// The bare hex of a `sha256:<hex>` digest reference.
pub fn digest_hex(reference: &str) -> &str {
    reference.strip_prefix("sha256:").unwrap_or(reference)
}

/// What the controller must do with a Model.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// `spec.version` is Ready and its artifact is in the store.
    UpToDate,
    /// The spec asks for something this operator cannot do; a person must change it.
    Refuse(Refusal),
    /// Fetch the source and publish `spec.version`.
    Fetch,
}

/// A reason a version cannot become Ready, with a message that says what to fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The `reason` of the Ready condition (CamelCase, as Kubernetes conditions use).
    pub reason: &'static str,
    pub message: String,
}

/// Decides what a Model needs. `artifact_in_store` tells whether a digest's blob exists.
pub fn plan(model: &Model, artifact_in_store: impl Fn(&str) -> bool) -> Plan {
    if compression_mode(model) == CompressionMode::Unknown {
        return Plan::Refuse(Refusal {
            reason: "CompressionNotSupported",
            message: "spec.compression.mode is not one this operator version knows; \
                      use none, fp16 or int8"
                .into(),
        });
    }
    if model.spec.source.oci.is_some() {
        return Plan::Refuse(Refusal {
            reason: "SourceNotSupported",
            message: "spec.source.oci is not supported by this operator version yet; \
                      use spec.source.http (with sha256) or spec.source.configMap"
                .into(),
        });
    }
    let Some(status) = &model.status else {
        return Plan::Fetch;
    };
    let ready = status.phase == Some(ModelPhase::Ready)
        && status.observed_generation == model.metadata.generation
        && status.latest_version.as_deref() == Some(model.spec.version.as_str());
    let stored = find_version(&status.versions, &model.spec.version)
        .is_some_and(|entry| artifact_in_store(digest_hex(&entry.artifact_digest)));
    if ready && stored {
        Plan::UpToDate
    } else {
        Plan::Fetch
    }
}

/// The compression the Model asks for (none without spec.compression).
pub fn compression_mode(model: &Model) -> CompressionMode {
    model
        .spec
        .compression
        .as_ref()
        .map_or(CompressionMode::None, |c| c.mode)
}

pub fn mode_name(mode: CompressionMode) -> &'static str {
    match mode {
        CompressionMode::None => "none",
        CompressionMode::Fp16 => "fp16",
        CompressionMode::Int8 => "int8",
        CompressionMode::Unknown => "(unknown)",
    }
}

/// How a fetched source relates to the versions the Model already published.
#[derive(Debug, PartialEq)]
pub enum VersionBinding {
    /// The version string has never been Ready: publish it.
    New,
    /// The version was published with these same bytes (e.g. the store was lost): republish.
    Same,
    /// The version string is bound to other bytes: refuse.
    Conflict(Refusal),
}

/// A version string once Ready is bound to one content digest and one way of
/// compressing it, forever.
pub fn bind_version(
    versions: &[ModelVersion],
    version: &str,
    source_digest: &str,
    compression: CompressionMode,
) -> VersionBinding {
    match find_version(versions, version) {
        None => VersionBinding::New,
        Some(entry) if entry.source_digest == source_digest && entry.compression == compression => {
            VersionBinding::Same
        }
        Some(entry) if entry.source_digest == source_digest => VersionBinding::Conflict(Refusal {
            reason: "VersionConflict",
            message: format!(
                "version {version} was published with compression {} and now asks for {}; the \
                 artifact of a published version never changes: set a new spec.version to publish it \
                 with the new compression",
                mode_name(entry.compression),
                mode_name(compression)
            ),
        }),
        Some(entry) => VersionBinding::Conflict(Refusal {
            reason: "VersionConflict",
            message: format!(
                "version {version} is already bound to {} but the source now has {source_digest}; \
                 a published version never changes its bytes: set a new spec.version to publish them",
                entry.source_digest
            ),
        }),
    }
}

pub fn find_version<'a>(versions: &'a [ModelVersion], version: &str) -> Option<&'a ModelVersion> {
    versions.iter().find(|entry| entry.version == version)
}

/// The status of a Model whose `spec.version` just became Ready as `entry`.
/// The history keeps the newest `revisionHistoryLimit` versions, oldest first.
pub fn ready_status(model: &Model, entry: ModelVersion, now: Time) -> ModelStatus {
    let mut status = model.status.clone().unwrap_or_default();
    let limit = model
        .spec
        .revision_history_limit
        .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT)
        .max(1) as usize;
    let mut message = format!(
        "version {} is Ready: artifact {} ({} bytes)",
        entry.version, entry.artifact_digest, entry.artifact_bytes
    );
    if entry.compression != CompressionMode::None {
        message.push_str(&format!(
            ", {} of source {} ({} bytes, {}x)",
            mode_name(entry.compression),
            entry.source_digest,
            entry.source_bytes,
            entry.compression_ratio
        ));
        if let Some(figures) = &entry.validation {
            message.push_str(&format!(
                "; validation: {}",
                crate::compression::validation::describe(figures)
            ));
        }
    }
    status
        .versions
        .retain(|existing| existing.version != entry.version);
    status.latest_version = Some(entry.version.clone());
    status.artifact_digest = Some(entry.artifact_digest.clone());
    status.versions.push(entry);
    let excess = status.versions.len().saturating_sub(limit);
    status.versions.drain(..excess);
    status.phase = Some(ModelPhase::Ready);
    status.observed_generation = model.metadata.generation;
    set_condition(
        &mut status.conditions,
        ready_condition(
            ConditionStatus::True,
            "VersionReady",
            &message,
            model.metadata.generation,
            now,
        ),
    );
    status
}

/// The status of a Model whose `spec.version` failed. What was Ready before keeps
/// serving: the latest version, its digest and the history are left as they were.
pub fn failed_status(model: &Model, refusal: &Refusal, now: Time) -> ModelStatus {
    let mut status = model.status.clone().unwrap_or_default();
    status.phase = Some(ModelPhase::Failed);
    status.observed_generation = model.metadata.generation;
    set_condition(
        &mut status.conditions,
        ready_condition(
            ConditionStatus::False,
            refusal.reason,
            &refusal.message,
            model.metadata.generation,
            now,
        ),
    );
    status
}

/// The status while the controller works on `spec.version` (`Fetching`, or
/// `Pending` with a reason while it waits on something outside the Model).
pub fn progress_status(
    model: &Model,
    phase: ModelPhase,
    reason: &str,
    message: &str,
    now: Time,
) -> ModelStatus {
    let mut status = model.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    set_condition(
        &mut status.conditions,
        ready_condition(
            ConditionStatus::False,
            reason,
            message,
            model.metadata.generation,
            now,
        ),
    );
    status
}

fn ready_condition(
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Time,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    new_condition("Ready", status, reason, message, generation, now)
}

/// `namespace/name`, the key for backoff and logs.
pub fn object_key(model: &Model) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Model {
        serde_yaml::from_str(yaml).expect("test model parses")
    }

    const BASE: &str = r#"
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: ranker, namespace: shop, generation: 3}
spec:
  version: "2.0"
  source: {configMap: {name: ranker, key: model.onnx}}
  revisionHistoryLimit: 2
"#;

    fn entry(version: &str, digest: &str) -> ModelVersion {
        ModelVersion {
            version: version.into(),
            source_digest: digest.into(),
            artifact_digest: digest.into(),
            source_bytes: 10,
            artifact_bytes: 10,
            compression: CompressionMode::None,
            compression_ratio: 1.0,
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("valid time"))
    }

    #[test]
    fn new_model_is_fetched() {
        assert_eq!(plan(&model(BASE), |_| true), Plan::Fetch);
    }

    #[test]
    fn ready_model_with_artifact_is_up_to_date_and_refetched_when_store_lost_it() {
        let mut m = model(BASE);
        m.status = Some(ready_status(&m, entry("2.0", "sha256:aa"), now()));
        assert_eq!(plan(&m, |digest| digest == "aa"), Plan::UpToDate);
        assert_eq!(plan(&m, |_| false), Plan::Fetch);
    }

    #[test]
    fn new_generation_is_fetched_even_when_ready() {
        let mut m = model(BASE);
        m.status = Some(ready_status(&m, entry("2.0", "aa"), now()));
        m.metadata.generation = Some(4);
        m.spec.version = "3.0".into();
        assert_eq!(plan(&m, |_| true), Plan::Fetch);
    }

    #[test]
    fn known_compression_modes_are_fetched_and_unknown_ones_refused() {
        let mut m = model(BASE);
        for mode in ["none", "fp16", "int8"] {
            m.spec.compression =
                Some(serde_json::from_str(&format!(r#"{{"mode":"{mode}"}}"#)).expect("parses"));
            assert_eq!(plan(&m, |_| true), Plan::Fetch, "{mode}");
        }
        m.spec.compression = Some(serde_json::from_str(r#"{"mode":"int4"}"#).expect("parses"));
        let Plan::Refuse(refusal) = plan(&m, |_| true) else {
            panic!("expected a refusal")
        };
        assert_eq!(refusal.reason, "CompressionNotSupported");
        assert!(
            refusal.message.contains("none, fp16 or int8"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn version_binding() {
        let versions = vec![entry("1.0", "sha256:aa"), entry("2.0", "sha256:bb")];
        let none = CompressionMode::None;
        assert_eq!(
            bind_version(&versions, "3.0", "sha256:cc", none),
            VersionBinding::New
        );
        assert_eq!(
            bind_version(&versions, "2.0", "sha256:bb", none),
            VersionBinding::Same
        );
        let VersionBinding::Conflict(refusal) = bind_version(&versions, "2.0", "sha256:cc", none)
        else {
            panic!("expected a conflict")
        };
        assert_eq!(refusal.reason, "VersionConflict");
        assert!(refusal.message.contains("sha256:bb") && refusal.message.contains("sha256:cc"));
        let VersionBinding::Conflict(refusal) =
            bind_version(&versions, "2.0", "sha256:bb", CompressionMode::Int8)
        else {
            panic!("a new compression of a published version is a conflict")
        };
        assert!(
            refusal
                .message
                .contains("compression none and now asks for int8"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn history_is_bounded_by_revision_history_limit() {
        let mut m = model(BASE);
        for (version, digest) in [("1.0", "aa"), ("2.0", "bb"), ("3.0", "cc"), ("2.0", "bb")] {
            m.spec.version = version.into();
            m.status = Some(ready_status(&m, entry(version, digest), now()));
        }
        let status = m.status.expect("status");
        let kept: Vec<_> = status.versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(kept, ["3.0", "2.0"]);
        assert_eq!(status.latest_version.as_deref(), Some("2.0"));
        assert_eq!(status.artifact_digest.as_deref(), Some("bb"));
    }

    #[test]
    fn failure_keeps_the_serving_version() {
        let mut m = model(BASE);
        m.status = Some(ready_status(&m, entry("2.0", "aa"), now()));
        m.spec.version = "3.0".into();
        m.metadata.generation = Some(4);
        let refusal = Refusal {
            reason: "DigestMismatch",
            message: "bad".into(),
        };
        let status = failed_status(&m, &refusal, now());
        assert_eq!(status.phase, Some(ModelPhase::Failed));
        assert_eq!(status.latest_version.as_deref(), Some("2.0"));
        assert_eq!(status.observed_generation, Some(4));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready condition");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DigestMismatch")
        );
    }
}
