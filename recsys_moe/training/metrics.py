"""Per-task metrics. Every metric is computed per task and never pooled across tasks: a pooled
AUC mixes tasks with different base rates and rewards a model for telling tasks apart."""

from __future__ import annotations

import math

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


def logloss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    p = probs.double().clamp(1e-7, 1 - 1e-7)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.double() - target.double()).square().mean())


def task_metrics(task_type: str, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """`score` is the model-selection value (higher is better): AUC for binary tasks, R² for
    regression (1 - MSE / variance), so tasks of different scales average fairly."""
    if task_type == "binary":
        a = auc(scores, labels)
        return {"auc": a, "logloss": logloss(scores, labels), "score": a}
    err = mse(scores, labels)
    var = float(labels.double().var(unbiased=False)) if labels.numel() > 1 else 0.0
    return {"mse": err, "r2": 1 - err / var if var > 0 else math.nan, "score": 1 - err / var if var > 0 else -err}
