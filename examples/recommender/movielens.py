"""MovieLens-100k loading, the leave-one-out split and the ranking metrics.

Shared by train.py and evaluate.py so that both see exactly the same split.

The data is the `ml-100k.inter` file that the recbole 1.2.1 wheel on PyPI ships
(`recbole/dataset_example/ml-100k/ml-100k.inter`, tab separated, header
`user_id:token item_id:token rating:float timestamp:float`). It is read straight
out of the wheel zip: recbole itself is never imported.

Index mapping: raw MovieLens user ids are 1..943 and item ids 1..1682, both
contiguous (checked on load), so user index = raw user id - 1 and item index =
raw item id - 1.
"""

import glob
import os
import zipfile

import numpy as np

WHEEL_PATTERN = "recbole-1.2.1-*.whl"
INTER_PATH = "recbole/dataset_example/ml-100k/ml-100k.inter"
N_USERS = 943
N_ITEMS = 1682
TOP_K = 10
SPLIT_DESCRIPTION = (
    "leave-one-out: each user's latest interaction (by timestamp, ties broken by "
    "the larger item id) is the test item; all other interactions are training "
    "positives (implicit feedback, every rating counts)"
)


def find_wheel(data_dir):
    """Return the path of the recbole 1.2.1 wheel inside data_dir."""
    matches = sorted(glob.glob(os.path.join(data_dir, WHEEL_PATTERN)))
    if not matches:
        raise FileNotFoundError(f"no {WHEEL_PATTERN} in {data_dir}")
    return matches[0]


def load_interactions(data_dir):
    """Read ml-100k.inter from the wheel; return (users, items, timestamps).

    users and items are 0-based int64 indices (raw id - 1), timestamps int64.
    """
    with zipfile.ZipFile(find_wheel(data_dir)) as wheel:
        lines = wheel.read(INTER_PATH).decode("utf-8").splitlines()
    header = lines[0].split("\t")
    if header[:4] != ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]:
        raise ValueError(f"unexpected header in {INTER_PATH}: {header}")
    rows = np.array([line.split("\t")[:4] for line in lines[1:] if line], dtype=np.float64)
    users = rows[:, 0].astype(np.int64) - 1
    items = rows[:, 1].astype(np.int64) - 1
    timestamps = rows[:, 3].astype(np.int64)
    check_contiguous(users, N_USERS, "user")
    check_contiguous(items, N_ITEMS, "item")
    return users, items, timestamps


def check_contiguous(indices, expected, what):
    """Fail unless indices cover exactly 0..expected-1."""
    unique = np.unique(indices)
    if len(unique) != expected or unique[0] != 0 or unique[-1] != expected - 1:
        raise ValueError(f"{what} ids are not the contiguous range 1..{expected}")


def leave_one_out(users, items, timestamps):
    """Split into training pairs and one test item per user.

    Returns (train_users, train_items, test_items) where test_items[u] is the
    held-out item of user u: the latest interaction by timestamp, ties broken
    by the larger item id so the split is fully deterministic.
    """
    order = np.lexsort((items, timestamps, users))  # by user, then time, then item
    users, items = users[order], items[order]
    is_last = np.append(users[1:] != users[:-1], True)
    test_items = np.full(N_USERS, -1, dtype=np.int64)
    test_items[users[is_last]] = items[is_last]
    return users[~is_last], items[~is_last], test_items


def load_split(data_dir):
    """load_interactions + leave_one_out in one call."""
    return leave_one_out(*load_interactions(data_dir))


def train_matrix(train_users, train_items):
    """Dense [N_USERS, N_ITEMS] float32 matrix, 1 where a training interaction exists."""
    matrix = np.zeros((N_USERS, N_ITEMS), dtype=np.float32)
    matrix[train_users, train_items] = 1.0
    return matrix


def rank_metrics(scores, train_mask, test_items):
    """Hit-rate@10 and NDCG@10 of the held-out items.

    scores: [N_USERS, N_ITEMS]; items the user interacted with in training are
    excluded from the ranking. The rank of the test item is the number of
    remaining items with a strictly higher score (0 = first).
    """
    scores = np.where(train_mask > 0, -np.inf, scores.astype(np.float64))
    rows = np.arange(len(test_items))
    target = scores[rows, test_items]
    ranks = (scores > target[:, None]).sum(axis=1)
    hits = ranks < TOP_K
    ndcg = np.where(hits, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {"hit_rate_at_10": round(float(hits.mean()), 4),
            "ndcg_at_10": round(float(ndcg.mean()), 4)}


def popularity_scores(train_users, train_items):
    """Baseline: every user gets the same scores, the training count of each item."""
    counts = np.bincount(train_items, minlength=N_ITEMS).astype(np.float32)
    return np.tile(counts, (N_USERS, 1))
