//! Checks an inference request against a model's signature and turns its JSON
//! data into typed, flat element vectors. Pure functions: every way a request
//! can be wrong becomes an `InvalidRequest` whose text names the problem.

use std::collections::HashMap;

use crate::oip::{Datatype, InferRequest, RequestInput, Scalar};
use crate::signature::{Dim, Signature, TensorSpec};

/// A request that fits the model: inputs in the model's order, ready for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub id: Option<String>,
    pub inputs: Vec<InputTensor>,
    /// Indices into the signature's outputs, in the order the client asked for
    /// them; every output when the request names none.
    pub outputs: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub shape: Vec<usize>,
    pub values: InputValues,
}

/// Flat row-major elements of one input, typed as the model takes them.
#[derive(Debug, Clone, PartialEq)]
pub enum InputValues {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    /// Kept as f32 here; the engine narrows to half precision.
    Fp16(Vec<f32>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("input \"{name}\": the model has no such input (its inputs: {known})")]
    UnknownInput { name: String, known: String },
    #[error("input \"{name}\" is given twice")]
    DuplicateInput { name: String },
    #[error("input \"{name}\" is missing (the model's inputs: {known})")]
    MissingInput { name: String, known: String },
    #[error("input \"{name}\": unknown or unsupported datatype \"{datatype}\"")]
    UnknownDatatype { name: String, datatype: String },
    #[error("input \"{name}\": expected datatype {expected}, got {got}")]
    WrongDatatype {
        name: String,
        expected: Datatype,
        got: Datatype,
    },
    #[error("input \"{name}\": shape {got:?} has a negative dimension")]
    NegativeDim { name: String, got: Vec<i64> },
    #[error(
        "input \"{name}\": expected shape {expected:?} (rank {}), got {got:?} (rank {})",
        expected.len(),
        got.len()
    )]
    WrongRank {
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error(
        "input \"{name}\": dimension {axis} must be {expected} (shape {model_shape:?}), got {got}"
    )]
    WrongDim {
        name: String,
        axis: usize,
        expected: usize,
        got: usize,
        model_shape: Vec<i64>,
    },
    #[error(
        "input \"{name}\": dimension {axis} ({symbol}) is {got}, but it is {first} in input \"{first_input}\""
    )]
    InconsistentDim {
        name: String,
        axis: usize,
        symbol: String,
        got: usize,
        first: usize,
        first_input: String,
    },
    #[error(
        "input \"{name}\": dimension 0 (the batch) is {got}, more than the agent's --max-batch of {max}; send smaller batches"
    )]
    BatchTooLarge {
        name: String,
        got: usize,
        max: usize,
    },
    #[error(
        "input \"{name}\": shape {shape:?} is too large: its dimensions multiply to {product} \
         (each zero counted as one), more than the {max} elements a request within \
         --max-body-bytes can carry"
    )]
    ShapeTooLarge {
        name: String,
        shape: Vec<usize>,
        product: u128,
        max: u128,
    },
    #[error("input \"{name}\": shape {shape:?} holds {expected} elements, but data has {got}")]
    ElementCount {
        name: String,
        shape: Vec<usize>,
        expected: u128,
        got: usize,
    },
    #[error("input \"{name}\": data[{index}] is {found}; datatype {datatype} takes {takes}")]
    WrongElement {
        name: String,
        index: usize,
        found: &'static str,
        datatype: Datatype,
        takes: &'static str,
    },
    #[error(
        "input \"{name}\": data[{index}] = {value} is not an integer, which {datatype} requires"
    )]
    NotInteger {
        name: String,
        index: usize,
        value: f64,
        datatype: Datatype,
    },
    #[error("input \"{name}\": data[{index}] = {value} is out of range for {datatype}")]
    OutOfRange {
        name: String,
        index: usize,
        value: String,
        datatype: Datatype,
    },
    #[error(
        "input \"{name}\": binary tensor data is not supported; send the data as JSON (tritonclient: binary_data=False)"
    )]
    BinaryData { name: String },
    #[error("output \"{name}\": the model has no such output (its outputs: {known})")]
    UnknownOutput { name: String, known: String },
}

/// The agent's default for `--max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// Bounds on the shapes of a request, checked before any plan is built. The
/// element count alone does not bound the work: `[100000000, 3, 48, 0]` holds no
/// element, yet tract builds (and allocates for) a plan for a batch of 10^8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeLimits {
    /// Largest size of an input's first dimension when the model leaves it open
    /// (the batch).
    pub max_batch: usize,
    /// Largest product of an input's dimensions, each zero counted as one.
    pub max_elements: u128,
}

impl ShapeLimits {
    /// The bounds for requests of at most `max_body_bytes`: a JSON body spends at
    /// least two bytes on each element (a digit and a comma), so no request the
    /// agent accepts carries more than `max_body_bytes / 2` elements.
    pub fn new(max_batch: usize, max_body_bytes: usize) -> ShapeLimits {
        ShapeLimits {
            max_batch,
            max_elements: (max_body_bytes / 2) as u128,
        }
    }
}

/// Checks `request` against `signature` and `limits` and converts its data.
pub fn validate(
    signature: &Signature,
    request: InferRequest,
    limits: ShapeLimits,
) -> Result<ValidRequest, InvalidRequest> {
    let mut given: Vec<Option<InputTensor>> = vec![None; signature.inputs.len()];
    // Open dimensions sharing a symbol: the first size seen and which input gave it.
    let mut symbol_sizes: HashMap<String, (usize, String)> = HashMap::new();
    for input in request.inputs {
        let Some(position) = signature
            .inputs
            .iter()
            .position(|spec| spec.name == input.name)
        else {
            return Err(InvalidRequest::UnknownInput {
                name: input.name,
                known: signature.input_names(),
            });
        };
        if given[position].is_some() {
            return Err(InvalidRequest::DuplicateInput { name: input.name });
        }
        let spec = &signature.inputs[position];
        given[position] = Some(validate_input(spec, input, limits, &mut symbol_sizes)?);
    }
    let mut inputs = Vec::with_capacity(given.len());
    for (spec, tensor) in signature.inputs.iter().zip(given) {
        match tensor {
            Some(tensor) => inputs.push(tensor),
            None => {
                return Err(InvalidRequest::MissingInput {
                    name: spec.name.clone(),
                    known: signature.input_names(),
                });
            }
        }
    }
    let outputs = match request.outputs {
        None => (0..signature.outputs.len()).collect(),
        Some(requested) => requested
            .into_iter()
            .map(|output| {
                signature
                    .outputs
                    .iter()
                    .position(|spec| spec.name == output.name)
                    .ok_or_else(|| InvalidRequest::UnknownOutput {
                        name: output.name,
                        known: signature.output_names(),
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(ValidRequest {
        id: request.id,
        inputs,
        outputs,
    })
}

fn validate_input(
    spec: &TensorSpec,
    input: RequestInput,
    limits: ShapeLimits,
    symbol_sizes: &mut HashMap<String, (usize, String)>,
) -> Result<InputTensor, InvalidRequest> {
    let name = input.name;
    // The binary extension puts the bytes after the JSON; this agent reads JSON only.
    if input
        .parameters
        .as_ref()
        .is_some_and(|parameters| parameters.contains_key("binary_data_size"))
    {
        return Err(InvalidRequest::BinaryData { name });
    }
    let Some(datatype) = Datatype::parse(&input.datatype) else {
        return Err(InvalidRequest::UnknownDatatype {
            name,
            datatype: input.datatype,
        });
    };
    if datatype != spec.datatype {
        return Err(InvalidRequest::WrongDatatype {
            name,
            expected: spec.datatype,
            got: datatype,
        });
    }
    let shape = check_shape(spec, &name, &input.shape, limits, symbol_sizes)?;
    let expected = shape
        .iter()
        .try_fold(1u128, |product, dim| product.checked_mul(*dim as u128))
        .unwrap_or(u128::MAX);
    let data = input.data.0;
    if expected != data.len() as u128 {
        return Err(InvalidRequest::ElementCount {
            name,
            shape,
            expected,
            got: data.len(),
        });
    }
    let values = convert(&name, datatype, &data)?;
    Ok(InputTensor { shape, values })
}

fn check_shape(
    spec: &TensorSpec,
    name: &str,
    shape: &[i64],
    limits: ShapeLimits,
    symbol_sizes: &mut HashMap<String, (usize, String)>,
) -> Result<Vec<usize>, InvalidRequest> {
    let Ok(sizes) = shape
        .iter()
        .map(|dim| usize::try_from(*dim))
        .collect::<Result<Vec<usize>, _>>()
    else {
        return Err(InvalidRequest::NegativeDim {
            name: name.to_string(),
            got: shape.to_vec(),
        });
    };
    if sizes.len() != spec.dims.len() {
        return Err(InvalidRequest::WrongRank {
            name: name.to_string(),
            expected: spec.protocol_shape(),
            got: shape.to_vec(),
        });
    }
    for (axis, (dim, &size)) in spec.dims.iter().zip(&sizes).enumerate() {
        match dim {
            Dim::Fixed(expected) if *expected != size => {
                return Err(InvalidRequest::WrongDim {
                    name: name.to_string(),
                    axis,
                    expected: *expected,
                    got: size,
                    model_shape: spec.protocol_shape(),
                });
            }
            Dim::Fixed(_) | Dim::Open(None) => {}
            Dim::Open(Some(symbol)) => match symbol_sizes.get(symbol) {
                Some((first, first_input)) if *first != size => {
                    return Err(InvalidRequest::InconsistentDim {
                        name: name.to_string(),
                        axis,
                        symbol: symbol.clone(),
                        got: size,
                        first: *first,
                        first_input: first_input.clone(),
                    });
                }
                Some(_) => {}
                None => {
                    symbol_sizes.insert(symbol.clone(), (size, name.to_string()));
                }
            },
        }
    }
    check_bounds(spec, name, &sizes, limits)?;
    Ok(sizes)
}

/// Bounds what the declared sizes leave open: the batch by `--max-batch`, and
/// the product of the dimensions (a zero counted as one, since it empties the
/// data but not the plan) by what a request body can carry.
fn check_bounds(
    spec: &TensorSpec,
    name: &str,
    sizes: &[usize],
    limits: ShapeLimits,
) -> Result<(), InvalidRequest> {
    if let (Some(Dim::Open(_)), Some(&batch)) = (spec.dims.first(), sizes.first())
        && batch > limits.max_batch
    {
        return Err(InvalidRequest::BatchTooLarge {
            name: name.to_string(),
            got: batch,
            max: limits.max_batch,
        });
    }
    let product = sizes.iter().fold(1u128, |product, &size| {
        product.saturating_mul(size.max(1) as u128)
    });
    if product > limits.max_elements {
        return Err(InvalidRequest::ShapeTooLarge {
            name: name.to_string(),
            shape: sizes.to_vec(),
            product,
            max: limits.max_elements,
        });
    }
    Ok(())
}

fn convert(name: &str, datatype: Datatype, data: &[Scalar]) -> Result<InputValues, InvalidRequest> {
    let values = match datatype {
        Datatype::Bool => InputValues::Bool(convert_each(name, datatype, data, to_bool)?),
        Datatype::Uint8 => InputValues::Uint8(convert_each(name, datatype, data, to_integer)?),
        Datatype::Uint16 => InputValues::Uint16(convert_each(name, datatype, data, to_integer)?),
        Datatype::Uint32 => InputValues::Uint32(convert_each(name, datatype, data, to_integer)?),
        Datatype::Uint64 => InputValues::Uint64(convert_each(name, datatype, data, to_integer)?),
        Datatype::Int8 => InputValues::Int8(convert_each(name, datatype, data, to_integer)?),
        Datatype::Int16 => InputValues::Int16(convert_each(name, datatype, data, to_integer)?),
        Datatype::Int32 => InputValues::Int32(convert_each(name, datatype, data, to_integer)?),
        Datatype::Int64 => InputValues::Int64(convert_each(name, datatype, data, to_integer)?),
        // JSON numbers are f64; narrowing to the model's precision is the
        // rounding any client that sent f32 values expects.
        Datatype::Fp16 | Datatype::Fp32 => InputValues::from_f32(
            datatype,
            convert_each(name, datatype, data, |scalar| {
                to_float(scalar).map(|v| v as f32)
            })?,
        ),
        Datatype::Fp64 => InputValues::Fp64(convert_each(name, datatype, data, to_float)?),
    };
    Ok(values)
}

impl InputValues {
    fn from_f32(datatype: Datatype, values: Vec<f32>) -> InputValues {
        match datatype {
            Datatype::Fp16 => InputValues::Fp16(values),
            _ => InputValues::Fp32(values),
        }
    }
}

/// Why one element does not fit; turned into an `InvalidRequest` with the
/// input's name and the element's index by `convert_each`.
enum ElementProblem {
    Wrong {
        found: &'static str,
        takes: &'static str,
    },
    NotInteger(f64),
    OutOfRange(String),
}

fn convert_each<T>(
    name: &str,
    datatype: Datatype,
    data: &[Scalar],
    convert_one: impl Fn(Scalar) -> Result<T, ElementProblem>,
) -> Result<Vec<T>, InvalidRequest> {
    let mut out = Vec::with_capacity(data.len());
    for (index, scalar) in data.iter().enumerate() {
        match convert_one(*scalar) {
            Ok(value) => out.push(value),
            Err(problem) => {
                let name = name.to_string();
                return Err(match problem {
                    ElementProblem::Wrong { found, takes } => InvalidRequest::WrongElement {
                        name,
                        index,
                        found,
                        datatype,
                        takes,
                    },
                    ElementProblem::NotInteger(value) => InvalidRequest::NotInteger {
                        name,
                        index,
                        value,
                        datatype,
                    },
                    ElementProblem::OutOfRange(value) => InvalidRequest::OutOfRange {
                        name,
                        index,
                        value,
                        datatype,
                    },
                });
            }
        }
    }
    Ok(out)
}

const NUMBERS: &str = "numbers";

fn to_bool(scalar: Scalar) -> Result<bool, ElementProblem> {
    const BOOLEANS: &str = "true or false";
    match scalar {
        Scalar::Bool(value) => Ok(value),
        Scalar::Int(_) | Scalar::Uint(_) | Scalar::Float(_) => Err(ElementProblem::Wrong {
            found: "a number",
            takes: BOOLEANS,
        }),
        Scalar::Other(found) => Err(ElementProblem::Wrong {
            found,
            takes: BOOLEANS,
        }),
    }
}

fn to_float(scalar: Scalar) -> Result<f64, ElementProblem> {
    match scalar {
        Scalar::Int(value) => Ok(value as f64),
        Scalar::Uint(value) => Ok(value as f64),
        Scalar::Float(value) => Ok(value),
        Scalar::Bool(_) => Err(ElementProblem::Wrong {
            found: "a boolean",
            takes: NUMBERS,
        }),
        Scalar::Other(found) => Err(ElementProblem::Wrong {
            found,
            takes: NUMBERS,
        }),
    }
}

fn to_integer<T: TryFrom<i64> + TryFrom<u64>>(scalar: Scalar) -> Result<T, ElementProblem> {
    let out_of_range = |value: String| ElementProblem::OutOfRange(value);
    match scalar {
        Scalar::Int(value) => T::try_from(value).map_err(|_| out_of_range(value.to_string())),
        Scalar::Uint(value) => T::try_from(value).map_err(|_| out_of_range(value.to_string())),
        // numpy-based clients may write 3.0 for an integer; a fraction is a mistake.
        Scalar::Float(value) if value.fract() == 0.0 => {
            if value >= -(2f64.powi(63)) && value < 2f64.powi(63) {
                T::try_from(value as i64).map_err(|_| out_of_range(value.to_string()))
            } else if value >= 0.0 && value < 2f64.powi(64) {
                T::try_from(value as u64).map_err(|_| out_of_range(value.to_string()))
            } else {
                Err(out_of_range(value.to_string()))
            }
        }
        Scalar::Float(value) => Err(ElementProblem::NotInteger(value)),
        Scalar::Bool(_) => Err(ElementProblem::Wrong {
            found: "a boolean",
            takes: NUMBERS,
        }),
        Scalar::Other(found) => Err(ElementProblem::Wrong {
            found,
            takes: NUMBERS,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, datatype: Datatype, dims: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            dims,
        }
    }

    /// ids: INT32 [batch, 4]; mask: BOOL [batch, 4]; one FP32 output "score".
    fn signature() -> Signature {
        let batch = || Dim::Open(Some("batch".into()));
        Signature {
            inputs: vec![
                spec("ids", Datatype::Int32, vec![batch(), Dim::Fixed(4)]),
                spec("mask", Datatype::Bool, vec![batch(), Dim::Fixed(4)]),
            ],
            outputs: vec![
                spec("score", Datatype::Fp32, vec![batch()]),
                spec("label", Datatype::Int64, vec![batch()]),
            ],
        }
    }

    /// The agent's defaults: batches up to 64, bodies up to 16 MiB.
    const LIMITS: ShapeLimits = ShapeLimits {
        max_batch: 64,
        max_elements: 8 << 20,
    };

    fn check(json: &str) -> Result<ValidRequest, InvalidRequest> {
        let request: InferRequest = serde_json::from_str(json).expect("request parses");
        validate(&signature(), request, LIMITS)
    }

    fn error(json: &str) -> String {
        check(json).expect_err("must be invalid").to_string()
    }

    const MASK: &str =
        r#"{"name":"mask","shape":[1,4],"datatype":"BOOL","data":[true,false,true,false]}"#;

    fn with_mask(ids: &str) -> String {
        format!(r#"{{"inputs":[{ids},{MASK}]}}"#)
    }

    #[test]
    fn valid_request_is_typed_in_model_order() {
        let valid = check(&format!(
            r#"{{"id":"r1","inputs":[{MASK},{{"name":"ids","shape":[1,4],"datatype":"INT32","data":[[1,2,3,4]]}}],
                "outputs":[{{"name":"label"}}]}}"#
        ))
        .expect("valid");
        assert_eq!(valid.id.as_deref(), Some("r1"));
        assert_eq!(valid.inputs[0].values, InputValues::Int32(vec![1, 2, 3, 4]));
        assert_eq!(valid.inputs[0].shape, vec![1, 4]);
        assert_eq!(
            valid.inputs[1].values,
            InputValues::Bool(vec![true, false, true, false])
        );
        assert_eq!(valid.outputs, vec![1]);
    }

    #[test]
    fn all_outputs_by_default() {
        let valid = check(&with_mask(
            r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,3,4]}"#,
        ))
        .expect("valid");
        assert_eq!(valid.outputs, vec![0, 1]);
        assert_eq!(valid.id, None);
    }

    #[test]
    fn unknown_input() {
        let message = error(&with_mask(
            r#"{"name":"idz","shape":[1,4],"datatype":"INT32","data":[1,2,3,4]}"#,
        ));
        assert_eq!(
            message,
            r#"input "idz": the model has no such input (its inputs: "ids", "mask")"#
        );
    }

    #[test]
    fn missing_input() {
        assert_eq!(
            error(&format!(r#"{{"inputs":[{MASK}]}}"#)),
            r#"input "ids" is missing (the model's inputs: "ids", "mask")"#
        );
    }

    #[test]
    fn duplicate_input() {
        assert_eq!(
            error(&format!(r#"{{"inputs":[{MASK},{MASK}]}}"#)),
            r#"input "mask" is given twice"#
        );
    }

    #[test]
    fn wrong_datatype() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}"#
            )),
            "input \"ids\": expected datatype INT32, got FP32"
        );
    }

    #[test]
    fn unknown_datatype() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"BYTES","data":[1,2,3,4]}"#
            )),
            "input \"ids\": unknown or unsupported datatype \"BYTES\""
        );
    }

    #[test]
    fn wrong_rank() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[4],"datatype":"INT32","data":[1,2,3,4]}"#
            )),
            "input \"ids\": expected shape [-1, 4] (rank 2), got [4] (rank 1)"
        );
    }

    #[test]
    fn wrong_fixed_dim() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[2,2],"datatype":"INT32","data":[1,2,3,4]}"#
            )),
            "input \"ids\": dimension 1 must be 4 (shape [-1, 4]), got 2"
        );
    }

    #[test]
    fn negative_dim() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[-1,4],"datatype":"INT32","data":[1,2,3,4]}"#
            )),
            "input \"ids\": shape [-1, 4] has a negative dimension"
        );
    }

    #[test]
    fn shared_symbol_must_agree() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[2,4],"datatype":"INT32","data":[1,2,3,4,5,6,7,8]}"#
            )),
            "input \"mask\": dimension 0 (batch) is 1, but it is 2 in input \"ids\""
        );
    }

    #[test]
    fn element_count() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,3]}"#
            )),
            "input \"ids\": shape [1, 4] holds 4 elements, but data has 3"
        );
    }

    #[test]
    fn non_numeric_element() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,"2",3,4]}"#
            )),
            "input \"ids\": data[1] is a string; datatype INT32 takes numbers"
        );
    }

    #[test]
    fn bool_for_number() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,true,4]}"#
            )),
            "input \"ids\": data[2] is a boolean; datatype INT32 takes numbers"
        );
    }

    #[test]
    fn number_for_bool() {
        let ids = r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,3,4]}"#;
        let mask = r#"{"name":"mask","shape":[1,4],"datatype":"BOOL","data":[1,0,1,0]}"#;
        assert_eq!(
            error(&format!(r#"{{"inputs":[{ids},{mask}]}}"#)),
            "input \"mask\": data[0] is a number; datatype BOOL takes true or false"
        );
    }

    #[test]
    fn fraction_for_integer() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2.5,3,4]}"#
            )),
            "input \"ids\": data[1] = 2.5 is not an integer, which INT32 requires"
        );
    }

    #[test]
    fn integral_float_is_an_integer() {
        let valid = check(&with_mask(
            r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1.0,2,3,4]}"#,
        ))
        .expect("valid");
        assert_eq!(valid.inputs[0].values, InputValues::Int32(vec![1, 2, 3, 4]));
    }

    #[test]
    fn out_of_range() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,3,4294967296]}"#
            )),
            "input \"ids\": data[3] = 4294967296 is out of range for INT32"
        );
    }

    #[test]
    fn unknown_output() {
        assert_eq!(
            error(&format!(
                r#"{{"inputs":[{MASK},{{"name":"ids","shape":[1,4],"datatype":"INT32","data":[1,2,3,4]}}],
                    "outputs":[{{"name":"scores"}}]}}"#
            )),
            r#"output "scores": the model has no such output (its outputs: "score", "label")"#
        );
    }

    #[test]
    fn binary_data_is_refused() {
        assert_eq!(
            error(&with_mask(
                r#"{"name":"ids","shape":[1,4],"datatype":"INT32","parameters":{"binary_data_size":16},"data":[]}"#
            )),
            "input \"ids\": binary tensor data is not supported; send the data as JSON (tritonclient: binary_data=False)"
        );
    }

    /// PP-OCR's direction classifier: x FP32 [N, 3, 48, W].
    fn image_signature() -> Signature {
        Signature {
            inputs: vec![spec(
                "x",
                Datatype::Fp32,
                vec![
                    Dim::Open(Some("N".into())),
                    Dim::Fixed(3),
                    Dim::Fixed(48),
                    Dim::Open(Some("W".into())),
                ],
            )],
            outputs: vec![],
        }
    }

    fn image_error(shape: &str, limits: ShapeLimits) -> String {
        let request: InferRequest = serde_json::from_str(&format!(
            r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"FP32","data":[]}}]}}"#
        ))
        .expect("parses");
        validate(&image_signature(), request, limits)
            .expect_err("must be invalid")
            .to_string()
    }

    #[test]
    fn a_huge_batch_is_refused_even_when_the_shape_holds_no_element() {
        assert_eq!(
            image_error("[100000000, 3, 48, 0]", LIMITS),
            "input \"x\": dimension 0 (the batch) is 100000000, more than the agent's --max-batch of 64; send smaller batches"
        );
    }

    #[test]
    fn the_largest_batch_passes_and_one_more_is_refused() {
        let ids = |batch: usize| {
            let data = vec!["1"; batch * 4].join(",");
            format!(r#"{{"name":"ids","shape":[{batch},4],"datatype":"INT32","data":[{data}]}}"#)
        };
        let limits = ShapeLimits::new(2, 1 << 20);
        let request = |batch: usize| {
            let mask = vec!["true"; batch * 4].join(",");
            let json = format!(
                r#"{{"inputs":[{},{{"name":"mask","shape":[{batch},4],"datatype":"BOOL","data":[{mask}]}}]}}"#,
                ids(batch)
            );
            serde_json::from_str::<InferRequest>(&json).expect("parses")
        };
        assert!(validate(&signature(), request(2), limits).is_ok());
        assert_eq!(
            validate(&signature(), request(3), limits)
                .expect_err("too large a batch")
                .to_string(),
            "input \"ids\": dimension 0 (the batch) is 3, more than the agent's --max-batch of 2; send smaller batches"
        );
    }

    #[test]
    fn open_dimensions_are_bounded_by_what_a_body_can_carry() {
        // 1000 bytes of body carry at most 500 elements.
        let limits = ShapeLimits::new(64, 1000);
        assert_eq!(
            image_error("[0, 3, 48, 4]", limits),
            "input \"x\": shape [0, 3, 48, 4] is too large: its dimensions multiply to 576 \
             (each zero counted as one), more than the 500 elements a request within \
             --max-body-bytes can carry"
        );
        // A zero batch with a width no body could fill, under the default limits.
        assert!(
            image_error("[0, 3, 48, 100000000]", LIMITS).contains("is too large"),
            "refused"
        );
        // Within the bounds, a shape with no element is still a valid request.
        let request: InferRequest = serde_json::from_str(
            r#"{"inputs":[{"name":"x","shape":[2,3,48,0],"datatype":"FP32","data":[]}]}"#,
        )
        .expect("parses");
        assert!(validate(&image_signature(), request, limits).is_ok());
    }

    #[test]
    fn floats_accept_integers_and_narrow() {
        let signature = Signature {
            inputs: vec![
                spec("x", Datatype::Fp32, vec![Dim::Fixed(2)]),
                spec("h", Datatype::Fp16, vec![Dim::Open(None)]),
                spec("d", Datatype::Fp64, vec![Dim::Fixed(1)]),
                spec("u", Datatype::Uint8, vec![Dim::Fixed(1)]),
            ],
            outputs: vec![],
        };
        let request: InferRequest = serde_json::from_str(
            r#"{"inputs":[
                {"name":"x","shape":[2],"datatype":"FP32","data":[1, 0.1]},
                {"name":"h","shape":[3],"datatype":"FP16","data":[1, 2, 3]},
                {"name":"d","shape":[1],"datatype":"FP64","data":[0.1]},
                {"name":"u","shape":[1],"datatype":"UINT8","data":[255]}]}"#,
        )
        .expect("parses");
        let valid = validate(&signature, request, LIMITS).expect("valid");
        assert_eq!(valid.inputs[0].values, InputValues::Fp32(vec![1.0, 0.1]));
        assert_eq!(
            valid.inputs[1].values,
            InputValues::Fp16(vec![1.0, 2.0, 3.0])
        );
        assert_eq!(valid.inputs[2].values, InputValues::Fp64(vec![0.1]));
        assert_eq!(valid.inputs[3].values, InputValues::Uint8(vec![255]));
    }
}
