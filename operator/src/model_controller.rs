//! The Model controller's I/O shell: fetch the source, verify its digest, inspect
//! it with tract, store it content-addressed and write status. Decisions live in
//! `model_plan`; this file only carries them out.

use crate::artifact_store::StoreError;
use crate::compression::records::{self, Record, Records};
use crate::compression::{self, CompressError, Gate, Granularity, Progress};
use crate::context::{Context, FIELD_MANAGER};
use crate::fetch::{FetchError, fetch_http};
use crate::model_plan::{self, Plan, Refusal, VersionBinding};
use crate::onnx_signature;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use shoal_api::{
    CompressionMode, ConfigMapSource, Model, ModelPhase, ModelStatus, ModelVersion, TensorSpec,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CONTROLLER: &str = "model";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("the artifact store failed: {0}")]
    Store(StoreError),
    #[error(
        "ConfigMap {namespace}/{name} not found; create it or fix the ConfigMap name in the Model \
         (spec.source.configMap or spec.compression.validation.dataset)"
    )]
    ConfigMapMissing { namespace: String, name: String },
    #[error(
        "ConfigMap {namespace}/{name} has no key {key:?} in binaryData or data (it has: {available}); \
         put the file under binaryData.{key} or fix the key in the Model"
    )]
    ConfigMapKeyMissing {
        namespace: String,
        name: String,
        key: String,
        available: String,
    },
    #[error("inspecting the model was interrupted: {0}")]
    Interrupted(String),
    #[error(
        "could not write the compression record: {0}; check that the artifact store volume is writable and not full"
    )]
    CompressionRecord(std::io::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Fetch(e) => e.metric_label(),
            Error::Store(e) => e.metric_label(),
            Error::ConfigMapMissing { .. } => "configmap_missing",
            Error::ConfigMapKeyMissing { .. } => "configmap_key_missing",
            Error::Interrupted(_) => "interrupted",
            Error::CompressionRecord(_) => "compression_record",
        }
    }
}

/// Runs the Model controller until shutdown. `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let models: Api<Model> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (reader, writer) = reflector::store();
    // Status writes do not change metadata.generation; filtering on it keeps the
    // controller from reconciling its own status patches.
    let stream = watcher(models, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let ready_reader = reader.clone();
    tokio::spawn(crate::context::signal_when_synced(
        ready_reader,
        "model",
        synced,
    ));
    Controller::for_stream(stream, reader)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_model(&model, &ctx).await;
    ctx.metrics.reconciled(CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.backoff.reset(&model_plan::object_key(&model));
    }
    result
}

fn error_policy(model: Arc<Model>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let delay = ctx.backoff.next_delay(&model_plan::object_key(&model));
    tracing::warn!(model = %model_plan::object_key(&model), %error, retry_in = ?delay, "model reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_model(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let key = model_plan::object_key(model);
    match model_plan::plan(model, |digest| {
        ctx.artifacts.contains(digest).unwrap_or(false)
    }) {
        Plan::UpToDate => return Ok(Action::requeue(Duration::from_secs(600))),
        Plan::Refuse(refusal) => return refuse(model, ctx, &refusal).await,
        Plan::Fetch => {}
    }
    tracing::info!(model = %key, version = %model.spec.version, "fetching model source");
    let message = format!("fetching version {}", model.spec.version);
    write_status(
        model,
        ctx,
        &model_plan::progress_status(model, ModelPhase::Fetching, "Fetching", &message, now()),
    )
    .await?;

    let (bytes, expected_digest) = match fetch_source(model, ctx).await {
        Ok(fetched) => fetched,
        Err(error) => {
            let status = model_plan::progress_status(
                model,
                ModelPhase::Pending,
                "FetchFailed",
                &error.to_string(),
                now(),
            );
            write_status(model, ctx, &status).await?;
            return Err(error);
        }
    };
    ctx.metrics.fetched(bytes.len() as u64);
    let source_hex = crate::artifact_store::sha256_hex(&bytes);
    if let Some(expected) = &expected_digest
        && *expected != source_hex
    {
        let refusal = Refusal {
            reason: "DigestMismatch",
            message: format!(
                "the source's sha256 is {source_hex} but spec.source.http.sha256 says {expected}; \
                 nothing was stored. Fix the sha256 or the URL"
            ),
        };
        return refuse(model, ctx, &refusal).await;
    }

    let source_digest = model_plan::digest_reference(&source_hex);
    let versions = model
        .status
        .as_ref()
        .map(|s| s.versions.as_slice())
        .unwrap_or_default();
    let mode = model_plan::compression_mode(model);
    if let VersionBinding::Conflict(refusal) =
        model_plan::bind_version(versions, &model.spec.version, &source_digest, mode)
    {
        return refuse(model, ctx, &refusal).await;
    }

    // Parsing and optimising a model is CPU-bound and storing it is blocking file
    // I/O: keep both off the async runtime. Only a loadable model is stored.
    let artifacts = ctx.artifacts.clone();
    let expected = source_hex.clone();
    let bytes = Arc::new(bytes);
    let source = bytes.clone();
    let outcome =
        tokio::task::spawn_blocking(move || match onnx_signature::read_signature(&bytes) {
            Err(invalid) => Ok(Err(invalid)),
            Ok(signature) => artifacts
                .put_verified(&bytes, Some(&expected))
                .map(|stored| Ok((signature, stored))),
        })
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))?
        .map_err(Error::Store)?;
    let (signature, stored) = match outcome {
        Ok(inspected) => inspected,
        Err(invalid) => {
            let refusal = Refusal {
                reason: "InvalidModel",
                message: invalid.to_string(),
            };
            return refuse(model, ctx, &refusal).await;
        }
    };
    let mut entry = ModelVersion {
        version: model.spec.version.clone(),
        source_digest: source_digest.clone(),
        artifact_digest: model_plan::digest_reference(&stored.digest),
        source_bytes: stored.bytes,
        artifact_bytes: stored.bytes,
        compression: CompressionMode::None,
        compression_ratio: 1.0,
        validation: None,
        inputs: signature.inputs.into_iter().map(tensor_spec).collect(),
        outputs: signature.outputs.into_iter().map(tensor_spec).collect(),
        ready_time: None,
    };
    if mode != CompressionMode::None {
        match compress_version(model, ctx, source, &source_hex, mode).await? {
            Ok(record) => {
                entry.artifact_digest = record.artifact_digest;
                entry.artifact_bytes = record.artifact_bytes;
                entry.compression = mode;
                entry.compression_ratio = record.ratio;
                entry.validation = Some(record.validation);
            }
            Err(refusal) => return refuse(model, ctx, &refusal).await,
        }
    }
    entry.ready_time = Some(now());
    tracing::info!(model = %key, version = %entry.version, digest = %entry.artifact_digest, bytes = entry.artifact_bytes, "model version ready");
    write_status(model, ctx, &model_plan::ready_status(model, entry, now())).await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// Compresses the stored source of `spec.version` as `spec.compression` says and
/// stores the artifact if it passes the gate. A finished compression with the same
/// inputs is reused (see `compression::records`). The outer error is worth a retry;
/// the inner one is a refusal only a change to the Model can fix.
async fn compress_version(
    model: &Model,
    ctx: &Context,
    source: Arc<Vec<u8>>,
    source_hex: &str,
    mode: CompressionMode,
) -> Result<Result<Record, Refusal>, Error> {
    let spec = model.spec.compression.clone().unwrap_or_default();
    let gate_spec = spec.validation.clone().unwrap_or_default();
    let dataset = match &gate_spec.dataset {
        None => None,
        Some(source) => match config_map_bytes(ctx, model, source).await {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                let status = model_plan::progress_status(
                    model,
                    ModelPhase::Pending,
                    "DatasetUnavailable",
                    &format!("the validation dataset is unavailable: {error}"),
                    now(),
                );
                write_status(model, ctx, &status).await?;
                return Err(error);
            }
        },
    };
    let options = compression::Options {
        mode,
        granularity: if spec.per_channel {
            Granularity::PerChannel
        } else {
            Granularity::PerTensor
        },
        samples: gate_spec.samples_or_default() as usize,
        gate: Gate {
            max_abs_error: gate_spec.max_abs_error,
            min_top1_agreement: gate_spec.min_top1_agreement,
        },
        dataset,
    };
    let dataset_hex = options
        .dataset
        .as_deref()
        .map(crate::artifact_store::sha256_hex);
    let key = records::key(&records::KeyInputs {
        source_hex,
        mode,
        granularity: options.granularity,
        samples: options.samples,
        dataset_hex: dataset_hex.as_deref(),
        gate: options.gate,
    });

    let message = format!(
        "compressing version {} to {}",
        model.spec.version,
        model_plan::mode_name(mode)
    );
    write_status(
        model,
        ctx,
        &model_plan::progress_status(
            model,
            ModelPhase::Compressing,
            "Compressing",
            &message,
            now(),
        ),
    )
    .await?;
    // Compressions are CPU- and memory-heavy: at most `compression_slots` at once.
    let _permit = ctx
        .compression_slots
        .acquire()
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))?;
    let (validating_tx, mut validating_rx) = tokio::sync::mpsc::unbounded_channel();
    let artifacts = ctx.artifacts.clone();
    let records = ctx.compression_records.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        compress_or_reuse(&source, &options, &key, &artifacts, &records, || {
            let _ = validating_tx.send(());
        })
    });
    let mut reported_validating = false;
    let outcome = loop {
        tokio::select! {
            result = &mut task => break result,
            Some(()) = validating_rx.recv(), if !reported_validating => {
                reported_validating = true;
                let message = format!(
                    "validating the {} artifact of version {} against the original",
                    model_plan::mode_name(mode),
                    model.spec.version
                );
                let status = model_plan::progress_status(
                    model, ModelPhase::Validating, "Validating", &message, now(),
                );
                write_status(model, ctx, &status).await?;
            }
        }
    };
    let outcome = outcome.map_err(|e| Error::Interrupted(e.to_string()))??;
    let result = match &outcome {
        Err(_) => "error",
        Ok(record) if record.gate_failure.is_some() => "gate_failed",
        Ok(_) => "passed",
    };
    ctx.metrics.compressed(model_plan::mode_name(mode), result);
    Ok(match outcome {
        Err(error) => Err(Refusal {
            reason: error.reason(),
            message: error.to_string(),
        }),
        Ok(record) => match &record.gate_failure {
            None => Ok(record),
            Some(failure) => Err(Refusal {
                reason: "ValidationFailed",
                message: format!(
                    "the {} artifact of version {} failed its validation gate: {failure}; nothing \
                     was published and the previous version keeps serving. Loosen \
                     spec.compression.validation, try perChannel: true, or use another mode",
                    model_plan::mode_name(mode),
                    model.spec.version
                ),
            }),
        },
    })
}

/// Blocking: the record of an earlier identical compression whose artifact is still
/// stored, or a fresh compression (stored and recorded). `on_validating` is called
/// once validation starts.
fn compress_or_reuse(
    source: &[u8],
    options: &compression::Options,
    key: &str,
    artifacts: &crate::artifact_store::ArtifactStore,
    records: &Records,
    on_validating: impl Fn(),
) -> Result<Result<Record, CompressError>, Error> {
    if let Some(record) = records.get(key) {
        let stored = artifacts
            .contains(model_plan::digest_hex(&record.artifact_digest))
            .unwrap_or(false);
        if record.gate_failure.is_some() || stored {
            return Ok(Ok(record));
        }
    }
    let compressed = match compression::compress(source, options, |progress| {
        if let Progress::Validating { done: 1, .. } = progress {
            on_validating();
        }
    }) {
        Ok(compressed) => compressed,
        Err(error) => return Ok(Err(error)),
    };
    let report = compressed.report;
    if report.gate.passed {
        artifacts
            .put_verified(
                &compressed.bytes,
                Some(model_plan::digest_hex(&report.artifact_digest)),
            )
            .map_err(Error::Store)?;
    }
    let record = Record {
        artifact_digest: report.artifact_digest,
        artifact_bytes: report.artifact_bytes,
        source_bytes: report.source_bytes,
        ratio: report.ratio,
        validation: report.validation,
        gate_failure: report.gate.failure,
    };
    records
        .put(key, &record)
        .map_err(Error::CompressionRecord)?;
    Ok(Ok(record))
}

fn tensor_spec(tensor: onnx_signature::Tensor) -> TensorSpec {
    TensorSpec {
        name: tensor.name,
        datatype: tensor.datatype,
        shape: tensor.shape,
    }
}

/// Records a failure that only a change to the Model can fix, then waits for that change.
async fn refuse(model: &Model, ctx: &Context, refusal: &Refusal) -> Result<Action, Error> {
    tracing::warn!(model = %model_plan::object_key(model), reason = refusal.reason, message = %refusal.message, "model version refused");
    ctx.metrics.reconcile_failed(CONTROLLER, refusal.reason);
    write_status(
        model,
        ctx,
        &model_plan::failed_status(model, refusal, now()),
    )
    .await?;
    Ok(Action::await_change())
}

/// The source bytes and, for http sources, the digest the user declared.
async fn fetch_source(model: &Model, ctx: &Context) -> Result<(Vec<u8>, Option<String>), Error> {
    if let Some(http) = &model.spec.source.http {
        let bytes = fetch_http(&ctx.http, &http.url, ctx.max_model_bytes).await?;
        return Ok((bytes, Some(http.sha256.clone())));
    }
    let Some(source) = &model.spec.source.config_map else {
        // The schema admits exactly one source and `plan` refused oci already.
        return Err(Error::Interrupted(
            "spec.source names no source this operator can fetch".into(),
        ));
    };
    Ok((config_map_bytes(ctx, model, source).await?, None))
}

/// The bytes under `source.key` of a ConfigMap in the Model's namespace: binaryData,
/// or data (text, such as a JSON Lines dataset).
async fn config_map_bytes(
    ctx: &Context,
    model: &Model,
    source: &ConfigMapSource,
) -> Result<Vec<u8>, Error> {
    let namespace = model.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_map =
        config_maps
            .get_opt(&source.name)
            .await?
            .ok_or_else(|| Error::ConfigMapMissing {
                namespace: namespace.clone(),
                name: source.name.clone(),
            })?;
    let mut binary = config_map.binary_data.unwrap_or_default();
    let mut text = config_map.data.unwrap_or_default();
    if let Some(bytes) = binary.remove(&source.key) {
        return Ok(bytes.0);
    }
    if let Some(text) = text.remove(&source.key) {
        return Ok(text.into_bytes());
    }
    Err(Error::ConfigMapKeyMissing {
        namespace,
        name: source.name.clone(),
        key: source.key.clone(),
        available: binary
            .keys()
            .chain(text.keys())
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Writes the whole status with server-side apply under the operator's field manager.
async fn write_status(model: &Model, ctx: &Context, status: &ModelStatus) -> Result<(), Error> {
    let api: Api<Model> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let patch = json!({ "apiVersion": "shoal.dev/v1alpha1", "kind": "Model", "status": status });
    api.patch_status(
        &model.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
