//! Hand-built ONNX models for the unit tests, encoded with prost.

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension;

use crate::tensor::TensorSpec;

pub enum Dim {
    Fixed(i64),
    Named(&'static str),
    Unnamed,
}

pub fn value_info(name: &str, elem_type: DataType, dims: &[Dim]) -> pb::ValueInfoProto {
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

/// A graph input or output that declares nothing but its name.
pub fn untyped(name: &str) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.to_string(),
        ..Default::default()
    }
}

pub fn node(op_type: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op_type.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        ..Default::default()
    }
}

pub fn model(graph: pb::GraphProto) -> Vec<u8> {
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
pub fn add_bias_model(x_dims: &[Dim]) -> Vec<u8> {
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
        output: vec![untyped("y")],
        ..Default::default()
    })
}

/// text: string[1] → Identity → text_out (declared string[1], or untyped).
/// tract loads and optimizes it; only the datatype rule refuses it.
pub fn string_input_model(declare_output: bool) -> Vec<u8> {
    let output = if declare_output {
        value_info("text_out", DataType::String, &[Dim::Fixed(1)])
    } else {
        untyped("text_out")
    };
    model(pb::GraphProto {
        name: "string_echo".to_string(),
        node: vec![node("Identity", &["text"], "text_out")],
        input: vec![value_info("text", DataType::String, &[Dim::Fixed(1)])],
        output: vec![output],
        ..Default::default()
    })
}

/// A spec as the protocol describes it: name, datatype name, shape with -1 for
/// open dimensions.
pub fn described(specs: &[TensorSpec]) -> Vec<(String, &'static str, Vec<i64>)> {
    specs
        .iter()
        .map(|spec| {
            (
                spec.name.clone(),
                spec.datatype.as_str(),
                spec.protocol_shape(),
            )
        })
        .collect()
}

pub fn tensor(
    name: &str,
    datatype: &'static str,
    shape: &[i64],
) -> (String, &'static str, Vec<i64>) {
    (name.to_string(), datatype, shape.to_vec())
}
