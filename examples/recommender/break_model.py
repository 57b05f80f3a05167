"""Writes a deliberately broken copy of the recommender, for rollout demos and tests.

The copy keeps the signature and loads and warms up fine, but its user embedding
table holds only the first 16 users: a request for any other user makes the runtime
fail (an out-of-range Gather), so an agent answers most real traffic with 500.
It stands for a bad export that passes every static check and fails in production,
which is what a canary with metric analysis is for.

Usage: break_model.py IN.onnx OUT.onnx
"""

import sys

import onnx
from onnx import numpy_helper

KEPT_USERS = 16


def main():
    source, target = sys.argv[1:3]
    model = onnx.load(source)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "user_embedding":
            rows = numpy_helper.to_array(tensor)[:KEPT_USERS]
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(rows, tensor.name))
            break
    else:
        raise SystemExit(f"{source} has no user_embedding initializer")
    model.doc_string = (model.doc_string + "\n\nBROKEN ON PURPOSE: only the first "
                        f"{KEPT_USERS} users have embeddings (see break_model.py).")
    onnx.save(model, target)


if __name__ == "__main__":
    main()
