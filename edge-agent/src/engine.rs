//! The inference engine: turns ONNX bytes into optimized tract plans, proves them
//! with one warm-up run, and runs validated requests on them. Everything here is
//! CPU-bound and blocking; callers run it on a worker thread.

use std::collections::{HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use shoal_signature::check::{OpenDims, panic_message, pin_open_input_dims};
use shoal_signature::{InvalidModel, OnnxModel, complete_outputs, read_onnx};
use tract_onnx::prelude::{
    DatumType, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, Symbol, TDim,
    TValue, TVec, Tensor, ToDim, TractResult, TypedFact, TypedSimplePlan, f16,
};
use tract_onnx::tract_hir::infer::Factoid;

use crate::oip::{Datatype, OutputData, ResponseOutput};
use crate::signature::{Dim, Signature, TensorSpec};
use crate::validation::{InputTensor, InputValues, ValidRequest};

/// How many concrete-shape plans a model that needs them keeps. Each holds its
/// own packed weights, so the bound is a memory bound; eight covers the few
/// batch sizes a real client uses.
pub const PLAN_CACHE_SIZE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// What the operator's admission check refuses too (shoal-signature).
    #[error("not a loadable ONNX model: {0}")]
    Invalid(#[from] InvalidModel),
    #[error("not a loadable ONNX model: {0}")]
    Unloadable(String),
    #[error("tract panicked while loading the model: {0}")]
    Panicked(String),
}

impl LoadError {
    /// A short, fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LoadError::Invalid(InvalidModel::NotOnnx { .. } | InvalidModel::Unloadable { .. })
            | LoadError::Unloadable(_) => "unloadable",
            LoadError::Invalid(
                InvalidModel::UnservableTensor { .. } | InvalidModel::UndeclaredInput { .. },
            ) => "unsupported_tensor",
            LoadError::Panicked(_) => "panicked",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("could not prepare the model for input shapes {shapes:?}: {reason}")]
    Prepare {
        shapes: Vec<Vec<usize>>,
        reason: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("output \"{name}\" has element type {datum_type}, which this agent cannot send")]
    UnsupportedOutput { name: String, datum_type: String },
}

/// One version of one model, ready to serve.
pub struct LoadedModel {
    pub name: String,
    pub version: String,
    pub signature: Signature,
    runner: Runner,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

enum Runner {
    /// One plan for every shape the signature accepts: all dimensions are fixed,
    /// or tract optimized the graph with its open dimensions left symbolic.
    Single(Arc<TypedSimplePlan>),
    /// tract only optimizes this graph with concrete sizes (magika builds a
    /// shape tensor from its batch size): one plan per set of sizes seen.
    PerShape(Box<PerShape>),
}

struct PerShape {
    model: InferenceModel,
    open_dims: Vec<OpenDim>,
    plans: Mutex<PlanCache>,
}

/// Where an open input dimension is, and the graph's symbol for it if it names one.
struct OpenDim {
    input: usize,
    axis: usize,
    symbol: Option<Symbol>,
}

impl LoadedModel {
    /// Parses, optimizes and warms up a model. Blocking and CPU-heavy.
    pub fn load(name: &str, version: &str, bytes: &[u8]) -> Result<LoadedModel, LoadError> {
        // tract panics on some malformed models; the bytes come from outside, so
        // a panic is one more way for a model to be unloadable.
        match panic::catch_unwind(AssertUnwindSafe(|| load_unguarded(name, version, bytes))) {
            Ok(result) => result,
            Err(payload) => Err(LoadError::Panicked(panic_message(payload.as_ref()))),
        }
    }

    /// Runs one validated request; returns the requested outputs in the order asked.
    pub fn infer(&self, request: &ValidRequest) -> Result<Vec<ResponseOutput>, InferError> {
        let shapes: Vec<Vec<usize>> = request.inputs.iter().map(|i| i.shape.clone()).collect();
        let plan = self.plan_for(&shapes)?;
        let inputs = request
            .inputs
            .iter()
            .map(input_tensor)
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(|err| InferError::Run(format!("{err:#}")))?;
        let outputs = plan
            .run(inputs)
            .map_err(|err| InferError::Run(format!("{err:#}")))?;
        request
            .outputs
            .iter()
            .map(|&ix| response_output(&self.signature.outputs[ix].name, &outputs[ix]))
            .collect()
    }

    /// Whether this model runs on one plan for all shapes (for logs and tests).
    pub fn has_single_plan(&self) -> bool {
        matches!(self.runner, Runner::Single(_))
    }

    fn plan_for(&self, shapes: &[Vec<usize>]) -> Result<Arc<TypedSimplePlan>, InferError> {
        match &self.runner {
            Runner::Single(plan) => Ok(plan.clone()),
            Runner::PerShape(per_shape) => {
                let key: Vec<usize> = per_shape
                    .open_dims
                    .iter()
                    .map(|open| shapes[open.input][open.axis])
                    .collect();
                if let Some(plan) = lock(&per_shape.plans).get(&key) {
                    return Ok(plan);
                }
                // Built outside the lock: another batch size must not wait for
                // this one. Two workers may build the same plan once; both work.
                let plan = per_shape.build(shapes).map_err(|err| InferError::Prepare {
                    shapes: shapes.to_vec(),
                    reason: format!("{err:#}"),
                })?;
                lock(&per_shape.plans).insert(key, plan.clone());
                Ok(plan)
            }
        }
    }
}

fn load_unguarded(name: &str, version: &str, bytes: &[u8]) -> Result<LoadedModel, LoadError> {
    // The same reading, and the same datatype rule, as the operator's admission.
    let OnnxModel {
        model,
        inputs,
        declared_outputs,
    } = read_onnx(bytes)?;

    let (runner, symbolic_error) = match single_plan(&model, &inputs) {
        Ok(plan) => (Runner::Single(plan), None),
        Err(err) => (per_shape_runner(model, &inputs)?, Some(err)),
    };
    if let Some(err) = symbolic_error {
        tracing::info!(
            model = name,
            version,
            reason = format!("{err:#}"),
            "tract optimizes this model only with concrete sizes; keeping one plan per batch size"
        );
    }
    // Outputs the graph does not fully declare are described from the plan tract
    // built. A per-shape plan was built for size 1, so its open dims are unknown.
    let (typed_plan, typed_dims_are_general) = match &runner {
        Runner::Single(plan) => (plan.clone(), true),
        Runner::PerShape(per_shape) => {
            let ones = vec![1; per_shape.open_dims.len()];
            let plan = lock(&per_shape.plans)
                .get(&ones)
                .ok_or_else(|| LoadError::Unloadable("the warm-up plan is gone".to_string()))?;
            (plan, false)
        }
    };
    let analysed_outputs = (0..typed_plan.model().outputs.len())
        .map(|ix| typed_plan.model().output_fact(ix).cloned())
        .collect::<TractResult<Vec<TypedFact>>>()
        .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
    let outputs = complete_outputs(declared_outputs, &analysed_outputs, typed_dims_are_general)?;
    Ok(LoadedModel {
        name: name.to_string(),
        version: version.to_string(),
        signature: Signature { inputs, outputs },
        runner,
    })
}

/// Optimizes with open dimensions symbolic and warms the plan up at size 1.
fn single_plan(model: &InferenceModel, inputs: &[TensorSpec]) -> TractResult<Arc<TypedSimplePlan>> {
    let mut model = model.clone();
    // tract cannot type a source whose shape is not fully known, so an unnamed
    // open dimension gets a fresh symbol of its own.
    pin_open_input_dims(&mut model, OpenDims::Symbolic)?;
    let plan = model.into_optimized()?.into_runnable()?;
    warm_up(&plan, inputs)?;
    Ok(plan)
}

fn per_shape_runner(model: InferenceModel, inputs: &[TensorSpec]) -> Result<Runner, LoadError> {
    let mut open_dims = Vec::new();
    for (input, spec) in inputs.iter().enumerate() {
        let fact = model
            .input_fact(input)
            .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
        for (axis, dim) in fact.shape.dims().enumerate() {
            if let Dim::Open(_) = spec.dims[axis] {
                let symbol = match dim.concretize() {
                    Some(TDim::Sym(symbol)) => Some(symbol),
                    _ => None,
                };
                open_dims.push(OpenDim {
                    input,
                    axis,
                    symbol,
                });
            }
        }
    }
    let per_shape = PerShape {
        model,
        open_dims,
        plans: Mutex::new(PlanCache::new(PLAN_CACHE_SIZE)),
    };
    let ones: Vec<Vec<usize>> = inputs.iter().map(shape_with_ones).collect();
    let plan = per_shape
        .build(&ones)
        .and_then(|plan| warm_up(&plan, inputs).map(|()| plan))
        .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
    lock(&per_shape.plans).insert(vec![1; per_shape.open_dims.len()], plan);
    Ok(Runner::PerShape(Box::new(per_shape)))
}

impl PerShape {
    fn build(&self, shapes: &[Vec<usize>]) -> TractResult<Arc<TypedSimplePlan>> {
        let mut model = self.model.clone();
        let mut symbols: HashMap<Symbol, TDim> = HashMap::new();
        for open in &self.open_dims {
            if let Some(symbol) = &open.symbol {
                symbols.insert(symbol.clone(), shapes[open.input][open.axis].to_dim());
            }
        }
        for (ix, shape) in shapes.iter().enumerate() {
            let datum_type = model
                .input_fact(ix)?
                .datum_type
                .concretize()
                .ok_or_else(|| {
                    tract_onnx::tract_hir::internal::format_err!("input {ix} has no datum type")
                })?;
            model.set_input_fact(ix, InferenceFact::dt_shape(datum_type, shape.as_slice()))?;
        }
        // value_info inside the graph may name the same symbols; they must agree
        // with the sizes given to the inputs or analysis finds a contradiction.
        model.set_symbols(&symbols)?;
        model.into_optimized()?.into_runnable()
    }
}

fn warm_up(plan: &Arc<TypedSimplePlan>, inputs: &[TensorSpec]) -> TractResult<()> {
    let zeros = inputs
        .iter()
        .map(|spec| {
            Tensor::zero_dt(spec.datatype.datum_type(), &shape_with_ones(spec)).map(TValue::from)
        })
        .collect::<TractResult<TVec<TValue>>>()?;
    plan.run(zeros)?;
    Ok(())
}

fn shape_with_ones(spec: &TensorSpec) -> Vec<usize> {
    spec.dims
        .iter()
        .map(|dim| match dim {
            Dim::Fixed(size) => *size,
            Dim::Open(_) => 1,
        })
        .collect()
}

fn input_tensor(input: &InputTensor) -> TractResult<TValue> {
    let shape = input.shape.as_slice();
    let tensor = match &input.values {
        InputValues::Bool(v) => Tensor::from_shape(shape, v)?,
        InputValues::Uint8(v) => Tensor::from_shape(shape, v)?,
        InputValues::Uint16(v) => Tensor::from_shape(shape, v)?,
        InputValues::Uint32(v) => Tensor::from_shape(shape, v)?,
        InputValues::Uint64(v) => Tensor::from_shape(shape, v)?,
        InputValues::Int8(v) => Tensor::from_shape(shape, v)?,
        InputValues::Int16(v) => Tensor::from_shape(shape, v)?,
        InputValues::Int32(v) => Tensor::from_shape(shape, v)?,
        InputValues::Int64(v) => Tensor::from_shape(shape, v)?,
        InputValues::Fp16(v) => {
            let halves: Vec<f16> = v.iter().map(|x| f16::from_f32(*x)).collect();
            Tensor::from_shape(shape, &halves)?
        }
        InputValues::Fp32(v) => Tensor::from_shape(shape, v)?,
        InputValues::Fp64(v) => Tensor::from_shape(shape, v)?,
    };
    Ok(tensor.into())
}

fn response_output(name: &str, tensor: &Tensor) -> Result<ResponseOutput, InferError> {
    let run_error = |err: tract_onnx::prelude::TractError| InferError::Run(format!("{err:#}"));
    let datum_type = tensor.datum_type();
    let datatype =
        Datatype::from_datum_type(datum_type).ok_or_else(|| InferError::UnsupportedOutput {
            name: name.to_string(),
            datum_type: format!("{datum_type:?}"),
        })?;
    let data = match datum_type {
        DatumType::TDim => {
            let cast = tensor.cast_to::<i64>().map_err(run_error)?;
            OutputData::Int(plain_slice::<i64>(&cast)?.to_vec())
        }
        _ => match datatype {
            Datatype::Bool => OutputData::Bool(plain_slice::<bool>(tensor)?.to_vec()),
            Datatype::Uint8 => OutputData::Uint(widen::<u8, u64>(tensor)?),
            Datatype::Uint16 => OutputData::Uint(widen::<u16, u64>(tensor)?),
            Datatype::Uint32 => OutputData::Uint(widen::<u32, u64>(tensor)?),
            Datatype::Uint64 => OutputData::Uint(plain_slice::<u64>(tensor)?.to_vec()),
            Datatype::Int8 => OutputData::Int(widen::<i8, i64>(tensor)?),
            Datatype::Int16 => OutputData::Int(widen::<i16, i64>(tensor)?),
            Datatype::Int32 => OutputData::Int(widen::<i32, i64>(tensor)?),
            Datatype::Int64 => OutputData::Int(plain_slice::<i64>(tensor)?.to_vec()),
            Datatype::Fp16 => OutputData::Fp32(
                plain_slice::<f16>(tensor)?
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
            ),
            Datatype::Fp32 => OutputData::Fp32(plain_slice::<f32>(tensor)?.to_vec()),
            Datatype::Fp64 => OutputData::Fp64(plain_slice::<f64>(tensor)?.to_vec()),
        },
    };
    Ok(ResponseOutput {
        name: name.to_string(),
        datatype,
        shape: tensor.shape().to_vec(),
        data,
    })
}

fn plain_slice<T: tract_onnx::prelude::Datum>(tensor: &Tensor) -> Result<&[T], InferError> {
    tensor
        .try_as_plain_ram()
        .and_then(|view| view.as_slice::<T>())
        .map_err(|err| InferError::Run(format!("{err:#}")))
}

fn widen<T: tract_onnx::prelude::Datum + Copy, W: From<T>>(
    tensor: &Tensor,
) -> Result<Vec<W>, InferError> {
    Ok(plain_slice::<T>(tensor)?
        .iter()
        .map(|x| W::from(*x))
        .collect())
}

/// The last few concrete-shape plans used, most recent first.
struct PlanCache {
    entries: VecDeque<(Vec<usize>, Arc<TypedSimplePlan>)>,
    capacity: usize,
}

impl PlanCache {
    fn new(capacity: usize) -> PlanCache {
        PlanCache {
            entries: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn get(&mut self, key: &[usize]) -> Option<Arc<TypedSimplePlan>> {
        let position = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(position)?;
        let plan = entry.1.clone();
        self.entries.push_front(entry);
        Some(plan)
    }

    fn insert(&mut self, key: Vec<usize>, plan: Arc<TypedSimplePlan>) {
        if let Some(position) = self.entries.iter().position(|(k, _)| *k == key) {
            self.entries.remove(position);
        }
        self.entries.push_front((key, plan));
        self.entries.truncate(self.capacity);
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<Vec<usize>> {
        self.entries.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// A panic in one worker must not make the cache unusable for the others; its
/// content is always consistent between statements.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_unloadable() {
        let err = LoadedModel::load("m", "1", b"<html>404</html>").expect_err("refused");
        assert_eq!(err.label(), "unloadable", "{err}");
    }

    /// text: string[1] → Identity → text_out: tract loads it, but agents serve
    /// no string tensors, and the operator refuses the same model for the same
    /// reason (shoal_signature::servable_datatype).
    fn string_input_model() -> Vec<u8> {
        use prost::Message;
        use tract_onnx::pb;
        use tract_onnx::pb::tensor_proto::DataType;
        use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
        let value_info = |name: &str| pb::ValueInfoProto {
            name: name.to_string(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: DataType::String as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: vec![Dimension {
                            value: Some(dimension::Value::DimValue(1)),
                            ..Default::default()
                        }],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(pb::GraphProto {
                name: "string_echo".to_string(),
                node: vec![pb::NodeProto {
                    op_type: "Identity".to_string(),
                    input: vec!["text".to_string()],
                    output: vec!["text_out".to_string()],
                    ..Default::default()
                }],
                input: vec![value_info("text")],
                output: vec![value_info("text_out")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn string_input_is_refused_like_the_operator_refuses_it() {
        let bytes = string_input_model();
        let err = LoadedModel::load("m", "1", &bytes).expect_err("refused");
        assert_eq!(err.label(), "unsupported_tensor", "{err}");
        let admission = shoal_signature::read_signature(&bytes).expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!("not a loadable ONNX model: {admission}")
        );
        assert!(
            err.to_string().contains("input `text` is a string tensor"),
            "{err}"
        );
    }

    #[test]
    fn plan_cache_keeps_the_most_recent() {
        let plan = || {
            let model = tract_onnx::prelude::TypedModel::default();
            model.into_runnable().expect("empty plan")
        };
        let mut cache = PlanCache::new(2);
        cache.insert(vec![1], plan());
        cache.insert(vec![2], plan());
        assert!(cache.get(&[1]).is_some());
        cache.insert(vec![3], plan());
        assert_eq!(cache.keys(), vec![vec![3], vec![1]]);
        assert!(cache.get(&[2]).is_none());
    }
}
