"""What every architecture returns, so the trainer treats them all alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recsys_moe.model.gates import GateOutput


@dataclass
class ArchOutput:
    logits: torch.Tensor  # [B, T]
    # Mean-able gate weights over the architecture's experts, [B, T, E_total], for telemetry and
    # the heatmap; None for architectures without gates.
    gate_weights: torch.Tensor | None = None
    gates: list[GateOutput] = field(default_factory=list)  # every gate, for the balance loss
