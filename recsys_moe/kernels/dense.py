"""The dense expert block as plain torch ops: N stacked MLPs run as one GEMM plus batched GEMMs,
and the gate-weighted combine of their outputs. Any device; the model blocks (`model.stacked`,
`model.mmoe`, `model.ple`) call these, and the routed and Triton kernels are checked against them.

Stacked layout (what `model.stacked.StackedMLP` holds): layer 0 weight [d_in, N, h1], so that on
a shared input it is one [d_in, N*h1] matrix with no copy; deeper weights [N, h_in, h_out] for
`baddbmm`; biases [N, 1, h].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def stacked_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    activate_last: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`StackedMLP`'s forward on its raw parameters (the routed kernels take the same layout).

    x [B, d_in] (shared) or [num, B, d_in] → [num, B, h_last]. ReLUs run in place: addmm/baddbmm
    keep their inputs, not their outputs, for backward, so nothing autograd needs is overwritten.
    """
    d_in, num, h0 = weights[0].shape
    last = len(weights) - 1
    h = x
    for i in range(len(weights)):
        if i > 0:
            h = torch.baddbmm(biases[i], h, weights[i])
        elif x.dim() == 2:  # shared input: all MLPs' first layers in one [B, d] x [d, num*h] GEMM
            h = torch.addmm(biases[0].view(1, -1), x, weights[0].view(d_in, num * h0))
        else:
            h = torch.baddbmm(biases[0], x, weights[0].permute(1, 0, 2))
        if i < last or activate_last:
            # Before the [B, num*h] → [num, B, h] view: an in-place op on a view makes autograd
            # copy the whole gradient back into the base in backward.
            h = h.relu_()
            if dropout > 0:
                h = F.dropout(h, dropout)
        if h.dim() == 2:
            h = h.view(-1, num, h0).transpose(0, 1)
    return h


def combine(expert_out: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of experts for every gate at once: expert_out [E, B, H], gates [B, G, E] → [G, B, H].

    The contraction is per sample: one batched matmul over B of [G, E] x [E, H]. Measured forward +
    backward with torch 2.13 on a 2-core AVX2 CPU, it beats the multiply-and-sum (whose [G, E, B, H]
    temporary is all memory traffic) at every shape tried: 2.6x at the census shapes (E 8, B 1024,
    H 32, G 2), 7x at B 8192, 17x at E 16, B 4096, H 64; level at E 4. An einsum picks the same bmm.
    """
    return torch.bmm(gates, expert_out.transpose(0, 1)).transpose(0, 1)


def dense_experts_combine(x: Tensor, weights: list[Tensor], biases: list[Tensor], gate_weights: Tensor) -> Tensor:
    """The dense reference: every expert on every row, then the gate-weighted sum → [G, B, H]."""
    return combine(stacked_mlp(x, weights, biases), gate_weights)
