"""The full model: sparse embeddings + dense features → a multi-task architecture → logits.

Built from a manifest (table sizes, dense width, tasks) and a ModelConfig, so the same spec
trains any architecture with a one-word config change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from pipelines.manifest import Manifest
from recsys_moe.config import ModelConfig
from recsys_moe.model.embeddings import SparseArch
from recsys_moe.model.mmoe import MMoE
from recsys_moe.model.shared_bottom import SharedBottom


@dataclass
class RankerOutput:
    logits: torch.Tensor  # [B, T]
    gates: torch.Tensor | None  # [B, T, E] for gated architectures


class MultiTaskRanker(nn.Module):
    def __init__(
        self,
        manifest: Manifest,
        config: ModelConfig,
        tasks: list[str] | None = None,
        fused_optimizer: tuple[str, dict[str, float]] | None = None,
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
        self.sparse = SparseArch(manifest.sparse_features, config.pack_tables_below, fused_optimizer)
        self.num_dense = len(manifest.dense_features)
        d_in = self.sparse.output_dim + self.num_dense
        n_tasks = len(self.task_names)
        if config.arch == "mmoe":
            self.arch: nn.Module = MMoE(
                d_in, n_tasks, config.num_experts, config.expert_hidden, config.tower_hidden, config.dropout
            )
        else:
            self.arch = SharedBottom(d_in, n_tasks, config.bottom_hidden, config.tower_hidden, config.dropout)
        self._init_output_bias(manifest)

    def _init_output_bias(self, manifest: Manifest) -> None:
        """Start each binary tower at its base rate: rare tasks (CVR) otherwise spend the first
        epoch only learning the prior."""
        bias = self.arch.towers.mlp.biases[-1]
        with torch.no_grad():
            for i, name in enumerate(self.task_names):
                task = next(t for t in manifest.tasks if t.name == name)
                if task.type == "binary":
                    p = min(max(task.train_mean, 1e-4), 1 - 1e-4)
                    bias[i].fill_(float(torch.logit(torch.tensor(p))))
                else:
                    bias[i].fill_(task.train_mean)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> RankerOutput:
        x = torch.cat([self.sparse(sparse), dense], dim=1) if self.num_dense else self.sparse(sparse)
        logits, gates = self.arch(x)
        return RankerOutput(logits=logits, gates=gates)

    def predict(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Per-task scores [B, T]: probabilities for binary tasks, values for regression."""
        logits = self.forward(dense, sparse).logits
        binary = torch.tensor([t == "binary" for t in self.task_types])
        return torch.where(binary, torch.sigmoid(logits), logits)
