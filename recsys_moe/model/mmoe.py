"""MMoE (Ma et al., KDD 2018): shared experts, one gate per task, one tower per task.

    x ──► experts (E stacked MLPs) ──► [E, B, H] ─┐
    x ──► gates (one per task)      ──► [B, T, E] ─┴─► combine ──► [T, B, H] ──► towers ──► [B, T]

With `num_gates=1` the one gate is shared by all tasks: that is OMoE (see omoe.py). With top-k
gates, `routed=True` runs each expert only on the rows routed to it (kernels/grouped.py) instead
of on every row: same result, a fraction of the FLOPs when k is much smaller than E.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.kernels.grouped import topk_experts_combine
from recsys_moe.model.gates import GateKind, Gates, combine
from recsys_moe.model.outputs import ArchOutput
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
        gate: GateKind = "softmax",
        temperature: float = 1.0,
        top_k: int = 2,
        num_gates: int | None = None,
        routed: bool = False,
    ) -> None:
        super().__init__()
        if routed and (gate == "softmax" or dropout > 0):
            raise ValueError("routed expert compute needs a top-k gate and no expert dropout")
        self.num_tasks, self.routed = num_tasks, routed
        self.experts = StackedMLP(num_experts, d_in, expert_hidden, dropout=dropout)
        self.gates = Gates(d_in, num_experts, num_gates or num_tasks, gate, temperature, top_k)
        self.towers = TaskTowers(num_tasks, expert_hidden[-1], tower_hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> ArchOutput:
        gates = self.gates(x)  # weights [B, G, E]
        if self.routed:
            mixed = topk_experts_combine(x, list(self.experts.weights), list(self.experts.biases), gates.weights)
        else:
            mixed = combine(self.experts(x), gates.weights)  # [G, B, H]
        weights = gates.weights
        if mixed.shape[0] != self.num_tasks:  # one shared gate: every tower reads the same mixture
            mixed = mixed.expand(self.num_tasks, -1, -1)
            weights = weights.expand(-1, self.num_tasks, -1)
        return ArchOutput(logits=self.towers(mixed), gate_weights=weights, gates=[gates])
