"""Train a small two-tower-style recommender on MovieLens-100k and export it to ONNX.

numpy only, manual gradients, fixed seed: the same inputs give a byte-identical
recommender.onnx (run with one BLAS thread; build.sh sets that).

Model, for a batch of user indices:
    u      = user_embedding[user_id]                              [N, 128]
    h      = relu(u @ user_tower_1_weight + user_tower_1_bias)     [N, 128]
    z      = h @ user_tower_2_weight + user_tower_2_bias           [N, 128]
    scores = z @ item_embedding_t + item_bias                      [N, 1682]
Loss: softmax over all items, the training items of each user are the targets
(multinomial log-likelihood, as in Mult-VAE), plus L2; optimiser Adam.

Usage: train.py --data-dir DIR --out-dir OUT
writes OUT/recommender.onnx, OUT/validation.jsonl and OUT/quality.json.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import movielens
from evaluate import onnx_scores

SEED = 20261201
DIM = 128
EPOCHS = 250
BATCH_USERS = 64
LEARNING_RATE = 2e-3
L2 = 2e-4
VALIDATION_USERS = 64
OPSET = 13
IR_VERSION = 8


def init_params(rng):
    """Initial weights: small Gaussians, He-scaled tower, zero biases."""
    return {
        "user_embedding": rng.normal(0, 0.1, (movielens.N_USERS, DIM)),
        "user_tower_1_weight": rng.normal(0, np.sqrt(2.0 / DIM), (DIM, DIM)),
        "user_tower_1_bias": np.zeros(DIM),
        "user_tower_2_weight": rng.normal(0, np.sqrt(1.0 / DIM), (DIM, DIM)),
        "user_tower_2_bias": np.zeros(DIM),
        "item_embedding_t": rng.normal(0, 0.1, (DIM, movielens.N_ITEMS)),
        "item_bias": np.zeros(movielens.N_ITEMS),
    }


def forward(params, user_ids):
    """Scores for a batch of users, plus the intermediates backward() needs."""
    u = params["user_embedding"][user_ids]
    a = u @ params["user_tower_1_weight"] + params["user_tower_1_bias"]
    h = np.maximum(a, 0.0)
    z = h @ params["user_tower_2_weight"] + params["user_tower_2_bias"]
    scores = z @ params["item_embedding_t"] + params["item_bias"]
    return scores, (u, a, h, z)


def loss_and_grads(params, user_ids, targets):
    """Multinomial log-likelihood over all items (mean per positive) + L2, with gradients.

    targets: [B, N_ITEMS] 0/1 matrix of the batch users' training items.
    Gradients of the user embedding are returned only for the batch rows.
    """
    scores, (u, a, h, z) = forward(params, user_ids)
    scores = scores - scores.max(axis=1, keepdims=True)
    log_softmax = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    n_pos = targets.sum()
    loss = -(targets * log_softmax).sum() / n_pos
    d_scores = (np.exp(log_softmax) * targets.sum(axis=1, keepdims=True) - targets) / n_pos

    grads = {"item_embedding_t": z.T @ d_scores, "item_bias": d_scores.sum(axis=0)}
    d_z = d_scores @ params["item_embedding_t"].T
    grads["user_tower_2_weight"] = h.T @ d_z
    grads["user_tower_2_bias"] = d_z.sum(axis=0)
    d_a = (d_z @ params["user_tower_2_weight"].T) * (a > 0)
    grads["user_tower_1_weight"] = u.T @ d_a
    grads["user_tower_1_bias"] = d_a.sum(axis=0)
    grads["user_embedding"] = d_a @ params["user_tower_1_weight"].T

    for name in ("user_tower_1_weight", "user_tower_2_weight", "item_embedding_t"):
        loss += L2 * (params[name] ** 2).sum()
        grads[name] += 2 * L2 * params[name]
    loss += L2 * (u ** 2).sum()
    grads["user_embedding"] += 2 * L2 * u
    return loss, grads


class Adam:
    """Plain Adam; sparse rows (user embedding) are updated only where given."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, user_ids):
        """Apply one update; grads['user_embedding'] holds only rows user_ids."""
        self.t += 1
        correction = np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        for name, grad in grads.items():
            rows = user_ids if name == "user_embedding" else slice(None)
            m = self.m[name][rows] = self.beta1 * self.m[name][rows] + (1 - self.beta1) * grad
            v = self.v[name][rows] = self.beta2 * self.v[name][rows] + (1 - self.beta2) * grad ** 2
            params[name][rows] -= self.lr * correction * m / (np.sqrt(v) + self.eps)


def train(train_matrix, rng):
    """Mini-batch Adam over shuffled users; returns the trained float32 parameters."""
    params = init_params(rng)
    optimiser = Adam(params, LEARNING_RATE)
    for epoch in range(1, EPOCHS + 1):
        order = rng.permutation(movielens.N_USERS)
        total = 0.0
        for start in range(0, len(order), BATCH_USERS):
            user_ids = np.sort(order[start:start + BATCH_USERS])
            loss, grads = loss_and_grads(params, user_ids, train_matrix[user_ids])
            optimiser.step(params, grads, user_ids)
            total += loss * len(user_ids)
        if epoch == 1 or epoch % 25 == 0:
            print(f"epoch {epoch:3d}/{EPOCHS}  loss {total / len(order):.4f}", file=sys.stderr)
    return {name: value.astype(np.float32) for name, value in params.items()}


def build_onnx(params, metadata):
    """The ONNX graph: Gather -> MatMul/Add/Relu -> MatMul/Add -> MatMul/Add."""
    nodes = [
        helper.make_node("Gather", ["user_embedding", "user_id"], ["user_vector"],
                         name="user_embedding_lookup", axis=0),
        helper.make_node("MatMul", ["user_vector", "user_tower_1_weight"], ["user_tower_1_matmul"],
                         name="user_tower_1_matmul"),
        helper.make_node("Add", ["user_tower_1_matmul", "user_tower_1_bias"], ["user_tower_1_preact"],
                         name="user_tower_1_add"),
        helper.make_node("Relu", ["user_tower_1_preact"], ["user_tower_1_out"], name="user_tower_1_relu"),
        helper.make_node("MatMul", ["user_tower_1_out", "user_tower_2_weight"], ["user_tower_2_matmul"],
                         name="user_tower_2_matmul"),
        helper.make_node("Add", ["user_tower_2_matmul", "user_tower_2_bias"], ["user_representation"],
                         name="user_tower_2_add"),
        helper.make_node("MatMul", ["user_representation", "item_embedding_t"], ["item_logits"],
                         name="item_scores_matmul"),
        helper.make_node("Add", ["item_logits", "item_bias"], ["scores"], name="item_bias_add"),
    ]
    initializers = [numpy_helper.from_array(params[name], name=name) for name in (
        "user_embedding", "user_tower_1_weight", "user_tower_1_bias", "user_tower_2_weight",
        "user_tower_2_bias", "item_embedding_t", "item_bias")]
    graph = helper.make_graph(
        nodes, "shoal_recommender",
        inputs=[helper.make_tensor_value_info("user_id", TensorProto.INT64, ["batch"])],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", movielens.N_ITEMS])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="shoal-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=(
            "MovieLens-100k product recommender. Input user_id: int64 [batch], dense user index "
            "= raw MovieLens user id - 1 (0..942). Output scores: float [batch, 1682], one score "
            "per item (item index = raw MovieLens item id - 1); higher = recommend. Items the user "
            "already interacted with are not masked by the model."
        ),
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def validation_requests(test_items):
    """64 OIP v2 request bodies, one per held-out user, users evenly spread over the index range."""
    users = np.arange(VALIDATION_USERS) * movielens.N_USERS // VALIDATION_USERS
    assert (test_items[users] >= 0).all()
    return [json.dumps({"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1],
                                    "data": [int(user)]}]}, separators=(",", ":"))
            for user in users]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory holding the recbole 1.2.1 wheel")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=SEED,
                        help="random seed (a second version of the model is the same training "
                             "with another seed)")
    args = parser.parse_args()

    started = time.monotonic()
    train_users, train_items, test_items = movielens.load_split(args.data_dir)
    matrix = movielens.train_matrix(train_users, train_items)
    print(f"MovieLens-100k: {movielens.N_USERS} users, {movielens.N_ITEMS} items, "
          f"{len(train_users)} training interactions, {len(test_items)} held out", file=sys.stderr)

    params = train(matrix, np.random.default_rng(args.seed))
    metadata = {
        "dataset": "MovieLens-100k (ml-100k.inter from the recbole 1.2.1 wheel on PyPI)",
        "seed": str(args.seed),
        "training_split": movielens.SPLIT_DESCRIPTION,
        "user_id_mapping": "user index = raw MovieLens user id - 1 (0..942)",
        "item_index_mapping": "item index = raw MovieLens item id - 1 (0..1681)",
    }
    model = build_onnx(params, metadata)
    os.makedirs(args.out_dir, exist_ok=True)
    model_path = os.path.join(args.out_dir, "recommender.onnx")
    onnx.save(model, model_path)

    with open(os.path.join(args.out_dir, "validation.jsonl"), "w") as out:
        out.write("\n".join(validation_requests(test_items)) + "\n")

    numpy_scores, _ = forward(params, np.arange(movielens.N_USERS))
    runtime_scores = onnx_scores(model_path)
    max_diff = float(np.abs(runtime_scores - numpy_scores).max())
    if max_diff > 1e-3:
        raise SystemExit(f"onnxruntime disagrees with numpy: max |diff| = {max_diff}")
    quality = {
        "dataset": metadata["dataset"],
        "split": movielens.SPLIT_DESCRIPTION,
        "users": movielens.N_USERS,
        "items": movielens.N_ITEMS,
        "fp32": {"bytes": os.path.getsize(model_path),
                 **movielens.rank_metrics(runtime_scores, matrix, test_items)},
        "popularity_baseline": movielens.rank_metrics(
            movielens.popularity_scores(train_users, train_items), matrix, test_items),
    }
    with open(os.path.join(args.out_dir, "quality.json"), "w") as out:
        json.dump(quality, out, indent=2)
        out.write("\n")
    print(f"fp32 {quality['fp32']}  popularity {quality['popularity_baseline']}  "
          f"in {time.monotonic() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
