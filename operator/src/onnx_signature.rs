//! Reads an ONNX model's input and output signature (names, Open Inference Protocol
//! datatypes, shapes) and proves tract can load and optimize it, so a model agents
//! cannot serve is refused at the operator instead of failing on every edge node.

use std::collections::{HashMap, HashSet};
use std::panic::{self, AssertUnwindSafe};

use serde::Serialize;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModel, InferenceModelExt, Symbol, TDim, TVec, ToDim, TractError,
    TractResult, TypedFact,
};
use tract_onnx::tract_hir::infer::{DimFact, Factoid, ShapeFactoid};

/// What a model takes and returns, in the terms of the Open Inference Protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signature {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

/// One named tensor of a signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tensor {
    pub name: String,
    /// Open Inference Protocol datatype: FP32, INT64, BOOL, BYTES, ...
    pub datatype: String,
    /// Dimensions; -1 where the model leaves one open (a batch size, a sequence length).
    pub shape: Vec<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidModel {
    #[error(
        "the artifact is not an ONNX model ({reason}); check that the source points at the .onnx \
         file itself, not an archive, a web page or a model in another format"
    )]
    NotOnnx { reason: String },

    #[error(
        "the artifact is not a loadable ONNX model: {reason}; agents run models with tract, so \
         re-export the model with operators tract supports (ONNX opset 9 to 18) and declared input shapes"
    )]
    Unloadable { reason: String },

    #[error(
        "the model's {role} `{name}` has element type {datatype}, which the Open Inference Protocol \
         cannot carry; re-export the model with a numeric, bool or string {role}"
    )]
    UnsupportedDatatype {
        role: &'static str,
        name: String,
        datatype: String,
    },
}

impl InvalidModel {
    /// A short, fixed label for the `reason` of an error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            InvalidModel::NotOnnx { .. } => "not_onnx",
            InvalidModel::Unloadable { .. } => "unloadable",
            InvalidModel::UnsupportedDatatype { .. } => "unsupported_datatype",
        }
    }
}

/// Parses `bytes` as ONNX, returns its signature, and checks that tract can type
/// and optimize it.
///
/// The signature is what the graph declares; where it declares no datatype or
/// rank (often the case for outputs) it is what tract's analysis computes.
///
/// The load check first leaves open dimensions (the batch size, say) symbolic.
/// Some graphs only type with fixed sizes in tract (magika, a jax2tf export, is
/// one: it builds a shape tensor from the batch size), so if that fails the check
/// is repeated with every open input dimension set to 1, which is how an agent can
/// still serve such a model. Only when both fail is the model invalid.
///
/// CPU-heavy and synchronous: call it from `spawn_blocking` or a worker thread.
pub fn read_signature(bytes: &[u8]) -> Result<Signature, InvalidModel> {
    // tract panics on some malformed models (it has `unimplemented!` paths for
    // unusual tensor encodings). The bytes come from outside, so a panic is one
    // more way for a model to be invalid, not a reason to lose the worker.
    match panic::catch_unwind(AssertUnwindSafe(|| read_signature_unguarded(bytes))) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            Err(InvalidModel::Unloadable {
                reason: format!("tract panicked while reading it: {message}"),
            })
        }
    }
}

fn read_signature_unguarded(bytes: &[u8]) -> Result<Signature, InvalidModel> {
    let onnx = tract_onnx::onnx();
    let proto =
        onnx.proto_model_for_read(&mut &bytes[..])
            .map_err(|err| InvalidModel::NotOnnx {
                reason: format!("not a valid ONNX protobuf: {err:#}"),
            })?;
    // Protobuf decoding accepts many byte strings (empty input, for one); without
    // a graph this is not a model, whatever the decoder says.
    let Some(graph) = proto.graph.as_ref() else {
        return Err(InvalidModel::NotOnnx {
            reason: "it holds no ONNX graph".to_string(),
        });
    };
    // Graph inputs that an initializer feeds are weights, not model inputs; tract
    // makes a source of every other one, in the same order.
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let graph_inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|input| !initializers.contains(input.name.as_str()))
        .collect();
    let declared_inputs = declared_tensors(Role::Input, &graph_inputs)?;
    let graph_outputs: Vec<&pb::ValueInfoProto> = graph.output.iter().collect();
    let declared_outputs = declared_tensors(Role::Output, &graph_outputs)?;

    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|err| unloadable(err.context("tract could not read the graph")))?;
    // Free the decoded copy of the weights before analysis makes its own.
    drop(proto);

    let analysed = match type_and_optimize(model.clone(), OpenDims::Symbolic) {
        Ok(analysed) => analysed,
        Err(symbolic_err) => match type_and_optimize(model, OpenDims::One) {
            Ok(analysed) => {
                tracing::debug!(
                    reason = format!("{symbolic_err:#}"),
                    "model only loads with open input dimensions set to 1"
                );
                analysed
            }
            // The error with fixed sizes is the more fundamental one: the model
            // cannot be loaded at all.
            Err(err) => return Err(unloadable(err)),
        },
    };

    Ok(Signature {
        inputs: complete_with_analysis(Role::Input, declared_inputs, &analysed.inputs)?,
        outputs: complete_with_analysis(Role::Output, declared_outputs, &analysed.outputs)?,
    })
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Input,
    Output,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Input => "input",
            Role::Output => "output",
        }
    }
}

/// How to pin input dimensions the graph leaves open before typing it.
#[derive(Debug, Clone, Copy)]
enum OpenDims {
    /// Named dims stay symbols; unnamed ones get a fresh symbol, because tract
    /// cannot type a source whose shape is not fully known.
    Symbolic,
    /// Every open dim becomes 1.
    One,
}

/// The input and output facts tract computed for a model it could optimize.
struct Analysed {
    inputs: Vec<TypedFact>,
    outputs: Vec<TypedFact>,
}

fn type_and_optimize(mut model: InferenceModel, open_dims: OpenDims) -> TractResult<Analysed> {
    pin_open_input_dims(&mut model, open_dims)?;
    let typed = model
        .into_typed()
        .map_err(|err| err.context("shape and type analysis failed"))?;
    let analysed = Analysed {
        inputs: (0..typed.inputs.len())
            .map(|ix| typed.input_fact(ix).cloned())
            .collect::<TractResult<_>>()?,
        outputs: (0..typed.outputs.len())
            .map(|ix| typed.output_fact(ix).cloned())
            .collect::<TractResult<_>>()?,
    };
    typed
        .into_optimized()
        .map_err(|err| err.context("tract could not optimize it"))?;
    Ok(analysed)
}

fn pin_open_input_dims(model: &mut InferenceModel, open_dims: OpenDims) -> TractResult<()> {
    let mut symbols = HashSet::new();
    for ix in 0..model.inputs.len() {
        let mut fact = model.input_fact(ix)?.clone();
        // Unknown rank: nothing to pin; analysis decides whether that is fatal.
        if fact.shape.is_open() {
            continue;
        }
        let dims: TVec<DimFact> = fact
            .shape
            .dims()
            .map(|dim| match (dim.concretize(), open_dims) {
                (Some(dim), _) => {
                    symbols.extend(dim.symbols());
                    DimFact::from(dim)
                }
                (None, OpenDims::Symbolic) => {
                    DimFact::from(model.symbols.new_with_prefix("unnamed").to_dim())
                }
                (None, OpenDims::One) => DimFact::from(TDim::from(1)),
            })
            .collect();
        fact.shape = ShapeFactoid::closed(dims);
        model.set_input_fact(ix, fact)?;
    }
    if let OpenDims::One = open_dims {
        let ones: HashMap<Symbol, TDim> = symbols
            .into_iter()
            .map(|symbol| (symbol, TDim::from(1)))
            .collect();
        // Substitutes in every declared fact, so value_info that mentions the
        // batch symbol stays consistent with the inputs.
        model.set_symbols(&ones)?;
    }
    Ok(())
}

fn unloadable(err: TractError) -> InvalidModel {
    // `{:#}` prints the whole anyhow chain, stage first, root cause last.
    InvalidModel::Unloadable {
        reason: format!("{err:#}"),
    }
}

/// Each input or output's name, with its tensor when the graph declares both its
/// element type and its rank; `None` where only analysis can tell.
fn declared_tensors(
    role: Role,
    infos: &[&pb::ValueInfoProto],
) -> Result<Vec<(String, Option<Tensor>)>, InvalidModel> {
    infos
        .iter()
        .map(|info| Ok((info.name.clone(), declared_tensor(role, info)?)))
        .collect()
}

fn declared_tensor(role: Role, info: &pb::ValueInfoProto) -> Result<Option<Tensor>, InvalidModel> {
    let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(tensor_type)),
        ..
    }) = &info.r#type
    else {
        return Ok(None);
    };
    let Some(shape) = &tensor_type.shape else {
        return Ok(None);
    };
    let datum_type = match DataType::try_from(tensor_type.elem_type) {
        Ok(DataType::Undefined) | Err(_) => return Ok(None),
        Ok(data_type) => match DatumType::try_from(data_type) {
            Ok(datum_type) => datum_type,
            Err(_) => {
                return Err(InvalidModel::UnsupportedDatatype {
                    role: role.word(),
                    name: info.name.clone(),
                    datatype: data_type.as_str_name().to_string(),
                });
            }
        },
    };
    let shape = shape
        .dim
        .iter()
        .map(|dim| match dim.value {
            Some(dimension::Value::DimValue(value)) if value >= 0 => value,
            // A dim_param (`batch`), nothing at all, or a negative value: open.
            _ => -1,
        })
        .collect();
    Ok(Some(Tensor {
        name: info.name.clone(),
        datatype: oip_datatype(role, &info.name, datum_type)?,
        shape,
    }))
}

fn complete_with_analysis(
    role: Role,
    declared: Vec<(String, Option<Tensor>)>,
    analysed: &[TypedFact],
) -> Result<Vec<Tensor>, InvalidModel> {
    if declared.len() != analysed.len() {
        return Err(InvalidModel::Unloadable {
            reason: format!(
                "the graph declares {} {}s but tract found {}",
                declared.len(),
                role.word(),
                analysed.len()
            ),
        });
    }
    declared
        .into_iter()
        .zip(analysed)
        .map(|((name, tensor), fact)| match tensor {
            Some(tensor) => Ok(tensor),
            None => analysed_tensor(role, name, fact),
        })
        .collect()
}

fn analysed_tensor(role: Role, name: String, fact: &TypedFact) -> Result<Tensor, InvalidModel> {
    let datatype = oip_datatype(role, &name, fact.datum_type)?;
    // Symbols (`N`) and expressions of them (`N*4`) are open dimensions.
    let shape = fact
        .shape
        .dims()
        .iter()
        .map(|dim| dim.to_i64().unwrap_or(-1))
        .collect();
    Ok(Tensor {
        name,
        datatype,
        shape,
    })
}

/// Maps tract's datum types to the Open Inference Protocol's tensor datatypes.
fn oip_datatype(role: Role, name: &str, datum_type: DatumType) -> Result<String, InvalidModel> {
    let oip = match datum_type {
        DatumType::Bool => "BOOL",
        DatumType::U8 => "UINT8",
        DatumType::U16 => "UINT16",
        DatumType::U32 => "UINT32",
        DatumType::U64 => "UINT64",
        DatumType::I8 => "INT8",
        DatumType::I16 => "INT16",
        DatumType::I32 => "INT32",
        DatumType::I64 => "INT64",
        DatumType::F16 => "FP16",
        DatumType::F32 => "FP32",
        DatumType::F64 => "FP64",
        DatumType::String => "BYTES",
        // Analysis types shape arithmetic as TDim; in ONNX it is an int64 tensor.
        DatumType::TDim => "INT64",
        other => {
            return Err(InvalidModel::UnsupportedDatatype {
                role: role.word(),
                name: name.to_string(),
                datatype: format!("{other:?}"),
            });
        }
    };
    Ok(oip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    enum Dim {
        Fixed(i64),
        Named(&'static str),
        Unnamed,
    }

    fn value_info(name: &str, elem_type: DataType, dims: &[Dim]) -> pb::ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| pb::tensor_shape_proto::Dimension {
                value: match d {
                    Dim::Fixed(v) => Some(dimension::Value::DimValue(*v)),
                    Dim::Named(s) => Some(dimension::Value::DimParam(s.to_string())),
                    Dim::Unnamed => None,
                },
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: name.to_string(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: elem_type as i32,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op_type: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op_type.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: output.to_string(),
            ..Default::default()
        }
    }

    fn model(graph: pb::GraphProto) -> Vec<u8> {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            producer_name: "shoal-test".to_string(),
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// y = x + bias, with x: float[N, 4] and a float[4] initializer; the output
    /// declares no type, so its signature must come from analysis.
    fn add_bias_model(x_dims: &[Dim]) -> Vec<u8> {
        let bias = pb::TensorProto {
            name: "bias".to_string(),
            dims: vec![4],
            data_type: DataType::Float as i32,
            float_data: vec![1.0, 2.0, 3.0, 4.0],
            ..Default::default()
        };
        model(pb::GraphProto {
            name: "add_bias".to_string(),
            node: vec![node("Add", &["x", "bias"], "y")],
            initializer: vec![bias],
            input: vec![value_info("x", DataType::Float, x_dims)],
            output: vec![pb::ValueInfoProto {
                name: "y".to_string(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn tensor(name: &str, datatype: &str, shape: &[i64]) -> Tensor {
        Tensor {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn garbage_is_not_onnx() {
        let err = read_signature(b"<html><body>404 Not Found</body></html>")
            .expect_err("garbage must be refused");
        let message = err.to_string();
        assert!(
            message.starts_with("the artifact is not an ONNX model"),
            "{message}"
        );
        assert!(
            message.contains("protobuf") || message.contains("graph"),
            "{message}"
        );
        assert_eq!(err.metric_label(), "not_onnx");
    }

    #[test]
    fn empty_bytes_are_not_onnx() {
        let err = read_signature(b"").expect_err("empty must be refused");
        assert_eq!(err.metric_label(), "not_onnx", "{err}");
    }

    #[test]
    fn reads_declared_input_and_analysed_output() {
        let bytes = add_bias_model(&[Dim::Named("N"), Dim::Fixed(4)]);
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(signature.inputs, vec![tensor("x", "FP32", &[-1, 4])]);
        assert_eq!(signature.outputs, vec![tensor("y", "FP32", &[-1, 4])]);
    }

    #[test]
    fn unnamed_dimension_is_open() {
        let bytes = add_bias_model(&[Dim::Unnamed, Dim::Fixed(4)]);
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(signature.inputs, vec![tensor("x", "FP32", &[-1, 4])]);
    }

    #[test]
    fn declared_types_map_to_oip_names() {
        let bytes = model(pb::GraphProto {
            name: "identity".to_string(),
            node: vec![
                node("Identity", &["ids"], "ids_out"),
                node("Identity", &["mask"], "mask_out"),
            ],
            input: vec![
                value_info(
                    "ids",
                    DataType::Int64,
                    &[Dim::Named("batch"), Dim::Named("seq")],
                ),
                value_info("mask", DataType::Bool, &[Dim::Fixed(2), Dim::Fixed(3)]),
            ],
            output: vec![
                value_info(
                    "ids_out",
                    DataType::Int64,
                    &[Dim::Named("batch"), Dim::Named("seq")],
                ),
                value_info("mask_out", DataType::Bool, &[Dim::Fixed(2), Dim::Fixed(3)]),
            ],
            ..Default::default()
        });
        let signature = read_signature(&bytes).expect("valid model");
        assert_eq!(
            signature.inputs,
            vec![
                tensor("ids", "INT64", &[-1, -1]),
                tensor("mask", "BOOL", &[2, 3])
            ]
        );
        assert_eq!(
            signature.outputs,
            vec![
                tensor("ids_out", "INT64", &[-1, -1]),
                tensor("mask_out", "BOOL", &[2, 3])
            ]
        );
    }

    #[test]
    fn unknown_operator_is_unloadable_with_tract_reason() {
        let bytes = model(pb::GraphProto {
            name: "mystery".to_string(),
            node: vec![node("NoSuchOperator", &["x"], "y")],
            input: vec![value_info("x", DataType::Float, &[Dim::Fixed(1)])],
            output: vec![value_info("y", DataType::Float, &[Dim::Fixed(1)])],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("unknown operator must be refused");
        let message = err.to_string();
        assert!(
            message.starts_with("the artifact is not a loadable ONNX model: "),
            "{message}"
        );
        assert!(message.contains("NoSuchOperator"), "{message}");
        assert_eq!(err.metric_label(), "unloadable");
    }

    #[test]
    fn datatype_oip_cannot_carry_is_refused() {
        let bytes = model(pb::GraphProto {
            name: "bf16".to_string(),
            node: vec![node("Identity", &["x"], "y")],
            input: vec![value_info("x", DataType::Bfloat16, &[Dim::Fixed(2)])],
            output: vec![value_info("y", DataType::Bfloat16, &[Dim::Fixed(2)])],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("bfloat16 must be refused");
        assert_eq!(err.metric_label(), "unsupported_datatype", "{err}");
        let message = err.to_string();
        assert!(message.contains("input `x`"), "{message}");
        assert!(message.contains("BFLOAT16"), "{message}");
    }

    #[test]
    fn tract_panic_becomes_invalid_model() {
        // tract has no raw-bytes decoding for string tensors and panics on one.
        let strings = pb::TensorProto {
            name: "words".to_string(),
            dims: vec![1],
            data_type: DataType::String as i32,
            raw_data: b"abc".to_vec(),
            ..Default::default()
        };
        let bytes = model(pb::GraphProto {
            name: "raw_strings".to_string(),
            node: vec![node("Identity", &["words"], "y")],
            initializer: vec![strings],
            output: vec![pb::ValueInfoProto {
                name: "y".to_string(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let err = read_signature(&bytes).expect_err("must be refused");
        assert_eq!(err.metric_label(), "unloadable", "{err}");
    }

    #[test]
    fn magika_model_signature() {
        let Ok(path) = std::env::var("SHOAL_TEST_MAGIKA_ONNX") else {
            eprintln!("skipping magika_model_signature: SHOAL_TEST_MAGIKA_ONNX is not set");
            return;
        };
        let bytes = std::fs::read(&path).expect("read magika model");
        let signature = read_signature(&bytes).expect("magika loads");
        // Magika's graph only types with a fixed batch size in tract 0.23, so this
        // also covers the fallback that pins open dimensions to 1; the signature
        // still reports the batch as open because the graph declares it so.
        assert_eq!(
            signature.inputs,
            vec![tensor("bytes", "INT32", &[-1, 2048])]
        );
        assert_eq!(
            signature.outputs,
            vec![tensor("target_label", "FP32", &[-1, 214])]
        );
    }
}
