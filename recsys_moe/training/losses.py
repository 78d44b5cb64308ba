"""The multi-task loss: per-task losses (BCE for binary, MSE for regression), weighted and summed."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def multitask_loss(
    logits: torch.Tensor, labels: torch.Tensor, is_binary: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, labels [B, T]; is_binary, weights [T] → (weighted total, per-task losses [T])."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
    mse = (logits - labels).square().mean(dim=0)
    per_task = torch.where(is_binary, bce, mse)
    return (per_task * weights).sum(), per_task.detach()
