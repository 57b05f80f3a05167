//! The Model controller's I/O shell: fetch the source, verify its digest, inspect
//! it with tract, store it content-addressed and write status. Decisions live in
//! `plan`; this file only carries them out.

use super::compress::compress_version;
use super::plan::{self, Plan, Refusal, VersionBinding};
use super::source::fetch_source;
use crate::artifacts::fetch::FetchError;
use crate::artifacts::store::StoreError;
use crate::runtime::conditions;
use crate::runtime::context::Context;
use crate::runtime::object_key;
use crate::runtime::reconcile::{self, ReconcileError};
use crate::runtime::status::write_status;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, ResourceExt};
use shoal_api::{CompressionMode, Model, ModelPhase, ModelRollout, TensorSpec};
use std::sync::Arc;
use std::time::Duration;

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

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
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
    tokio::spawn(crate::runtime::context::signal_when_synced(
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
    reconcile::timed(
        CONTROLLER,
        &ctx,
        model.as_ref(),
        reconcile_model(&model, &ctx),
    )
    .await
}

fn error_policy(model: Arc<Model>, error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(reconcile::retry_delay(
        CONTROLLER,
        &ctx,
        model.as_ref(),
        error,
    ))
}

async fn reconcile_model(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(model);
    match plan::plan(model, |digest| {
        ctx.artifacts.contains(digest).unwrap_or(false)
    }) {
        Plan::UpToDate => return Ok(Action::requeue(Duration::from_secs(600))),
        Plan::Refuse(refusal) => return refuse(model, ctx, &refusal).await,
        Plan::Fetch => {}
    }
    tracing::info!(model = %key, version = %model.spec.version, "fetching model source");
    let message = format!("fetching version {}", model.spec.version);
    write_status(
        &ctx.client,
        model,
        &plan::progress_status(
            model,
            ModelPhase::Fetching,
            conditions::model::FETCHING,
            &message,
            now(),
        ),
    )
    .await?;

    let (bytes, expected_digest) = match fetch_source(model, ctx).await {
        Ok(fetched) => fetched,
        // A URL the operator refuses to fetch stays refused until the Model changes.
        Err(Error::Fetch(error)) if error.is_permanent() => {
            return refuse(model, ctx, &plan::source_refused(&error)).await;
        }
        Err(error) => {
            let status = plan::progress_status(
                model,
                ModelPhase::Pending,
                conditions::model::FETCH_FAILED,
                &error.to_string(),
                now(),
            );
            write_status(&ctx.client, model, &status).await?;
            return Err(error);
        }
    };
    ctx.metrics.fetched(bytes.len() as u64);
    let source_hex = crate::artifacts::store::sha256_hex(&bytes);
    if let Err(refusal) = plan::check_digest(&source_hex, expected_digest.as_deref()) {
        // The digest of what was fetched goes to the operator's log only: in status
        // it would let a Model author learn the digest of any file the operator reaches.
        tracing::warn!(model = %object_key(model), fetched_sha256 = %source_hex, "the source does not match its declared sha256");
        return refuse(model, ctx, &refusal).await;
    }
    let versions = model
        .status
        .as_ref()
        .map(|s| s.versions.as_slice())
        .unwrap_or_default();
    let mode = plan::compression_mode(model);
    let source_digest = crate::artifacts::digest_reference(&source_hex);
    if let VersionBinding::Conflict(refusal) =
        plan::bind_version(versions, &model.spec.version, &source_digest, mode)
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
        tokio::task::spawn_blocking(move || match shoal_signature::read_signature(&bytes) {
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
        Err(invalid) => return refuse(model, ctx, &plan::invalid_model(invalid)).await,
    };
    let mut entry = plan::uncompressed_version(
        model,
        &stored.digest,
        stored.bytes,
        signature.inputs.into_iter().map(tensor_spec).collect(),
        signature.outputs.into_iter().map(tensor_spec).collect(),
    );
    if mode != CompressionMode::None {
        match compress_version(model, ctx, source, &source_hex, mode).await? {
            Ok(record) => entry = plan::compressed_version(entry, mode, record),
            Err(refusal) => return refuse(model, ctx, &refusal).await,
        }
    }
    entry.ready_time = Some(now());
    tracing::info!(model = %key, version = %entry.version, digest = %entry.artifact_digest, bytes = entry.artifact_bytes, "model version ready");
    // The versions the Model's rollouts still use survive history trimming.
    let rollouts: Api<ModelRollout> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let rollouts = rollouts.list(&ListParams::default()).await?.items;
    let in_use = plan::versions_in_use(&rollouts, &model.name_any());
    let status = plan::ready_status(model, entry, &in_use, now());
    write_status(&ctx.client, model, &status).await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

fn tensor_spec(tensor: shoal_signature::TensorSpec) -> TensorSpec {
    TensorSpec {
        shape: tensor.protocol_shape(),
        datatype: tensor.datatype.to_string(),
        name: tensor.name,
    }
}

/// Records a failure that only a change to the Model can fix, then waits for that change.
async fn refuse(model: &Model, ctx: &Context, refusal: &Refusal) -> Result<Action, Error> {
    tracing::warn!(model = %object_key(model), reason = refusal.reason, message = %refusal.message, "model version refused");
    ctx.metrics.reconcile_failed(CONTROLLER, refusal.reason);
    write_status(
        &ctx.client,
        model,
        &plan::failed_status(model, refusal, now()),
    )
    .await?;
    Ok(Action::await_change())
}

pub(super) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
