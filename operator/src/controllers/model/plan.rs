//! The Model controller's decisions, apart from I/O: whether a Model needs work,
//! whether a fetched source may become its version, and the status that results.
//! Every function here is pure and unit-tested.

use crate::artifacts::{digest_hex, digest_reference};
use crate::compression::CompressError;
use crate::compression::records::Record;
use crate::runtime::conditions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use shoal_api::condition::{ConditionStatus, new_condition, set_condition};
use shoal_api::{
    CompressionMode, Model, ModelPhase, ModelRollout, ModelStatus, ModelVersion, RolloutPhase,
    TensorSpec,
};
use std::collections::BTreeSet;

pub const DEFAULT_REVISION_HISTORY_LIMIT: u32 = 10;

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
            reason: conditions::model::COMPRESSION_NOT_SUPPORTED,
            message: "spec.compression.mode is not one this operator version knows; \
                      use none, fp16 or int8"
                .into(),
        });
    }
    if model.spec.source.oci.is_some() {
        return Plan::Refuse(Refusal {
            reason: conditions::model::SOURCE_NOT_SUPPORTED,
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
            reason: conditions::model::VERSION_CONFLICT,
            message: format!(
                "version {version} was published with compression {} and now asks for {}; the \
                 artifact of a published version never changes: set a new spec.version to publish it \
                 with the new compression",
                mode_name(entry.compression),
                mode_name(compression)
            ),
        }),
        Some(entry) => VersionBinding::Conflict(Refusal {
            reason: conditions::model::VERSION_CONFLICT,
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

/// The versions of Model `model` that its ModelRollouts still need: the version
/// each rolls to, its stable and canary versions, and the version an undo of its
/// last succeeded rollout would go back to. History trimming never drops these:
/// the fleet is assigned a version only while it is in `status.versions`.
pub fn versions_in_use(rollouts: &[ModelRollout], model: &str) -> BTreeSet<String> {
    let mut in_use = BTreeSet::new();
    for rollout in rollouts.iter().filter(|r| r.spec.model == model) {
        in_use.insert(rollout.spec.version.clone());
        let Some(status) = &rollout.status else {
            continue;
        };
        in_use.extend(status.stable_version.iter().cloned());
        in_use.extend(status.canary_version.iter().cloned());
        let undo_target = status
            .history
            .iter()
            .rev()
            .find(|entry| entry.phase == RolloutPhase::Succeeded)
            .and_then(|entry| entry.from_version.clone());
        in_use.extend(undo_target);
    }
    in_use
}

/// The status of a Model whose `spec.version` just became Ready as `entry`.
/// The history keeps the newest `revisionHistoryLimit` versions, oldest first,
/// and every older one in `in_use` (see [`versions_in_use`]); the condition's
/// message says why the history is longer than the limit.
pub fn ready_status(
    model: &Model,
    entry: ModelVersion,
    in_use: &BTreeSet<String>,
    now: Time,
) -> ModelStatus {
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
    let mut kept_for_rollouts = Vec::new();
    let mut index = 0;
    status.versions.retain(|existing| {
        let old = index < excess;
        index += 1;
        if old && in_use.contains(&existing.version) {
            kept_for_rollouts.push(existing.version.clone());
        }
        !old || in_use.contains(&existing.version)
    });
    if !kept_for_rollouts.is_empty() {
        message.push_str(&format!(
            "; the history keeps {} versions, more than revisionHistoryLimit {limit}, because \
             ModelRollouts still use {}",
            status.versions.len(),
            kept_for_rollouts.join(", ")
        ));
    }
    status.phase = Some(ModelPhase::Ready);
    status.observed_generation = model.metadata.generation;
    set_condition(
        &mut status.conditions,
        ready_condition(
            ConditionStatus::True,
            conditions::model::VERSION_READY,
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
    new_condition(conditions::READY, status, reason, message, generation, now)
}

/// Refuses a fetched source whose sha256 is not the one the user declared.
pub fn check_digest(source_hex: &str, declared: Option<&str>) -> Result<(), Refusal> {
    match declared {
        Some(declared) if declared != source_hex => Err(Refusal {
            reason: conditions::model::DIGEST_MISMATCH,
            message: format!(
                "the downloaded content does not match spec.source.http.sha256 ({declared}); \
                 nothing was stored. Fix the sha256 or the URL (the operator's log has the \
                 digest of what was downloaded)"
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses a source URL the operator will not fetch (not http(s), or an address its
/// policy refuses): only a change to the Model or to the operator's flags helps.
pub fn source_refused(error: &crate::artifacts::fetch::FetchError) -> Refusal {
    Refusal {
        reason: conditions::model::SOURCE_REFUSED,
        message: error.to_string(),
    }
}

/// Refuses a source that is not a model the agents can load and serve; `problem`
/// says what is wrong and what to change.
pub fn invalid_model(problem: impl std::fmt::Display) -> Refusal {
    Refusal {
        reason: conditions::model::INVALID_MODEL,
        message: problem.to_string(),
    }
}

/// Refuses a compression that failed before its gate could judge it.
pub fn compression_failed(error: &CompressError) -> Refusal {
    Refusal {
        reason: error.reason(),
        message: error.to_string(),
    }
}

/// Refuses a compressed artifact that failed its validation gate.
pub fn gate_failed(mode: CompressionMode, version: &str, failure: &str) -> Refusal {
    Refusal {
        reason: conditions::model::VALIDATION_FAILED,
        message: format!(
            "the {} artifact of version {version} failed its validation gate: {failure}; nothing \
             was published and the previous version keeps serving. Loosen \
             spec.compression.validation, try perChannel: true, or use another mode",
            mode_name(mode),
        ),
    }
}

/// The version entry of a source published as it is (no compression): the
/// artifact is the source.
pub fn uncompressed_version(
    model: &Model,
    source_hex: &str,
    bytes: u64,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
) -> ModelVersion {
    ModelVersion {
        version: model.spec.version.clone(),
        source_digest: digest_reference(source_hex),
        artifact_digest: digest_reference(source_hex),
        source_bytes: bytes,
        artifact_bytes: bytes,
        compression: CompressionMode::None,
        compression_ratio: 1.0,
        validation: None,
        inputs,
        outputs,
        ready_time: None,
    }
}

/// `entry` with the compressed artifact of `record` in place of the source.
pub fn compressed_version(
    entry: ModelVersion,
    mode: CompressionMode,
    record: Record,
) -> ModelVersion {
    ModelVersion {
        artifact_digest: record.artifact_digest,
        artifact_bytes: record.artifact_bytes,
        compression: mode,
        compression_ratio: record.ratio,
        validation: Some(record.validation),
        ..entry
    }
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
        m.status = Some(ready_status(
            &m,
            entry("2.0", "sha256:aa"),
            &BTreeSet::new(),
            now(),
        ));
        assert_eq!(plan(&m, |digest| digest == "aa"), Plan::UpToDate);
        assert_eq!(plan(&m, |_| false), Plan::Fetch);
    }

    #[test]
    fn new_generation_is_fetched_even_when_ready() {
        let mut m = model(BASE);
        m.status = Some(ready_status(
            &m,
            entry("2.0", "aa"),
            &BTreeSet::new(),
            now(),
        ));
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
            m.status = Some(ready_status(
                &m,
                entry(version, digest),
                &BTreeSet::new(),
                now(),
            ));
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
        m.status = Some(ready_status(
            &m,
            entry("2.0", "aa"),
            &BTreeSet::new(),
            now(),
        ));
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

    #[test]
    fn refusals_say_what_to_fix() {
        assert_eq!(check_digest("abc", None), Ok(()));
        assert_eq!(check_digest("abc", Some("abc")), Ok(()));
        let mismatch = check_digest("abc", Some("def")).expect_err("a mismatch is refused");
        assert_eq!(mismatch.reason, "DigestMismatch");
        assert!(mismatch.message.contains("def") && mismatch.message.contains("Fix the sha256"));
        assert!(
            !mismatch.message.contains("abc"),
            "the fetched digest stays out of status: {}",
            mismatch.message
        );

        let gate = gate_failed(CompressionMode::Int8, "2.0", "top-1 agreement 0.91 < 0.99");
        assert_eq!(gate.reason, "ValidationFailed");
        assert!(
            gate.message.contains("int8 artifact of version 2.0"),
            "{}",
            gate.message
        );
        assert!(gate.message.contains("previous version keeps serving"));

        let invalid = invalid_model("input x is a string tensor");
        assert_eq!(
            (invalid.reason, invalid.message.as_str()),
            ("InvalidModel", "input x is a string tensor")
        );
    }

    #[test]
    fn a_compressed_version_keeps_the_source_and_takes_the_artifact() {
        let model = model(
            "apiVersion: shoal.dev/v1alpha1\nkind: Model\nmetadata: {name: m, namespace: shop}\nspec:\n  version: '1'\n  source: {configMap: {name: c, key: k}}\n",
        );
        let entry = uncompressed_version(&model, "aa", 100, vec![], vec![]);
        assert_eq!(
            (entry.source_digest.as_str(), entry.artifact_digest.as_str()),
            ("sha256:aa", "sha256:aa")
        );
        assert_eq!(
            (entry.compression, entry.compression_ratio),
            (CompressionMode::None, 1.0)
        );
        let record = Record {
            artifact_digest: "sha256:bb".into(),
            artifact_bytes: 25,
            source_bytes: 100,
            ratio: 4.0,
            validation: Default::default(),
            gate_failure: None,
        };
        let compressed = compressed_version(entry, CompressionMode::Int8, record);
        assert_eq!(compressed.source_digest, "sha256:aa");
        assert_eq!(
            (
                compressed.artifact_digest.as_str(),
                compressed.artifact_bytes
            ),
            ("sha256:bb", 25)
        );
        assert_eq!(
            (compressed.compression, compressed.compression_ratio),
            (CompressionMode::Int8, 4.0)
        );
        assert!(compressed.validation.is_some());
    }

    #[test]
    fn versions_rollouts_still_use_are_never_trimmed() {
        let rollout = |yaml: &str| -> ModelRollout {
            serde_yaml::from_str(&format!(
                "apiVersion: shoal.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: r, namespace: shop}}\n{yaml}"
            ))
            .expect("rollout parses")
        };
        // Paused at 25 %: 1.0 stable, 2.0 canary; another model's rollout does not count.
        let rollouts = [
            rollout(
                "spec: {model: ranker, version: '2.0', pools: [a], steps: [{setWeight: 25}, {pause: {}}]}\n\
                 status: {phase: Paused, stableVersion: '1.0', canaryVersion: '2.0', \
                 history: [{version: '1.0', phase: Succeeded, fromVersion: '0.9'}]}",
            ),
            rollout("spec: {model: fraud, version: '7.0', pools: [a], steps: [{setWeight: 100}]}"),
        ];
        let in_use = versions_in_use(&rollouts, "ranker");
        assert_eq!(
            in_use.iter().map(String::as_str).collect::<Vec<_>>(),
            ["0.9", "1.0", "2.0"],
            "target, stable, canary and the undo target"
        );

        let mut m = model(BASE); // revisionHistoryLimit 2
        for (version, digest) in [("0.9", "a9"), ("1.0", "aa"), ("2.0", "bb"), ("3.0", "cc")] {
            m.spec.version = version.into();
            m.status = Some(ready_status(&m, entry(version, digest), &in_use, now()));
        }
        let status = m.status.clone().expect("status");
        let kept: Vec<_> = status.versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(
            kept,
            ["0.9", "1.0", "2.0", "3.0"],
            "1.0 still serves the non-canary nodes"
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert!(
            ready.message.contains("more than revisionHistoryLimit 2")
                && ready.message.contains("ModelRollouts still use 0.9, 1.0"),
            "{}",
            ready.message
        );

        // Once the rollouts let go, the next publish trims back to the limit.
        m.spec.version = "4.0".into();
        let status = ready_status(&m, entry("4.0", "dd"), &BTreeSet::new(), now());
        let kept: Vec<_> = status.versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(kept, ["3.0", "4.0"]);
    }
}
