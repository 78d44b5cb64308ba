"""MMoE (Ma et al., KDD 2018): shared experts, one gate per task, one tower per task.

    x ──► experts (E stacked MLPs) ──► [E, B, H] ─┐
    x ──► gates (one per task)      ──► [B, T, E] ─┴─► combine ──► [T, B, H] ──► towers ──► [B, T]

With `num_gates=1` the one gate is shared by all tasks: that is OMoE (see omoe.py). How the
experts run (`compute`, the config's `model.expert_compute`) changes the speed, not the result:
`dense` runs every expert on every row (with a hand-written backward, `kernels.dense.experts_combine`,
unless dropout is on; softmax gates are then computed in the block's first GEMM,
`gated_experts_combine`); `routed` (top-k gates) runs each expert only on the rows
routed to it (kernels/grouped.py), a fraction of the FLOPs when k is much smaller than E;
`triton` runs the block in the Triton kernels (kernels/triton_experts.py) on CUDA tensors and
falls back to the torch path elsewhere, so a model trained that way evaluates and serves on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from recsys_moe.kernels.dense import combine, experts_combine, gated_experts_combine
from recsys_moe.kernels.grouped import topk_experts_combine
from recsys_moe.kernels.projected import TableLayout, projected_gated_experts_combine
from recsys_moe.model.gates import GateKind, GateOutput, Gates
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.stacked import StackedMLP
from recsys_moe.model.towers import TaskTowers

ExpertCompute = Literal["dense", "routed", "triton"]
Kernel = Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]


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
        compute: ExpertCompute = "dense",
    ) -> None:
        super().__init__()
        if compute == "routed" and gate == "softmax":
            raise ValueError("routed expert compute needs a top-k gate (model.gate: topk or noisy_topk)")
        if compute != "dense" and dropout > 0:
            raise ValueError(f"expert_compute {compute} runs the experts without dropout: set model.dropout=0")
        self.num_tasks, self.compute, self.sparse_gate = num_tasks, compute, gate != "softmax"
        self.experts = StackedMLP(num_experts, d_in, expert_hidden, dropout=dropout)
        self.gates = Gates(d_in, num_experts, num_gates or num_tasks, gate, temperature, top_k)
        self.towers = TaskTowers(num_tasks, expert_hidden[-1], tower_hidden, dropout=dropout)
        self._triton: Kernel | None = None

    @property
    def routed(self) -> bool:
        return self.compute == "routed"

    def forward(self, x: torch.Tensor) -> ArchOutput:
        if self._gates_in_block(x):
            g = self.gates
            w, b = list(self.experts.weights), list(self.experts.biases)
            mixed, probs = gated_experts_combine(x, w, b, g.weight, g.bias, g.temperature)
            gates = GateOutput(weights=probs, probs=probs)
        else:
            gates = self.gates(x)  # weights [B, G, E]
            mixed = self._mix(x, gates.weights)  # [G, B, H]
        return self._outputs(mixed, gates)

    @property
    def gated_block(self) -> bool:
        """Softmax gates riding in the dense expert block (no dropout): `forward_rows` runs too."""
        return self.compute == "dense" and self.gates.kind == "softmax" and not self.experts.drops

    def forward_rows(
        self, table: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, layout: TableLayout, dense: torch.Tensor
    ) -> ArchOutput:
        """`forward` on x = [each feature's row of `table` | dense] with the first layer taken
        through the table's rows (`kernels.projected`): training's step on a small single-id
        table, where it is much cheaper. ids [F, B], counts [R]: `model.embeddings.RowBatch`."""
        g = self.gates
        w, b = list(self.experts.weights), list(self.experts.biases)
        mixed, probs = projected_gated_experts_combine(
            table, ids, counts, dense, w, b, g.weight, g.bias, g.temperature, layout
        )
        return self._outputs(mixed, GateOutput(weights=probs, probs=probs))

    def _outputs(self, mixed: torch.Tensor, gates: GateOutput) -> ArchOutput:
        weights = gates.weights
        if mixed.shape[0] != self.num_tasks:  # one shared gate: every tower reads the same mixture
            mixed = mixed.expand(self.num_tasks, -1, -1)
            weights = weights.expand(-1, self.num_tasks, -1)
        return ArchOutput(logits=self.towers(mixed), gate_weights=weights, gates=[gates])

    def _gates_in_block(self, x: torch.Tensor) -> bool:
        """Softmax gates on the experts' own input ride in the expert block's first GEMM."""
        return self.gated_block and x.dim() == 2

    def _mix(self, x: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
        w, b = list(self.experts.weights), list(self.experts.biases)
        if self.compute == "triton":
            kernel = self._triton_kernel(x)
            if kernel is not None:
                return kernel(x, w, b, gate_weights)
        if self.routed or (self.compute == "triton" and self.sparse_gate):
            return topk_experts_combine(x, w, b, gate_weights)
        if self.experts.drops:
            return combine(self.experts(x), gate_weights)
        return experts_combine(x, w, b, gate_weights)

    def _triton_kernel(self, x: torch.Tensor) -> Kernel | None:
        """The Triton kernel for this gate, where Triton runs `x` (CUDA, or its interpreter)."""
        # Imported on first use: triton fixes GPU or interpreter mode when it defines the kernels.
        from recsys_moe.kernels import triton_experts

        if not triton_experts.runs_on(x):
            return None
        if self._triton is None:
            if not triton_experts.triton_available():
                raise RuntimeError("model.expert_compute=triton needs the triton package (pip install recsys-moe[gpu])")
            sparse = self.sparse_gate
            self._triton = (
                triton_experts.triton_topk_experts_combine if sparse else triton_experts.triton_dense_experts_combine
            )
        return self._triton
