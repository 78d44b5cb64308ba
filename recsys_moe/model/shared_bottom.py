"""Shared-Bottom (Caruana, 1997): one MLP shared by all tasks, then one tower per task.

With a single task this is also the single-task baseline the MMoE paper compares against.

    x ──► bottom MLP ──► [B, H] ──► towers ──► [B, T]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.model.towers import TaskTowers


class SharedBottom(nn.Module):
    def __init__(
        self,
        d_in: int,
        num_tasks: int,
        bottom_hidden: Sequence[int] = (128, 64),
        tower_hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bottom = StackedMLP(1, d_in, bottom_hidden, dropout=dropout)
        self.towers = TaskTowers(num_tasks, bottom_hidden[-1], tower_hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> ArchOutput:
        return ArchOutput(logits=self.towers(self.bottom(x)[0]))
