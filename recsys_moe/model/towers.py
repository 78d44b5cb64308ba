"""Task towers: one small MLP per task ending in a single logit, run stacked."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.model.stacked import StackedMLP


class TaskTowers(nn.Module):
    """[B, d_in] (shared) or [T, B, d_in] (per task) → logits [B, T]."""

    def __init__(self, num_tasks: int, d_in: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = StackedMLP(num_tasks, d_in, [*hidden, 1], activate_last=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1).transpose(0, 1)  # [T, B, 1] → [B, T]; B = 1 stays a dimension
