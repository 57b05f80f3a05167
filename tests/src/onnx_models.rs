//! ONNX models written byte by byte (a hand-written protobuf encoder): the tiny
//! linear scorer of the ConfigMap and fleet tests, its scaled and padded versions, and
//! the pieces other tests build their own models from.

/// A tiny ONNX model written byte by byte (protobuf), for the ConfigMap tests: a
/// ConfigMap holds at most 1 MiB, less than the real models we test with. It is a
/// linear scorer: `tokens` int32 [batch, 4] → Cast to float → MatMul with a 4×3
/// weight → `scores` float [batch, 3], opset 13.
pub fn tiny_onnx_model() -> Vec<u8> {
    tiny_onnx_model_scaled(1.0)
}

/// [`tiny_onnx_model`] with every weight multiplied by `scale`: another version of
/// the same signature whose bytes and outputs differ. Row-major weight `[k][j]` is
/// `scale * (3k + j) / 10`, so tokens `[1, 2, 3, 4]` score `scale * [6, 7, 8]`.
pub fn tiny_onnx_model_scaled(scale: f32) -> Vec<u8> {
    const FLOAT: u64 = 1;
    // Cast(to = FLOAT): AttributeProto {name: 1, i: 3, type: 20 (INT = 2)}.
    let to_float = message(&[
        bytes_field(1, b"to"),
        varint_field(3, FLOAT),
        varint_field(20, 2),
    ]);
    let cast = message(&[
        bytes_field(1, b"tokens"),
        bytes_field(2, b"tokens_f"),
        bytes_field(3, b"cast"),
        bytes_field(4, b"Cast"),
        bytes_field(5, &to_float),
    ]);
    let matmul = message(&[
        bytes_field(1, b"tokens_f"),
        bytes_field(1, b"weight"),
        bytes_field(2, b"scores"),
        bytes_field(3, b"score"),
        bytes_field(4, b"MatMul"),
    ]);
    let weights: Vec<f32> = (0..12u8).map(|i| scale * f32::from(i) / 10.0).collect();
    let weight = float_tensor("weight", &[4, 3], &weights);
    scorer_onnx_model("tiny-scorer", &[cast, matmul], &weight)
}

/// [`tiny_onnx_model_scaled`] with an unused float initializer `padding` of about
/// `padding_bytes` bytes added to its graph: the same signature and outputs in a
/// bigger artifact, for tests that need a download or a load to take a while.
/// (Protobuf merges an embedded message field that appears twice, so the graph
/// appended here adds its initializer to the model's graph.)
pub fn tiny_onnx_model_padded(scale: f32, padding_bytes: usize) -> Vec<u8> {
    let floats = padding_bytes / 4;
    let values: Vec<f32> = (0..floats).map(|i| (i % 251) as f32).collect();
    let padding = float_tensor("padding", &[floats as u64], &values);
    let mut model = tiny_onnx_model_scaled(scale);
    // ModelProto.graph (7) → GraphProto.initializer (5).
    model.extend(bytes_field(7, &message(&[bytes_field(5, &padding)])));
    model
}

/// An ONNX model (IR version 8, opset 13) with the signature of the tests' scorers,
/// input `tokens` int32 [batch, 4] and output `scores` float [batch, 3], whose graph
/// `graph_name` is made of `nodes` (encoded NodeProtos, in order) and `initializer`
/// (an encoded TensorProto).
pub fn scorer_onnx_model(graph_name: &str, nodes: &[Vec<u8>], initializer: &[u8]) -> Vec<u8> {
    const FLOAT: u64 = 1;
    const INT32: u64 = 6;
    let dim_param = |name: &str| message(&[bytes_field(2, name.as_bytes())]);
    let dim_value = |value: u64| message(&[varint_field(1, value)]);
    let value_info = |name: &str, elem_type: u64, dims: &[Vec<u8>]| {
        let shape: Vec<Vec<u8>> = dims.iter().map(|dim| bytes_field(1, dim)).collect();
        let tensor_type = message(&[varint_field(1, elem_type), bytes_field(2, &message(&shape))]);
        let type_proto = message(&[bytes_field(1, &tensor_type)]);
        message(&[bytes_field(1, name.as_bytes()), bytes_field(2, &type_proto)])
    };
    // GraphProto {node: 1, name: 2, initializer: 5, input: 11, output: 12}.
    let mut graph: Vec<Vec<u8>> = nodes.iter().map(|node| bytes_field(1, node)).collect();
    graph.push(bytes_field(2, graph_name.as_bytes()));
    graph.push(bytes_field(5, initializer));
    graph.push(bytes_field(
        11,
        &value_info("tokens", INT32, &[dim_param("batch"), dim_value(4)]),
    ));
    graph.push(bytes_field(
        12,
        &value_info("scores", FLOAT, &[dim_param("batch"), dim_value(3)]),
    ));
    // ModelProto {ir_version: 1, producer_name: 2, graph: 7, opset_import: 8 {version: 2}}.
    message(&[
        varint_field(1, 8),
        bytes_field(2, b"shoal-tests"),
        bytes_field(7, &message(&graph)),
        bytes_field(8, &message(&[varint_field(2, 13)])),
    ])
}

/// An encoded TensorProto of floats: `name`, shape `dims` and `values` (as
/// little-endian raw data), for a graph's initializers.
pub fn float_tensor(name: &str, dims: &[u64], values: &[f32]) -> Vec<u8> {
    const FLOAT: u64 = 1;
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    // TensorProto {dims: 1, data_type: 2, name: 8, raw_data: 9}.
    let mut fields: Vec<Vec<u8>> = dims.iter().map(|&dim| varint_field(1, dim)).collect();
    fields.push(varint_field(2, FLOAT));
    fields.push(bytes_field(8, name.as_bytes()));
    fields.push(bytes_field(9, &raw));
    message(&fields)
}

/// A tiny ONNX model whose input is a string tensor, which no agent can serve:
/// `text` string [1] → Identity → `text_out` string [1], opset 13. tract loads and
/// optimizes it, so only the datatype rule refuses it.
pub fn string_input_onnx_model() -> Vec<u8> {
    const STRING: u64 = 8;
    let dim_value = |value: u64| message(&[varint_field(1, value)]);
    let value_info = |name: &str| {
        let shape = message(&[bytes_field(1, &dim_value(1))]);
        let tensor_type = message(&[varint_field(1, STRING), bytes_field(2, &shape)]);
        let type_proto = message(&[bytes_field(1, &tensor_type)]);
        message(&[bytes_field(1, name.as_bytes()), bytes_field(2, &type_proto)])
    };
    // NodeProto {input: 1, output: 2, name: 3, op_type: 4}.
    let identity = message(&[
        bytes_field(1, b"text"),
        bytes_field(2, b"text_out"),
        bytes_field(3, b"identity"),
        bytes_field(4, b"Identity"),
    ]);
    // GraphProto {node: 1, name: 2, input: 11, output: 12}.
    let graph = message(&[
        bytes_field(1, &identity),
        bytes_field(2, b"string-echo"),
        bytes_field(11, &value_info("text")),
        bytes_field(12, &value_info("text_out")),
    ]);
    // ModelProto {ir_version: 1, producer_name: 2, graph: 7, opset_import: 8 {version: 2}}.
    message(&[
        varint_field(1, 8),
        bytes_field(2, b"shoal-tests"),
        bytes_field(7, &graph),
        bytes_field(8, &message(&[varint_field(2, 13)])),
    ])
}

/// Protobuf encoding by hand, for test ONNX models: a message is its fields concatenated.
pub fn message(fields: &[Vec<u8>]) -> Vec<u8> {
    fields.concat()
}

/// A varint field (wire type 0).
pub fn varint_field(number: u64, value: u64) -> Vec<u8> {
    let mut out = varint(number << 3);
    out.extend(varint(value));
    out
}

/// A length-delimited field (wire type 2): bytes, strings, nested messages.
pub fn bytes_field(number: u64, value: &[u8]) -> Vec<u8> {
    let mut out = varint((number << 3) | 2);
    out.extend(varint(value.len() as u64));
    out.extend_from_slice(value);
    out
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_models::sha256_hex;

    // The tests' expectations (scores, digests in status) rest on these bytes; a change
    // of the encoder that changes them should be on purpose.
    #[test]
    fn the_tiny_models_keep_their_bytes() {
        assert_eq!(
            sha256_hex(&tiny_onnx_model()),
            "317140eb874575623a502c95bd56aa629bd444b9bd2745e8ce0fdcaaeb82dca8"
        );
        assert_eq!(
            sha256_hex(&tiny_onnx_model_padded(2.0, 100_000)),
            "5d08d4105fd4e55603610d579b802de5395e82b4573609f84ebaeeb949459a9e"
        );
    }
}
