"""PLE and CGC (Tang et al., RecSys 2020): task-specific experts next to shared experts.

One extraction layer (CGC, "customized gate control"):

    task t's input ──► its own experts (n_task each) ─┐
    shared input   ──► shared experts (n_shared)      ─┼─► task t's gate over its own + shared ──► task t's output
                                                       └─► shared gate over ALL experts ──► shared output (not in the last layer)

PLE stacks `levels` extraction layers: each task's output feeds its experts in the next layer,
the shared output feeds the next shared experts. CGC is PLE with one layer. Every layer has
exactly `n_shared` shared experts.

Where every expert reads the same input (CGC, and PLE's first layer) the layer is MMoE's block
with gates that leave out other tasks' experts: it runs as one `experts_combine` (the hand-written
backward, oneDNN GEMMs) over all experts, each gate's row zero outside its experts. The deeper
PLE layers, whose task experts read their own task's input, and training with dropout run the
experts as stacked MLPs and mix them with autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from recsys_moe.kernels.dense import combine, experts_combine
from recsys_moe.model.gates import GateKind, GateOutput, Gates
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.model.towers import TaskTowers


class ExtractionLayer(nn.Module):
    gate_columns: torch.Tensor  # buffer: where task t's gate columns sit among all experts

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
        # [T, n + n_shared]: where task t's gate columns sit among all experts [task 0's own, ..., shared].
        own = torch.arange(num_tasks * n_task).view(num_tasks, n_task)
        shared = torch.arange(num_tasks * n_task, num_tasks * n_task + n_shared).expand(num_tasks, -1)
        self.register_buffer("gate_columns", torch.cat([own, shared], dim=1), persistent=False)

    def over_all_experts(self, task_weights: torch.Tensor) -> torch.Tensor:
        """Task gates' weights [B, T, n + n_shared] → [B, T, all experts], zero outside each
        task's own and the shared experts."""
        index = self.gate_columns.unsqueeze(0).expand(task_weights.shape[0], -1, -1)
        zeros = task_weights.new_zeros(*task_weights.shape[:2], self.task_experts.num + self.shared_experts.num)
        return zeros.scatter(-1, index, task_weights)

    def forward(
        self, task_in: torch.Tensor, shared_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[GateOutput]]:
        """task_in [B, d] (first layer: the model input) or [T, B, d]; shared_in [B, d]."""
        if task_in is shared_in and not self.task_experts.drops:
            return self._one_input(task_in)
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

    def _one_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[GateOutput]]:
        """Every expert on `x`: all of them stacked (task experts first, as in the shared gate's
        columns) and mixed by one gate row per task (zeros outside its own and the shared
        experts), plus the shared gate's row."""
        own, shared = self.task_experts, self.shared_experts
        weights = [
            torch.cat([a, b], dim=1 if i == 0 else 0) for i, (a, b) in enumerate(zip(own.weights, shared.weights))
        ]
        biases = [torch.cat([a, b]) for a, b in zip(own.biases, shared.biases)]
        task_gates = self.task_gates(x)
        rows = self.over_all_experts(task_gates.weights)
        if self.shared_gate is None:
            return experts_combine(x, weights, biases, rows), None, [task_gates]
        shared_gates = self.shared_gate(x)
        mixed = experts_combine(x, weights, biases, torch.cat([rows, shared_gates.weights], dim=1))
        return mixed[: self.num_tasks], mixed[self.num_tasks], [task_gates, shared_gates]


class PLE(nn.Module):
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

    def forward(self, x: torch.Tensor) -> ArchOutput:
        task_in, shared_in, gates = x, x, []
        for layer in self.layers:
            task_in, shared_in, layer_gates = layer(task_in, shared_in)
            gates += layer_gates
        last = cast(ExtractionLayer, self.layers[-1])
        full = last.over_all_experts(gates[-1].weights)  # the last layer's task gates
        return ArchOutput(logits=self.towers(task_in), gate_weights=full, gates=gates)
