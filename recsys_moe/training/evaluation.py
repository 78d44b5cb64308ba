"""A model's per-task metrics on a dataset, with what its gates did.

Every metric is computed per task and never pooled across tasks (`metrics.task_metrics`). The
single-process `evaluate` and the sharded evaluation (`recsys_moe.distributed.train`) share the
pieces here, so both report the same numbers for the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.training.metrics import task_metrics


@dataclass
class Evaluation:
    metrics: dict[str, dict[str, float]]  # task → metric → value
    gate_means: np.ndarray | None = None  # [T, E] mean gate weight per task and expert
    gate_routed: np.ndarray | None = None  # [T, E] share of samples with a non-zero weight on the expert
    gate_entropy: np.ndarray | None = None  # [T] mean entropy of each task's gate (nats)
    scores: torch.Tensor | None = None  # [N, T] probabilities (binary) or values (regression), in row order

    @property
    def score(self) -> float:
        """The model-selection value: the mean of the per-task scores (AUC, or R² for regression)."""
        return float(np.mean([m["score"] for m in self.metrics.values()]))

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_{task}_{k}": v for task, m in self.metrics.items() for k, v in m.items() if k != "score"}
        out[f"{prefix}_mean_score"] = self.score
        return out

    def gate_metrics(self, tasks: list[str], sparse_routing: bool) -> dict[str, float]:
        """Per task: gate entropy, mean weight per expert, and (top-k) routed share per expert."""
        if self.gate_means is None or self.gate_entropy is None or self.gate_routed is None:
            return {}
        out = {}
        for t, task in enumerate(tasks):
            out[f"gate_{task}_entropy"] = float(self.gate_entropy[t])
            for e in range(self.gate_means.shape[1]):
                out[f"gate_{task}_e{e}_weight"] = float(self.gate_means[t, e])
                if sparse_routing:
                    out[f"gate_{task}_e{e}_routed"] = float(self.gate_routed[t, e])
        return out

    def collapsed_experts(self, threshold: float, sparse_routing: bool) -> list[int]:
        """Experts no task uses: every task's mean weight (top-k: routed share) is under threshold."""
        usage = self.gate_routed if sparse_routing else self.gate_means
        if usage is None:
            return []
        return [int(e) for e in np.flatnonzero(usage.max(axis=0) < threshold)]


class GateSums:
    """Sums over batches of each gate weight, of the routed indicator and of the gates' entropy,
    per task and expert (float64); `means` divides by the rows seen. A sharded evaluation
    all-reduces `totals` before dividing."""

    def __init__(self) -> None:
        self.totals: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, weights: torch.Tensor | None) -> None:
        """One batch's gate weights [B, T, E] (None for an architecture without gates)."""
        if weights is None:
            return
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)  # [B, T]
        batch = (weights.sum(0).double(), (weights > 0).sum(0).double(), entropy.sum(0).double())
        self.totals = (
            batch
            if self.totals is None
            else (self.totals[0] + batch[0], self.totals[1] + batch[1], self.totals[2] + batch[2])
        )

    def evaluation(self, metrics: dict[str, dict[str, float]], rows: int, scores: torch.Tensor) -> Evaluation:
        if self.totals is None:
            return Evaluation(metrics=metrics, scores=scores)
        means, routed, entropy = (x.cpu().numpy() / max(rows, 1) for x in self.totals)
        return Evaluation(metrics=metrics, gate_means=means, gate_routed=routed, gate_entropy=entropy, scores=scores)


def per_task_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    tasks: Sequence[str],
    task_types: Sequence[str],
    groups: torch.Tensor | None = None,
    selection: str = "auc",
) -> dict[str, dict[str, float]]:
    """scores, labels [N, T] → task → its metrics (column by column, never pooled); with `groups`
    (the spec's group_key per row) binary tasks add their GAUC."""
    return {
        task: task_metrics(kind, scores[:, i], labels[:, i], groups, selection)
        for i, (task, kind) in enumerate(zip(tasks, task_types))
    }


def evaluate(model: MultiTaskRanker, dataset: InMemoryDataset, batch_size: int, selection: str = "auc") -> Evaluation:
    """Per-task metrics on a dataset; `selection` (auc or gauc) is what `Evaluation.score`
    averages. Restores the model's train/eval mode on the way out, so a validation pass in the
    middle of training never leaves dropout switched off."""
    was_training = model.training
    model.eval()
    gates = GateSums()
    try:
        logits = []
        with torch.no_grad():
            for batch in dataset.batches(batch_size):
                out = model(batch.dense, batch.sparse)
                logits.append(out.logits)
                gates.add(out.gate_weights)
        all_logits = torch.cat(logits) if logits else torch.zeros(0, len(model.task_names))
    finally:
        model.train(was_training)
    scores = model.scores(all_logits)
    metrics = per_task_metrics(scores, dataset.labels, model.task_names, model.task_types, dataset.groups, selection)
    return gates.evaluation(metrics, len(dataset), scores)
