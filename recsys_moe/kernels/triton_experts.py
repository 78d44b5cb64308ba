"""Triton kernels for the expert block on GPU: dense stacked experts and top-k grouped experts.

Dense: each layer is one batched GEMM with bias and ReLU fused in the epilogue (layer 0 on the
shared input is a single [B, d] x [d, E*h1] GEMM, as in `StackedMLP`), then a combine kernel forms
the G gate-weighted sums without materialising [G, E, B, H].

Top-k: the routed (row, expert) pairs from `grouped.route` are processed by a grouped GEMM that
walks each expert's group of pairs (per-expert offsets): layer 0 gathers its input rows inside the
kernel, and the last layer scatters `gate weight * output` into [G, B, H] with atomic adds (the
combine fused into the GEMM epilogue).

Backward (both paths: one `torch.autograd.Function` each): every GEMM — input gradients (the same
kernels with transposed weight strides) and weight gradients (the dense kernel on transposed
activations, a grouped reduction kernel for top-k) — runs in Triton, and the dense path's gradient
of the combine w.r.t. the expert outputs is the combine kernel with gates and experts swapped. The
cheap rest is torch ops: ReLU masks, bias sums, the gradient w.r.t. the gate weights (a dot per
pair), and the top-k backward's gather of the output gradient and scatter of the input gradient.

Triton's interpreter (TRITON_INTERPRET=1 in the environment before this module is imported) runs
the same kernels on CPU tensors, with a single small autotune config so tests stay fast. Importing
this module never fails: without triton, or without both a GPU and the interpreter,
`triton_available()` is False.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from recsys_moe.kernels.grouped import Routing, route

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Whether the kernels can run here: triton importable, and a GPU or the interpreter."""
    return triton is not None and (INTERPRET or torch.cuda.is_available())


def runs_on(x: Tensor) -> bool:
    """Whether these kernels take `x`: a CUDA tensor, or any tensor under the interpreter."""
    return x.is_cuda or INTERPRET


def _precision() -> str:
    """fp32 dot precision that follows torch's own matmul setting (TF32 only when torch allows it)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton is not None:

    def _gemm_configs() -> list[triton.Config]:
        if INTERPRET:  # one config: the autotuner then runs it without benchmarking
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
        return [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        ]

    def _combine_configs() -> list[triton.Config]:
        if INTERPRET:
            return [triton.Config({"BLOCK_B": 16, "BLOCK_H": 16}, num_warps=1)]
        return [
            triton.Config({"BLOCK_B": 32, "BLOCK_H": 128}, num_warps=4),
            triton.Config({"BLOCK_B": 64, "BLOCK_H": 64}, num_warps=4),
            triton.Config({"BLOCK_B": 128, "BLOCK_H": 32}, num_warps=4),
        ]

    @triton.autotune(configs=_gemm_configs(), key=["M", "N", "K"])
    @triton.jit
    def _bmm_kernel(
        a_ptr,
        w_ptr,
        bias_ptr,
        c_ptr,
        M,
        N,
        K,
        stride_ab,
        stride_am,
        stride_ak,
        stride_wb,
        stride_wk,
        stride_wn,
        stride_bb,
        stride_cb,
        stride_cm,
        stride_cn,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """c[b] = act(a[b] @ w[b] + bias[b]) for the batch index b = program_id(2); any strides."""
        batch = tl.program_id(2).to(tl.int64)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a = a_ptr + batch * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
        w = w_ptr + batch * stride_wb + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a_tile = tl.load(a, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            w_tile = tl.load(w, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a_tile, w_tile, acc, input_precision=PRECISION)
            a += BLOCK_K * stride_ak
            w += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + batch * stride_bb + rn, mask=rn < N, other=0.0)[None, :].to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        c = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.autotune(configs=_gemm_configs(), key=["N", "K"], reset_to_zero=["out_ptr"])
    @triton.jit
    def _grouped_kernel(
        a_ptr,
        rows_ptr,
        w_ptr,
        bias_ptr,
        c_ptr,
        offsets_ptr,
        pw_ptr,
        out_ptr,
        N,
        K,
        G,
        max_count,
        stride_am,
        stride_ak,
        stride_we,
        stride_wk,
        stride_wn,
        stride_be,
        stride_cm,
        stride_cn,
        stride_pwm,
        stride_pwg,
        stride_og,
        stride_ob,
        stride_on,
        GATHER: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        SCATTER: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Pairs sorted by expert; program (e, tile) computes c[pairs] = act(a[rows] @ w[e] + bias[e]).

        GATHER reads a's row rows[pair] (layer 0 reads x directly); SCATTER also adds
        pw[pair, g] * c[pair] into out[g, rows[pair]] for every gate g (the fused combine).
        """
        tiles = tl.cdiv(max_count, BLOCK_M)
        expert = tl.program_id(0) // tiles
        tile = tl.program_id(0) % tiles
        start = tl.load(offsets_ptr + expert)
        end = tl.load(offsets_ptr + expert + 1)
        rm = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # pair indices
        m_mask = rm < end
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rows = tl.load(rows_ptr + rm, mask=m_mask, other=0)  # sample of each pair
        if GATHER:
            a_rows = rows
        else:
            a_rows = rm
        a = a_ptr + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
        w = w_ptr + expert.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_tiles = tl.where(start + tile * BLOCK_M < end, tl.cdiv(K, BLOCK_K), 0)  # padding tiles skip the loop
        for k in range(0, k_tiles):
            k_left = K - k * BLOCK_K
            a_tile = tl.load(a, mask=m_mask[:, None] & (rk[None, :] < k_left), other=0.0)
            w_tile = tl.load(w, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a_tile, w_tile, acc, input_precision=PRECISION)
            a += BLOCK_K * stride_ak
            w += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_be + rn, mask=rn < N, other=0.0)
            acc += bias[None, :].to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        mask = m_mask[:, None] & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)
        if SCATTER:
            out = out_ptr + rows[:, None] * stride_ob + rn[None, :] * stride_on
            for g in range(0, G):
                gate = tl.load(pw_ptr + rm * stride_pwm + g * stride_pwg, mask=m_mask, other=0.0).to(tl.float32)
                tl.atomic_add(out + g * stride_og, acc * gate[:, None], mask=mask)

    @triton.autotune(configs=_gemm_configs(), key=["N", "K"])
    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr,
        rows_ptr,
        dy_ptr,
        dw_ptr,
        offsets_ptr,
        N,
        K,
        stride_am,
        stride_ak,
        stride_dym,
        stride_dyn,
        stride_we,
        stride_wk,
        stride_wn,
        GATHER: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """dw[e] = a[group e]^T @ dy[group e]: a [BLOCK_K, BLOCK_N] tile of expert e per program,
        reducing over the expert's pairs BLOCK_M at a time (empty experts get zeros)."""
        expert = tl.program_id(2)
        start = tl.load(offsets_ptr + expert)
        end = tl.load(offsets_ptr + expert + 1)
        rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_mask = rm < end
            if GATHER:
                a_rows = tl.load(rows_ptr + rm, mask=m_mask, other=0)
            else:
                a_rows = rm
            a_t = tl.load(
                a_ptr + a_rows[None, :] * stride_am + rk[:, None] * stride_ak,
                mask=m_mask[None, :] & (rk[:, None] < K),
                other=0.0,
            )
            dy = tl.load(
                dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                mask=m_mask[:, None] & (rn[None, :] < N),
                other=0.0,
            )
            acc = tl.dot(a_t, dy, acc, input_precision=PRECISION)
        dw = dw_ptr + expert.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rn[None, :] < N))

    @triton.autotune(configs=_combine_configs(), key=["B", "H", "Q"])
    @triton.jit
    def _combine_kernel(
        w_ptr,
        y_ptr,
        out_ptr,
        B,
        H,
        Q,
        stride_wb,
        stride_wp,
        stride_wq,
        stride_yq,
        stride_yb,
        stride_yh,
        stride_op,
        stride_ob,
        stride_oh,
        BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """out[p, b] = sum_q w[b, p, q] * y[q, b]: the combine (p = gate, q = expert) and, with the
        roles swapped, its gradient w.r.t. the expert outputs (p = expert, q = gate)."""
        p = tl.program_id(2)
        rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (rb[:, None] < B) & (rh[None, :] < H)
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for q in range(0, Q):
            w = tl.load(w_ptr + rb * stride_wb + p * stride_wp + q * stride_wq, mask=rb < B, other=0.0)
            y = tl.load(y_ptr + q * stride_yq + rb[:, None] * stride_yb + rh[None, :] * stride_yh, mask=mask, other=0.0)
            acc += w.to(tl.float32)[:, None] * y.to(tl.float32)
        out = out_ptr + p * stride_op + rb[:, None] * stride_ob + rh[None, :] * stride_oh
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _bmm(a: Tensor, w: Tensor, c: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """c[i] = act(a[i] @ w[i] + bias[i]) for 3-D views a [n, M, K], w [n, K, N], c [n, M, N], bias [n, 1, N]."""
    n, m, k = a.shape
    cols = w.shape[2]
    bias_arg = c if bias is None else bias  # unused pointer when HAS_BIAS is off

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]), n

    _bmm_kernel[grid](
        a,
        w,
        bias_arg,
        c,
        m,
        cols,
        k,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        0 if bias is None else bias.stride(0),
        c.stride(0),
        c.stride(1),
        c.stride(2),
        HAS_BIAS=bias is not None,
        RELU=relu,
        PRECISION=_precision(),
    )
    return c


def _combine(w: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """out [P, B, H] = sum_q w[b, p, q] * y[q, b, :] for a view w [B, P, Q] and y [Q, B, H]."""
    num_p, batch, hidden = out.shape

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(hidden, meta["BLOCK_H"]), num_p

    _combine_kernel[grid](
        w,
        y,
        out,
        batch,
        hidden,
        w.shape[2],
        w.stride(0),
        w.stride(1),
        w.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    return out


class _DenseExperts(torch.autograd.Function):
    """All experts on all rows, then the combine. Saved: x, gate weights, weights, every layer's output."""

    @staticmethod
    def forward(ctx, num_layers: int, x: Tensor, gate_weights: Tensor, *params: Tensor) -> Tensor:
        weights, biases = params[:num_layers], params[num_layers:]
        batch, d_in = x.shape
        _, num_experts, h1 = weights[0].shape
        flat = x.new_empty(batch, num_experts * h1)  # layer 0 on the shared input: one GEMM
        _bmm(x[None], weights[0].view(1, d_in, -1), flat[None], biases[0].view(1, 1, -1), relu=True)
        acts = [flat.view(batch, num_experts, h1).transpose(0, 1)]  # [E, B, h1] views
        for w, b in zip(weights[1:], biases[1:]):
            acts.append(_bmm(acts[-1], w, x.new_empty(num_experts, batch, w.shape[2]), b, relu=True))
        num_gates = gate_weights.shape[1]
        out = _combine(gate_weights, acts[-1], x.new_empty(num_gates, batch, acts[-1].shape[2]))
        ctx.save_for_backward(x, gate_weights, *weights, *acts)
        ctx.num_layers = num_layers
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        num_layers = ctx.num_layers
        x, gate_weights, *rest = ctx.saved_tensors
        weights, acts = rest[:num_layers], rest[num_layers:]
        grad_out = grad_out.contiguous()
        num_experts, batch, hidden = acts[-1].shape
        grad_gates = torch.einsum("gbh,ebh->bge", grad_out, acts[-1])
        grad_h = _combine(gate_weights.transpose(1, 2), grad_out, x.new_empty(num_experts, batch, hidden))
        grad_w: list[Tensor | None] = [None] * num_layers
        grad_b: list[Tensor | None] = [None] * num_layers
        for i in range(num_layers - 1, 0, -1):
            grad_pre = grad_h * (acts[i] > 0)
            grad_b[i] = grad_pre.sum(dim=1, keepdim=True)
            grad_w[i] = _bmm(acts[i - 1].transpose(1, 2), grad_pre, torch.empty_like(weights[i]))
            grad_h = _bmm(grad_pre, weights[i].transpose(1, 2), torch.empty_like(acts[i - 1]))
        d_in, _, h1 = weights[0].shape
        grad_pre = (grad_h * (acts[0] > 0)).transpose(0, 1).reshape(batch, num_experts * h1)
        grad_b[0] = grad_pre.sum(dim=0).view(num_experts, 1, h1)
        grad_w[0] = _bmm(x.t()[None], grad_pre[None], torch.empty_like(weights[0]).view(1, d_in, -1)).view_as(
            weights[0]
        )
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _bmm(grad_pre[None], weights[0].view(1, d_in, -1).transpose(1, 2), torch.empty_like(x)[None])[0]
        return None, grad_x, grad_gates, *grad_w, *grad_b


def _grouped(
    a: Tensor,
    w: Tensor,
    c: Tensor,
    routing: Routing,
    *,
    weight_strides: tuple[int, int, int],
    bias: Tensor | None = None,
    relu: bool = False,
    gather: bool = False,
    scatter_out: Tensor | None = None,
) -> Tensor:
    """c [N, cols] = act(a[pairs or rows] @ w[expert] + bias[expert]) over the routed groups.

    weight_strides = (expert, k, n) strides of w, so a transposed weight is just swapped strides.
    """
    num_experts = routing.offsets.numel() - 1
    max_count = max(routing.counts)
    cols, k = c.shape[1], a.shape[1]
    out_strides: tuple[int, ...]
    if scatter_out is None:
        out, out_strides = c.new_empty(0), (0, 0, 0)  # a dummy: autotune zeroes out_ptr between trials
    else:
        out, out_strides = scatter_out, scatter_out.stride()

    def grid(meta: dict) -> tuple[int, int]:
        return num_experts * triton.cdiv(max_count, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"])

    _grouped_kernel[grid](
        a,
        routing.rows,
        w,
        c if bias is None else bias,
        c,
        routing.offsets,
        routing.pair_weights,
        out,
        cols,
        k,
        routing.pair_weights.shape[1],
        max_count,
        a.stride(0),
        a.stride(1),
        *weight_strides,
        0 if bias is None else bias.stride(0),
        c.stride(0),
        c.stride(1),
        routing.pair_weights.stride(0),
        routing.pair_weights.stride(1),
        *out_strides,
        GATHER=gather,
        HAS_BIAS=bias is not None,
        RELU=relu,
        SCATTER=scatter_out is not None,
        PRECISION=_precision(),
    )
    return c


def _grouped_wgrad(
    a: Tensor, dy: Tensor, dw: Tensor, routing: Routing, *, dw_strides: tuple[int, int, int], gather: bool
) -> Tensor:
    """dw[e] = a[group e]^T @ dy[group e], written through dw_strides = (expert, k, n)."""
    k, cols = a.shape[1], dy.shape[1]
    num_experts = routing.offsets.numel() - 1

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(cols, meta["BLOCK_N"]), num_experts

    _grouped_wgrad_kernel[grid](
        a,
        routing.rows,
        dy,
        dw,
        routing.offsets,
        cols,
        k,
        a.stride(0),
        a.stride(1),
        dy.stride(0),
        dy.stride(1),
        *dw_strides,
        GATHER=gather,
        PRECISION=_precision(),
    )
    return dw


def _weight_strides(w: Tensor, layer: int) -> tuple[int, int, int]:
    """(expert, k, n) strides of a stacked weight: layer 0 is [d_in, E, h], deeper ones [E, h_in, h_out]."""
    return (w.stride(1), w.stride(0), w.stride(2)) if layer == 0 else (w.stride(0), w.stride(1), w.stride(2))


class _TopkExperts(torch.autograd.Function):
    """Experts on their routed rows only, the combine fused into the last layer's scatter."""

    @staticmethod
    def forward(ctx, num_layers: int, x: Tensor, gate_weights: Tensor, *params: Tensor) -> Tensor:
        weights, biases = params[:num_layers], params[num_layers:]
        routing = route(gate_weights)
        batch, num_gates, num_experts = gate_weights.shape
        hidden = biases[-1].shape[-1]
        out = torch.zeros(num_gates, batch, hidden, dtype=torch.float32, device=x.device)  # atomics: fp32
        acts: list[Tensor] = []
        if routing.rows.numel() > 0:
            a = x
            for i, (w, b) in enumerate(zip(weights, biases)):
                c = x.new_empty(routing.rows.numel(), b.shape[-1])
                last = i == num_layers - 1
                _grouped(
                    a,
                    w,
                    c,
                    routing,
                    weight_strides=_weight_strides(w, i),
                    bias=b.view(num_experts, -1),
                    relu=True,
                    gather=i == 0,
                    scatter_out=out if last else None,
                )
                acts.append(c)
                a = c
        ctx.save_for_backward(x, *weights, *acts)
        ctx.routing, ctx.num_layers, ctx.gate_shape = routing, num_layers, gate_weights.shape
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        num_layers, routing = ctx.num_layers, ctx.routing
        x, *rest = ctx.saved_tensors
        weights, acts = rest[:num_layers], rest[num_layers:]
        batch, num_gates, num_experts = ctx.gate_shape
        grad_w = [torch.zeros_like(w) for w in weights]
        grad_b = [x.new_zeros(num_experts, 1, w.shape[-1]) for w in weights]
        grad_gates = x.new_zeros(batch, num_experts, num_gates)
        want_x = ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if want_x else None
        if not acts:  # nothing routed: every gradient is zero
            return None, grad_x, grad_gates.transpose(1, 2), *grad_w, *grad_b
        picked = grad_out[:, routing.rows]  # [G, N, H]
        grad_gates[routing.rows, routing.experts] = (picked * acts[-1]).sum(-1).t()
        grad_h = (picked * routing.pair_weights.t().unsqueeze(-1)).sum(0)  # [N, H]
        for i in range(num_layers - 1, -1, -1):
            grad_pre = (grad_h * (acts[i] > 0)).contiguous()
            grad_b[i].view(num_experts, -1).index_add_(0, routing.experts, grad_pre)
            a = x if i == 0 else acts[i - 1]
            _grouped_wgrad(a, grad_pre, grad_w[i], routing, dw_strides=_weight_strides(grad_w[i], i), gather=i == 0)
            if i == 0 and not want_x:
                break
            e_stride, k_stride, n_stride = _weight_strides(weights[i], i)
            grad_h = _grouped(
                grad_pre,
                weights[i],
                x.new_empty(grad_pre.shape[0], a.shape[1]),
                routing,
                weight_strides=(e_stride, n_stride, k_stride),
            )
        if grad_x is not None:
            grad_x.index_add_(0, routing.rows, grad_h)
        return None, grad_x, grad_gates.transpose(1, 2), *grad_w, *grad_b


def _check(x: Tensor) -> None:
    if not triton_available():
        raise RuntimeError("Triton kernels need triton and a CUDA GPU (or TRITON_INTERPRET=1 set before import)")
    if not runs_on(x):
        raise ValueError("Triton kernels run on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")


def triton_dense_experts_combine(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], gate_weights: Tensor
) -> Tensor:
    """`grouped.dense_experts_combine` in Triton: x [B, d], gate_weights [B, G, E] → [G, B, H]."""
    _check(x)
    return _DenseExperts.apply(len(weights), x.contiguous(), gate_weights, *weights, *biases)


def triton_topk_experts_combine(x: Tensor, weights: list[Tensor], biases: list[Tensor], gate_weights: Tensor) -> Tensor:
    """`grouped.topk_experts_combine` in Triton: only routed (row, expert) pairs are computed."""
    _check(x)
    return _TopkExperts.apply(len(weights), x.contiguous(), gate_weights, *weights, *biases)
