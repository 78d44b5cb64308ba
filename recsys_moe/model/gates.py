"""Softmax gates: one per task, each a linear map from the input to a distribution over experts.

No BatchNorm and no hidden layers here on purpose: the gate must stay a per-sample function of its
input (a BatchNorm makes routing depend on the rest of the batch, and breaks at batch size 1).
"""

from __future__ import annotations

import torch
from torch import nn


class SoftmaxGates(nn.Module):
    """[B, d_in] → [B, num_gates, num_experts], each row summing to 1."""

    def __init__(self, d_in: int, num_experts: int, num_gates: int) -> None:
        super().__init__()
        self.num_experts, self.num_gates = num_experts, num_gates
        self.proj = nn.Linear(d_in, num_gates * num_experts)  # all gates in one GEMM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(x).view(x.shape[0], self.num_gates, self.num_experts)
        return torch.softmax(logits, dim=-1)


def combine(expert_out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of experts for every gate at once.

    expert_out [E, B, H], gates [B, G, E] → [G, B, H]. A multiply-and-sum, not a bmm: the
    contraction is per sample, and a bmm over B tiny [G, E] x [E, H] matrices is ~8x slower.
    """
    weights = gates.permute(1, 2, 0).unsqueeze(-1)  # [G, E, B, 1]
    return (weights * expert_out.unsqueeze(0)).sum(dim=1)
