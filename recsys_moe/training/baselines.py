"""The two cheapest honest baselines, fitted in every training run on the same split as the model.

A multi-task MoE that does not beat a per-item click rate or a logistic regression on the same
features is not earning its keep, and a user should see that on the run's page, not find it out
in an A/B test. Both baselines are cheap (seconds at census scale) and use only the training
split; both are judged on the same validation and test rows with the same metrics as the model.

- `key_mean`: each task's smoothed mean label per id of one categorical feature (e.g. item
  popularity), `(sum + m * global mean) / (count + m)`; the feature is the one with the best
  validation score, ids unseen in training get the global mean.
- `linear`: one weight per embedding row and per dense input for each task (logistic for binary
  tasks, least squares for regression): the "wide" part of Wide & Deep, trained with Adagrad.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recsys_moe.data.loader import Batch, InMemoryDataset
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.evaluation import per_task_metrics
from recsys_moe.training.losses import per_task_losses

SMOOTHING = 20.0  # key_mean: prior strength in rows; an id seen 20 times is half its own mean
LINEAR_EPOCHS = 2
LINEAR_LR = 0.05
EVAL_BATCH = 8192


@dataclass
class Baseline:
    name: str  # key_mean | linear
    detail: str  # what it was fitted on, for people
    valid: dict[str, dict[str, float]]  # task → metric → value, as the model's Evaluation.metrics
    test: dict[str, dict[str, float]]

    def flat(self) -> dict[str, float]:
        """MLflow metric keys: `baseline_<name>_<split>_<task>_<metric>`."""
        return {
            f"baseline_{self.name}_{split}_{task}_{k}": v
            for split, metrics in (("valid", self.valid), ("test", self.test))
            for task, m in metrics.items()
            for k, v in m.items()
            if k != "score"
        }


def fit_baselines(
    manifest: Manifest,
    data: dict[str, InMemoryDataset],
    tasks: Sequence[str],
    task_types: Sequence[str],
    selection: str = "auc",
    seed: int = 0,
) -> list[Baseline]:
    """Both baselines on `data`'s train split, judged on its valid and test splits."""
    out = []
    mean = key_mean(data, tasks, task_types, selection)
    if mean is not None:
        out.append(mean)
    out.append(linear(manifest, data, tasks, task_types, selection, seed))
    return out


def _metrics(
    data: InMemoryDataset, scores: torch.Tensor, tasks: Sequence[str], task_types: Sequence[str], selection: str
) -> dict[str, dict[str, float]]:
    return per_task_metrics(scores, data.labels, tasks, task_types, data.groups, selection)


def key_mean(
    data: dict[str, InMemoryDataset], tasks: Sequence[str], task_types: Sequence[str], selection: str
) -> Baseline | None:
    """The smoothed per-id mean of the single-id categorical feature that validates best; None
    when the spec has no such feature."""
    train, valid = data["train"], data["valid"]
    if not train.single_rows or len(train) == 0:
        return None
    labels = train.labels.double().numpy()
    prior = labels.mean(axis=0)  # [T]
    best: tuple[float, str, np.ndarray] | None = None
    for key, col in train.single_rows.items():
        ids = train.ids[:, col].numpy()
        rows = 1 + max(int(d.ids[:, col].max()) for d in data.values() if len(d))  # ids of every split fit
        counts = np.bincount(ids, minlength=rows).astype(np.float64)
        sums = np.stack([np.bincount(ids, weights=labels[:, t], minlength=rows) for t in range(labels.shape[1])], 1)
        table = (sums + SMOOTHING * prior) / (counts[:, None] + SMOOTHING)  # [rows, T]
        scores = torch.from_numpy(table[valid.ids[:, col].numpy()]).float()
        score = _mean_score(_metrics(valid, scores, tasks, task_types, selection))
        if best is None or score > best[0]:
            best = (score, key, table)
    assert best is not None
    _, key, table = best
    col = train.single_rows[key]

    def predict(split: InMemoryDataset) -> torch.Tensor:
        return torch.from_numpy(table[split.ids[:, col].numpy()]).float()

    return Baseline(
        name="key_mean",
        detail=f"smoothed mean per {key} (prior strength {SMOOTHING:g} rows), the best-validating feature",
        valid=_metrics(valid, predict(valid), tasks, task_types, selection),
        test=_metrics(data["test"], predict(data["test"]), tasks, task_types, selection),
    )


def _mean_score(metrics: dict[str, dict[str, float]]) -> float:
    values = [m["score"] for m in metrics.values() if not math.isnan(m["score"])]
    return float(np.mean(values)) if values else -math.inf


class LinearModel(nn.Module):
    """A weight per (table row, task) and per (dense input, task), plus a bias per task."""

    starts: torch.Tensor  # buffer: per sparse key, its first row in `table`

    def __init__(self, rows: Sequence[int], num_dense: int, prior: torch.Tensor, binary: torch.Tensor) -> None:
        super().__init__()
        starts = np.cumsum([0, *rows])[:-1]  # per key; empty for a dense-only spec
        self.register_buffer("starts", torch.tensor(starts.tolist(), dtype=torch.int64))
        num_tasks = prior.numel()
        self.table = nn.EmbeddingBag(max(int(sum(rows)), 1), num_tasks, mode="sum", sparse=True)
        nn.init.zeros_(self.table.weight)
        self.dense = nn.Linear(num_dense, num_tasks, bias=False) if num_dense else None
        if self.dense is not None:
            nn.init.zeros_(self.dense.weight)
        p = prior.clamp(1e-4, 1 - 1e-4)
        self.bias = nn.Parameter(torch.where(binary, torch.log(p / (1 - p)), prior).float())

    def forward(self, batch: Batch) -> torch.Tensor:
        n = len(batch)
        logits = self.bias.expand(n, -1)
        keys = len(self.starts)
        if keys:
            lengths = batch.sparse.lengths().long()  # key-major: key 0's rows, then key 1's, ...
            per_key = lengths.view(keys, n).sum(dim=1)
            ids = batch.sparse.values().long() + torch.repeat_interleave(self.starts, per_key)
            offsets = torch.zeros(keys * n, dtype=torch.int64)
            offsets[1:] = lengths.cumsum(0)[:-1]
            logits = logits + self.table(ids, offsets).view(keys, n, -1).sum(dim=0)
        if self.dense is not None:
            logits = logits + self.dense(batch.dense)
        return logits


def linear(
    manifest: Manifest,
    data: dict[str, InMemoryDataset],
    tasks: Sequence[str],
    task_types: Sequence[str],
    selection: str,
    seed: int = 0,
) -> Baseline:
    """Logistic (binary) or least-squares (regression) regression on every input, Adagrad."""
    train = data["train"]
    tables = {f.name: f.num_embeddings for f in manifest.sparse_features}
    binary = torch.tensor([t == "binary" for t in task_types])
    prior = train.labels.double().mean(dim=0) if len(train) else torch.zeros(len(tasks), dtype=torch.float64)
    model = LinearModel([tables[k] for k in train.sparse_keys], train.dense.shape[1], prior, binary)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=LINEAR_LR)
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # Adagrad on the sparse gradient: torch's note about invariant checks
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        for _ in range(LINEAR_EPOCHS):
            for batch in train.batches(1024, shuffle=True, generator=generator):
                loss = per_task_losses(model(batch), batch.labels, binary).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def predict(split: InMemoryDataset) -> torch.Tensor:
        with torch.no_grad():
            logits = (
                torch.cat([model(b) for b in split.batches(EVAL_BATCH)]) if len(split) else torch.zeros(0, len(tasks))
            )
        return torch.where(binary, torch.sigmoid(logits), logits)

    inputs = f"{len(train.sparse_keys)} sparse, {train.dense.shape[1]} dense inputs"
    return Baseline(
        name="linear",
        detail=f"{'logistic' if bool(binary.all()) else 'linear'} regression on {inputs}, Adagrad, {LINEAR_EPOCHS} epochs",
        valid=_metrics(data["valid"], predict(data["valid"]), tasks, task_types, selection),
        test=_metrics(data["test"], predict(data["test"]), tasks, task_types, selection),
    )
