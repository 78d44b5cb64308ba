"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task.

x ──► experts (E stacked MLPs) ──► [E, B, H] ─┐
x ──► gates (softmax per task)  ──► [B, T, E] ─┴─► combine ──► [T, B, H] ──► towers ──► [B, T]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.model.gates import SoftmaxGates, combine
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.model.towers import TaskTowers


class MMoE(nn.Module):
    def __init__(
        self,
        d_in: int,
        num_tasks: int,
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (16,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.experts = StackedMLP(num_experts, d_in, expert_hidden, dropout=dropout)
        self.gates = SoftmaxGates(d_in, num_experts, num_gates=num_tasks)
        self.towers = TaskTowers(num_tasks, expert_hidden[-1], tower_hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.gates(x)  # [B, T, E]
        mixed = combine(self.experts(x), gates)  # [T, B, H]
        return self.towers(mixed), gates
