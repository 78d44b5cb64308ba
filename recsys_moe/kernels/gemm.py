"""fp32 matrix products through oneDNN where torch's own `mm` is slow.

torch's CPU `mm`/`addmm` call MKL. On AMD CPUs MKL runs an AVX2 code path even where the CPU has
AVX-512; oneDNN (bundled with torch, used by its compiler for CPU linear layers) runs AVX-512.
Measured on this project's 2-core AMD EPYC VM, torch 2.13: the first expert layer's three GEMMs
at census shapes ([1024, 263] x [263, 512] forward, and the two backward products) take 0.6-0.7 ms
through oneDNN against 1.4-1.6 ms through `mm`, with bias and ReLU fused into the forward for free.

Not differentiable: for hand-written backward passes (`kernels.dense.experts_combine`) and
inference. Anything else (another device or dtype, a torch without the op, or
RECSYS_MOE_ONEDNN=0) takes `addmm`, which gives the same values up to float rounding.
"""

from __future__ import annotations

import logging
import os
import threading

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


def matmul(a: Tensor, b: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) (then ReLU) → a new [M, N] tensor. Either operand may be a
    transposed view: neither path copies it. Other strided views take `addmm`."""
    if uses_onednn(a, b):
        _threads_here()
        # `_linear_pointwise` computes input @ weight.T + bias, the op's layout for nn.Linear.
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "relu" if relu else "none", [], "")
    out = torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)
    return out.relu_() if relu else out
