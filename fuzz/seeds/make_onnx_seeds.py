import numpy as np, onnx, sys
from onnx import helper, TensorProto, numpy_helper
out = sys.argv[1]
def save(name, graph, opset=13):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="shoal-fuzz-seed")
    m.ir_version = 8
    onnx.checker.check_model(m)
    open(f"{out}/{name}.onnx", "wb").write(m.SerializeToString())
rng = np.random.default_rng(7)
# tiny scorer: tokens int32 [batch,4] -> Cast -> MatMul W[4,3] -> scores [batch,3]
W = (np.arange(12, dtype=np.float32) / 10).reshape(4, 3)
g = helper.make_graph(
    [helper.make_node("Cast", ["tokens"], ["tokens_f"], to=TensorProto.FLOAT),
     helper.make_node("MatMul", ["tokens_f", "weight"], ["scores"])],
    "tiny-scorer",
    [helper.make_tensor_value_info("tokens", TensorProto.INT32, ["batch", 4])],
    [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
    [numpy_helper.from_array(W, "weight")])
save("tiny_scorer", g)
# embedding: user_id int64 [batch] -> Gather(table[20,8]) -> MatMul [8,5] + bias -> Softmax
T = rng.standard_normal((20, 8)).astype(np.float32)
P = rng.standard_normal((8, 5)).astype(np.float32)
B = rng.standard_normal((5,)).astype(np.float32)
g = helper.make_graph(
    [helper.make_node("Gather", ["table", "user_id"], ["emb"], axis=0),
     helper.make_node("MatMul", ["emb", "proj"], ["logits0"]),
     helper.make_node("Add", ["logits0", "bias"], ["logits"]),
     helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
    "embedding",
    [helper.make_tensor_value_info("user_id", TensorProto.INT64, ["batch"])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5])],
    [numpy_helper.from_array(T, "table"), numpy_helper.from_array(P, "proj"), numpy_helper.from_array(B, "bias")])
save("embedding", g)
# conv: x float [1,2,8,8] -> Conv(W[4,2,3,3], b) -> Relu -> GlobalAveragePool -> Flatten -> Gemm [4,3]
CW = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
CB = rng.standard_normal((4,)).astype(np.float32)
GW = rng.standard_normal((4, 3)).astype(np.float32)
g = helper.make_graph(
    [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
     helper.make_node("Relu", ["c"], ["r"]),
     helper.make_node("GlobalAveragePool", ["r"], ["p"]),
     helper.make_node("Flatten", ["p"], ["f"]),
     helper.make_node("Gemm", ["f", "gw"], ["y"])],
    "conv",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    [numpy_helper.from_array(CW, "cw"), numpy_helper.from_array(CB, "cb"), numpy_helper.from_array(GW, "gw")])
save("conv", g)
# two inputs, fp16 weights and an fp64 input path
H = rng.standard_normal((3, 2)).astype(np.float16)
g = helper.make_graph(
    [helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16),
     helper.make_node("MatMul", ["a16", "h"], ["m"]),
     helper.make_node("Cast", ["m"], ["m32"], to=TensorProto.FLOAT),
     helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.FLOAT),
     helper.make_node("Add", ["m32", "b32"], ["out"])],
    "two-inputs",
    [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
     helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["n", 2])],
    [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 2])],
    [numpy_helper.from_array(H, "h")])
save("two_inputs", g)
