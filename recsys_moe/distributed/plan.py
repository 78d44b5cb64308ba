"""A sharding plan for the run's topology: world size, device, memory per rank, and per-table
constraints from `train.sharding` (table or feature name → table_wise / row_wise / column_wise /
data_parallel; '*' for every other table)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan, ShardingType

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
    "data_parallel": ShardingType.DATA_PARALLEL.value,
}


def constraints_for(tables: list[EmbeddingBagConfig], sharding: Mapping[str, str]) -> dict[str, ParameterConstraints]:
    """Config entries → ParameterConstraints per table. A key names a table (`t_<feature>`,
    `packed_d16_sum`) or a feature (resolved to the table that holds it)."""
    by_feature = {f: t.name for t in tables for f in t.feature_names}
    names = {t.name for t in tables}
    chosen: dict[str, str] = {}
    for key, kind in sharding.items():
        if key == "*":
            continue
        table = key if key in names else by_feature.get(key)
        if table is None:
            raise ValueError(f"train.sharding: {key!r} is neither a table ({sorted(names)}) nor a feature")
        chosen[table] = kind
    if "*" in sharding:
        for t in tables:
            chosen.setdefault(t.name, sharding["*"])
    return {name: ParameterConstraints(sharding_types=[SHARDING_TYPES[kind]]) for name, kind in chosen.items()}


def topology(world_size: int, device: torch.device, memory_per_rank_gb: float | None = None) -> Topology:
    cap = int(memory_per_rank_gb * 1024**3) if memory_per_rank_gb else None
    kind = device.type
    caps = {"hbm_cap": cap} if kind == "cuda" and cap else {"ddr_cap": cap} if cap else {}
    return Topology(world_size=world_size, local_world_size=world_size, compute_device=kind, **caps)


def make_plan(
    model: nn.Module,
    tables: list[EmbeddingBagConfig],
    sharding: Mapping[str, str],
    device: torch.device,
    world_size: int,
    memory_per_rank_gb: float | None = None,
    batch_size: int | None = None,
    sharders: list | None = None,
) -> ShardingPlan:
    """Plan on every rank; with a process group, rank 0's plan is broadcast so all ranks agree."""
    sharders = sharders or [EmbeddingBagCollectionSharder()]
    allowed = set().union(*(s.sharding_types(device.type) for s in sharders))
    for kind in set(sharding.values()):
        if SHARDING_TYPES[kind] not in allowed:
            # TorchRec 1.8's EBC sharder offers row_wise (and table_row_wise, grid) on CUDA only.
            raise ValueError(
                f"train.sharding: {kind} is not available on {device.type} (TorchRec allows {sorted(allowed)} there)"
            )
    planner = EmbeddingShardingPlanner(
        topology=topology(world_size, device, memory_per_rank_gb),
        batch_size=batch_size,
        constraints=constraints_for(tables, sharding),
    )
    if dist.is_initialized():
        return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return planner.plan(model, sharders)


def plan_rows(plan: ShardingPlan) -> list[dict[str, object]]:
    """One row per table: module, table, sharding type, kernel, ranks, shard shapes."""
    rows = []
    for module, params in plan.plan.items():
        for table, p in params.items():
            shards = p.sharding_spec.shards if p.sharding_spec is not None else []
            rows.append(
                {
                    "module": module,
                    "table": table,
                    "sharding": p.sharding_type,
                    "kernel": p.compute_kernel,
                    "ranks": list(p.ranks or []),
                    "shards": [f"{list(s.shard_offsets)}+{list(s.shard_sizes)}@{s.placement}" for s in shards],
                }
            )
    return rows


def plan_summary(plan: ShardingPlan) -> str:
    lines = [f"{'table':<28} {'sharding':<14} {'kernel':<8} ranks"]
    for r in plan_rows(plan):
        lines.append(f"{r['table']:<28} {r['sharding']:<14} {r['kernel']:<8} {r['ranks']}")
    return "\n".join(lines)


def weight_bytes_per_rank(plan: ShardingPlan, tables: list[EmbeddingBagConfig], world_size: int) -> list[int]:
    """Embedding weight bytes each rank holds under the plan (fp32): shards where they are placed,
    data-parallel tables on every rank. Optimizer state comes on top (Adagrad: as much again)."""
    dims = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    out = [0] * world_size
    for params in plan.plan.values():
        for table, p in params.items():
            if p.sharding_spec is None:  # data-parallel: a full replica per rank
                for r in p.ranks or range(world_size):
                    out[r] += dims[table][0] * dims[table][1] * 4
                continue
            for shard in p.sharding_spec.shards:
                rows, cols = shard.shard_sizes
                out[shard.placement.rank()] += rows * cols * 4
    return out
