"""Which precision the training step's products run in: `train.precision`, checked against the CPU."""

from __future__ import annotations

import logging

import torch

from recsys_moe.kernels import gemm

log = logging.getLogger(__name__)


def use_bf16(precision: str, device: torch.device | None = None) -> bool:
    """Whether to train under `gemm.bf16_products`: asked for, and the CPU (or GPU) has bf16
    instructions.

    Without them oneDNN emulates bf16 and the step gets slower, not faster: a config shared by
    hosts of both kinds should still train everywhere, so this falls back to fp32 and says so.
    """
    if precision != "bf16":
        return False
    on_gpu = device is not None and device.type == "cuda"
    if torch.cuda.is_bf16_supported() if on_gpu else gemm.bf16_native():
        return True
    log.warning(
        "train.precision=bf16: this %s has no bf16 instructions (%s), where bf16 products are emulated and "
        "slower than fp32; training in fp32",
        "GPU" if on_gpu else "CPU",
        "compute capability 8.0 or later" if on_gpu else "AVX512-BF16 or AMX",
    )
    return False


def warn_if_unused(products_before: int) -> bool:
    """After a bf16 epoch: warn when none of its products took bf16 operands; returns whether any did.

    Only the dense expert block has them (MMoE and OMoE with `expert_compute` dense, CGC, PLE,
    without dropout): Shared-Bottom, Single-Task, routed experts or dropout train in fp32 whatever
    `train.precision` says, and a user waiting for the speed-up should hear why it did not come.
    """
    if gemm.bf16_product_count() > products_before:
        return True
    log.warning(
        "train.precision=bf16: no product of this model ran in bf16; only the dense expert block has them "
        "(MMoE and OMoE with model.expert_compute=dense, CGC, PLE; without model.dropout), so it trained in fp32"
    )
    return False
