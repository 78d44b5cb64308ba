"""Plots people would rather look at than read: learning curves and expert usage."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs in CI and on servers
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def validation_curves(
    history: Sequence[dict[str, float]], tasks: Sequence[str], metric: dict[str, str], selected_epoch: int
) -> Figure:
    """One panel per task: its validation metric per epoch, with the epoch the model was selected
    at (on the mean over tasks) marked, so a task that peaked elsewhere is visible."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
    epochs = [int(h["epoch"]) for h in history]
    for ax, task in zip(axes[0], tasks):
        name = metric[task]
        values = [h[f"val_{task}_{name}"] for h in history]
        ax.plot(epochs, values, marker="o")
        if selected_epoch in epochs:
            value = values[epochs.index(selected_epoch)]
            ax.axvline(selected_epoch, color="grey", linestyle=":", label=f"selected epoch: {value:.4f}")
            ax.legend(loc="best")
        ax.set_title(f"{task}: validation {name}")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def gate_heatmap(weights: np.ndarray, tasks: Sequence[str], title: str = "mean gate weight per expert") -> Figure:
    """Per expert (columns) for each task (rows) on validation data: mean gate weight, or the
    share of samples routed to it under top-k."""
    n_tasks, n_experts = weights.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n_experts, 1.2 + 0.5 * n_tasks))
    im = ax.imshow(weights, cmap="viridis", vmin=0, vmax=max(float(weights.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(n_experts), [f"e{i}" for i in range(n_experts)])
    ax.set_yticks(range(n_tasks), list(tasks))
    for t in range(n_tasks):
        for e in range(n_experts):
            ax.text(e, t, f"{weights[t, e]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
