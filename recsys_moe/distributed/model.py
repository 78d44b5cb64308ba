"""The ranker with its tables on the meta device, sharded by DistributedModelParallel.

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
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from pipelines.manifest import Manifest
from recsys_moe.config import RunConfig
from recsys_moe.distributed.plan import make_plan
from recsys_moe.model.embeddings import FUSED_OPTIMIZERS, plan_tables
from recsys_moe.model.gates import GateOutput
from recsys_moe.model.outputs import ArchOutput
from recsys_moe.model.ranker import MultiTaskRanker

EMBEDDING_PREFIX = "sparse.ebc."
INIT_RANGE = 0.05  # as SparseArch's single-process init


def _register_outputs() -> None:
    """DDP finds the model's output tensors with pytree; unregistered dataclasses hide them, and
    with DMP's static_graph=True that silently skips the gradient all-reduce (ranks drift apart)."""
    from torch.utils import _pytree

    for cls in (GateOutput, ArchOutput):
        if cls not in _pytree.SUPPORTED_NODES:
            _pytree.register_dataclass(cls)


_register_outputs()


@dataclass
class ShardedRanker:
    dmp: DistributedModelParallel
    ranker: MultiTaskRanker  # the unwrapped module: task names/types, scores(), sparse keys
    plan: ShardingPlan


def build_sharded(manifest: Manifest, config: RunConfig, device: torch.device, world_size: int) -> ShardedRanker:
    tc = config.train
    torch.manual_seed(tc.seed)  # every rank builds identical dense weights (DDP broadcasts rank 0's anyway)
    model = MultiTaskRanker(manifest, config.model, tc.tasks, sparse_device=torch.device("meta"))
    tables = plan_tables(manifest.sparse_features, config.model.pack_tables_below).tables
    apply_optimizer_in_backward(
        FUSED_OPTIMIZERS[tc.embedding_optimizer], model.sparse.ebc.parameters(), {"lr": tc.embedding_lr}
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = make_plan(model, tables, tc.sharding, device, world_size, tc.memory_per_rank_gb,
                     batch_size=max(tc.batch_size // world_size, 1), sharders=sharders)  # fmt: skip
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    _init_tables(dmp, tc.seed)
    return ShardedRanker(dmp=dmp, ranker=model, plan=plan)


def _local_tensors(value: object) -> list[tuple[torch.Tensor, list[int]]]:
    """(local shard, its offsets in the full table) of a sharded or replicated table."""
    if isinstance(value, ShardedTensor):
        return [(s.tensor, list(s.metadata.shard_offsets)) for s in value.local_shards()]
    if hasattr(value, "to_local") and hasattr(value, "device_mesh"):  # DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = value.to_local()  # type: ignore[attr-defined]
        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)  # type: ignore[attr-defined]
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


def embedding_key(key: str) -> str:
    return key.removeprefix("module.").removeprefix("_dmp_wrapped_module.")


def full_state_dict(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """The single-process state dict, on rank 0 (None elsewhere): sharded tables are gathered
    shard by shard, replicated parameters taken as they are. A collective: every rank calls it."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        name = embedding_key(key)
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            tensor = full
        elif hasattr(value, "full_tensor"):  # DTensor
            tensor = value.full_tensor()  # type: ignore[attr-defined]
        else:
            tensor = value
        if rank == 0 and tensor is not None:
            out[name] = tensor.detach().cpu().contiguous().clone()
    return out if rank == 0 else None
