"""fp32 matrix products through oneDNN where torch's own `mm` is slow.

torch's CPU `mm`/`addmm` call MKL. On AMD CPUs MKL runs an AVX2 code path even where the CPU has
AVX-512; oneDNN (bundled with torch, used by its compiler for CPU linear layers) runs AVX-512.
Measured on this project's 2-core AMD EPYC VM, torch 2.13: the first expert layer's three GEMMs
at census shapes ([1024, 263] x [263, 512] forward, and the two backward products) take 0.6-0.7 ms
through oneDNN against 1.4-1.6 ms through `mm`, with bias and ReLU fused into the forward for free.

Not differentiable: for hand-written backward passes (`kernels.dense.experts_combine`) and
inference. Anything else (another device or dtype, a torch without the op, or
RECSYS_MOE_ONEDNN=0) takes `addmm`, which gives the same values up to float rounding.

bf16 products (`bf16_products`, the trainer's `train.precision=bf16`): the operands are rounded
to bfloat16, oneDNN accumulates in fp32 and rounds the result to bfloat16, which comes back as
fp32. CPUs with bf16 dot-product instructions (AVX512-BF16, AMX) run these at 2-2.5x the fp32 rate
(measured at the census shapes on a Zen 4 core: 420 against 160-220 GFLOP/s); elsewhere oneDNN
emulates them, slower than fp32, which `bf16_native` tells apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _onednn_available() -> bool:
    value = os.environ.get("RECSYS_MOE_ONEDNN", "").strip()
    if value not in ("", "0", "1"):
        log.warning("RECSYS_MOE_ONEDNN=%r: expected 0 (off) or 1 (on); using 1", value)
    if value == "0":
        return False
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()
_local = threading.local()


def _threads_here() -> None:
    """Give this OS thread torch's thread count before oneDNN runs in it.

    oneDNN sizes its work by OpenMP's count, which is per OS thread: `torch.set_num_threads` in one
    thread leaves every other at OpenMP's default (all cores). torch's own ops fix that up as
    they enter a thread; oneDNN called directly does not. Measured: the server, which scores in
    worker threads at 1 thread each, ran every request's GEMMs on 2, and its closed-loop
    throughput fell from 585 to 314 requests/s.
    """
    n = torch.get_num_threads()
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)  # the same count: only this thread's OpenMP setting changes
        _local.threads = n


def _plain(t: Tensor) -> bool:
    """Row-major or its transpose, with no gaps: oneDNN's fast layouts. A column block of a wider
    matrix, transposed, took oneDNN 190 ms where MKL took 0.3 (its reference kernel, presumably)."""
    return t.is_contiguous() or t.t().is_contiguous()


def uses_onednn(a: Tensor, b: Tensor) -> bool:
    """Whether `matmul(a, b)` runs in oneDNN: plain fp32 CPU matrices, with the op present."""
    return (
        ONEDNN
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.dim() == 2
        and b.dim() == 2
        and _plain(a)
        and _plain(b)
    )


def bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), so bf16 products pay."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def bf16_products(enabled: bool = True) -> Iterator[None]:
    """Within the block, in this thread, the expert block's large products take bf16 operands.

    The kernels that honour it (`kernels.dense`) read the setting in their forward and keep it for
    their backward, so only the forward needs to run inside. Weights, activations and every other
    op stay fp32: the bulk of the FLOPs get the fast instructions, the rest keeps its precision.
    """
    previous = getattr(_local, "dtype", None)
    _local.dtype = torch.bfloat16 if enabled else None
    try:
        yield
    finally:
        _local.dtype = previous


def product_dtype() -> torch.dtype | None:
    """The operand dtype `bf16_products` set in this thread, or None (fp32)."""
    return getattr(_local, "dtype", None)


def bf16_product_count() -> int:
    """How many products took bf16 operands in this thread so far: a run can tell whether
    `train.precision=bf16` changed anything for its model (models without the dense expert block
    have no such product)."""
    return getattr(_local, "bf16_count", 0)


def matmul(
    a: Tensor, b: Tensor, bias: Tensor | None = None, relu: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) (then ReLU) → a new [M, N] tensor. Either operand may be a
    transposed view (oneDNN gets `a` copied row-major: faster, the same bits). Other strided views
    take `addmm`.

    `dtype=torch.bfloat16` rounds fp32 operands (and bias) to bf16 first; the result is fp32 all
    the same (its values rounded to bf16). Other dtypes (float64 in gradchecks) ignore it."""
    onednn = uses_onednn(a, b)  # decided on the fp32 operands: a cast below keeps the layout
    if dtype is None or not a.dtype == b.dtype == torch.float32:
        return _product(a, b, bias, relu, onednn)
    # A transposed `a` is cast and made row-major in one pass (what `_product` would copy again).
    a = a.to(dtype, memory_format=torch.contiguous_format) if onednn else a.to(dtype)
    out = _product(a, b.to(dtype), bias.to(dtype) if bias is not None else None, relu, onednn)
    _local.bf16_count = bf16_product_count() + 1
    return out.float()


def _product(a: Tensor, b: Tensor, bias: Tensor | None, relu: bool, onednn: bool) -> Tensor:
    if onednn:
        _threads_here()
        if not a.is_contiguous():
            # A transposed input (the weight gradient's x.t()): a copy first, then the row-major
            # product, gives the same bits faster than the op's own handling of it. The census
            # dW: 0.27 + 1.75 ms against 2.4-3.0 isolated; in a training step 0.3-0.5 ms less.
            a = a.contiguous()
        # `_linear_pointwise` computes input @ weight.T + bias, the op's layout for nn.Linear.
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "relu" if relu else "none", [], "")
    out = torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)
    return out.relu_() if relu else out
