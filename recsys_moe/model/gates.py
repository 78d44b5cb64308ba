"""Gates: for each sample, a distribution over experts, one per task (or per shared block).

Three kinds, chosen by config:
- softmax: dense softmax(x W / temperature), every expert gets some weight (MMoE).
- topk: keep the k largest logits and renormalise over them (k = 1 is Switch-style routing).
- noisy_topk: top-k on logits plus learned, input-dependent Gaussian noise while training
  (Shazeer et al., 2017), which keeps routing from locking onto a few experts early.

No BatchNorm and no hidden layers here on purpose: a gate must stay a per-sample function of its
input (a BatchNorm makes routing depend on the rest of the batch, and breaks at batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

GateKind = Literal["softmax", "topk", "noisy_topk"]


@dataclass
class GateOutput:
    weights: torch.Tensor  # [B, G, E], each row sums to 1 (zeros outside the top-k)
    probs: torch.Tensor  # [B, G, E], the full softmax, the load-balancing loss's smooth load estimate


class Gates(nn.Module):
    """[B, d_in] (shared input) or [G, B, d_in] (one input per gate) → GateOutput."""

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        num_gates: int,
        kind: GateKind = "softmax",
        temperature: float = 1.0,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        if kind != "softmax" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (num_experts), got {top_k}")
        self.num_experts, self.num_gates = num_experts, num_gates
        self.kind, self.temperature, self.top_k = kind, temperature, top_k
        self.weight = nn.Parameter(torch.empty(num_gates, d_in, num_experts))
        self.bias = nn.Parameter(torch.zeros(num_gates, 1, num_experts))
        nn.init.normal_(self.weight, std=d_in**-0.5)
        if kind == "noisy_topk":
            self.noise_weight = nn.Parameter(torch.zeros(num_gates, d_in, num_experts))

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        g, d, e = weight.shape
        if x.dim() == 2:  # shared input: all gates in one GEMM
            w = weight.permute(1, 0, 2).reshape(d, g * e)
            out = x @ w if bias is None else torch.addmm(bias.view(1, g * e), x, w)
            return out.view(x.shape[0], g, e)
        out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)
        return out.transpose(0, 1)  # [G, B, d] → [B, G, E]

    def forward(self, x: torch.Tensor) -> GateOutput:
        logits = self._project(x, self.weight, self.bias)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.kind == "softmax":
            return GateOutput(weights=probs, probs=probs)
        if self.kind == "noisy_topk" and self.training:
            noise_scale = F.softplus(self._project(x, self.noise_weight))
            logits = logits + torch.randn_like(logits) * noise_scale
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_logits, dim=-1))
        return GateOutput(weights=weights, probs=probs)


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dim: 0 when perfectly balanced."""
    return x.var(dim=-1, unbiased=False) / (x.mean(dim=-1).square() + 1e-10)


def balance_loss(gates: GateOutput) -> torch.Tensor:
    """Shazeer et al. (2017): CV² of each expert's importance (its summed gate weight) plus CV² of
    its smooth load (summed full-softmax probability), averaged over gates. Added to the task
    losses with `train.balance_loss_weight`; it pushes a collapsed router back toward spreading."""
    importance = gates.weights.sum(dim=0)  # [G, E]
    load = gates.probs.sum(dim=0)
    return (_cv_squared(importance) + _cv_squared(load)).mean()
