"""How per-task scores become the one number a feed is sorted by."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class RankingConfig(BaseModel):
    """`weighted_sum`: Σ w_t · s_t. `weighted_product`: Π s_t^w_t (e.g. pCTR · pCVR = pCTCVR with
    weights 1 and 1), which needs scores in (0, 1]: use it for binary tasks only. Every task
    weighs 1 unless set here; a weight of 0 ignores a task."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["weighted_sum", "weighted_product"] = "weighted_sum"
    weights: dict[str, float] = Field(default_factory=dict)

    def check_tasks(self, tasks: list[str]) -> None:
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ValueError(f"ranking.weights: unknown tasks {unknown} (the model has {tasks})")


def ranking_score(scores: np.ndarray, tasks: list[str], config: RankingConfig) -> np.ndarray:
    """scores [N, T] in the order of `tasks` → [N] float64."""
    config.check_tasks(tasks)
    w = np.array([config.weights.get(t, 1.0) for t in tasks], dtype=np.float64)
    s = scores.astype(np.float64, copy=False)
    if config.kind == "weighted_sum":
        return s @ w
    return np.exp(np.log(np.clip(s, 1e-12, None)) @ w)
