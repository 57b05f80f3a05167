//! Model compression with an accuracy gate: rewrite the weights (`weights`), then
//! run original and compressed side by side in tract (`validation`) on synthetic or
//! real inputs (`samples`) and check the figures against the gate.
//!
//! Used by the Model controller and by `shoal-operator compress`. Synchronous and
//! CPU-heavy: async callers run it in `spawn_blocking`.

pub mod command;
pub mod records;
pub mod samples;
pub mod validation;
pub mod weights;

use std::time::Instant;

use prost::Message;
use serde::Serialize;
use shoal_api::{CompressionMode, ValidationFigures};
use tract_onnx::pb;

use crate::artifacts::store::sha256_hex;
use shoal_signature::InvalidModel;
pub use validation::Gate;
pub use weights::Granularity;

/// Bumped whenever the same input and options could produce different bytes, so
/// that cached results of an older compressor are not reused.
pub const COMPRESSOR_VERSION: u32 = 1;

/// What to compress to and the gate the result must pass.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: CompressionMode,
    pub granularity: Granularity,
    /// Number of samples to validate on (synthetic, or the first ones of `dataset`).
    pub samples: usize,
    /// A JSON Lines dataset of real inputs (see `samples`), instead of synthetic ones.
    pub dataset: Option<Vec<u8>>,
    pub gate: Gate,
}

/// The JSON report of one compression: lineage, sizes and validation figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub mode: CompressionMode,
    pub granularity: Granularity,
    pub compressor_version: u32,
    pub source_digest: String,
    pub source_bytes: u64,
    pub artifact_digest: String,
    pub artifact_bytes: u64,
    /// sourceBytes / artifactBytes.
    pub ratio: f64,
    pub weights: weights::WeightReport,
    /// "synthetic" or "dataset".
    pub inputs: &'static str,
    pub validation: ValidationFigures,
    pub gate: GateReport,
    pub compress_seconds: f64,
    pub validate_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GateReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_top1_agreement: Option<f64>,
    pub passed: bool,
    /// Why the gate failed, with every figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A compressed model and its report. Ship `bytes` only if `report.gate.passed`.
pub struct Compressed {
    pub bytes: Vec<u8>,
    pub report: Report,
}

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("compression mode none needs no compression; pick int8 or fp16")]
    NothingToDo,
    #[error("the input model cannot be compressed: {0}")]
    InvalidInput(#[from] InvalidModel),
    #[error("the input model cannot be compressed: {0}")]
    Weights(#[from] weights::WeightError),
    #[error("the validation inputs are unusable: {0}")]
    Samples(#[from] samples::SampleError),
    #[error("validation failed: {0}")]
    Validation(#[from] validation::ValidationError),
}

impl CompressError {
    /// A short, fixed label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            CompressError::NothingToDo => crate::runtime::conditions::model::NOTHING_TO_COMPRESS,
            CompressError::InvalidInput(_) => crate::runtime::conditions::model::INVALID_MODEL,
            CompressError::Weights(_) => crate::runtime::conditions::model::COMPRESSION_FAILED,
            CompressError::Samples(_) => {
                crate::runtime::conditions::model::INVALID_VALIDATION_DATASET
            }
            CompressError::Validation(_) => crate::runtime::conditions::model::VALIDATION_FAILED,
        }
    }
}

/// Where a compression is, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Inspecting,
    Rewriting,
    /// `done` of `total` samples compared.
    Validating {
        done: usize,
        total: usize,
    },
}

/// Compresses `source` and validates the result against it.
///
/// A model with nothing to compress comes back byte for byte (ratio 1.0), still
/// validated. Everything else in the file (opsets, metadata, names, doc strings) is
/// kept; only the rewritten initializers and the nodes that decode them change.
pub fn compress(
    source: &[u8],
    options: &Options,
    mut progress: impl FnMut(Progress),
) -> Result<Compressed, CompressError> {
    progress(Progress::Inspecting);
    let started = Instant::now();
    // Proves the input is a model tract can load, and gives the input signature.
    let signature = shoal_signature::read_signature(source)?;
    let mut proto = pb::ModelProto::decode(source).map_err(|e| InvalidModel::NotOnnx {
        reason: format!("not a valid ONNX protobuf: {e}"),
    })?;
    let index_limits = samples::gather_index_limits(&proto);

    progress(Progress::Rewriting);
    let weight_report = match options.mode {
        CompressionMode::Int8 => weights::quantize_int8(&mut proto, options.granularity)?,
        CompressionMode::Fp16 => weights::convert_fp16(&mut proto)?,
        CompressionMode::None | CompressionMode::Unknown => return Err(CompressError::NothingToDo),
    };
    let bytes = if weight_report.tensors_compressed == 0 {
        source.to_vec()
    } else {
        proto.encode_to_vec()
    };
    drop(proto);
    let compress_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (inputs, samples) = match &options.dataset {
        Some(dataset) => (
            "dataset",
            samples::from_dataset(dataset, &signature.inputs, options.samples)?,
        ),
        None => (
            "synthetic",
            samples::synthetic(&signature.inputs, &index_limits, options.samples),
        ),
    };
    let figures = validation::compare(source, &bytes, &samples, |done, total| {
        progress(Progress::Validating { done, total })
    })?;
    let validate_seconds = started.elapsed().as_secs_f64();
    let gate_result = validation::check_gate(&figures, &options.gate);

    let report = Report {
        mode: options.mode,
        granularity: options.granularity,
        compressor_version: COMPRESSOR_VERSION,
        source_digest: format!("sha256:{}", sha256_hex(source)),
        source_bytes: source.len() as u64,
        artifact_digest: format!("sha256:{}", sha256_hex(&bytes)),
        artifact_bytes: bytes.len() as u64,
        ratio: ratio(source.len(), bytes.len()),
        weights: weight_report,
        inputs,
        validation: figures,
        gate: GateReport {
            max_abs_error: options.gate.max_abs_error,
            min_top1_agreement: options.gate.min_top1_agreement,
            passed: gate_result.is_ok(),
            failure: gate_result.err(),
        },
        compress_seconds,
        validate_seconds,
    };
    Ok(Compressed { bytes, report })
}

/// source / artifact, rounded to 3 decimals so status does not churn on noise.
pub fn ratio(source_bytes: usize, artifact_bytes: usize) -> f64 {
    if artifact_bytes == 0 {
        return 1.0;
    }
    (source_bytes as f64 / artifact_bytes as f64 * 1000.0).round() / 1000.0
}
