"""The ranker with its tables on the meta device, wrapped in a training step and sharded by
DistributedModelParallel.

Embedding tables get their optimizer fused into the backward pass (`apply_optimizer_in_backward`:
Adagrad / row-wise Adagrad run inside FBGEMM's kernel on the rank that owns the shard); every
other parameter is replicated and synchronised by DDP, which DMP applies to the unsharded part.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_moe.config import RunConfig
from recsys_moe.data.loader import Batch
from recsys_moe.distributed.plan import make_plan
from recsys_moe.model.embeddings import FUSED_OPTIMIZERS, plan_tables
from recsys_moe.model.gates import GateOutput
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.training.losses import UncertaintyWeighting, per_task_losses, task_weights, training_loss

EMBEDDING_PREFIX = "ranker.sparse.ebc."
INIT_RANGE = 0.05  # as SparseArch's single-process init


def _register_outputs() -> None:
    """DDP finds the model's output tensors with pytree; unregistered dataclasses hide them, and
    with DMP's static_graph=True that silently skips the gradient all-reduce (ranks drift apart)."""
    from torch.utils import _pytree

    for cls in (GateOutput, ArchOutput):
        if cls not in _pytree.SUPPORTED_NODES:
            _pytree.register_dataclass(cls)


_register_outputs()


@torch.fx.wrap  # opaque to the pipeline's FX trace, which needs to see only the EBC call
def _step_loss(step: TrainStep, pooled: KeyedTensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = step.ranker.from_pooled(pooled, batch.dense)
    per_task = per_task_losses(out.logits, batch.labels, step.is_binary)
    loss = training_loss(
        per_task, step.loss_weights, step.weighting, out.gates, step.balance_weight, pooled.values(), step.embedding_l2
    )
    return loss, per_task.detach() * batch.labels.shape[0]


class TrainStep(nn.Module):
    """batch → (loss, per-task loss sums): the form TorchRec's TrainPipelineSparseDist drives.

    The sharded EBC is called on `batch.sparse` itself (ids already offset into packed tables by
    `SparseArch.table_ids` in the loader), so the pipeline can run the next batch's input
    all-to-all while this batch computes. The task weighting lives here, under DDP with the rest."""

    is_binary: torch.Tensor  # buffers
    loss_weights: torch.Tensor

    def __init__(
        self,
        ranker: MultiTaskRanker,
        loss_weights: torch.Tensor,
        weighting: UncertaintyWeighting | None,
        balance_weight: float,
        embedding_l2: float = 0.0,
    ) -> None:
        super().__init__()
        self.ranker = ranker
        self.weighting = weighting
        self.balance_weight, self.embedding_l2 = balance_weight, embedding_l2
        self.register_buffer("is_binary", torch.tensor([t == "binary" for t in ranker.task_types]), persistent=False)
        self.register_buffer("loss_weights", loss_weights.float(), persistent=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return _step_loss(self, self.ranker.sparse.ebc(batch.sparse), batch)


@dataclass
class ShardedRanker:
    dmp: DistributedModelParallel  # wraps a TrainStep
    ranker: MultiTaskRanker  # the unwrapped ranker: task names/types, scores(), evaluation forward
    plan: ShardingPlan
    step: TrainStep  # the unwrapped step: its task weighting


def build_sharded(manifest: Manifest, config: RunConfig, device: torch.device, world_size: int) -> ShardedRanker:
    tc = config.train
    torch.manual_seed(tc.seed)  # every rank builds identical dense weights (DDP broadcasts rank 0's anyway)
    model = MultiTaskRanker(manifest, config.model, tc.tasks, sparse_device=torch.device("meta"))
    weights = task_weights(manifest, model.task_names)
    weighting = UncertaintyWeighting(len(model.task_names)) if tc.task_weighting == "uncertainty" else None
    step = TrainStep(model, weights, weighting, tc.balance_loss_weight, tc.embedding_l2)
    tables = plan_tables(manifest.sparse_features, config.model.pack_tables_below).tables
    apply_optimizer_in_backward(
        FUSED_OPTIMIZERS[tc.embedding_optimizer], model.sparse.ebc.parameters(), {"lr": tc.embedding_lr}
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = make_plan(
        step,
        tables,
        tc.sharding,
        device,
        world_size,
        tc.memory_per_rank_gb,
        batch_size=max(tc.batch_size // world_size, 1),
        sharders=sharders,
    )
    dmp = DistributedModelParallel(module=step, device=device, plan=plan, sharders=sharders)
    _init_tables(dmp, tc.seed)
    return ShardedRanker(dmp=dmp, ranker=model, plan=plan, step=step)


def _local_tensors(value: object) -> list[tuple[torch.Tensor, list[int]]]:
    """(local shard, its offsets in the full table) of a sharded or replicated table."""
    if isinstance(value, ShardedTensor):
        return [(s.tensor, list(s.metadata.shard_offsets)) for s in value.local_shards()]
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = value.to_local()
        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return [(local, list(offsets))]
    assert isinstance(value, torch.Tensor)
    return [(value, [0] * value.dim())]


@torch.no_grad()
def _init_tables(dmp: nn.Module, seed: int) -> None:
    """U(-0.05, 0.05) like the single-process model. Each table's values come from one generator
    per table, so every shard of a table is the slice the unsharded table would hold: the initial
    weights do not depend on the plan or the world size."""
    for key, value in dmp.state_dict().items():
        if EMBEDDING_PREFIX not in key or not key.endswith(".weight"):
            continue
        shape = value.shape
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        full_rows = None
        for local, offsets in _local_tensors(value):
            if local.numel() == 0:
                continue
            if full_rows is None:  # generated once per table (cheap next to training at this scale)
                full_rows = torch.empty(shape).uniform_(-INIT_RANGE, INIT_RANGE, generator=g)
            r, c = offsets
            local.copy_(full_rows[r : r + local.shape[0], c : c + local.shape[1]].to(local.device))


def full_state_dict(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """The single-process state dict, on rank 0 (None elsewhere): sharded tables are gathered
    shard by shard, replicated parameters taken as they are. A collective: every rank calls it."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if not key.startswith("ranker."):
            continue  # the task weighting: a training aid, not part of the model
        name = key.removeprefix("ranker.")
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            tensor = full
        elif isinstance(value, DTensor):
            tensor = value.full_tensor()
        else:
            tensor = value
        if rank == 0 and tensor is not None:
            out[name] = tensor.detach().cpu().contiguous().clone()
    return out if rank == 0 else None
