"""The dense expert block as plain torch ops: N stacked MLPs run as one GEMM plus batched GEMMs,
and the gate-weighted combine of their outputs; `experts_combine` is the same block with a
hand-written backward. Any device; the model blocks (`model.stacked`,
`model.mmoe`, `model.ple`) call these, and the routed and Triton kernels are checked against them.

Stacked layout (what `model.stacked.StackedMLP` holds): layer 0 weight [d_in, N, h1], so that on
a shared input it is one [d_in, N*h1] matrix with no copy; deeper weights [N, h_in, h_out] for
`baddbmm`; biases [N, 1, h].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from recsys_moe.kernels.gemm import matmul


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


def experts_combine(x: Tensor, weights: list[Tensor], biases: list[Tensor], gate_weights: Tensor) -> Tensor:
    """`dense_experts_combine` with a hand-written backward and the first layer in oneDNN: what
    MMoE trains and scores with. The same values up to float rounding (bit for bit without oneDNN).

    Autograd's backward of the stacked layout pays for layouts, not FLOPs: the second layer's
    input gradient comes out expert-major [E, B, h] and is copied back to the first layer's
    [B, E*h], with a slow small-K bmm on the way; and every view is a node. Here each gradient is
    written where the next GEMM reads it (the second layer's input gradient by one GEMM per expert
    straight into [B, E*h]'s columns) and ReLU masks run in place. The first layer's three GEMMs,
    most of the block's FLOPs, go through `kernels.gemm.matmul`. Measured in a census training
    step on 2 cores: the layouts save about 1 ms of 10, oneDNN another 2-3 ms.

    x [B, d] (a shared input), any depth, no dropout; gradients for every input, as autograd's.
    """
    return _ExpertsCombine.apply(x, gate_weights, *weights, *biases)


class _ExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, gate_weights: Tensor, *params: Tensor) -> Tensor:
        depth = len(params) // 2
        weights, biases = params[:depth], params[depth:]
        d_in, num, h0 = weights[0].shape
        acts = [matmul(x, weights[0].view(d_in, num * h0), biases[0].view(-1), relu=True)]  # [B, E*h0]
        h = acts[0].view(-1, num, h0).transpose(0, 1)
        for w, b in zip(weights[1:], biases[1:]):
            h = torch.baddbmm(b, h, w).relu_()  # [E, B, h]
            acts.append(h)
        ctx.save_for_backward(x, gate_weights, *weights, *acts)
        ctx.depth = depth
        return torch.bmm(gate_weights, h.transpose(0, 1)).transpose(0, 1)  # [G, B, H]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        depth = ctx.depth
        x, gate_weights, *rest = ctx.saved_tensors
        weights, acts = rest[:depth], rest[depth:]
        d_in, num, h0 = weights[0].shape
        batch = x.shape[0]

        def expert_major(i: int) -> Tensor:  # layer i's output as [E, B, h]
            return acts[0].view(batch, num, h0).transpose(0, 1) if i == 0 else acts[i]

        # The combine: out[b, g] = sum_e gate[b, g, e] * h[e, b]. A transposed grad makes bmm
        # loop per sample, so it is made contiguous first (it is small: [B, G, H]).
        grad_bgh = grad_out.transpose(0, 1).contiguous()
        last = expert_major(depth - 1).transpose(0, 1)  # [B, E, H]
        grad_gates = torch.bmm(grad_bgh, last.transpose(1, 2))
        grad_h = torch.bmm(gate_weights.transpose(1, 2), grad_bgh)  # [B, E, H], sample-major
        torch.ops.aten.threshold_backward.grad_input(grad_h, last, 0, grad_input=grad_h)
        grad_h = grad_h.transpose(0, 1)  # [E, B, H] view

        grad_w: list[Tensor] = [x] * depth  # placeholders, all filled below
        grad_b: list[Tensor] = [x] * depth
        for i in range(depth - 1, 0, -1):  # layers 1.. : h_i = relu(h_{i-1} @ W_i + b_i) per expert
            below = expert_major(i - 1)
            grad_w[i] = torch.bmm(below.transpose(1, 2), grad_h)
            grad_b[i] = grad_h.sum(dim=1, keepdim=True)
            w_t = weights[i].transpose(1, 2)
            if i > 1:
                grad_h = torch.bmm(grad_h, w_t)
                torch.ops.aten.threshold_backward.grad_input(grad_h, acts[i - 1], 0, grad_input=grad_h)
            else:  # into layer 0's [B, E*h0] layout, one GEMM per expert, no copy back
                flat = grad_h.new_empty(batch, num * h0)
                for e in range(num):
                    torch.mm(grad_h[e], w_t[e], out=flat[:, e * h0 : (e + 1) * h0])
                grad_h = flat
                torch.ops.aten.threshold_backward.grad_input(grad_h, acts[0], 0, grad_input=grad_h)
        grad_0 = grad_h.transpose(0, 1).reshape(batch, num * h0) if depth == 1 else grad_h  # [B, E*h0]
        grad_b[0] = grad_0.sum(dim=0).view(num, 1, h0)
        grad_w[0] = matmul(x.t(), grad_0).view(d_in, num, h0)
        grad_x = matmul(grad_0, weights[0].view(d_in, num * h0).t()) if ctx.needs_input_grad[0] else None
        return (grad_x, grad_gates, *grad_w, *grad_b)
