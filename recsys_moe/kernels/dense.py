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

from recsys_moe.kernels.gemm import matmul, product_dtype


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
    Under `gemm.bf16_products` the first layer's three GEMMs take bf16 operands.
    """
    return _ExpertsCombine.apply(x, gate_weights, *weights, *biases)


def gated_experts_combine(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    gate_weight: Tensor,
    gate_bias: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """`experts_combine` with its softmax gates computed inside: → (mixture [G, B, H], gate
    probabilities [B, G, E]), both differentiable (the balance loss reads the probabilities).

    The gates' projection (gate_weight [G, d, E], gate_bias [G, 1, E], as `model.gates.Gates`
    holds them) rides in the first layer's three GEMMs as G*E more output columns. On their own
    the gates were three thin GEMMs, a softmax and a sum of two [B, d] input gradients: about
    1 ms of a 9 ms expert block at the census shapes, where 16 more columns on 512 cost nothing
    measurable. A census training step (Zen 4, 2 threads) ran 5.6% faster.
    """
    return _GatedExpertsCombine.apply(x, gate_weight, gate_bias, temperature, *weights, *biases)


def _softmax_experts(logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """Softmax over the experts of [B, G, E] logits → (probs [B, G, E], probs as [G, E, B] or None).

    torch's CPU softmax over the last dim loops in scalars when that dim is shorter than a vector
    register: 8 experts at B=1024 took 155 µs (Zen 4, AVX-512), 16 took 50. Over a middle dim,
    with the batch innermost, it runs vectorised across rows: with both transposing copies, 46 µs.
    The transposed probabilities are kept for the backward, which gains the same way. Measured in
    alternating rounds: a census training step 1% faster, scoring in batches of 8192 rows 4.5%.
    From 16 experts up torch's own is faster; under 64 rows the copies are not worth it.
    """
    if logits.shape[-1] >= 16 or logits.shape[0] < 64:
        return torch.softmax(logits, dim=-1), None
    probs_t = torch.softmax(logits.permute(1, 2, 0).contiguous(), dim=1)  # [G, E, B]
    return probs_t.permute(2, 0, 1).contiguous(), probs_t


def _softmax_experts_backward(grad: Tensor, probs: Tensor, probs_t: Tensor | None) -> Tensor:
    """The gradient through `_softmax_experts` to the logits, [B, G, E] (may be a transposed view)."""
    if probs_t is None:
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype)
    grad_t = torch._softmax_backward_data(grad.permute(1, 2, 0).contiguous(), probs_t, 1, probs_t.dtype)
    return grad_t.permute(2, 0, 1)


def _upper_layers(first: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
    """Layer 0's activations [B, E*h0] (may be columns of a wider buffer) → every layer's: layer
    0's as given, the deeper ones [E, B, h]."""
    _, num, h0 = weights[0].shape
    acts = [first]
    h = first.view(-1, num, h0).transpose(0, 1)
    for w, b in zip(weights[1:], biases[1:]):
        h = torch.baddbmm(b, h, w).relu_()  # [E, B, h]
        acts.append(h)
    return acts


def _expert_major(acts: Sequence[Tensor], i: int, num: int, h0: int) -> Tensor:
    """Layer i's output as [E, B, h]."""
    return acts[0].view(-1, num, h0).transpose(0, 1) if i == 0 else acts[i]


def _mixture(acts: Sequence[Tensor], gate_weights: Tensor, num: int, h0: int) -> Tensor:
    """The gate-weighted sum of the last layer → [G, B, H]."""
    last = _expert_major(acts, len(acts) - 1, num, h0)
    return torch.bmm(gate_weights, last.transpose(0, 1)).transpose(0, 1)


def _upper_backward(
    grad_out: Tensor, gate_weights: Tensor, weights: Sequence[Tensor], acts: Sequence[Tensor], grad_0: Tensor
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """From the mixture's gradient [G, B, H] down to layer 0's output: writes that gradient
    (ReLU mask applied) into `grad_0` [B, E*h0] (may be columns of a wider buffer); returns the
    gate weights' gradient [B, G, E] and the weight and bias gradients of layers 1 and up.

    Each gradient is written where the next GEMM reads it: the second layer's input gradient by
    one GEMM per expert straight into [B, E*h0]'s columns, ReLU masks in place.
    """
    depth = len(weights)
    _, num, h0 = weights[0].shape
    batch = grad_0.shape[0]
    # The combine: out[b, g] = sum_e gate[b, g, e] * h[e, b]. A transposed grad makes bmm
    # loop per sample, so it is made contiguous first (it is small: [B, G, H]).
    grad_bgh = grad_out.transpose(0, 1).contiguous()
    last = _expert_major(acts, depth - 1, num, h0).transpose(0, 1)  # [B, E, H]
    grad_gates = torch.bmm(grad_bgh, last.transpose(1, 2))
    grad_h = torch.bmm(gate_weights.transpose(1, 2), grad_bgh)  # [B, E, H], sample-major
    torch.ops.aten.threshold_backward.grad_input(grad_h, last, 0, grad_input=grad_h)
    if depth == 1:
        grad_0.view(batch, num, h0).copy_(grad_h)
        return grad_gates, [], []
    grad_h = grad_h.transpose(0, 1)  # [E, B, H] view
    grad_w: list[Tensor] = []
    grad_b: list[Tensor] = []
    for i in range(depth - 1, 0, -1):  # layers 1.. : h_i = relu(h_{i-1} @ W_i + b_i) per expert
        below = _expert_major(acts, i - 1, num, h0)
        grad_w.insert(0, torch.bmm(below.transpose(1, 2), grad_h))
        grad_b.insert(0, grad_h.sum(dim=1, keepdim=True))
        w_t = weights[i].transpose(1, 2)
        if i > 1:
            grad_h = torch.bmm(grad_h, w_t)
            torch.ops.aten.threshold_backward.grad_input(grad_h, acts[i - 1], 0, grad_input=grad_h)
        else:  # into layer 0's [B, E*h0] layout, one GEMM per expert, no copy back
            for e in range(num):
                torch.mm(grad_h[e], w_t[e], out=grad_0[:, e * h0 : (e + 1) * h0])
            torch.ops.aten.threshold_backward.grad_input(grad_0, acts[0], 0, grad_input=grad_0)
    return grad_gates, grad_w, grad_b


def gated_first_layer(
    weights: Sequence[Tensor], biases: Sequence[Tensor], gate_weight: Tensor, gate_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """The first layer and every gate as one [d_in, E*h0 + G*E] matrix, and its bias."""
    d_in, num, h0 = weights[0].shape
    wide = torch.cat([weights[0].view(d_in, num * h0), gate_weight.permute(1, 0, 2).reshape(d_in, -1)], dim=1)
    return wide, torch.cat([biases[0].view(-1), gate_bias.view(-1)])


def split_first_layer(
    grad_wide: Tensor, grad_bias: Tensor, first_shape: torch.Size, gates_shape: torch.Size
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`gated_first_layer`'s gradients back to (gate weight, gate bias, layer 0 weight, layer 0
    bias) in their parameters' shapes."""
    d_in, num, h0 = first_shape
    gates, experts = gates_shape
    grad_gate_w = grad_wide[:, num * h0 :].view(d_in, gates, experts).permute(1, 0, 2)
    grad_gate_b = grad_bias[num * h0 :].view(gates, 1, experts)
    return (
        grad_gate_w,
        grad_gate_b,
        grad_wide[:, : num * h0].view(d_in, num, h0),
        grad_bias[: num * h0].view(num, 1, h0),
    )


def gated_upper_forward(
    y: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], gate_shape: torch.Size, temperature: float
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """From the first layer's output with the gate logits [B, E*h0 + G*E] (ReLU'd in place) to
    (mixture [G, B, H], gate probabilities [B, G, E], their transposed copy, every layer's output)."""
    _, num, h0 = weights[0].shape
    gates, _, experts = gate_shape
    first = y[:, : num * h0].relu_()
    logits = y[:, num * h0 :].view(-1, gates, experts)
    probs, probs_t = _softmax_experts(logits / temperature if temperature != 1.0 else logits)
    acts = _upper_layers(first, weights, biases)
    return _mixture(acts, probs, num, h0), probs, probs_t, acts


def gated_upper_backward(
    grad_out: Tensor,
    grad_probs: Tensor,
    probs: Tensor,
    probs_t: Tensor | None,
    weights: Sequence[Tensor],
    acts: Sequence[Tensor],
    temperature: float,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """`gated_upper_forward`'s backward: (the gradient of y [B, E*h0 + G*E], the weight and bias
    gradients of layers 1 and up)."""
    _, num, h0 = weights[0].shape
    batch, gates, experts = probs.shape
    grad = grad_out.new_empty(batch, num * h0 + gates * experts)  # [layer 0's output | gate logits]
    grad_gates, grad_w, grad_b = _upper_backward(grad_out, probs, weights, acts, grad[:, : num * h0])
    grad_gates += grad_probs  # the balance loss's, or zeros
    grad_logits = _softmax_experts_backward(grad_gates, probs, probs_t)
    if temperature != 1.0:
        grad_logits = grad_logits / temperature
    grad[:, num * h0 :].view(batch, gates, experts).copy_(grad_logits)
    return grad, grad_w, grad_b


class _ExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, gate_weights: Tensor, *params: Tensor) -> Tensor:
        depth = len(params) // 2
        weights, biases = params[:depth], params[depth:]
        d_in, num, h0 = weights[0].shape
        ctx.dtype = product_dtype()  # bf16 operands under `gemm.bf16_products`, in backward too
        first = matmul(x, weights[0].view(d_in, num * h0), biases[0].view(-1), relu=True, dtype=ctx.dtype)
        acts = _upper_layers(first, weights, biases)  # first: [B, E*h0]
        ctx.save_for_backward(x, gate_weights, *weights, *acts)
        ctx.depth = depth
        return _mixture(acts, gate_weights, num, h0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        depth = ctx.depth
        x, gate_weights, *rest = ctx.saved_tensors
        weights, acts = rest[:depth], rest[depth:]
        d_in, num, h0 = weights[0].shape
        grad_0 = x.new_empty(x.shape[0], num * h0)
        grad_gates, grad_w, grad_b = _upper_backward(grad_out, gate_weights, weights, acts, grad_0)
        w0 = weights[0].view(d_in, num * h0)
        grad_x = matmul(grad_0, w0.t(), dtype=ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_w0 = matmul(x.t(), grad_0, dtype=ctx.dtype).view(d_in, num, h0)
        grad_b0 = grad_0.sum(dim=0).view(num, 1, h0)
        return (grad_x, grad_gates, grad_w0, *grad_w, grad_b0, *grad_b)


class _GatedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, gate_weight: Tensor, gate_bias: Tensor, temperature: float, *params: Tensor
    ) -> tuple[Tensor, Tensor]:
        depth = len(params) // 2
        weights, biases = params[:depth], params[depth:]
        wide, bias = gated_first_layer(weights, biases, gate_weight, gate_bias)  # one GEMM for both
        ctx.dtype = product_dtype()  # bf16 operands under `gemm.bf16_products`, in backward too
        y = matmul(x, wide, bias, dtype=ctx.dtype)
        mixed, probs, probs_t, acts = gated_upper_forward(y, weights, biases, gate_weight.shape, temperature)
        ctx.save_for_backward(x, probs, probs_t, wide, *weights, *acts)
        ctx.depth, ctx.temperature = depth, temperature
        return mixed, probs

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_probs: Tensor) -> tuple[Tensor | None, ...]:
        depth = ctx.depth
        x, probs, probs_t, wide, *rest = ctx.saved_tensors
        weights, acts = rest[:depth], rest[depth:]
        grad, grad_w, grad_b = gated_upper_backward(
            grad_out, grad_probs, probs, probs_t, weights, acts, ctx.temperature
        )
        grad_x = matmul(grad, wide.t(), dtype=ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_wide = matmul(x.t(), grad, dtype=ctx.dtype)
        grad_gate_w, grad_gate_b, grad_w0, grad_b0 = split_first_layer(
            grad_wide, grad.sum(dim=0), weights[0].shape, probs.shape[1:]
        )
        return (grad_x, grad_gate_w, grad_gate_b, None, grad_w0, *grad_w, grad_b0, *grad_b)
