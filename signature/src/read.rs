//! Reads an ONNX model's bytes: tract's graph, and the inputs and outputs the file
//! declares, each checked against the datatypes agents serve. Outputs the file
//! does not fully declare are completed from tract's analysis with
//! [`complete_outputs`].
//!
//! Nothing here optimizes or runs the model; [`crate::check`] does that for the
//! operator and the agent's engine does it with its own plans.

use std::collections::HashSet;

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension;
use tract_onnx::prelude::{DatumType, Framework, InferenceModel, TDim, TypedFact};
use tract_onnx::tract_hir::infer::Factoid;

use crate::datatype::{Datatype, Unservable, servable_datatype};
use crate::error::{InvalidModel, Role};
use crate::tensor::{Dim, TensorSpec};

/// A decoded ONNX model: tract's graph and what the file declares.
#[derive(Debug)]
pub struct OnnxModel {
    /// tract's graph, its sources typed as the file declares them.
    pub model: InferenceModel,
    /// Every input, in tract's order; the file must declare each one's element
    /// type and rank.
    pub inputs: Vec<TensorSpec>,
    /// Every output, in tract's order, with its spec when the file declares both
    /// its element type and its shape (often it does not).
    pub declared_outputs: Vec<DeclaredOutput>,
}

/// An output's name, and its spec if the file declares it completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredOutput {
    pub name: String,
    pub spec: Option<TensorSpec>,
}

/// Decodes `bytes` as ONNX and builds tract's graph of it.
///
/// Refuses bytes that are not ONNX, graphs tract cannot read, inputs that do not
/// declare their element type and rank, and any declared tensor whose element
/// type agents do not serve (see [`servable_datatype`]).
///
/// tract panics on some malformed models; call this under
/// [`std::panic::catch_unwind`] (as [`crate::check::read_signature`] does).
pub fn read_onnx(bytes: &[u8]) -> Result<OnnxModel, InvalidModel> {
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
    let declared_inputs = graph
        .input
        .iter()
        .filter(|input| !initializers.contains(input.name.as_str()))
        .map(declared_input)
        .collect::<Result<Vec<_>, _>>()?;
    let declared_outputs = graph
        .output
        .iter()
        .map(|info| {
            Ok(DeclaredOutput {
                name: info.name.clone(),
                spec: declared_tensor(Role::Output, info)?,
            })
        })
        .collect::<Result<Vec<_>, InvalidModel>>()?;

    let model = onnx.model_for_proto_model(&proto).map_err(|err| {
        InvalidModel::Unloadable {
            // `{:#}` prints the whole chain, stage first, root cause last.
            reason: format!("{:#}", err.context("tract could not read the graph")),
        }
    })?;
    check_count(Role::Input, declared_inputs.len(), model.inputs.len())?;
    check_count(Role::Output, declared_outputs.len(), model.outputs.len())?;
    let inputs = declared_inputs
        .into_iter()
        .enumerate()
        .map(|(ix, (name, datatype))| {
            Ok(TensorSpec {
                dims: input_dims(&model, ix)?,
                name,
                datatype,
            })
        })
        .collect::<Result<Vec<_>, InvalidModel>>()?;
    Ok(OnnxModel {
        model,
        inputs,
        declared_outputs,
    })
}

/// The outputs of a model: each declared spec, or else the one tract's analysis
/// gives (`analysed` holds the facts of every output, in order).
///
/// `analysed_dims_are_general` says whether the analysed shapes hold for every
/// input size. They do not when tract could only type the graph with open input
/// dimensions pinned to concrete sizes; every dimension of those outputs is
/// then open.
pub fn complete_outputs(
    declared: Vec<DeclaredOutput>,
    analysed: &[TypedFact],
    analysed_dims_are_general: bool,
) -> Result<Vec<TensorSpec>, InvalidModel> {
    check_count(Role::Output, declared.len(), analysed.len())?;
    declared
        .into_iter()
        .zip(analysed)
        .map(|(output, fact)| match output.spec {
            Some(spec) => Ok(spec),
            None => analysed_tensor(output.name, fact, analysed_dims_are_general),
        })
        .collect()
}

fn check_count(role: Role, declared: usize, found: usize) -> Result<(), InvalidModel> {
    if declared == found {
        return Ok(());
    }
    Err(InvalidModel::Unloadable {
        reason: format!(
            "the graph declares {declared} {}s but tract found {found}",
            role.word()
        ),
    })
}

/// An input's name and datatype; the file must declare its element type and rank.
fn declared_input(info: &pb::ValueInfoProto) -> Result<(String, Datatype), InvalidModel> {
    let undeclared = |missing| InvalidModel::UndeclaredInput {
        name: info.name.clone(),
        missing,
    };
    let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(tensor_type)),
        ..
    }) = &info.r#type
    else {
        return Err(undeclared("element type"));
    };
    let Some(datatype) = declared_datatype(Role::Input, &info.name, tensor_type.elem_type)? else {
        return Err(undeclared("element type"));
    };
    if tensor_type.shape.is_none() {
        return Err(undeclared("rank"));
    }
    Ok((info.name.clone(), datatype))
}

/// An input's dimensions as tract reads the file's shape: a `dim_param` that
/// names a symbol (`batch`) is an open dimension of that name; `?`, `unk__0`
/// and the like are open and unnamed.
fn input_dims(model: &InferenceModel, ix: usize) -> Result<Vec<Dim>, InvalidModel> {
    let fact = model
        .input_fact(ix)
        .map_err(|err| InvalidModel::Unloadable {
            reason: format!("{err:#}"),
        })?;
    Ok(fact
        .shape
        .dims()
        .map(|dim| match dim.concretize() {
            Some(TDim::Val(size)) => fixed_or_open(size),
            Some(TDim::Sym(symbol)) => Dim::Open(Some(symbol.to_string())),
            // Unknown, or an expression of symbols (`N*2`).
            _ => Dim::Open(None),
        })
        .collect())
}

/// The tensor the file declares, when it declares both element type and shape;
/// `None` where only analysis can tell.
fn declared_tensor(
    role: Role,
    info: &pb::ValueInfoProto,
) -> Result<Option<TensorSpec>, InvalidModel> {
    let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(tensor_type)),
        ..
    }) = &info.r#type
    else {
        return Ok(None);
    };
    let Some(datatype) = declared_datatype(role, &info.name, tensor_type.elem_type)? else {
        return Ok(None);
    };
    let Some(shape) = &tensor_type.shape else {
        return Ok(None);
    };
    Ok(Some(TensorSpec {
        name: info.name.clone(),
        datatype,
        dims: declared_dims(shape),
    }))
}

/// The datatype an ONNX `elem_type` stands for; `None` when the file leaves it
/// undefined, an error when agents cannot serve it.
fn declared_datatype(
    role: Role,
    name: &str,
    elem_type: i32,
) -> Result<Option<Datatype>, InvalidModel> {
    let data_type = match DataType::try_from(elem_type) {
        Ok(DataType::Undefined) | Err(_) => return Ok(None),
        Ok(data_type) => data_type,
    };
    let why = match DatumType::try_from(data_type) {
        Ok(datum_type) => match servable_datatype(datum_type) {
            Ok(datatype) => return Ok(Some(datatype)),
            Err(why) => why,
        },
        // tract has no element type for it at all (BFLOAT16, complex numbers).
        Err(_) => Unservable::Other {
            type_name: data_type.as_str_name().to_string(),
        },
    };
    Err(InvalidModel::UnservableTensor {
        role: role.word(),
        name: name.to_string(),
        why,
    })
}

fn declared_dims(shape: &pb::TensorShapeProto) -> Vec<Dim> {
    shape
        .dim
        .iter()
        .map(|dim| match &dim.value {
            Some(dimension::Value::DimValue(size)) => fixed_or_open(*size),
            // A dim_param or nothing at all: open. Output dims only describe the
            // model, so their names are not kept.
            _ => Dim::Open(None),
        })
        .collect()
}

/// A size the file or tract gives: fixed, or open when it is negative (ONNX
/// writes -1 for "any size").
fn fixed_or_open(size: i64) -> Dim {
    usize::try_from(size).map_or(Dim::Open(None), Dim::Fixed)
}

fn analysed_tensor(
    name: String,
    fact: &TypedFact,
    dims_are_general: bool,
) -> Result<TensorSpec, InvalidModel> {
    let datatype =
        servable_datatype(fact.datum_type).map_err(|why| InvalidModel::UnservableTensor {
            role: Role::Output.word(),
            name: name.clone(),
            why,
        })?;
    // Symbols (`N`) and expressions of them (`N*4`) are open dimensions.
    let dims = fact
        .shape
        .iter()
        .map(|dim| match dim.to_i64() {
            Ok(size) if dims_are_general => fixed_or_open(size),
            _ => Dim::Open(None),
        })
        .collect();
    Ok(TensorSpec {
        name,
        datatype,
        dims,
    })
}
