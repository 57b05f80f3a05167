//! The inputs a validation runs both models on: synthetic ones generated from the
//! model's input signature, or real ones read from a dataset file.
//!
//! Dataset format (JSON Lines): one Open Inference Protocol v2 inference request body
//! per line, the same JSON a client POSTs to `/v2/models/NAME/infer`:
//!
//! ```text
//! {"inputs":[{"name":"user_id","datatype":"INT64","shape":[1],"data":[42]}]}
//! ```
//!
//! Every line names every model input with the model's datatype; `data` is flat or
//! nested row-major. Blank lines and lines starting with `#` are skipped.

use std::collections::HashMap;

use serde::Deserialize;
use tract_onnx::pb;
use tract_onnx::prelude::{Tensor, TractResult};

use shoal_signature::{Datatype, Dim, TensorSpec};

/// One set of model inputs, in the model's input order.
pub type Sample = Vec<Tensor>;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleError {
    #[error(
        "dataset line {line}: {reason}. Each line must be one Open Inference Protocol request \
         body: {{\"inputs\":[{{\"name\":…,\"datatype\":…,\"shape\":[…],\"data\":[…]}}]}}"
    )]
    BadLine { line: usize, reason: String },

    #[error("the dataset holds no samples; give it at least one line")]
    EmptyDataset,
}

/// The size synthetic inputs give an open dimension other than the first (an image's
/// height and width, a sequence length): big enough that convolutions and pooling
/// see more than one pixel, small enough to stay fast.
pub const OPEN_DIM_SIZE: usize = 32;

/// `count` synthetic samples for `inputs`, reproducible (fixed seed).
///
/// An open first dimension (the batch) becomes 1, other open ones [`OPEN_DIM_SIZE`]. Floats are uniform in [-1, 1]. Integers feeding a
/// Gather as indices are uniform over the table's rows (`index_limits`); other
/// integers are uniform in [0, 255] (bytes, tokens, small ids), capped by the type.
pub fn synthetic(
    inputs: &[TensorSpec],
    index_limits: &HashMap<String, u64>,
    count: usize,
) -> Vec<Sample> {
    let mut rng = SplitMix64(0x5EED_2026_1201);
    (0..count)
        .map(|_| {
            inputs
                .iter()
                .map(|input| synthetic_tensor(input, index_limits, &mut rng))
                .collect()
        })
        .collect()
}

fn synthetic_tensor(
    input: &TensorSpec,
    index_limits: &HashMap<String, u64>,
    rng: &mut SplitMix64,
) -> Tensor {
    let shape: Vec<usize> = input
        .dims
        .iter()
        .enumerate()
        .map(|(axis, dim)| match dim {
            Dim::Fixed(size) => *size,
            Dim::Open(_) if axis == 0 => 1,
            Dim::Open(_) => OPEN_DIM_SIZE,
        })
        .collect();
    let n: usize = shape.iter().product();
    let int_limit = |type_max: u64| {
        index_limits
            .get(&input.name)
            .copied()
            .unwrap_or(256)
            .min(type_max + 1)
    };
    let ints = |rng: &mut SplitMix64, limit: u64| -> Vec<u64> {
        (0..n).map(|_| rng.below(limit.max(1))).collect()
    };
    let floats =
        |rng: &mut SplitMix64| -> Vec<f64> { (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect() };
    let tensor = match input.datatype {
        Datatype::Fp32 => Tensor::from_shape(
            &shape,
            &floats(rng).iter().map(|v| *v as f32).collect::<Vec<_>>(),
        ),
        Datatype::Fp64 => Tensor::from_shape(&shape, &floats(rng)),
        Datatype::Fp16 => Tensor::from_shape(
            &shape,
            &floats(rng)
                .iter()
                .map(|v| half::f16::from_f64(*v))
                .collect::<Vec<_>>(),
        ),
        Datatype::Int8 => Tensor::from_shape(&shape, &cast(ints(rng, int_limit(127)), |v| v as i8)),
        Datatype::Int16 => Tensor::from_shape(
            &shape,
            &cast(ints(rng, int_limit(i16::MAX as u64)), |v| v as i16),
        ),
        Datatype::Int32 => Tensor::from_shape(
            &shape,
            &cast(ints(rng, int_limit(i32::MAX as u64)), |v| v as i32),
        ),
        Datatype::Int64 => Tensor::from_shape(
            &shape,
            &cast(ints(rng, int_limit(i64::MAX as u64)), |v| v as i64),
        ),
        Datatype::Uint8 => {
            Tensor::from_shape(&shape, &cast(ints(rng, int_limit(255)), |v| v as u8))
        }
        Datatype::Uint16 => Tensor::from_shape(
            &shape,
            &cast(ints(rng, int_limit(u16::MAX as u64)), |v| v as u16),
        ),
        Datatype::Uint32 => Tensor::from_shape(
            &shape,
            &cast(ints(rng, int_limit(u32::MAX as u64)), |v| v as u32),
        ),
        Datatype::Uint64 => Tensor::from_shape(&shape, &ints(rng, int_limit(u64::MAX - 1))),
        Datatype::Bool => Tensor::from_shape(&shape, &cast(ints(rng, 2), |v| v == 1)),
    };
    tensor.expect("the value count matches the shape by construction")
}

fn cast<T>(values: Vec<u64>, f: impl Fn(u64) -> T) -> Vec<T> {
    values.into_iter().map(f).collect()
}

/// For each graph input used directly as Gather indices into an initializer, the
/// number of rows of that table: synthetic indices must stay below it.
pub fn gather_index_limits(model: &pb::ModelProto) -> HashMap<String, u64> {
    let Some(graph) = &model.graph else {
        return HashMap::new();
    };
    let tables: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut limits: HashMap<String, u64> = HashMap::new();
    for node in graph.node.iter().filter(|n| n.op_type == "Gather") {
        let (Some(table), Some(indices)) = (node.input.first(), node.input.get(1)) else {
            continue;
        };
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let Some(table) = tables.get(table.as_str()) else {
            continue;
        };
        let axis = if axis < 0 {
            axis + table.dims.len() as i64
        } else {
            axis
        };
        let Some(rows) = table.dims.get(axis as usize) else {
            continue;
        };
        let rows = (*rows).max(1) as u64;
        limits
            .entry(indices.clone())
            .and_modify(|limit| *limit = (*limit).min(rows))
            .or_insert(rows);
    }
    limits
}

#[derive(Deserialize)]
struct RequestLine {
    inputs: Vec<RequestInput>,
}

#[derive(Deserialize)]
struct RequestInput {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    data: serde_json::Value,
}

/// Reads at most `limit` samples from a JSON Lines dataset for a model with `inputs`.
pub fn from_dataset(
    dataset: &[u8],
    inputs: &[TensorSpec],
    limit: usize,
) -> Result<Vec<Sample>, SampleError> {
    let text = std::str::from_utf8(dataset).map_err(|e| SampleError::BadLine {
        line: 1,
        reason: format!("the dataset is not UTF-8 text ({e})"),
    })?;
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if samples.len() >= limit {
            break;
        }
        let line_no = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = |reason: String| SampleError::BadLine {
            line: line_no,
            reason,
        };
        let request: RequestLine =
            serde_json::from_str(trimmed).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let mut by_name: HashMap<&str, &RequestInput> = request
            .inputs
            .iter()
            .map(|i| (i.name.as_str(), i))
            .collect();
        let mut sample = Vec::with_capacity(inputs.len());
        for input in inputs {
            let given = by_name
                .remove(input.name.as_str())
                .ok_or_else(|| bad(format!("input `{}` is missing", input.name)))?;
            sample.push(dataset_tensor(input, given).map_err(bad)?);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(bad(format!("the model has no input `{extra}`")));
        }
        samples.push(sample);
    }
    if samples.is_empty() {
        return Err(SampleError::EmptyDataset);
    }
    Ok(samples)
}

fn dataset_tensor(spec: &TensorSpec, given: &RequestInput) -> Result<Tensor, String> {
    if Datatype::parse(&given.datatype) != Some(spec.datatype) {
        return Err(format!(
            "input `{}` has datatype {} but the model takes {}",
            spec.name, given.datatype, spec.datatype
        ));
    }
    let model_shape = spec.protocol_shape();
    if given.shape.len() != model_shape.len()
        || given
            .shape
            .iter()
            .zip(&model_shape)
            .any(|(g, s)| *g < 0 || (*s >= 0 && g != s))
    {
        return Err(format!(
            "input `{}` has shape {:?} but the model takes {:?} (-1 is any size)",
            spec.name, given.shape, model_shape
        ));
    }
    let shape: Vec<usize> = given.shape.iter().map(|d| *d as usize).collect();
    let mut flat = Vec::new();
    flatten(&given.data, &mut flat);
    let expected: usize = shape.iter().product();
    if flat.len() != expected {
        return Err(format!(
            "input `{}` has {} values but shape {:?} needs {expected}",
            spec.name,
            flat.len(),
            given.shape
        ));
    }
    let not_number = || {
        format!(
            "input `{}` holds a value that is not a {}",
            spec.name, spec.datatype
        )
    };
    let floats = || {
        flat.iter()
            .map(|v| v.as_f64())
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(not_number)
    };
    let ints = || {
        flat.iter()
            .map(|v| v.as_i64())
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(not_number)
    };
    let result: TractResult<Tensor> = match spec.datatype {
        Datatype::Fp32 => Tensor::from_shape(
            &shape,
            &floats()?.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        ),
        Datatype::Fp64 => Tensor::from_shape(&shape, &floats()?),
        Datatype::Fp16 => Tensor::from_shape(
            &shape,
            &floats()?
                .iter()
                .map(|v| half::f16::from_f64(*v))
                .collect::<Vec<_>>(),
        ),
        Datatype::Int8 => Tensor::from_shape(&shape, &narrow::<i8>(ints()?, &spec.name)?),
        Datatype::Int16 => Tensor::from_shape(&shape, &narrow::<i16>(ints()?, &spec.name)?),
        Datatype::Int32 => Tensor::from_shape(&shape, &narrow::<i32>(ints()?, &spec.name)?),
        Datatype::Int64 => Tensor::from_shape(&shape, &ints()?),
        Datatype::Uint8 => Tensor::from_shape(&shape, &narrow::<u8>(ints()?, &spec.name)?),
        Datatype::Uint16 => Tensor::from_shape(&shape, &narrow::<u16>(ints()?, &spec.name)?),
        Datatype::Uint32 => Tensor::from_shape(&shape, &narrow::<u32>(ints()?, &spec.name)?),
        Datatype::Uint64 => Tensor::from_shape(
            &shape,
            &flat
                .iter()
                .map(|v| v.as_u64())
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(not_number)?,
        ),
        Datatype::Bool => Tensor::from_shape(
            &shape,
            &flat
                .iter()
                .map(|v| v.as_bool())
                .collect::<Option<Vec<bool>>>()
                .ok_or_else(not_number)?,
        ),
    };
    result.map_err(|e| format!("input `{}`: {e}", spec.name))
}

fn narrow<T: TryFrom<i64>>(values: Vec<i64>, name: &str) -> Result<Vec<T>, String> {
    values
        .into_iter()
        .map(|v| {
            T::try_from(v)
                .map_err(|_| format!("input `{name}` holds {v}, out of its datatype's range"))
        })
        .collect()
}

fn flatten<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        scalar => out.push(scalar),
    }
}

/// A small, fast, reproducible generator (Steele, Lea, Flood 2014); statistical
/// quality is ample for test inputs and it needs no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, limit).
    fn below(&mut self, limit: u64) -> u64 {
        self.next() % limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Values {
        fn values<T: tract_onnx::prelude::Datum + Copy>(&self) -> Vec<T>;
    }

    impl Values for Tensor {
        fn values<T: tract_onnx::prelude::Datum + Copy>(&self) -> Vec<T> {
            let view = self.to_plain_array_view::<T>().expect("plain tensor");
            view.iter().copied().collect()
        }
    }

    fn spec(name: &str, datatype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: Datatype::parse(datatype).expect("a datatype agents serve"),
            dims: shape
                .iter()
                .map(|&d| usize::try_from(d).map_or(Dim::Open(None), Dim::Fixed))
                .collect(),
        }
    }

    #[test]
    fn synthetic_inputs_are_reproducible_and_in_range() {
        let inputs = [
            spec("ids", "INT64", &[-1]),
            spec("x", "FP32", &[-1, 4]),
            spec("b", "INT32", &[8]),
            spec("image", "FP32", &[-1, 3, -1, -1]),
        ];
        let limits = HashMap::from([("ids".to_string(), 10u64)]);
        let first = synthetic(&inputs, &limits, 50);
        let again = synthetic(&inputs, &limits, 50);
        assert_eq!(first, again);
        for sample in &first {
            assert_eq!(sample[0].shape(), &[1]);
            assert_eq!(sample[1].shape(), &[1, 4]);
            assert_eq!(sample[3].shape(), &[1, 3, OPEN_DIM_SIZE, OPEN_DIM_SIZE]);
            let id = sample[0].values::<i64>()[0];
            assert!((0..10).contains(&id));
            assert!(
                sample[1]
                    .values::<f32>()
                    .iter()
                    .all(|v| (-1.0..=1.0).contains(v))
            );
            assert!(
                sample[2]
                    .values::<i32>()
                    .iter()
                    .all(|v| (0..256).contains(v))
            );
        }
        let ids: std::collections::HashSet<i64> =
            first.iter().map(|s| s[0].values::<i64>()[0]).collect();
        assert!(ids.len() > 5, "indices spread over the table: {ids:?}");
    }

    #[test]
    fn dataset_lines_become_samples_in_model_input_order() {
        let inputs = [spec("a", "FP32", &[-1, 2]), spec("b", "INT64", &[1])];
        let data = br#"# comment
{"inputs":[{"name":"b","datatype":"INT64","shape":[1],"data":[7]},{"name":"a","datatype":"FP32","shape":[2,2],"data":[[1,2],[3,4]]}]}

{"inputs":[{"name":"a","datatype":"FP32","shape":[1,2],"data":[0.5,0.25]},{"name":"b","datatype":"INT64","shape":[1],"data":[1]}]}
"#;
        let samples = from_dataset(data, &inputs, 10).expect("parses");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0][0].shape(), &[2, 2]);
        assert_eq!(samples[0][0].values::<f32>(), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(samples[0][1].values::<i64>(), [7]);
        assert_eq!(from_dataset(data, &inputs, 1).expect("parses").len(), 1);
    }

    #[test]
    fn dataset_errors_name_the_line_and_the_problem() {
        let inputs = [spec("a", "FP32", &[-1, 2])];
        let cases: [(&[u8], &str); 6] = [
            (b"{not json", "line 1: not valid JSON"),
            (br#"{"inputs":[]}"#, "input `a` is missing"),
            (
                br#"{"inputs":[{"name":"a","datatype":"INT32","shape":[1,2],"data":[1,2]}]}"#,
                "datatype INT32",
            ),
            (
                br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}"#,
                "shape [1, 3]",
            ),
            (
                br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1,2],"data":[1]}]}"#,
                "has 1 values",
            ),
            (b"\n# only a comment\n", "holds no samples"),
        ];
        for (data, expected) in cases {
            let err = from_dataset(data, &inputs, 10)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let inputs = [spec("b", "INT8", &[1])];
        let err = from_dataset(
            br#"{"inputs":[{"name":"b","datatype":"INT8","shape":[1],"data":[300]}]}"#,
            &inputs,
            1,
        )
        .expect_err("out of range");
        assert!(
            err.to_string().contains("out of its datatype's range"),
            "{err}"
        );
    }
}
