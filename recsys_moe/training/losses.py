"""Multi-task losses: per-task losses (BCE for binary, MSE for regression) and how they are
weighted into one number: fixed weights from the spec, or learned uncertainty weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recsys_moe.model.gates import GateOutput, balance_loss
from recsys_moe.pipelines.manifest import Manifest


def per_task_losses(logits: torch.Tensor, labels: torch.Tensor, is_binary: torch.Tensor) -> torch.Tensor:
    """logits, labels [B, T]; is_binary [T] → mean loss per task [T] (differentiable)."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
    if bool(is_binary.all()):  # the common case: no regression loss to compute and discard
        return bce
    mse = (logits - labels).square().mean(dim=0)
    return torch.where(is_binary, bce, mse)


def task_weights(manifest: Manifest, tasks: list[str]) -> torch.Tensor:
    """The spec's fixed weight of each trained task, in the model's task order."""
    return torch.tensor([next(t.weight for t in manifest.tasks if t.name == n) for n in tasks])


def training_loss(
    per_task: torch.Tensor,
    weights: torch.Tensor,
    weighting: UncertaintyWeighting | None,
    gates: list[GateOutput] | None,
    balance_weight: float,
    embeddings: torch.Tensor | None = None,
    embedding_l2: float = 0.0,
) -> torch.Tensor:
    """The one number training minimises: per-task losses weighted (fixed or learned), plus the
    gates' load-balancing loss and the embedding penalty when they are switched on. Single-process
    and sharded training share it."""
    loss = weighting(per_task) if weighting is not None else (per_task * weights).sum()
    if balance_weight > 0 and gates:
        loss = loss + balance_weight * sum(balance_loss(g) for g in gates)
    if embedding_l2 > 0 and embeddings is not None and embeddings.numel():
        loss = loss + embedding_l2 * embedding_penalty(embeddings)
    return loss


def embedding_penalty(pooled: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's rows of the squared norm of their pooled embeddings [B, D].

    On the looked-up rows, not the whole tables: a sparse optimizer only touches the rows a batch
    uses, and a penalty on every row would update (and shrink) all of them every step. An id is
    pulled toward zero each time it is seen, in step with the evidence that moves it away."""
    return pooled.square().sum(dim=1).mean()


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
