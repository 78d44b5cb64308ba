from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recsys_moe.training.metrics import auc, gauc, task_metrics


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels * 0.7, 1)  # rounding creates ties
    ours = auc(torch.tensor(scores), torch.tensor(labels))
    assert ours == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ours == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_regression_score_is_r2() -> None:
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = task_metrics("regression", y + 0.5, y)
    assert m["mse"] == pytest.approx(0.25)
    assert m["score"] == pytest.approx(1 - 0.25 / 1.25)


def brute_force_gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Every (positive, negative) pair inside each group, ties counted half; groups weighted by rows."""
    total, weight = 0.0, 0
    for g in np.unique(groups):
        s, y = scores[groups == g], labels[groups == g]
        pos, neg = s[y > 0.5], s[y <= 0.5]
        if len(pos) == 0 or len(neg) == 0:
            continue
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        total += len(s) * wins / (len(pos) * len(neg))
        weight += len(s)
    return total / weight if weight else math.nan


@pytest.mark.parametrize("seed", range(6))
def test_gauc_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    groups = rng.integers(0, max(1, n // 8), n) * 7919 - 10**12  # sparse, negative ids: hashes look like this
    labels = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float32)
    scores = np.round(rng.random(n), 1 if seed % 2 else 6)  # many ties in odd seeds
    got = gauc(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(groups))
    want = brute_force_gauc(scores, labels, groups)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


def test_gauc_is_not_the_global_auc() -> None:
    """Two users, each ranked perfectly, but one user's scores all sit above the other's while
    their click rates are the opposite: GAUC is 1, the global AUC is not."""
    scores = torch.tensor([0.9, 0.8, 0.2, 0.1])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([1, 1, 2, 2])
    assert gauc(scores, labels, groups) == 1.0
    assert auc(scores, labels) == 0.75
    one_class = torch.tensor([1.0, 1.0, 0.0, 0.0])  # each user saw one class only: no information
    assert math.isnan(gauc(scores, one_class, groups))


def test_selection_by_gauc_needs_groups() -> None:
    scores, labels, groups = (
        torch.tensor([0.9, 0.8, 0.2, 0.1]),
        torch.tensor([1.0, 0.0, 1.0, 0.0]),
        torch.tensor([1, 1, 2, 2]),
    )
    assert task_metrics("binary", scores, labels, groups, selection="gauc")["score"] == 1.0
    assert task_metrics("binary", scores, labels, groups)["score"] == 0.75
    with pytest.raises(ValueError, match="group_key"):
        task_metrics("binary", scores, labels, selection="gauc")
