"""Offline quality of recommender ONNX files with onnxruntime.

Usage: evaluate.py --data-dir DIR MODEL.onnx [MODEL2.onnx ...]

DIR holds the recbole 1.2.1 wheel (the MovieLens-100k source). For every model
prints one JSON line: {"model", "bytes", "hit_rate_at_10", "ndcg_at_10", "users"},
on the leave-one-out split of movielens.py, ranking all items the user did not
interact with in training. Works for any model with the same contract (input
`user_id` int64 [batch], output `scores` float [batch, 1682]), e.g. fp16 or
int8 variants of recommender.onnx: no initializer names are assumed.
"""

import argparse
import json
import os

import numpy as np
import onnxruntime

import movielens


def onnx_scores(model_path):
    """Scores [N_USERS, N_ITEMS] for every user, computed by onnxruntime on CPU."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    user_ids = np.arange(movielens.N_USERS, dtype=np.int64)
    (scores,) = session.run(["scores"], {"user_id": user_ids})
    return np.asarray(scores, dtype=np.float32)


def evaluate(model_path, train_mask, test_items):
    """Quality record of one model file."""
    return {
        "model": model_path,
        "bytes": os.path.getsize(model_path),
        **movielens.rank_metrics(onnx_scores(model_path), train_mask, test_items),
        "users": movielens.N_USERS,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory holding the recbole 1.2.1 wheel")
    parser.add_argument("models", nargs="+", metavar="MODEL.onnx")
    args = parser.parse_args()

    train_users, train_items, test_items = movielens.load_split(args.data_dir)
    train_mask = movielens.train_matrix(train_users, train_items)
    for model_path in args.models:
        print(json.dumps(evaluate(model_path, train_mask, test_items)), flush=True)


if __name__ == "__main__":
    main()
