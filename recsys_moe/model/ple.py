"""PLE and CGC (Tang et al., RecSys 2020): task-specific experts next to shared experts.

One extraction layer (CGC, "customized gate control"):

    task t's input ──► its own experts (n_task each) ─┐
    shared input   ──► shared experts (n_shared)      ─┼─► task t's gate over its own + shared ──► task t's output
                                                       └─► shared gate over ALL experts ──► shared output (not in the last layer)

PLE stacks `levels` extraction layers: each task's output feeds its experts in the next layer,
the shared output feeds the next shared experts. CGC is PLE with one layer. Every layer has
exactly `n_shared` shared experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.kernels.dense import combine
from recsys_moe.model.gates import GateKind, GateOutput, Gates
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.model.towers import TaskTowers


class ExtractionLayer(nn.Module):
    def __init__(
        self,
        d_in: int,
        num_tasks: int,
        n_task: int,
        n_shared: int,
        hidden: Sequence[int],
        shared_gate: bool,
        gate: GateKind = "softmax",
        temperature: float = 1.0,
        top_k: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks, self.n_task, self.n_shared = num_tasks, n_task, n_shared
        self.task_experts = StackedMLP(num_tasks * n_task, d_in, hidden, dropout=dropout)
        self.shared_experts = StackedMLP(n_shared, d_in, hidden, dropout=dropout)
        gate_k = min(top_k, n_task + n_shared)
        self.task_gates = Gates(d_in, n_task + n_shared, num_tasks, gate, temperature, gate_k)
        self.shared_gate = (
            Gates(d_in, num_tasks * n_task + n_shared, 1, gate, temperature, top_k) if shared_gate else None
        )

    def forward(
        self, task_in: torch.Tensor, shared_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[GateOutput]]:
        """task_in [B, d] (first layer: the model input) or [T, B, d]; shared_in [B, d]."""
        t, n = self.num_tasks, self.n_task
        per_expert_in = task_in if task_in.dim() == 2 else task_in.repeat_interleave(n, dim=0)
        own = self.task_experts(per_expert_in)  # [T*n, B, H]
        shared = self.shared_experts(shared_in)  # [n_shared, B, H]
        batch, hidden = shared.shape[1], shared.shape[2]
        # Task t mixes its own n experts and the shared ones.
        candidates = torch.cat([own.view(t, n, batch, hidden), shared.expand(t, -1, -1, -1)], dim=1)
        task_gates = self.task_gates(task_in)  # weights [B, T, n + n_shared]
        task_out = (task_gates.weights.permute(1, 2, 0).unsqueeze(-1) * candidates).sum(dim=1)  # [T, B, H]
        if self.shared_gate is None:
            return task_out, None, [task_gates]
        shared_gates = self.shared_gate(shared_in)  # over all experts
        shared_out = combine(torch.cat([own, shared]), shared_gates.weights)[0]
        return task_out, shared_out, [task_gates, shared_gates]


class PLE(nn.Module):
    gate_columns: torch.Tensor  # buffer: where task t's gate columns sit among all experts

    def __init__(
        self,
        d_in: int,
        num_tasks: int,
        n_task: int = 2,
        n_shared: int = 2,
        expert_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (16,),
        levels: int = 2,
        dropout: float = 0.0,
        gate: GateKind = "softmax",
        temperature: float = 1.0,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        dims = [d_in] + [expert_hidden[-1]] * (levels - 1)
        self.layers = nn.ModuleList(
            ExtractionLayer(
                d, num_tasks, n_task, n_shared, expert_hidden, i < levels - 1, gate, temperature, top_k, dropout
            )
            for i, d in enumerate(dims)
        )
        self.towers = TaskTowers(num_tasks, expert_hidden[-1], tower_hidden, dropout=dropout)
        # Where task t's gate columns sit among all experts [task 0's, task 1's, ..., shared].
        columns = [
            list(range(i * n_task, (i + 1) * n_task)) + list(range(num_tasks * n_task, num_tasks * n_task + n_shared))
            for i in range(num_tasks)
        ]
        self.register_buffer("gate_columns", torch.tensor(columns), persistent=False)
        self.num_experts = num_tasks * n_task + n_shared

    def forward(self, x: torch.Tensor) -> ArchOutput:
        task_in, shared_in, gates = x, x, []
        for layer in self.layers:
            task_in, shared_in, layer_gates = layer(task_in, shared_in)
            gates += layer_gates
        last = gates[-1].weights  # the last layer's task gates, [B, T, n + n_shared]
        index = self.gate_columns.unsqueeze(0).expand(last.shape[0], -1, -1)
        full = last.new_zeros(*last.shape[:2], self.num_experts).scatter(-1, index, last)
        return ArchOutput(logits=self.towers(task_in), gate_weights=full, gates=gates)
