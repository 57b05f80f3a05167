//! The compression step of a Model's pipeline: compress the stored source as
//! `spec.compression` says, validate it against the original behind the accuracy
//! gate, and store the artifact when it passes; a finished compression with the
//! same inputs is reused.

use super::controller::{Error, now};
use super::plan::{self, Refusal};
use super::source::config_map_bytes;
use crate::compression::records::{self, Record, Records};
use crate::compression::{self, CompressError, Gate, Granularity, Progress};
use crate::runtime::conditions;
use crate::runtime::context::Context;
use crate::runtime::status::write_status;
use shoal_api::{CompressionMode, Model, ModelPhase};
use std::sync::Arc;

/// Compresses the stored source of `spec.version` as `spec.compression` says and
/// stores the artifact if it passes the gate. A finished compression with the same
/// inputs is reused (see `compression::records`). The outer error is worth a retry;
/// the inner one is a refusal only a change to the Model can fix.
pub(super) async fn compress_version(
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
                let status = plan::progress_status(
                    model,
                    ModelPhase::Pending,
                    conditions::model::DATASET_UNAVAILABLE,
                    &format!("the validation dataset is unavailable: {error}"),
                    now(),
                );
                write_status(&ctx.client, model, &status).await?;
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
        .map(crate::artifacts::store::sha256_hex);
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
        plan::mode_name(mode)
    );
    write_status(
        &ctx.client,
        model,
        &plan::progress_status(
            model,
            ModelPhase::Compressing,
            conditions::model::COMPRESSING,
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
                    plan::mode_name(mode),
                    model.spec.version
                );
                let status = plan::progress_status(
                    model, ModelPhase::Validating, conditions::model::VALIDATING, &message, now(),
                );
                write_status(&ctx.client, model, &status).await?;
            }
        }
    };
    let outcome = outcome.map_err(|e| Error::Interrupted(e.to_string()))??;
    let result = match &outcome {
        Err(_) => "error",
        Ok(record) if record.gate_failure.is_some() => "gate_failed",
        Ok(_) => "passed",
    };
    ctx.metrics.compressed(plan::mode_name(mode), result);
    Ok(match outcome {
        Err(error) => Err(plan::compression_failed(&error)),
        Ok(record) => match &record.gate_failure {
            None => Ok(record),
            Some(failure) => Err(plan::gate_failed(mode, &model.spec.version, failure)),
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
    artifacts: &crate::artifacts::store::ArtifactStore,
    records: &Records,
    on_validating: impl Fn(),
) -> Result<Result<Record, CompressError>, Error> {
    if let Some(record) = records.get(key) {
        let stored = artifacts
            .contains(crate::artifacts::digest_hex(&record.artifact_digest))
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
                Some(crate::artifacts::digest_hex(&report.artifact_digest)),
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
