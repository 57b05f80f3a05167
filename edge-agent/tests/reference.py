#!/usr/bin/env python3
"""Reference outputs from onnxruntime for the agent's model tests.

Usage: reference.py MODEL.onnx INPUTS.json
INPUTS.json: {"NAME": {"datatype": "INT32", "shape": [2, 2048], "data": [...flat...]}, ...}
Prints:      {"NAME": {"shape": [...], "data": [...flat...]}, ...} for every output.
Runs single-threaded on the CPU, the way the agent runs one request.
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
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    out = {
        name: {"shape": list(value.shape), "data": value.reshape(-1).tolist()}
        for name, value in zip(names, results)
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
