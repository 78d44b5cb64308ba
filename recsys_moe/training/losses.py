"""Multi-task losses: per-task losses (BCE for binary, MSE for regression) and how they are
weighted into one number: fixed weights from the spec, or learned uncertainty weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def per_task_losses(logits: torch.Tensor, labels: torch.Tensor, is_binary: torch.Tensor) -> torch.Tensor:
    """logits, labels [B, T]; is_binary [T] → mean loss per task [T] (differentiable)."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
    mse = (logits - labels).square().mean(dim=0)
    return torch.where(is_binary, bce, mse)


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal & Cipolla (2018): learn s_t = log σ_t² per task and minimise
    Σ_t exp(-s_t) L_t + s_t. Noisy or hard tasks get down-weighted by the data itself, instead of
    by hand-tuned weights; the s_t term stops every weight from collapsing to zero."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        return (torch.exp(-self.log_vars) * per_task + self.log_vars).sum()

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach())
