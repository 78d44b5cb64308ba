"""Per-task metrics. Every metric is computed per task and never pooled across tasks: a pooled
AUC mixes tasks with different base rates and rewards a model for telling tasks apart."""

from __future__ import annotations

import math

import numpy as np
import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC via the Mann-Whitney U statistic, with tied scores given their average rank."""
    scores = scores.detach().double().reshape(-1)
    pos = labels.detach().reshape(-1) > 0.5
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last_rank = torch.cumsum(counts, 0).double()
    avg_rank = last_rank - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Grouped AUC (Zhou et al., DIN, 2018): the AUC within each group (e.g. one user's rows),
    averaged with each group weighted by its rows. Groups with one class only carry no ranking
    information and are left out; NaN when no group has both. What a feed ranks is one user's
    candidates against each other, which a global AUC (dominated by differences between users)
    does not measure.

    Vectorised: rows sorted by (group, score), tied scores get their average rank within the
    group, then each group's Mann-Whitney U from the rank sums of its positives."""
    s = scores.detach().double().reshape(-1).numpy()
    y = (labels.detach().reshape(-1) > 0.5).numpy()
    g = groups.detach().reshape(-1).numpy()
    n = s.shape[0]
    if n == 0:
        return math.nan
    order = np.lexsort((s, g))
    g, s, y = g[order], s[order], y[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_of = np.cumsum(new_group) - 1
    rank_in_group = np.arange(n) - np.flatnonzero(new_group)[group_of] + 1  # 1-based
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_of = np.cumsum(new_tie) - 1
    tie_start = np.flatnonzero(new_tie)
    tie_len = np.diff(np.r_[tie_start, n])
    ranks = (rank_in_group[tie_start] + (tie_len - 1) / 2)[tie_of]
    size = np.bincount(group_of).astype(np.float64)
    n_pos = np.bincount(group_of, weights=y.astype(np.float64))
    n_neg = size - n_pos
    rank_sum = np.bincount(group_of, weights=ranks * y)
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return math.nan
    u = rank_sum[both] - n_pos[both] * (n_pos[both] + 1) / 2
    aucs = u / (n_pos[both] * n_neg[both])
    return float((aucs * size[both]).sum() / size[both].sum())


def logloss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    p = probs.double().clamp(1e-7, 1 - 1e-7)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.double() - target.double()).square().mean())


def task_metrics(
    task_type: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None = None,
    selection: str = "auc",
) -> dict[str, float]:
    """`score` is the model-selection value (higher is better): for binary tasks the AUC, or the
    GAUC when `selection` asks and `groups` (one group id per row) are given; R² for regression
    (1 - MSE / variance), so tasks of different scales average fairly."""
    if task_type == "binary":
        out = {"auc": auc(scores, labels), "logloss": logloss(scores, labels)}
        if groups is not None:
            out["gauc"] = gauc(scores, labels, groups)
        if selection == "gauc" and groups is None:
            raise ValueError("selection by gauc needs group ids: set the spec's group_key")
        return {**out, "score": out[selection]}
    err = mse(scores, labels)
    var = float(labels.double().var(unbiased=False)) if labels.numel() > 1 else 0.0
    return {"mse": err, "r2": 1 - err / var if var > 0 else math.nan, "score": 1 - err / var if var > 0 else -err}
