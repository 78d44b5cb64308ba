"""The full model: sparse embeddings + dense features → a multi-task architecture → logits.

Built from a manifest (table sizes, dense width, tasks) and a ModelConfig, so the same spec
trains any architecture with a one-word config change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor, KeyedTensor

from recsys_moe.config import ModelConfig
from recsys_moe.model.embeddings import RowBatch, SparseArch
from recsys_moe.model.mmoe import MMoE
from recsys_moe.model.omoe import OMoE
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.ple import PLE
from recsys_moe.model.shared_bottom import SharedBottom
from recsys_moe.model.towers import TaskTowers
from recsys_moe.pipelines.manifest import Manifest


def _shared_bottom(c: ModelConfig, d_in: int, num_tasks: int) -> nn.Module:
    return SharedBottom(d_in, num_tasks, c.bottom_hidden, c.tower_hidden, c.dropout)


def _experts(c: ModelConfig) -> dict[str, Any]:
    """The expert block's settings shared by MMoE, OMoE, CGC and PLE."""
    return {"gate": c.gate, "temperature": c.gate_temperature, "top_k": c.top_k, "dropout": c.dropout}


def _moe(c: ModelConfig) -> dict[str, Any]:
    """MMoE's and OMoE's settings, with how their experts run."""
    compute = c.expert_compute
    if compute == "auto":  # top-k gates without dropout run experts on their routed rows only
        compute = "routed" if c.gate != "softmax" and c.dropout == 0 else "dense"
    return {
        "num_experts": c.num_experts,
        "expert_hidden": c.expert_hidden,
        "tower_hidden": c.tower_hidden,
        "compute": compute,
        **_experts(c),
    }


def _ple(c: ModelConfig, d_in: int, num_tasks: int, levels: int) -> nn.Module:
    return PLE(
        d_in,
        num_tasks,
        c.num_task_experts,
        c.num_shared_experts,
        c.expert_hidden,
        c.tower_hidden,
        levels=levels,
        **_experts(c),
    )


# `model.arch` → the multi-task part of the model; every one maps [B, d_in] → ArchOutput. The
# names are `recsys_moe.config.ARCHITECTURES` (a test keeps the two in step).
ARCH_BUILDERS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "single_task": _shared_bottom,
    "shared_bottom": _shared_bottom,
    "omoe": lambda c, d_in, num_tasks: OMoE(d_in, num_tasks, **_moe(c)),
    "mmoe": lambda c, d_in, num_tasks: MMoE(d_in, num_tasks, **_moe(c)),
    "cgc": lambda c, d_in, num_tasks: _ple(c, d_in, num_tasks, levels=1),  # PLE with one extraction layer
    "ple": lambda c, d_in, num_tasks: _ple(c, d_in, num_tasks, levels=c.ple_levels),
}


def build_arch(config: ModelConfig, d_in: int, num_tasks: int) -> nn.Module:
    return ARCH_BUILDERS[config.arch](config, d_in, num_tasks)


class MultiTaskRanker(nn.Module):
    def __init__(
        self,
        manifest: Manifest,
        config: ModelConfig,
        tasks: list[str] | None = None,
        fused_optimizer: tuple[str, dict[str, float]] | None = None,
        sparse_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task_names = tasks or manifest.task_names
        unknown = sorted(set(self.task_names) - set(manifest.task_names))
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the manifest (has {manifest.task_names})")
        if config.arch == "single_task" and len(self.task_names) != 1:
            raise ValueError(
                f"arch single_task trains exactly one task, got {self.task_names}: set train.tasks=[<task>]"
            )
        self.task_types = [next(t.type for t in manifest.tasks if t.name == n) for n in self.task_names]
        # sparse_device="meta": tables are allocated later, shard by shard (distributed training)
        self.sparse = SparseArch(manifest.sparse_features, config.pack_tables_below, fused_optimizer, sparse_device)
        self.num_dense = len(manifest.dense_features)
        d_in = self.sparse.output_dim + self.num_dense
        # Per row, never over the batch: a BatchNorm here would make every gate's routing, and so
        # every score, depend on the rows scored with it (and break a batch of one).
        self.input_norm = nn.LayerNorm(d_in) if config.input_norm == "layer" else nn.Identity()
        self.arch = build_arch(config, d_in, len(self.task_names))
        self._init_output_bias(manifest)

    def _init_output_bias(self, manifest: Manifest) -> None:
        """Start each binary tower at its base rate: rare tasks (CVR) otherwise spend the first
        epoch only learning the prior."""
        towers = self.arch.towers  # every architecture ends in TaskTowers
        assert isinstance(towers, TaskTowers)
        bias = towers.mlp.biases[-1]
        with torch.no_grad():
            for i, name in enumerate(self.task_names):
                task = next(t for t in manifest.tasks if t.name == name)
                if task.type == "binary":
                    p = min(max(task.train_mean, 1e-4), 1 - 1e-4)
                    bias[i].fill_(float(torch.logit(torch.tensor(p))))
                else:
                    bias[i].fill_(task.train_mean)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> ArchOutput:
        return self.from_pooled(self.lookup(sparse), dense)

    def lookup(self, sparse: KeyedJaggedTensor) -> KeyedTensor | None:
        """The pooled embeddings (None for a dense-only spec: no tables). Training calls this and
        `from_pooled` apart, to see the embeddings its penalty acts on."""
        return self.sparse.lookup(sparse) if self.sparse.keys else None

    @property
    def trains_on_rows(self) -> bool:
        """Whether `forward_rows` runs here: single ids into one fused table, no input norm, an
        MMoE (or OMoE) whose softmax gates ride in its dense expert block."""
        arch = self.arch
        return (
            self.sparse.has_row_batches
            and isinstance(self.input_norm, nn.Identity)
            and isinstance(arch, MMoE)
            and arch.gated_block
        )

    def forward_rows(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> tuple[ArchOutput, RowBatch]:
        """`forward` with the first layer taken through the table rows (`kernels.projected`),
        for training: after the loss's backward, `self.sparse.update_rows(rows)` applies the
        rows' gradient through the fused optimizer (their lookup is not in the graph)."""
        assert isinstance(self.arch, MMoE)  # callers check trains_on_rows once, not every step
        rows = self.sparse.row_batch(sparse)
        return self.arch.forward_rows(rows.table, rows.ids, rows.counts, rows.layout, dense), rows

    def from_pooled(self, pooled: KeyedTensor | None, dense: torch.Tensor) -> ArchOutput:
        """The model after the embedding lookup (`lookup`; sharded training runs the sharded one
        itself, for the pipelined all-to-all). None: a dense-only spec."""
        if pooled is None:
            return self.arch(self.input_norm(dense))
        x = self.sparse.concat(pooled)
        return self.arch(self.input_norm(torch.cat([x, dense], dim=1) if self.num_dense else x))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] → per-task scores: probabilities for binary tasks, values for regression."""
        binary = torch.tensor([t == "binary" for t in self.task_types])
        return torch.where(binary, torch.sigmoid(logits), logits)

    def predict(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.scores(self.forward(dense, sparse).logits)
