#!/usr/bin/env python3
"""Outputs of onnxruntime for the compression tests (operator/tests/compression.rs).

Usage: ort_outputs.py MODEL.onnx INPUTS.json
INPUTS.json: {"NAME": {"datatype": "INT32", "shape": [1, 2048], "data": [...flat...]}, ...}
Prints:      {"outputs": [{"name": ..., "shape": [...], "data": [...flat...]}, ...]}
             with the outputs in the model's output order.
Loading the model is itself part of the check: onnxruntime refuses a graph that is
not valid ONNX (a node with an unknown input, a DequantizeLinear with a bad axis).
Runs single-threaded on the CPU with graph optimizations off, so that what is
measured is the model as written, not onnxruntime's fused rewrite of it.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def main():
    model_path, inputs_path = sys.argv[1], sys.argv[2]
    with open(inputs_path) as f:
        spec = json.load(f)
    feeds = {
        name: np.array(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
        for name, t in spec.items()
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    out = [
        {
            "name": name,
            "shape": list(value.shape),
            "data": value.astype(np.float64).reshape(-1).tolist(),
        }
        for name, value in zip(names, results)
    ]
    json.dump({"outputs": out}, sys.stdout)


if __name__ == "__main__":
    main()
