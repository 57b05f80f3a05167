//! The inference engine: turns ONNX bytes into optimized tract plans, proves them
//! with one warm-up run, and runs validated requests on them. Everything here is
//! CPU-bound and blocking; callers run it on a worker thread.

use std::collections::{HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, Symbol,
    TDim, TValue, TVec, Tensor, ToDim, TractResult, TypedSimplePlan, f16,
};
use tract_onnx::tract_hir::infer::{DimFact, Factoid, ShapeFactoid};
use tract_onnx::tract_hir::internal::DimLike;

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension;

use crate::oip::{Datatype, OutputData, ResponseOutput};
use crate::signature::{Dim, Signature, TensorSpec};
use crate::validation::{InputTensor, InputValues, ValidRequest};

/// How many concrete-shape plans a model that needs them keeps. Each holds its
/// own packed weights, so the bound is a memory bound; eight covers the few
/// batch sizes a real client uses.
pub const PLAN_CACHE_SIZE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a loadable ONNX model: {0}")]
    Unloadable(String),
    #[error("{role} \"{name}\": {reason}")]
    UnsupportedTensor {
        role: &'static str,
        name: String,
        reason: String,
    },
    #[error("tract panicked while loading the model: {0}")]
    Panicked(String),
}

impl LoadError {
    /// A short, fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LoadError::Unloadable(_) => "unloadable",
            LoadError::UnsupportedTensor { .. } => "unsupported_tensor",
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
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|err| LoadError::Unloadable(format!("not a valid ONNX protobuf: {err:#}")))?;
    let Some(graph) = proto.graph.as_ref() else {
        return Err(LoadError::Unloadable("it holds no ONNX graph".to_string()));
    };
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
    let inputs = input_specs(&model)?;
    let declared_outputs = declared_output_specs(&model, graph);
    // Free the decoded copy of the weights before optimization makes its own.
    drop(proto);

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
    let outputs = declared_outputs
        .into_iter()
        .enumerate()
        .map(|(ix, (name, declared))| match declared {
            Some(spec) => Ok(spec),
            None => analysed_output_spec(&typed_plan, ix, name, typed_dims_are_general),
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    for ix in 0..model.inputs.len() {
        let mut fact = model.input_fact(ix)?.clone();
        // tract cannot type a source whose shape is not fully known, so an
        // unnamed open dimension gets a fresh symbol of its own.
        let dims: TVec<DimFact> = fact
            .shape
            .dims()
            .map(|dim| match dim.concretize() {
                Some(dim) => DimFact::from(dim),
                None => DimFact::from(model.symbols.new_with_prefix("unnamed").to_dim()),
            })
            .collect();
        fact.shape = ShapeFactoid::closed(dims);
        model.set_input_fact(ix, fact)?;
    }
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
            Tensor::zero_dt(datum_type(spec.datatype), &shape_with_ones(spec)).map(TValue::from)
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

fn input_specs(model: &InferenceModel) -> Result<Vec<TensorSpec>, LoadError> {
    let mut specs = Vec::with_capacity(model.inputs.len());
    for (ix, outlet) in model.inputs.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let unsupported = |reason: &str| LoadError::UnsupportedTensor {
            role: "input",
            name: name.clone(),
            reason: reason.to_string(),
        };
        let fact = model
            .input_fact(ix)
            .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
        let Some(datum_type) = fact.datum_type.concretize() else {
            return Err(unsupported("the model declares no element type for it"));
        };
        let datatype = oip_datatype(datum_type).ok_or_else(|| {
            unsupported(&format!(
                "element type {datum_type:?} is not served by this agent"
            ))
        })?;
        if fact.shape.is_open() {
            return Err(unsupported("the model declares no rank for it"));
        }
        let dims = fact
            .shape
            .dims()
            .map(|dim| match dim.concretize() {
                Some(TDim::Val(size)) if size >= 0 => Dim::Fixed(size as usize),
                Some(TDim::Sym(symbol)) => Dim::Open(Some(symbol.to_string())),
                _ => Dim::Open(None),
            })
            .collect();
        specs.push(TensorSpec {
            name,
            datatype,
            dims,
        });
    }
    Ok(specs)
}

/// Each output's name, with its spec when the graph declares both element type
/// and shape. tract's loader ignores declared output shapes by default (they
/// are often wrong), so they are read from the protobuf; they only describe the
/// model in metadata, inference never relies on them.
fn declared_output_specs(
    model: &InferenceModel,
    graph: &pb::GraphProto,
) -> Vec<(String, Option<TensorSpec>)> {
    model
        .outputs
        .iter()
        .map(|outlet| {
            let name = model
                .outlet_label(*outlet)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            let declared = graph
                .output
                .iter()
                .find(|info| info.name == name)
                .and_then(declared_tensor);
            (name, declared)
        })
        .collect()
}

fn declared_tensor(info: &pb::ValueInfoProto) -> Option<TensorSpec> {
    let Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(tensor_type)),
        ..
    }) = &info.r#type
    else {
        return None;
    };
    let shape = tensor_type.shape.as_ref()?;
    let data_type = DataType::try_from(tensor_type.elem_type).ok()?;
    let datatype = oip_datatype(DatumType::try_from(data_type).ok()?)?;
    let dims = shape
        .dim
        .iter()
        .map(|dim| match dim.value {
            Some(dimension::Value::DimValue(size)) if size >= 0 => Dim::Fixed(size as usize),
            _ => Dim::Open(None),
        })
        .collect();
    Some(TensorSpec {
        name: info.name.clone(),
        datatype,
        dims,
    })
}

fn analysed_output_spec(
    plan: &Arc<TypedSimplePlan>,
    ix: usize,
    name: String,
    dims_are_general: bool,
) -> Result<TensorSpec, LoadError> {
    let fact = plan
        .model()
        .output_fact(ix)
        .map_err(|err| LoadError::Unloadable(format!("{err:#}")))?;
    let datatype = oip_datatype(fact.datum_type).ok_or_else(|| LoadError::UnsupportedTensor {
        role: "output",
        name: name.clone(),
        reason: format!(
            "element type {:?} is not served by this agent",
            fact.datum_type
        ),
    })?;
    let dims = fact
        .shape
        .iter()
        .map(|dim| match dim.to_usize() {
            Ok(size) if dims_are_general => Dim::Fixed(size),
            _ => Dim::Open(None),
        })
        .collect();
    Ok(TensorSpec {
        name,
        datatype,
        dims,
    })
}

fn oip_datatype(datum_type: DatumType) -> Option<Datatype> {
    let datatype = match datum_type {
        DatumType::Bool => Datatype::Bool,
        DatumType::U8 => Datatype::Uint8,
        DatumType::U16 => Datatype::Uint16,
        DatumType::U32 => Datatype::Uint32,
        DatumType::U64 => Datatype::Uint64,
        DatumType::I8 => Datatype::Int8,
        DatumType::I16 => Datatype::Int16,
        DatumType::I32 => Datatype::Int32,
        DatumType::I64 => Datatype::Int64,
        DatumType::F16 => Datatype::Fp16,
        DatumType::F32 => Datatype::Fp32,
        DatumType::F64 => Datatype::Fp64,
        // Shape arithmetic is typed TDim in tract and int64 in ONNX.
        DatumType::TDim => Datatype::Int64,
        _ => return None,
    };
    Some(datatype)
}

fn datum_type(datatype: Datatype) -> DatumType {
    match datatype {
        Datatype::Bool => DatumType::Bool,
        Datatype::Uint8 => DatumType::U8,
        Datatype::Uint16 => DatumType::U16,
        Datatype::Uint32 => DatumType::U32,
        Datatype::Uint64 => DatumType::U64,
        Datatype::Int8 => DatumType::I8,
        Datatype::Int16 => DatumType::I16,
        Datatype::Int32 => DatumType::I32,
        Datatype::Int64 => DatumType::I64,
        Datatype::Fp16 => DatumType::F16,
        Datatype::Fp32 => DatumType::F32,
        Datatype::Fp64 => DatumType::F64,
    }
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
    let datatype = oip_datatype(datum_type).ok_or_else(|| InferError::UnsupportedOutput {
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

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_unloadable() {
        let err = LoadedModel::load("m", "1", b"<html>404</html>").expect_err("refused");
        assert_eq!(err.label(), "unloadable", "{err}");
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
