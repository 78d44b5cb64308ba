from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from recsys_moe.training.metrics import auc, task_metrics


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
