"""MMoE's expert block with its first layer taken through the embedding table: each table row is
multiplied by its feature's slice of the first layer once, and a sample's first-layer output is
the sum of its features' projected rows: a gather, not a GEMM.

Why: on single-id features the first layer's input is a concatenation of table rows, x[b] =
[E[id_b1], ..., E[id_bF], dense_b], so x[b] @ W = sum_f E[id_bf] @ W_f + dense_b @ W_dense.
With small tables (census: 527 rows for 32 features) a batch holds each row dozens of times, and
projecting the rows (R x D x N multiply-adds) instead of the samples (B x F x D x N) does the
first layer's work a fraction of the times: the same sums in another order. The backward follows:
each row's output gradient summed over the samples holding it (another gather) gives the first
layer's weight gradient (rows^T @ it) and the rows' own gradient (it @ W_f^T), so the batch's
32k embedding gradients and their FBGEMM update become one update of the rows it touched
(`model.embeddings.SparseArch.update_rows`). A census training step ran 1.36x as fast
(`benchmarks/results/reference.md`, steps on the lookup and on rows by turns).

Equal to `kernels.dense.gated_experts_combine` on the looked-up embeddings up to float rounding;
tests/test_projected.py checks it, gradients and the embedding update included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from recsys_moe.kernels.dense import gated_first_layer, gated_upper_backward, gated_upper_forward, split_first_layer


@dataclass(frozen=True)
class TableLayout:
    """Where each feature's rows lie in one packed table (feature f: rows starts[f] to
    starts[f] + sizes[f]), and the index tensors the block's gathers use, built once per model.

    The backward's per-row gradient sum comes out padded, V = max(sizes) slots per feature (slot
    f * V + id), so that one batched GEMM gives every row's gradient."""

    starts: Tensor  # [F] int64: each feature's first row
    slot_of_row: Tensor  # [R] int64: f * V + id
    project_index: Tensor  # [R, D]: row r's k-th value multiplies W's row f(r) * D + k
    weight_slots: Tensor  # the first layer's weight gradient, bag f * D + k: feature f's slots...
    weight_offsets: Tensor  # ...where each bag starts...
    weight_values: Tensor  # ...and the flat position (r * D + k) of the row value weighing each
    slots_per_feature: int  # V

    @classmethod
    def of(cls, sizes: Sequence[int], dim: int) -> TableLayout:
        per = max(sizes)
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        feature = torch.cat([torch.full((n,), f) for f, n in enumerate(sizes)])
        slot_of_row = torch.cat([torch.arange(n) + f * per for f, n in enumerate(sizes)])
        slots, values = [], []
        for f, n in enumerate(sizes):  # D bags per feature, each over its n rows
            slots.append((torch.arange(n) + f * per).repeat(dim))
            values.append(((torch.arange(n) + int(starts[f])) * dim + torch.arange(dim)[:, None]).reshape(-1))
        lengths = torch.tensor(sizes).repeat_interleave(dim)
        return cls(
            starts=starts,
            slot_of_row=slot_of_row,
            project_index=feature[:, None] * dim + torch.arange(dim),
            weight_slots=torch.cat(slots),
            weight_offsets=torch.cumsum(lengths, 0) - lengths,
            weight_values=torch.cat(values),
            slots_per_feature=per,
        )


def projected_gated_experts_combine(
    table: Tensor,
    ids: Tensor,
    counts: Tensor,
    dense: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    gate_weight: Tensor,
    gate_bias: Tensor,
    temperature: float,
    layout: TableLayout,
) -> tuple[Tensor, Tensor]:
    """`gated_experts_combine` on x = [table rows of each feature's id, flattened | dense] →
    (mixture [G, B, H], gate probabilities [B, G, E]), differentiable in `table` (its gradient is
    the rows') and every weight.

    table [R, D]; ids [F, B]: each feature's ids within its rows (a single-id KJT's values);
    counts [R]: how many of the batch's ids fall on each row; dense [B, n_dense].
    """
    return _ProjectedGatedExpertsCombine.apply(
        table, ids, counts, dense, gate_weight, gate_bias, temperature, layout, *weights, *biases
    )


def _slot_sums(ids: Tensor, counts: Tensor, grad: Tensor, layout: TableLayout) -> Tensor:
    """[F * V, N]: per slot, the sum of the output gradient rows [B, N] of the samples holding it:
    the forward gather's transpose, as another gather (samples in slot order, a bag per slot)."""
    per = layout.slots_per_feature
    slot_counts = counts.new_zeros(ids.shape[0] * per).index_copy_(0, layout.slot_of_row, counts)
    samples = _by_id(ids, per).reshape(-1)  # by feature, then id: slot order
    return F.embedding_bag(samples, grad, torch.cumsum(slot_counts, 0) - slot_counts, mode="sum")


def _by_id(ids: Tensor, bound: int) -> Tensor:
    """Each feature's samples ordered by id, [F, B] int64 (ties in sample order, so the sums are
    deterministic). Ids below 2^15 go through NumPy's stable sort, a radix sort on 16-bit keys:
    84 µs against torch.sort's 620 for census's [32, 1024] (2 cores)."""
    if bound <= np.iinfo(np.int16).max:
        order = np.argsort(ids.numpy().astype(np.int16), axis=1, kind="stable")
        return torch.from_numpy(order)
    return torch.sort(ids, dim=1, stable=True).indices


class _ProjectedGatedExpertsCombine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        table: Tensor,
        ids: Tensor,
        counts: Tensor,
        dense: Tensor,
        gate_weight: Tensor,
        gate_bias: Tensor,
        temperature: float,
        layout: TableLayout,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        depth = len(params) // 2
        weights, biases = params[:depth], params[depth:]
        emb_cols = ids.shape[0] * table.shape[1]  # F * D: x's embedding columns
        wide, bias = gated_first_layer(weights, biases, gate_weight, gate_bias)
        # Every row through its feature's slice: row r = sum_k table[r, k] * wide[f(r) * D + k].
        projected = F.embedding_bag(layout.project_index, wide[:emb_cols], per_sample_weights=table, mode="sum")
        rows = ids + layout.starts.to(ids.dtype).unsqueeze(1)  # [F, B]: rows of the table
        y = F.embedding_bag(rows.t(), projected, mode="sum")  # [B, N]: each sample's rows, summed
        y += bias
        if dense.shape[1]:
            y.addmm_(dense, wide[emb_cols:])
        mixed, probs, probs_t, acts = gated_upper_forward(y, weights, biases, gate_weight.shape, temperature)
        ctx.save_for_backward(table, ids, counts, dense, wide, probs, probs_t, *weights, *acts)
        ctx.depth, ctx.temperature, ctx.layout = depth, temperature, layout
        return mixed, probs

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_probs: Tensor) -> tuple[Tensor | None, ...]:
        depth, layout = ctx.depth, ctx.layout
        table, ids, counts, dense, wide, probs, probs_t, *rest = ctx.saved_tensors
        weights, acts = rest[:depth], rest[depth:]
        grad, grad_w, grad_b = gated_upper_backward(
            grad_out, grad_probs, probs, probs_t, weights, acts, ctx.temperature
        )
        feats, dim = ids.shape[0], table.shape[1]
        emb_cols = feats * dim
        per_slot = _slot_sums(ids, counts, grad, layout)  # [F * V, N]
        grad_wide = torch.empty_like(wide)
        # Feature f's slice: sum over its rows of table[r, k] * per_slot[r], a bag per (f, k).
        weighing = table.reshape(-1).index_select(0, layout.weight_values)
        grad_wide[:emb_cols] = F.embedding_bag(
            layout.weight_slots, per_slot, layout.weight_offsets, per_sample_weights=weighing, mode="sum"
        )
        if dense.shape[1]:
            torch.mm(dense.t(), grad, out=grad_wide[emb_cols:])
        grad_table = None
        if ctx.needs_input_grad[0]:
            # [F, D, V]: as W_f @ per_slot_f^T, twice as fast as the [V, N] x [N, D] orientation.
            by_feature = per_slot.view(feats, layout.slots_per_feature, -1).transpose(1, 2)
            grad_slots = torch.bmm(wide[:emb_cols].view(feats, dim, -1), by_feature)
            grad_table = grad_slots.transpose(1, 2).reshape(-1, dim).index_select(0, layout.slot_of_row)
        grad_gate_w, grad_gate_b, grad_w0, grad_b0 = split_first_layer(
            grad_wide, grad.sum(dim=0), weights[0].shape, probs.shape[1:]
        )
        return (grad_table, None, None, None, grad_gate_w, grad_gate_b, None, None, grad_w0, *grad_w, grad_b0, *grad_b)
