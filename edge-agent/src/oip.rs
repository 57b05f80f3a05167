//! Wire types of the Open Inference Protocol v2 REST API (the KServe / Triton
//! "predict v2" JSON): datatypes, the inference request with its tensor data
//! flattened while it is parsed, and the response and metadata bodies.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::signature::TensorSpec;

/// A tensor element type, spelled the way the protocol spells it; shared with
/// the operator, which admits only models whose tensors have one.
pub use shoal_signature::Datatype;

/// `POST /v2/models/{name}[/versions/{v}]/infer` body.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// Echoed back in the response; the protocol defines it as a string.
    #[serde(default)]
    pub id: Option<String>,
    /// Accepted and ignored: no request parameter changes how this agent infers.
    #[serde(default)]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
    pub inputs: Vec<RequestInput>,
    /// When present, only these outputs are returned, in this order.
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    /// Signed so that a negative dimension can be refused with a clear message
    /// instead of a serde error about u64.
    pub shape: Vec<i64>,
    /// Kept as the client wrote it so an unknown name can be quoted back.
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
    pub data: FlatData,
}

#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One element of a request tensor as JSON wrote it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    Bool(bool),
    /// A JSON integer that fits i64.
    Int(i64),
    /// A JSON integer above i64::MAX.
    Uint(u64),
    Float(f64),
    /// Anything else (a string, null, an object); kept so validation can say
    /// which element and what it was, naming the input.
    Other(&'static str),
}

/// The `data` of a request tensor, flat in row-major order whether the client
/// sent it flat or nested. Parsed straight into 16-byte scalars, never into a
/// `serde_json::Value` tree, so a large body costs a bounded multiple of its size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatData(pub Vec<Scalar>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        deserializer.deserialize_any(FlattenInto { out: &mut out })?;
        Ok(FlatData(out))
    }
}

/// Appends every scalar of a (possibly nested) JSON array to `out`.
struct FlattenInto<'a> {
    out: &'a mut Vec<Scalar>,
}

impl<'de> Visitor<'de> for FlattenInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers or booleans, flat or nested")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(hint) = seq.size_hint() {
            self.out.reserve(hint);
        }
        while seq
            .next_element_seed(FlattenSeed { out: self.out })?
            .is_some()
        {}
        Ok(())
    }

    // A bare scalar as `data` is a one-element tensor: clients send that for
    // shape [1] and KServe accepts it.
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out.push(Scalar::Bool(v));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.out.push(Scalar::Int(v));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.out.push(match i64::try_from(v) {
            Ok(v) => Scalar::Int(v),
            Err(_) => Scalar::Uint(v),
        });
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.out.push(Scalar::Float(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.out.push(Scalar::Other("a string"));
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.push(Scalar::Other("null"));
        Ok(())
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Drain the object so parsing can go on and report the element by index.
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        self.out.push(Scalar::Other("an object"));
        Ok(())
    }
}

struct FlattenSeed<'a> {
    out: &'a mut Vec<Scalar>,
}

impl<'de> de::DeserializeSeed<'de> for FlattenSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(FlattenInto { out: self.out })
    }
}

/// Tensor data of a response, always flat.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OutputData {
    Bool(Vec<bool>),
    Uint(Vec<u64>),
    Int(Vec<i64>),
    /// FP16 goes out as JSON numbers too; widening to f32 is exact.
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

impl OutputData {
    pub fn len(&self) -> usize {
        match self {
            OutputData::Bool(v) => v.len(),
            OutputData::Uint(v) => v.len(),
            OutputData::Int(v) => v.len(),
            OutputData::Fp32(v) => v.len(),
            OutputData::Fp64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<usize>,
    pub data: OutputData,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    /// Present when the request had one; the protocol has no null id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

/// One input or output in model metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetadataTensor {
    pub name: String,
    pub datatype: Datatype,
    /// -1 for a dimension the model leaves open.
    pub shape: Vec<i64>,
}

impl From<&TensorSpec> for MetadataTensor {
    fn from(spec: &TensorSpec) -> MetadataTensor {
        MetadataTensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape: spec.protocol_shape(),
        }
    }
}

/// `GET /v2/models/{name}[/versions/{v}]` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<MetadataTensor>,
    pub outputs: Vec<MetadataTensor>,
}

/// `GET /v2` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<&'static str>,
}

/// The body of every error answer, as KServe and Triton write it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: &str) -> Vec<Scalar> {
        serde_json::from_str::<FlatData>(json).expect("parses").0
    }

    #[test]
    fn flat_and_nested_data_flatten_alike() {
        let flat = data("[1, 2, 3, 4]");
        let nested = data("[[1, 2], [3, 4]]");
        assert_eq!(flat, nested);
        assert_eq!(
            flat,
            vec![
                Scalar::Int(1),
                Scalar::Int(2),
                Scalar::Int(3),
                Scalar::Int(4)
            ]
        );
    }

    #[test]
    fn numbers_keep_their_json_kind() {
        assert_eq!(
            data("[1.5, -2, 18446744073709551615, true]"),
            vec![
                Scalar::Float(1.5),
                Scalar::Int(-2),
                Scalar::Uint(u64::MAX),
                Scalar::Bool(true)
            ]
        );
    }

    #[test]
    fn non_numbers_are_kept_for_validation_to_name() {
        assert_eq!(
            data(r#"[[1, "x"], [null, {"a": [1]}]]"#),
            vec![
                Scalar::Int(1),
                Scalar::Other("a string"),
                Scalar::Other("null"),
                Scalar::Other("an object")
            ]
        );
    }

    #[test]
    fn bare_scalar_is_one_element() {
        assert_eq!(data("7"), vec![Scalar::Int(7)]);
    }

    #[test]
    fn request_parses_with_optional_fields() {
        let request: InferRequest = serde_json::from_str(
            r#"{"id": "42", "parameters": {"x": 1},
                "inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "data": [1, 2]}],
                "outputs": [{"name": "y"}]}"#,
        )
        .expect("parses");
        assert_eq!(request.id.as_deref(), Some("42"));
        assert_eq!(request.inputs[0].data.0.len(), 2);
        assert_eq!(request.outputs.expect("outputs")[0].name, "y");
    }

    #[test]
    fn response_writes_flat_data_and_skips_absent_id() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![ResponseOutput {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: vec![1, 2],
                data: OutputData::Fp32(vec![0.5, 1.0]),
            }],
        };
        let json = serde_json::to_string(&response).expect("serializes");
        assert_eq!(
            json,
            r#"{"model_name":"m","model_version":"1","outputs":[{"name":"y","datatype":"FP32","shape":[1,2],"data":[0.5,1.0]}]}"#
        );
    }
}
