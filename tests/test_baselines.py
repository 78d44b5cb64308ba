"""The per-run baselines: the smoothed per-id mean is exactly that, judged like the model."""

from __future__ import annotations

import numpy as np
import torch

from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training import baselines
from recsys_moe.training.metrics import auc


def test_key_mean_is_the_smoothed_mean_of_the_best_validating_feature(synthetic_manifest: Manifest) -> None:
    keys = [f.name for f in synthetic_manifest.sparse_features]
    tasks = synthetic_manifest.task_names
    data = {s: InMemoryDataset.from_split(synthetic_manifest, s, keys, tasks) for s in ("train", "valid", "test")}
    found = baselines.key_mean(data, tasks, ["binary", "binary"], "auc")
    assert found is not None
    key = found.detail.split(" per ")[1].split(" ")[0]
    col = data["train"].single_rows[key]

    def by_hand(split: InMemoryDataset, feature_col: int) -> np.ndarray:
        train_ids, y = data["train"].ids[:, feature_col].numpy(), data["train"].labels.double().numpy()
        prior, out = y.mean(axis=0), []
        for i in split.ids[:, feature_col].numpy():
            seen = train_ids == i
            out.append((y[seen].sum(axis=0) + baselines.SMOOTHING * prior) / (seen.sum() + baselines.SMOOTHING))
        return np.array(out)

    want = by_hand(data["test"], col)
    for t, task in enumerate(tasks):
        assert abs(found.test[task]["auc"] - auc(torch.from_numpy(want[:, t]), data["test"].labels[:, t])) < 1e-9
    # No other single-id feature validates better (the mean over tasks of the validation AUC).
    chosen = np.mean([found.valid[t]["auc"] for t in tasks])
    for other, other_col in data["train"].single_rows.items():
        pred = by_hand(data["valid"], other_col)
        score = np.mean([auc(torch.from_numpy(pred[:, t]), data["valid"].labels[:, t]) for t in range(len(tasks))])
        assert score <= chosen + 1e-9, other
