//! Rewrites the float weights of an ONNX graph so that the file is smaller but any
//! ONNX runtime still computes the same graph (up to rounding):
//!
//! - `int8`: each float initializer that feeds a MatMul, Gemm or Conv weight input or a
//!   Gather table becomes an int8 initializer, a scale and a zero point, and a standard
//!   `DequantizeLinear` node whose output takes the initializer's old name. Symmetric
//!   (zero point 0). Per tensor by default; per output channel on request.
//! - `fp16`: each float initializer becomes a float16 initializer and a `Cast` back
//!   to float under the old name.
//!
//! Consumers of a rewritten initializer are left untouched: they read the same name,
//! now produced by the new node. Tensors below [`MIN_ELEMENTS`] (biases, norms,
//! scalars) stay float: they weigh nothing and are the most sensitive to rounding.
//! So do tensors holding NaN or infinity.
//! Weights stored as `Constant` nodes are rewritten the same way, in place. Only the
//! main graph is rewritten; subgraphs of If/Loop keep their weights.
//!
//! Pure functions over the decoded protobuf: no I/O.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

/// Initializers with fewer elements than this stay float.
pub const MIN_ELEMENTS: usize = 256;

/// How many scales an int8 tensor gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// One scale for the whole tensor (works with every ONNX runtime and opset ≥ 10).
    PerTensor,
    /// One scale per output channel (needs opset ≥ 13; tract 0.23.9 computes it
    /// correctly, which `tests/compression.rs` checks against onnxruntime).
    PerChannel,
}

/// What the rewrite did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightReport {
    /// Initializers rewritten.
    pub tensors_compressed: usize,
    /// Float initializers left as they were (too small, or not a weight input).
    pub tensors_kept_float: usize,
    /// Elements in the rewritten initializers.
    pub elements_compressed: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightError {
    #[error(
        "weight `{name}` is stored outside the .onnx file (external data); Shoal ships a single \
         file: re-export the model with its weights embedded (onnx.save(..., save_as_external_data=False))"
    )]
    ExternalData { name: String },

    #[error(
        "weight `{name}` declares {declared} elements but stores {stored}; the model file is corrupt"
    )]
    WrongElementCount {
        name: String,
        declared: usize,
        stored: usize,
    },

    #[error(
        "int8 needs ONNX opset 10 or newer for DequantizeLinear (13 for per-channel scales), but the \
         model imports opset {opset}; use compression mode fp16, or re-export the model with a newer opset"
    )]
    OpsetTooOld { opset: i64 },

    #[error("the model holds no graph")]
    NoGraph,
}

/// The opset of the default ONNX domain the model imports.
pub fn default_opset(model: &pb::ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
}

/// Quantizes weight initializers to int8 in place.
pub fn quantize_int8(
    model: &mut pb::ModelProto,
    granularity: Granularity,
) -> Result<WeightReport, WeightError> {
    let opset = default_opset(model).unwrap_or(1);
    let needed = match granularity {
        Granularity::PerTensor => 10,
        Granularity::PerChannel => 13,
    };
    if opset < needed {
        return Err(WeightError::OpsetTooOld { opset });
    }
    let graph = model.graph.as_mut().ok_or(WeightError::NoGraph)?;
    let uses = weight_uses(graph);
    rewrite_initializers(graph, |tensor| {
        let use_ = uses.get(tensor.name.as_str())?;
        let axis = match granularity {
            Granularity::PerTensor => None,
            Granularity::PerChannel => use_.channel_axis(tensor.dims.len()),
        };
        Some(Rewrite::Int8 { axis })
    })
}

/// Stores float initializers as float16 in place.
pub fn convert_fp16(model: &mut pb::ModelProto) -> Result<WeightReport, WeightError> {
    let graph = model.graph.as_mut().ok_or(WeightError::NoGraph)?;
    rewrite_initializers(graph, |_| Some(Rewrite::Fp16))
}

enum Rewrite {
    /// `axis: None` is per tensor.
    Int8 {
        axis: Option<usize>,
    },
    Fp16,
}

/// How a weight is consumed, which decides its output-channel axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightUse {
    /// B of MatMul `[.., K, N]`: channels are the last axis.
    MatMulB,
    /// B of Gemm, `[K, N]`, or `[N, K]` with transB.
    GemmB { transposed: bool },
    /// W of Conv `[M, C, kH, kW]`, or a Gather table `[V, D]`: channels are axis 0.
    LeadingAxis,
    /// A weight in another position (A of a MatMul): per tensor only.
    Other,
    /// Used in several ways that disagree on the channel axis: per tensor only.
    Mixed,
}

impl WeightUse {
    fn channel_axis(self, rank: usize) -> Option<usize> {
        match self {
            WeightUse::MatMulB if rank >= 2 => Some(rank - 1),
            WeightUse::GemmB { transposed } if rank == 2 => Some(if transposed { 0 } else { 1 }),
            WeightUse::LeadingAxis if rank >= 2 => Some(0),
            _ => None,
        }
    }
}

/// Initializer names that feed a quantizable weight input, and how.
fn weight_uses(graph: &pb::GraphProto) -> HashMap<String, WeightUse> {
    let mut uses: HashMap<String, WeightUse> = HashMap::new();
    for node in &graph.node {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            continue;
        }
        let mut record = |index: usize, use_: WeightUse| {
            if let Some(name) = node.input.get(index).filter(|n| !n.is_empty()) {
                uses.entry(name.clone())
                    .and_modify(|existing| {
                        if *existing != use_ {
                            *existing = WeightUse::Mixed
                        }
                    })
                    .or_insert(use_);
            }
        };
        match node.op_type.as_str() {
            "MatMul" => {
                record(0, WeightUse::Other);
                record(1, WeightUse::MatMulB);
            }
            "Gemm" => {
                let transposed = node
                    .attribute
                    .iter()
                    .any(|a| a.name == "transB" && a.i != 0);
                record(0, WeightUse::Other);
                record(1, WeightUse::GemmB { transposed });
            }
            "Conv" => record(1, WeightUse::LeadingAxis),
            "Gather" => {
                let axis = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "axis")
                    .map_or(0, |a| a.i);
                record(
                    0,
                    if axis == 0 {
                        WeightUse::LeadingAxis
                    } else {
                        WeightUse::Other
                    },
                );
            }
            _ => {}
        }
    }
    uses
}

fn rewrite_initializers(
    graph: &mut pb::GraphProto,
    choose: impl Fn(&pb::TensorProto) -> Option<Rewrite>,
) -> Result<WeightReport, WeightError> {
    let mut names = NameAllocator::new(graph);
    let mut report = WeightReport::default();
    let mut new_initializers = Vec::with_capacity(graph.initializer.len());
    let mut decoders = Vec::new();
    let mut rewritten: HashSet<String> = HashSet::new();

    // Weights stored as initializers.
    for tensor in std::mem::take(&mut graph.initializer) {
        match chosen_rewrite(&tensor, &choose, &mut report)? {
            None => new_initializers.push(tensor),
            Some((rewrite, values)) => {
                let node_name = names.fresh(&format!("{}_decode", tensor.name));
                let (tensors, node) = encode(&tensor, &values, rewrite, node_name, &mut names);
                new_initializers.extend(tensors);
                decoders.push(node);
                rewritten.insert(tensor.name);
            }
        }
    }

    // Weights stored as Constant nodes (PaddlePaddle and some PyTorch exports): the
    // Constant is replaced in place by the decoding node, under the same node name.
    for node in &mut graph.node {
        let Some(tensor) = constant_tensor(node) else {
            continue;
        };
        if let Some((rewrite, values)) = chosen_rewrite(&tensor, &choose, &mut report)? {
            let (tensors, decoder) =
                encode(&tensor, &values, rewrite, node.name.clone(), &mut names);
            new_initializers.extend(tensors);
            *node = decoder;
        }
    }

    graph.initializer = new_initializers;
    // An initializer listed among the graph inputs (IR < 4 style, "overridable") is now
    // computed by a node; a graph input of the same name would be a second producer.
    graph.input.retain(|input| !rewritten.contains(&input.name));
    // The decoders read only initializers, so putting them first keeps the node list
    // topologically sorted, as ONNX requires.
    decoders.append(&mut graph.node);
    graph.node = decoders;
    Ok(report)
}

/// The FLOAT tensor of a plain `Constant` node, named after the node's output.
fn constant_tensor(node: &pb::NodeProto) -> Option<pb::TensorProto> {
    if node.op_type != "Constant" || !(node.domain.is_empty() || node.domain == "ai.onnx") {
        return None;
    }
    let [attribute] = node.attribute.as_slice() else {
        return None;
    };
    let tensor = attribute.t.as_ref().filter(|_| attribute.name == "value")?;
    let output = node.output.first()?;
    (tensor.data_type == DataType::Float as i32).then(|| pb::TensorProto {
        name: output.clone(),
        ..tensor.clone()
    })
}

/// The rewrite to apply to `tensor` and its values, or None to leave it as it is.
fn chosen_rewrite(
    tensor: &pb::TensorProto,
    choose: &impl Fn(&pb::TensorProto) -> Option<Rewrite>,
    report: &mut WeightReport,
) -> Result<Option<(Rewrite, Vec<f32>)>, WeightError> {
    if tensor.data_type != DataType::Float as i32 {
        return Ok(None);
    }
    if tensor.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        return Err(WeightError::ExternalData {
            name: tensor.name.clone(),
        });
    }
    let rewrite = match choose(tensor) {
        Some(rewrite) if element_count(tensor) >= MIN_ELEMENTS => rewrite,
        _ => {
            report.tensors_kept_float += 1;
            return Ok(None);
        }
    };
    let values = float_values(tensor)?;
    // NaN or infinity in a weight has no int8 or float16 equivalent worth shipping.
    if values.iter().any(|v| !v.is_finite()) {
        report.tensors_kept_float += 1;
        return Ok(None);
    }
    report.tensors_compressed += 1;
    report.elements_compressed += values.len() as u64;
    Ok(Some((rewrite, values)))
}

/// The initializers holding the compressed `tensor` and the node that decodes them
/// back to a float tensor under `tensor.name`.
fn encode(
    tensor: &pb::TensorProto,
    values: &[f32],
    rewrite: Rewrite,
    node_name: String,
    names: &mut NameAllocator,
) -> (Vec<pb::TensorProto>, pb::NodeProto) {
    match rewrite {
        Rewrite::Int8 { axis } => {
            let q = quantize_symmetric(values, &tensor.dims, axis);
            let data_name = names.fresh(&format!("{}_quantized", tensor.name));
            let scale_name = names.fresh(&format!("{}_scale", tensor.name));
            let zero_name = names.fresh(&format!("{}_zero_point", tensor.name));
            let channel_dims = match axis {
                Some(axis) => vec![tensor.dims[axis]],
                None => vec![],
            };
            let tensors = vec![
                pb::TensorProto {
                    name: data_name.clone(),
                    dims: tensor.dims.clone(),
                    data_type: DataType::Int8 as i32,
                    raw_data: q.values.iter().map(|v| *v as u8).collect(),
                    doc_string: tensor.doc_string.clone(),
                    ..Default::default()
                },
                pb::TensorProto {
                    name: scale_name.clone(),
                    dims: channel_dims.clone(),
                    data_type: DataType::Float as i32,
                    raw_data: q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    ..Default::default()
                },
                pb::TensorProto {
                    name: zero_name.clone(),
                    dims: channel_dims,
                    data_type: DataType::Int8 as i32,
                    raw_data: vec![0; q.scales.len()],
                    ..Default::default()
                },
            ];
            let mut attribute = Vec::new();
            if let Some(axis) = axis {
                attribute.push(int_attribute("axis", axis as i64));
            }
            let node = pb::NodeProto {
                input: vec![data_name, scale_name, zero_name],
                output: vec![tensor.name.clone()],
                name: node_name,
                op_type: "DequantizeLinear".into(),
                attribute,
                doc_string: "shoal int8 weight compression".into(),
                ..Default::default()
            };
            (tensors, node)
        }
        Rewrite::Fp16 => {
            let data_name = names.fresh(&format!("{}_fp16", tensor.name));
            let tensors = vec![pb::TensorProto {
                name: data_name.clone(),
                dims: tensor.dims.clone(),
                data_type: DataType::Float16 as i32,
                raw_data: values
                    .iter()
                    .flat_map(|v| to_f16_saturating(*v).to_le_bytes())
                    .collect(),
                doc_string: tensor.doc_string.clone(),
                ..Default::default()
            }];
            let node = pb::NodeProto {
                input: vec![data_name],
                output: vec![tensor.name.clone()],
                name: node_name,
                op_type: "Cast".into(),
                attribute: vec![int_attribute("to", DataType::Float as i64)],
                doc_string: "shoal fp16 weight compression".into(),
                ..Default::default()
            };
            (tensors, node)
        }
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn element_count(tensor: &pb::TensorProto) -> usize {
    tensor.dims.iter().map(|d| (*d).max(0) as usize).product()
}

/// The float values of a FLOAT initializer, from `raw_data` or `float_data`.
fn float_values(tensor: &pb::TensorProto) -> Result<Vec<f32>, WeightError> {
    let declared = element_count(tensor);
    let values: Vec<f32> = if tensor.raw_data.is_empty() {
        tensor.float_data.clone()
    } else {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let stored_bytes_ok = tensor.raw_data.is_empty() || tensor.raw_data.len().is_multiple_of(4);
    if values.len() != declared || !stored_bytes_ok {
        return Err(WeightError::WrongElementCount {
            name: tensor.name.clone(),
            declared,
            stored: values.len(),
        });
    }
    Ok(values)
}

/// Symmetric int8 values and their scales (one, or one per channel of `axis`).
struct Quantized {
    values: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes to [-127, 127] with zero point 0: `w ≈ q * scale`, `scale = max|w| / 127`.
fn quantize_symmetric(values: &[f32], dims: &[i64], axis: Option<usize>) -> Quantized {
    let Some(axis) = axis else {
        let scale = scale_for(values.iter().copied());
        return Quantized {
            values: values.iter().map(|v| quantize_one(*v, scale)).collect(),
            scales: vec![scale],
        };
    };
    // Row-major layout: index = (outer * channels + channel) * inner + i.
    let dims: Vec<usize> = dims.iter().map(|d| *d as usize).collect();
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let channel_of = |index: usize| (index / inner) % channels;
    let mut max_abs = vec![0f32; channels];
    for (index, v) in values.iter().enumerate() {
        let c = channel_of(index);
        if v.is_finite() {
            max_abs[c] = max_abs[c].max(v.abs());
        }
    }
    let scales: Vec<f32> = max_abs.iter().map(|m| scale_from_max(*m)).collect();
    Quantized {
        values: values
            .iter()
            .enumerate()
            .map(|(index, v)| quantize_one(*v, scales[channel_of(index)]))
            .collect(),
        scales,
    }
}

fn scale_for(values: impl Iterator<Item = f32>) -> f32 {
    let max_abs = values
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    scale_from_max(max_abs)
}

fn scale_from_max(max_abs: f32) -> f32 {
    // An all-zero tensor still needs a valid (non-zero) scale.
    if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 }
}

fn quantize_one(value: f32, scale: f32) -> i8 {
    (value / scale).round().clamp(-127.0, 127.0) as i8
}

/// float16 of `value`; values beyond float16's range become ±65504, not infinity.
fn to_f16_saturating(value: f32) -> half::f16 {
    if value.is_finite() {
        half::f16::from_f32(value.clamp(-65504.0, 65504.0))
    } else {
        half::f16::from_f32(value)
    }
}

/// Hands out names not used anywhere in the graph.
struct NameAllocator {
    used: HashSet<String>,
}

impl NameAllocator {
    fn new(graph: &pb::GraphProto) -> Self {
        let mut used = HashSet::new();
        for node in &graph.node {
            used.insert(node.name.clone());
            used.extend(node.input.iter().cloned());
            used.extend(node.output.iter().cloned());
        }
        used.extend(graph.initializer.iter().map(|t| t.name.clone()));
        used.extend(graph.input.iter().map(|v| v.name.clone()));
        used.extend(graph.output.iter().map(|v| v.name.clone()));
        used.extend(graph.value_info.iter().map(|v| v.name.clone()));
        NameAllocator { used }
    }

    fn fresh(&mut self, wanted: &str) -> String {
        let mut name = wanted.to_string();
        let mut n = 1;
        while self.used.contains(&name) {
            n += 1;
            name = format!("{wanted}_{n}");
        }
        self.used.insert(name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: format!("{op}_node"),
            ..Default::default()
        }
    }

    fn model(
        opset: i64,
        initializers: Vec<pb::TensorProto>,
        nodes: Vec<pb::NodeProto>,
    ) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            graph: Some(pb::GraphProto {
                node: nodes,
                initializer: initializers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 - n as f32 / 2.0) / 100.0)
            .collect()
    }

    #[test]
    fn symmetric_quantization_round_trips_within_half_a_step() {
        let values = ramp(1000);
        let q = quantize_symmetric(&values, &[1000], None);
        let scale = q.scales[0];
        assert!((scale - 5.0 / 127.0).abs() < 1e-6, "scale {scale}");
        for (v, q) in values.iter().zip(&q.values) {
            assert!((v - *q as f32 * scale).abs() <= scale / 2.0 + 1e-6);
        }
        assert_eq!(q.values[0], -127);
    }

    #[test]
    fn per_channel_scales_follow_the_channel_axis() {
        // [2, 3] with channels on axis 1: column maxima 4, 0.5, 0.
        let values = [4.0, 0.5, 0.0, -2.0, 0.25, 0.0];
        let q = quantize_symmetric(&values, &[2, 3], Some(1));
        assert_eq!(q.scales, vec![4.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(q.values, vec![127, 127, 0, -64, 64, 0]);
        // Axis 0: row maxima 4 and 2.
        let q = quantize_symmetric(&values, &[2, 3], Some(0));
        assert_eq!(q.scales, vec![4.0 / 127.0, 2.0 / 127.0]);
        assert_eq!(q.values[3], -127);
    }

    #[test]
    fn int8_rewrites_only_large_weight_inputs_and_keeps_their_names() {
        let mut m = model(
            13,
            vec![
                float_tensor("w", &[32, 16], &ramp(512)),
                float_tensor("bias", &[16], &ramp(16)),
                float_tensor("table", &[100, 8], &ramp(800)),
                float_tensor("other", &[300], &ramp(300)),
            ],
            vec![
                node("Gather", &["table", "ids"], "emb"),
                node("MatMul", &["x", "w"], "h"),
                node("Add", &["h", "bias"], "y"),
                node("Mul", &["y", "other"], "z"),
            ],
        );
        let report = quantize_int8(&mut m, Granularity::PerTensor).expect("quantizes");
        assert_eq!(report.tensors_compressed, 2);
        assert_eq!(report.tensors_kept_float, 2);
        let graph = m.graph.as_ref().expect("graph");
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "DequantizeLinear",
                "DequantizeLinear",
                "Gather",
                "MatMul",
                "Add",
                "Mul"
            ]
        );
        assert_eq!(graph.node[0].output, vec!["w".to_string()]);
        assert_eq!(graph.node[1].output, vec!["table".to_string()]);
        let names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "w_quantized",
                "w_scale",
                "w_zero_point",
                "bias",
                "table_quantized",
                "table_scale",
                "table_zero_point",
                "other"
            ]
        );
        let quantized = &graph.initializer[0];
        assert_eq!(quantized.data_type, DataType::Int8 as i32);
        assert_eq!(quantized.raw_data.len(), 512);
        assert!(
            graph.initializer[1].dims.is_empty(),
            "per-tensor scale is a scalar"
        );
    }

    #[test]
    fn per_channel_int8_sets_the_axis_and_one_scale_per_channel() {
        let mut m = model(
            13,
            vec![float_tensor("w", &[32, 16], &ramp(512))],
            vec![node("MatMul", &["x", "w"], "y")],
        );
        quantize_int8(&mut m, Granularity::PerChannel).expect("quantizes");
        let graph = m.graph.as_ref().expect("graph");
        assert_eq!(graph.node[0].attribute[0].name, "axis");
        assert_eq!(graph.node[0].attribute[0].i, 1);
        assert_eq!(graph.initializer[1].dims, vec![16]);
        assert_eq!(graph.initializer[1].raw_data.len(), 16 * 4);
    }

    #[test]
    fn int8_refuses_opsets_without_dequantize_linear() {
        let mut m = model(9, vec![], vec![]);
        assert_eq!(
            quantize_int8(&mut m, Granularity::PerTensor),
            Err(WeightError::OpsetTooOld { opset: 9 })
        );
        let mut m = model(12, vec![], vec![]);
        assert_eq!(
            quantize_int8(&mut m, Granularity::PerChannel),
            Err(WeightError::OpsetTooOld { opset: 12 })
        );
    }

    #[test]
    fn fp16_casts_every_large_float_initializer() {
        let mut m = model(
            11,
            vec![
                float_tensor("a", &[300], &ramp(300)),
                float_tensor("huge", &[256], &[1e6; 256]),
                float_tensor("small", &[3], &[1.0, 2.0, 3.0]),
            ],
            vec![node("Add", &["a", "huge"], "y")],
        );
        let report = convert_fp16(&mut m).expect("converts");
        assert_eq!(report.tensors_compressed, 2);
        let graph = m.graph.as_ref().expect("graph");
        assert_eq!(graph.node[0].op_type, "Cast");
        assert_eq!(graph.node[0].output, vec!["a".to_string()]);
        let huge = graph
            .initializer
            .iter()
            .find(|t| t.name == "huge_fp16")
            .expect("huge_fp16");
        let first = half::f16::from_le_bytes([huge.raw_data[0], huge.raw_data[1]]);
        assert_eq!(
            first.to_f32(),
            65504.0,
            "saturates instead of overflowing to inf"
        );
    }

    #[test]
    fn overridable_initializer_inputs_are_dropped_and_fresh_names_avoid_collisions() {
        let mut m = model(
            13,
            vec![float_tensor("w", &[300], &ramp(300))],
            vec![node("MatMul", &["x", "w"], "w_quantized")],
        );
        m.graph.as_mut().expect("graph").input = vec![pb::ValueInfoProto {
            name: "w".into(),
            ..Default::default()
        }];
        quantize_int8(&mut m, Granularity::PerTensor).expect("quantizes");
        let graph = m.graph.as_ref().expect("graph");
        assert!(graph.input.is_empty());
        assert_eq!(graph.node[0].input[0], "w_quantized_2");
    }

    #[test]
    fn constant_node_weights_are_decoded_in_place_under_the_same_names() {
        let constant = pb::NodeProto {
            op_type: "Constant".into(),
            name: "conv_w_const".into(),
            output: vec!["conv_w".into()],
            attribute: vec![pb::AttributeProto {
                name: "value".into(),
                r#type: pb::attribute_proto::AttributeType::Tensor as i32,
                t: Some(float_tensor("", &[8, 4, 3, 3], &ramp(288))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut m = model(
            13,
            vec![],
            vec![
                node("Relu", &["x"], "r"),
                constant,
                node("Conv", &["r", "conv_w"], "y"),
            ],
        );
        let report = quantize_int8(&mut m, Granularity::PerChannel).expect("quantizes");
        assert_eq!(report.tensors_compressed, 1);
        let graph = m.graph.as_ref().expect("graph");
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Relu", "DequantizeLinear", "Conv"]);
        assert_eq!(graph.node[1].name, "conv_w_const");
        assert_eq!(graph.node[1].output, vec!["conv_w".to_string()]);
        assert_eq!(
            graph.node[1].attribute[0].i, 0,
            "Conv weights: channels on axis 0"
        );
        assert_eq!(graph.initializer[0].name, "conv_w_quantized");
        assert_eq!(graph.initializer[1].dims, vec![8]);
    }

    #[test]
    fn truncated_weights_are_reported() {
        let mut tensor = float_tensor("w", &[300], &ramp(300));
        tensor.raw_data.truncate(100);
        let mut m = model(13, vec![tensor], vec![node("MatMul", &["x", "w"], "y")]);
        assert!(matches!(
            quantize_int8(&mut m, Granularity::PerTensor),
            Err(WeightError::WrongElementCount {
                declared: 300,
                stored: 25,
                ..
            })
        ));
    }
}
