"""Expert-block kernels against a plain loop over nn.Linear experts.

The torch paths (recsys_moe.kernels.grouped) are checked in float64, forward and backward. The
Triton kernels run under the interpreter in a subprocess (TRITON_INTERPRET must be set before
triton is imported, which this process may already have done), and on the GPU when there is one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from recsys_moe.kernels import gemm, grouped
from recsys_moe.kernels.dense import combine, dense_experts_combine, experts_combine, gated_experts_combine
from recsys_moe.kernels.grouped import route, topk_experts_combine
from recsys_moe.model.gates import Gates
from recsys_moe.model.stacked import StackedMLP

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (batch, d_in, hidden, experts, gates, k)
SHAPES = [
    (32, 12, [16, 8], 4, 2, 2),
    (1, 8, [8], 3, 1, 1),  # batch of one
    (50, 10, [12, 6], 16, 3, 2),
    (40, 6, [5], 6, 2, 1),
    (64, 9, [7, 7, 4], 8, 2, 2),  # three layers
    (300, 8, [6], 3, 1, 1),  # larger groups
]


def make_experts(d_in: int, hidden: list[int], num_experts: int, dtype: torch.dtype, seed: int):
    """A StackedMLP's tensors (weights, biases) with fresh random values."""
    torch.manual_seed(seed)
    mlp = StackedMLP(num_experts, d_in, hidden).to(dtype)
    with torch.no_grad():
        for b in mlp.biases:
            b.normal_(0, 0.3)  # biases of both signs, so some ReLUs are off
    return [w.detach() for w in mlp.weights], [b.detach() for b in mlp.biases]


def topk_gates(batch: int, num_gates: int, num_experts: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Top-k renormalised gate weights, skewed so groups are ragged, and the last expert never picked."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_gates, num_experts, generator=gen, dtype=dtype)
    logits = logits + torch.linspace(1.5, -1.5, num_experts, dtype=dtype)  # popular and rare experts
    logits[..., -1] = float("-inf")
    return _scatter_topk(logits, k)


def _scatter_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def loop_reference(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], gate_weights: torch.Tensor
) -> tuple[torch.Tensor, list[nn.Sequential]]:
    """One nn.Sequential of nn.Linear + ReLU per expert, combined by a loop over gates and experts.

    Returns the output and the experts, whose parameter gradients `stacked_grads` maps back.
    """
    num_experts = weights[0].shape[1]
    experts = []
    for e in range(num_experts):
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(weights, biases)):
            w_e = w[:, e] if i == 0 else w[e]
            linear = nn.Linear(*w_e.shape, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w_e.t())
                linear.bias.copy_(b[e, 0])
            layers += [linear, nn.ReLU()]
        experts.append(nn.Sequential(*layers))
    outs = [expert(x) for expert in experts]
    gates = []
    for g in range(gate_weights.shape[1]):
        gates.append(sum(gate_weights[:, g, e : e + 1] * outs[e] for e in range(num_experts)))
    return torch.stack(gates), experts


def stacked_grads(experts: list[nn.Sequential]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The loop experts' parameter gradients in StackedMLP's layout."""
    linears = [[m for m in expert if isinstance(m, nn.Linear)] for expert in experts]
    grad_w, grad_b = [], []
    for i in range(len(linears[0])):
        w = torch.stack([layers[i].weight.grad.t() for layers in linears])  # [E, in, out]
        grad_w.append(w.transpose(0, 1) if i == 0 else w)
        grad_b.append(torch.stack([layers[i].bias.grad for layers in linears]).unsqueeze(1))
    return grad_w, grad_b


def run_with_grads(fn, x, weights, biases, gate_weights, grad_out):
    """fn's output and the gradients of <output, grad_out> w.r.t. x, gate weights, weights, biases."""
    leaves = [t.clone().requires_grad_() for t in (x, gate_weights, *weights, *biases)]
    n = len(weights)
    out = fn(leaves[0], leaves[2 : 2 + n], leaves[2 + n :], leaves[1])
    (out * grad_out).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(("batch", "d_in", "hidden", "num_experts", "num_gates", "k"), SHAPES)
@pytest.mark.parametrize("path", ["topk-padded", "topk-loop", "dense", "dense-manual-backward"])
def test_matches_linear_loop(batch, d_in, hidden, num_experts, num_gates, k, path: str, monkeypatch) -> None:
    monkeypatch.setattr(grouped, "_pads", lambda routing: path == "topk-padded")  # both strategies, every shape
    dtype = torch.float64
    weights, biases = make_experts(d_in, hidden, num_experts, dtype, seed=batch + num_experts)
    x = torch.randn(batch, d_in, dtype=dtype)
    gate_weights = topk_gates(batch, num_gates, num_experts, k, dtype, seed=batch)
    grad_out = torch.randn(num_gates, batch, hidden[-1], dtype=dtype)

    x_ref, gw_ref = x.clone().requires_grad_(), gate_weights.clone().requires_grad_()
    ref, experts = loop_reference(x_ref, weights, biases, gw_ref)
    (ref * grad_out).sum().backward()
    ref_grad_w, ref_grad_b = stacked_grads(experts)

    fns = {"dense": dense_experts_combine, "dense-manual-backward": experts_combine}
    fn = fns.get(path, topk_experts_combine)
    out, (grad_x, grad_gw, *grad_params) = run_with_grads(fn, x, weights, biases, gate_weights, grad_out)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(grad_x, x_ref.grad)
    for got, want in zip(grad_params, ref_grad_w + ref_grad_b):
        torch.testing.assert_close(got, want)
    if path.startswith("dense"):
        torch.testing.assert_close(grad_gw, gw_ref.grad)
    else:  # exact where some gate routed the (row, expert) pair; zero where no gate did (not computed)
        routed = (gate_weights != 0).any(dim=1, keepdim=True).expand_as(gate_weights)
        assert not routed.all()
        torch.testing.assert_close(grad_gw[routed], gw_ref.grad[routed])
        assert (grad_gw[~routed] == 0).all()


def test_topk_gradient_through_the_router_matches() -> None:
    """Through a real top-k producer, the gradient w.r.t. the logits is the dense one exactly."""
    dtype = torch.float64
    weights, biases = make_experts(10, [12, 6], 8, dtype, seed=0)
    x = torch.randn(48, 10, dtype=dtype)
    logits = torch.randn(48, 2, 8, dtype=dtype)
    grads = []
    for fn in (topk_experts_combine, dense_experts_combine):
        leaf = logits.clone().requires_grad_()
        fn(x, weights, biases, _scatter_topk(leaf, 2)).square().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_route_groups_union_of_gates_by_expert() -> None:
    gate_weights = torch.zeros(4, 2, 5)
    gate_weights[0, 0, 3] = 0.7  # row 0: expert 3 from gate 0, expert 1 from gate 1
    gate_weights[0, 1, 1] = 0.2
    gate_weights[2, 0, 1] = 1.0  # row 2: expert 1 from both gates (one pair)
    gate_weights[2, 1, 1] = 0.5
    gate_weights[3, 1, 0] = 0.4  # row 1 routes nowhere; experts 2 and 4 get nothing
    r = route(gate_weights)
    assert r.experts.tolist() == [0, 1, 1, 3]
    assert r.rows.tolist() == [3, 0, 2, 0]
    assert r.counts == [1, 2, 0, 1, 0]
    assert r.offsets.tolist() == [0, 1, 3, 3, 4, 4]
    torch.testing.assert_close(r.pair_weights, torch.tensor([[0.0, 0.4], [0.0, 0.2], [1.0, 0.5], [0.7, 0.0]]))


@pytest.mark.parametrize("padded", [False, True])
def test_topk_computes_routed_rows_only(padded: bool, monkeypatch) -> None:
    """The expert GEMMs cost the routed (row, expert) pairs, or with padding every expert at the
    largest group's size, not B x E."""
    monkeypatch.setattr(grouped, "_pads", lambda routing: padded)
    batch, d_in, hidden, num_experts = 64, 16, [32, 8], 16
    weights, biases = make_experts(d_in, hidden, num_experts, torch.float32, seed=1)
    gate_weights = topk_gates(batch, 2, num_experts, 2, torch.float32, seed=1)
    counts = (gate_weights != 0).any(dim=1).sum(dim=0)
    rows = num_experts * int(counts.max()) if padded else int(counts.sum())
    assert rows < batch * num_experts
    with FlopCounterMode(display=False) as counter:
        topk_experts_combine(torch.randn(batch, d_in), weights, biases, gate_weights)
    assert counter.get_total_flops() == 2 * rows * (d_in * 32 + 32 * 8)


def test_no_routed_rows_gives_zeros() -> None:
    weights, biases = make_experts(6, [4], 3, torch.float32, seed=2)
    x = torch.randn(5, 6, requires_grad=True)
    out = topk_experts_combine(x, weights, biases, torch.zeros(5, 2, 3))
    assert out.shape == (2, 5, 4) and (out == 0).all()


def test_dense_path_is_stacked_mlp_plus_combine() -> None:
    mlp = StackedMLP(6, 10, [12, 5])
    x = torch.randn(20, 10)
    gate_weights = torch.softmax(torch.randn(20, 3, 6), dim=-1)
    torch.testing.assert_close(
        dense_experts_combine(x, list(mlp.weights), list(mlp.biases), gate_weights), combine(mlp(x), gate_weights)
    )


@pytest.mark.parametrize("hidden", [[5], [6, 4], [7, 5, 3]])
def test_manual_backward_passes_gradcheck(hidden: list[int]) -> None:
    """The hand-written backward against finite differences, every input at once (float64)."""
    weights, biases = make_experts(4, hidden, 3, torch.float64, seed=len(hidden))
    gate_weights = torch.softmax(torch.randn(6, 2, 3, dtype=torch.float64), dim=-1)
    leaves = [t.clone().requires_grad_() for t in (torch.randn(6, 4, dtype=torch.float64), gate_weights)]
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    n = len(weights)
    assert torch.autograd.gradcheck(
        lambda x, g, *p: experts_combine(x, list(p[:n]), list(p[n:]), g), (*leaves, *params)
    )


@pytest.mark.parametrize("onednn", [False, True])
def test_manual_backward_matches_autograd_at_census_shapes(onednn: bool, monkeypatch) -> None:
    """float32, MMoE's census shapes. With torch's GEMMs it is the autograd path bit for bit; with
    oneDNN's (`kernels.gemm`, the default on x86 CPUs) equal up to float32 rounding."""
    if onednn and not gemm.ONEDNN:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(gemm, "ONEDNN", onednn)
    weights, biases = make_experts(263, [64, 32], 8, torch.float32, seed=3)
    x = torch.randn(1024, 263)
    gate_weights = torch.softmax(torch.randn(1024, 2, 8), dim=-1)
    grad_out = torch.randn(2, 1024, 32)
    ref, ref_grads = run_with_grads(dense_experts_combine, x, weights, biases, gate_weights, grad_out)
    out, grads = run_with_grads(experts_combine, x, weights, biases, gate_weights, grad_out)
    if onednn:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 7, 5), (64, 263, 512), (300, 33, 17)])
def test_onednn_matmul_is_torch_mm(shape: tuple[int, int, int]) -> None:
    """`gemm.matmul` against `addmm`: plain and transposed operands, with and without bias and ReLU."""
    m, k, n = shape
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    for left, right in [(a, b), (a.t().contiguous().t(), b.t().contiguous().t())]:
        want = torch.addmm(bias, left, right).relu_()
        torch.testing.assert_close(gemm.matmul(left, right, bias, relu=True), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gemm.matmul(left, right), left @ right, rtol=1e-5, atol=1e-4)
    double = a.double(), b.double()  # not oneDNN's: torch's, exactly
    assert not gemm.uses_onednn(*double)
    assert torch.equal(gemm.matmul(*double), double[0] @ double[1])
    block = torch.randn(k, 2 * m)[:, :m].t()  # a gap between rows: torch's, exactly
    assert not gemm.uses_onednn(block, b)
    assert torch.equal(gemm.matmul(block, b), block @ b)
    assert gemm.uses_onednn(a, b.t().contiguous().t()) == gemm.ONEDNN


@pytest.mark.skipif(not gemm.ONEDNN, reason="oneDNN's linear op is not in this torch build")
@pytest.mark.parametrize("shape", [(263, 1024, 528), (263, 1000, 528), (5, 7, 3), (50, 1, 70)])
def test_a_transposed_left_operand_is_copied_first_with_the_same_bits(shape: tuple[int, int, int]) -> None:
    """The weight gradient's x.t(): `matmul` copies it row-major before oneDNN (faster), and the
    product is bit for bit the op's own on the transposed view."""
    m, k, n = shape
    x, g = torch.randn(k, m), torch.randn(k, n)
    assert gemm.uses_onednn(x.t(), g)
    own = torch.ops.mkldnn._linear_pointwise(x.t(), g.t(), None, "none", [], "")
    assert torch.equal(gemm.matmul(x.t(), g), own)


def gated_leaves(batch: int, d_in: int, hidden: list[int], experts: int, gates: int, dtype: torch.dtype, seed: int):
    """Leaves for the gated block: x, a Gates module's weight and bias, expert weights and biases."""
    weights, biases = make_experts(d_in, hidden, experts, dtype, seed=seed)
    gate = Gates(d_in, experts, gates).to(dtype)
    with torch.no_grad():
        gate.bias.normal_(0, 0.5)
    x = torch.randn(batch, d_in, dtype=dtype)
    return [t.detach().clone().requires_grad_() for t in (x, gate.weight, gate.bias, *weights, *biases)]


def unfused_gated(x, gate_weight, gate_bias, temperature, weights, biases):
    """What MMoE ran before the gates moved into the block: `Gates`, then `experts_combine`."""
    gate = Gates(x.shape[1], gate_weight.shape[2], gate_weight.shape[0], temperature=temperature)
    out = torch.func.functional_call(gate, {"weight": gate_weight, "bias": gate_bias}, (x,))
    return experts_combine(x, weights, biases, out.weights), out.probs


@pytest.mark.parametrize(
    ("batch", "hidden", "experts", "gates", "temperature"),
    [
        (6, [5], 3, 2, 1.0),
        (6, [6, 4], 3, 1, 0.5),
        (6, [7, 5, 3], 3, 3, 2.0),
        (64, [3], 8, 2, 0.5),  # enough rows for the transposed softmax (kernels.dense._softmax_experts)
    ],
)
def test_gated_block_passes_gradcheck(
    batch: int, hidden: list[int], experts: int, gates: int, temperature: float
) -> None:
    """Both outputs (the mixture and the gate probabilities, which the balance loss reads) against
    finite differences, every input at once (float64)."""
    leaves = gated_leaves(batch, 4, hidden, experts, gates, torch.float64, seed=len(hidden))
    n = len(hidden)

    def fn(x, gw, gb, *p):
        return gated_experts_combine(x, list(p[:n]), list(p[n:]), gw, gb, temperature)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("batch", [1, 1024])
def test_gated_block_is_gates_then_block(batch: int) -> None:
    """float32 at the census shapes (oneDNN where the CPU has it), and a batch of one: the same
    mixture, probabilities and gradients as `Gates` followed by `experts_combine`, with a loss on
    both outputs."""
    leaves = gated_leaves(batch, 263, [64, 32], 8, 2, torch.float32, seed=batch)
    grad_out, grad_probs = torch.randn(2, batch, 32), torch.randn(batch, 2, 8)
    results = []
    for fn in (unfused_gated, gated_experts_combine):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        x, gw, gb, *p = copies
        mixed, probs = fn(x, gw, gb, 0.7, p[:2], p[2:]) if fn is unfused_gated else fn(x, p[:2], p[2:], gw, gb, 0.7)
        assert mixed.shape == (2, batch, 32) and probs.shape == (batch, 2, 8)
        ((mixed * grad_out).sum() + (probs * grad_probs).sum()).backward()
        results.append((mixed.detach(), probs.detach(), [t.grad for t in copies]))
    (want_mixed, want_probs, want_grads), (mixed, probs, grads) = results
    torch.testing.assert_close(mixed, want_mixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):  # sums over 1024 rows, in other orders: float32 rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_manual_backward_skips_the_input_gradient_when_not_needed() -> None:
    weights, biases = make_experts(5, [4, 3], 2, torch.float32, seed=4)
    w = [t.clone().requires_grad_() for t in weights]
    out = experts_combine(torch.randn(3, 5), w, biases, torch.full((3, 1, 2), 0.5))
    out.sum().backward()
    assert w[0].grad is not None and w[0].grad.abs().sum() > 0


# ---- bf16 products ----------------------------------------------------------------------------


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("onednn", [True, False])
def test_bf16_matmul_rounds_the_operands_and_the_result(onednn: bool, monkeypatch) -> None:
    """fp32 in and out; the value is the product of the bf16-rounded operands, rounded to bf16.
    Transposed and gapped operands (oneDNN's and `addmm`'s paths) give the same."""
    monkeypatch.setattr(gemm, "ONEDNN", onednn and gemm.ONEDNN)
    m, k, n = 64, 263, 96
    a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    gapped = torch.randn(k, 2 * m)[:, :m].t()
    for left, right in [(a, b), (a.t().contiguous().t(), b.t().contiguous().t()), (gapped, b)]:
        want = torch.addmm(*(t.bfloat16().float() for t in (bias, left, right))).relu_()
        got = gemm.matmul(left, right, bias, relu=True, dtype=torch.bfloat16)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        # One bf16 rounding of the result (8 bits): a relative error under 2^-8 per entry.
        torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-3)
        assert torch.equal(got, got.bfloat16().float())  # its values are bf16 values
    assert not torch.equal(gemm.matmul(a, b, dtype=torch.bfloat16), a @ b)
    double = a.double(), b.double()  # not fp32: the setting does not apply
    assert torch.equal(gemm.matmul(*double, dtype=torch.bfloat16), double[0] @ double[1])


def test_bf16_products_are_per_thread_and_nest() -> None:
    seen = []
    with gemm.bf16_products():
        assert gemm.product_dtype() == torch.bfloat16
        with gemm.bf16_products(False):
            assert gemm.product_dtype() is None
        assert gemm.product_dtype() == torch.bfloat16
        worker = threading.Thread(target=lambda: seen.append(gemm.product_dtype()))
        worker.start()
        worker.join()
    assert gemm.product_dtype() is None and seen == [None]


@pytest.mark.parametrize("batch", [1, 1024])
def test_the_gated_block_under_bf16_products_stays_close_to_fp32(batch: int) -> None:
    """Census shapes and a batch of one: the mixture, the probabilities and every gradient near
    fp32's (the relative error of each tensor), all fp32, and not fp32's exactly."""
    leaves = gated_leaves(batch, 263, [64, 32], 8, 2, torch.float32, seed=7 + batch)
    grad_out, grad_probs = torch.randn(2, batch, 32), torch.randn(batch, 2, 8)
    results = []
    for bf16 in (False, True):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        x, gw, gb, *p = copies
        with gemm.bf16_products(bf16):
            mixed, probs = gated_experts_combine(x, p[:2], p[2:], gw, gb, 0.7)
        ((mixed * grad_out).sum() + (probs * grad_probs).sum()).backward()  # outside: the forward's choice holds
        results.append((mixed.detach(), probs.detach(), [t.grad for t in copies]))
    (want_mixed, want_probs, want_grads), (mixed, probs, grads) = results
    assert mixed.dtype == probs.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert _rel(mixed, want_mixed) < 1e-2 and _rel(probs, want_probs) < 1e-2
    # Per entry, one bf16 rounding (~2^-9): batch 1 shows that. Over 1024 rows the random upstream
    # gradients cancel, and the sums' relative error grows with that (measured 4-5.5%).
    limit = 1e-2 if batch == 1 else 0.1
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) < limit, (got.shape, _rel(got, want))
    assert not torch.equal(mixed, want_mixed)
    assert not torch.equal(grads[3], want_grads[3])  # the first layer's weights: a bf16 product


def test_the_backward_runs_in_the_precision_its_forward_ran() -> None:
    """`experts_combine`'s backward follows its forward's setting, not the one around `backward()`."""
    weights, biases = make_experts(263, [64, 32], 8, torch.float32, seed=11)
    x = torch.randn(256, 263)
    gates = torch.softmax(torch.randn(256, 2, 8), dim=-1)

    def grads(forward_bf16: bool, backward_bf16: bool) -> list[Tensor]:
        w = [t.detach().clone().requires_grad_() for t in weights]
        xi = x.clone().requires_grad_()
        with gemm.bf16_products(forward_bf16):
            out = experts_combine(xi, w, biases, gates)
        with gemm.bf16_products(backward_bf16):
            out.square().sum().backward()
        return [xi.grad, *(t.grad for t in w)]

    for a, b in zip(grads(True, False), grads(True, True)):
        assert torch.equal(a, b)
    for a, b in zip(grads(False, True), grads(False, False)):
        assert torch.equal(a, b)
    assert not torch.equal(grads(True, True)[1], grads(False, False)[1])


# ---- Triton -------------------------------------------------------------------------------------

# (batch, d_in, hidden, experts, gates, k): small, the interpreter runs every program in Python.
TRITON_SHAPES = [(19, 24, [20, 12], 5, 2, 2), (7, 16, [16], 3, 1, 1), (1, 20, [18, 16], 4, 3, 2)]


def triton_errors(device: str) -> dict[str, float]:
    """Largest error of the Triton paths against the torch ones (output and every gradient),
    relative to the largest reference value, in float32."""
    from recsys_moe.kernels import triton_experts

    assert triton_experts.triton_available()
    pairs = [
        ("dense", dense_experts_combine, triton_experts.triton_dense_experts_combine),
        ("topk", topk_experts_combine, triton_experts.triton_topk_experts_combine),
    ]
    errors = {}
    for batch, d_in, hidden, num_experts, num_gates, k in TRITON_SHAPES:
        weights, biases = make_experts(d_in, hidden, num_experts, torch.float32, seed=batch)
        gate_weights = topk_gates(batch, num_gates, num_experts, k, torch.float32, seed=batch)
        x, gate_weights = torch.randn(batch, d_in, device=device), gate_weights.to(device)
        weights, biases = [w.to(device) for w in weights], [b.to(device) for b in biases]
        grad_out = torch.randn(num_gates, batch, hidden[-1], device=device)
        for name, ref_fn, fn in pairs:
            ref = run_with_grads(ref_fn, x, weights, biases, gate_weights, grad_out)
            got = run_with_grads(fn, x, weights, biases, gate_weights, grad_out)
            for i, (a, b) in enumerate(zip([got[0], *got[1]], [ref[0], *ref[1]])):
                errors[f"{name}/{batch}x{d_in}/{'out' if i == 0 else f'grad{i - 1}'}"] = relative_error(a, b)
    return errors


def under_interpreter(errors_of: str) -> dict[str, float]:
    """`errors_of('cpu')` (a function of this module) run in a subprocess under Triton's
    interpreter: TRITON_INTERPRET must be set before triton is imported, which this process may
    already have done."""
    code = f"import json, tests.test_kernels as t; print(json.dumps(t.{errors_of}('cpu')))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernels_under_interpreter() -> None:
    errors = under_interpreter("triton_errors")
    assert len(errors) == 2 * sum(1 + 2 + 2 * len(s[2]) for s in TRITON_SHAPES)  # out, x, gates, W, b
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])


def test_triton_module_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from recsys_moe.kernels import triton_experts as te\n"
        "assert not te.triton_available()\n"
        "try:\n"
        "    w, b = [torch.randn(3, 2, 4)], [torch.randn(2, 1, 4)]\n"
        "    te.triton_topk_experts_combine(torch.randn(2, 3), w, b, torch.ones(2, 1, 2))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and triton")
def test_triton_kernels_on_gpu() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the interpreter test covers this")
    errors = triton_errors("cuda")
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, (worst, errors[worst])  # TF32 is allowed when torch allows it


# ---- the Triton kernels inside the model (model.expert_compute=triton) ------------------------


def mmoe_triton_errors(device: str) -> dict[str, float]:
    """MMoE with expert_compute=triton against the same weights computed by the torch path, for a
    softmax and a top-k gate: the largest relative error of the logits and of every gradient."""
    from recsys_moe.model.mmoe import MMoE

    errors = {}
    for gate, reference in (("softmax", "dense"), ("topk", "routed")):
        torch.manual_seed(0)
        ref = MMoE(14, 2, num_experts=5, expert_hidden=(12, 8), gate=gate, top_k=2, compute=reference).to(device)
        tri = MMoE(14, 2, num_experts=5, expert_hidden=(12, 8), gate=gate, top_k=2, compute="triton").to(device)
        tri.load_state_dict(ref.state_dict())
        x = torch.randn(33, 14, device=device)
        outs = []
        for model in (ref, tri):
            logits = model(x).logits
            logits.square().sum().backward()
            outs.append([logits.detach(), *(p.grad for p in model.parameters())])
        for i, (a, b) in enumerate(zip(outs[1], outs[0])):
            errors[f"{gate}/{'logits' if i == 0 else f'grad{i}'}"] = relative_error(a, b)
    return errors


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_mmoe_runs_the_triton_kernels_under_interpreter() -> None:
    errors = under_interpreter("mmoe_triton_errors")
    assert {k.split("/")[0] for k in errors} == {"softmax", "topk"}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])


def test_triton_compute_falls_back_to_torch_off_cuda() -> None:
    """A model trained with the Triton kernels evaluates and serves on a CPU: same outputs as the
    torch path, and nothing of Triton runs (it would refuse CPU tensors outside the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter Triton takes CPU tensors")
    from recsys_moe.config import ModelConfig
    from recsys_moe.model.mmoe import MMoE
    from recsys_moe.model.ranker import build_arch

    for gate in ("softmax", "topk"):
        torch.manual_seed(0)
        ref = MMoE(10, 2, num_experts=4, expert_hidden=(8,), gate=gate)
        tri = build_arch(
            ModelConfig(arch="mmoe", num_experts=4, expert_hidden=[8], gate=gate, expert_compute="triton"), 10, 2
        )
        tri.load_state_dict(ref.state_dict())
        x = torch.randn(7, 10)
        torch.testing.assert_close(tri(x).logits, ref(x).logits)
    with pytest.raises(ValueError, match="without dropout"):
        build_arch(ModelConfig(arch="mmoe", dropout=0.1, expert_compute="triton"), 10, 2)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and triton")
def test_mmoe_runs_the_triton_kernels_on_gpu() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the interpreter test covers this")
    errors = mmoe_triton_errors("cuda")
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, (worst, errors[worst])  # TF32 is allowed when torch allows it


def test_onednn_keeps_torchs_thread_count_in_worker_threads() -> None:
    """OpenMP's thread count is per OS thread: a server scoring in worker threads at 1 thread each
    must not run oneDNN's GEMMs on every core (CPU time per wall second is the thread count)."""
    if not gemm.ONEDNN:
        pytest.skip("this torch has no oneDNN linear")
    import resource
    import threading

    a, b = torch.randn(2048, 263), torch.randn(263, 512)
    seen: list[float] = []

    def work() -> None:
        gemm.matmul(a, b)
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(40):
            gemm.matmul(a, b)
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
        seen.append(used / (time.perf_counter() - start))

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(before)
    assert seen and seen[0] < 1.3


def test_a_misspelt_onednn_setting_is_named_in_a_warning() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import recsys_moe.kernels.gemm"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RECSYS_MOE_ONEDNN": "off"},
    )
    assert "RECSYS_MOE_ONEDNN='off': expected 0 (off) or 1 (on)" in out.stderr
