"""Sparse features → pooled embeddings, through a TorchRec EmbeddingBagCollection.

Small tables of equal dimension and pooling are packed into one table (each feature owns a row
range, shifted by an id offset): FBGEMM's batched kernel then runs one table instead of dozens,
which is most of the embedding time for census-like data. Large tables stay on their own so a
sharding planner can place them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import KeyedOptimizer

from recsys_moe.kernels.projected import TableLayout
from recsys_moe.pipelines.manifest import Manifest, SparseFeatureInfo

FUSED_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "sgd": torch.optim.SGD,
}


@dataclass(frozen=True)
class RowBatch:
    """A batch as rows of the one packed table (`SparseArch.row_batch`): what the projected
    first layer (`kernels.projected`) takes, and what `SparseArch.update_rows` applies after it."""

    table: torch.Tensor  # [R, D]: a copy of the table's rows, a leaf whose .grad is theirs
    ids: torch.Tensor  # [F, B]: each feature's ids within its rows
    counts: torch.Tensor  # [R]: ids of the batch on each row
    layout: TableLayout


def _row_counts(features: Sequence[SparseFeatureInfo], plan: TablePlan) -> list[int] | None:
    """Each feature's rows in the one table, when every feature is a single id into one summed
    table (what `SparseArch.row_batch` takes), else None."""
    info = {f.name: f for f in features}
    if len(plan.tables) != 1 or any(info[k].kind == "multi_hot" or info[k].pooling != "sum" for k in plan.keys):
        return None
    return [info[k].num_embeddings for k in plan.keys]


@dataclass(frozen=True)
class TablePlan:
    tables: list[EmbeddingBagConfig]
    keys: list[str]  # KJT key order the module expects
    offsets: list[int]  # per key: first row of its range in its table


def plan_tables(features: Sequence[SparseFeatureInfo], pack_below: int) -> TablePlan:
    packed: dict[tuple[int, str], list[SparseFeatureInfo]] = {}
    tables, keys, offsets = [], [], []
    for f in features:
        if f.num_embeddings < pack_below:
            packed.setdefault((f.embedding_dim, f.pooling), []).append(f)
        else:
            tables.append(_config(f"t_{f.name}", f.embedding_dim, f.num_embeddings, [f.name], f.pooling))
            keys.append(f.name)
            offsets.append(0)
    for (dim, pooling), group in packed.items():
        start = 0
        for f in group:
            keys.append(f.name)
            offsets.append(start)
            start += f.num_embeddings
        tables.append(_config(f"packed_d{dim}_{pooling}", dim, start, [f.name for f in group], pooling))
    return TablePlan(tables=tables, keys=keys, offsets=offsets)


def _config(name: str, dim: int, rows: int, features: list[str], pooling: str) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name,
        embedding_dim=dim,
        num_embeddings=rows,
        feature_names=features,
        pooling=PoolingType.MEAN if pooling == "mean" else PoolingType.SUM,
    )


class SparseArch(nn.Module):
    """KJT of raw table ids (0 = OOV) → [B, sum of embedding dims]."""

    id_offsets: torch.Tensor  # buffer: per key, the first row of its range in its table

    def __init__(
        self,
        features: Sequence[SparseFeatureInfo],
        pack_below: int = 100_000,
        fused_optimizer: tuple[str, dict[str, float]] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        plan = plan_tables(features, pack_below)
        self.keys = plan.keys
        # The pooled output's column order: table by table, as an unsharded EBC returns it. A
        # sharded EBC (DistributedModelParallel) groups its output by sharding type instead.
        self.output_keys = [f for t in plan.tables for f in t.feature_names]
        self.output_dim = sum(t.embedding_dim * len(t.feature_names) for t in plan.tables)
        self.register_buffer("id_offsets", torch.tensor(plan.offsets, dtype=torch.int64), persistent=False)
        self._needs_offsets = any(plan.offsets)
        self._shifts: dict[tuple[tuple[int, ...], torch.device, torch.dtype], torch.Tensor] = {}
        device = device or torch.device("cpu")
        if fused_optimizer is None:
            self.ebc: EmbeddingBagCollection | FusedEmbeddingBagCollection = EmbeddingBagCollection(
                tables=plan.tables, device=device
            )
        else:
            name, kwargs = fused_optimizer
            # The optimizer runs inside FBGEMM's backward: no dense gradient for the tables.
            self.ebc = FusedEmbeddingBagCollection(
                tables=plan.tables, optimizer_type=FUSED_OPTIMIZERS[name], optimizer_kwargs=kwargs, device=device
            )
        self._direct = self._direct_kernel()
        self._by_table = self._table_bags()
        self._row_counts = _row_counts(features, plan) if self._direct is not None else None
        self._layout: TableLayout | None = None  # made on the first row batch
        for table in plan.tables:  # small init, like TorchRec's default for recsys tables
            weight = self.ebc.embedding_bags[table.name].weight
            with torch.no_grad():
                weight.uniform_(-0.05, 0.05)

    def fused_optimizer(self) -> KeyedOptimizer:
        """The embedding optimizer that runs inside FBGEMM's backward (built with `fused_optimizer`)."""
        if not isinstance(self.ebc, FusedEmbeddingBagCollection):
            raise TypeError("this SparseArch was built without a fused optimizer")
        return self.ebc.fused_optimizer()

    def _kernels(self) -> list[nn.Module]:
        """The fused tables' FBGEMM modules (none for a plain EBC)."""
        if not isinstance(self.ebc, FusedEmbeddingBagCollection):
            return []
        return [lookups._emb_module for lookups in self.ebc._emb_modules]

    @property
    def has_row_batches(self) -> bool:
        """Whether `row_batch` works here: single ids into one summed table with a fused
        optimizer, on the CPU, not replaced by a sharded module."""
        direct = self._direct
        if self._row_counts is None or direct is None or direct[0] is not self.ebc:
            return False
        return self._table().device.type == "cpu"

    def _table(self) -> torch.Tensor:
        """The one fused table's weights [R, D]: FBGEMM's own tensor, updated in place."""
        assert self._direct is not None
        kernel: Any = self._direct[1]
        return kernel.split_embedding_weights()[0]

    def rows_pay_off(self, batch_size: int) -> bool:
        """Whether a step over the table's rows costs less than one over a batch's ids: the
        largest feature has at most half a batch of rows, and the backward's per-row gradient
        sums (F x that many slots, each as wide as the first layer) take at most 8 batches' rows
        of memory."""
        counts = self._row_counts
        if counts is None:
            return False
        return 2 * max(counts) <= batch_size and len(counts) * max(counts) <= 8 * batch_size

    def row_batch(self, features: KeyedJaggedTensor) -> RowBatch:
        """The table's rows (a copy that collects their gradient) and the batch's ids in them.

        `features` has the keys in `self.keys` order, one id per sample each (what the loader
        gives a spec without multi-hot features), ids already checked against their tables.
        """
        assert self._row_counts is not None and self._direct is not None, "no row batches: see has_row_batches"
        if self._layout is None:
            self._layout = TableLayout.of(self._row_counts, self._table().shape[1])
        layout = self._layout
        batch, feats = features.stride(), len(self.keys)
        values = features.values()
        if features.keys() != self.keys:
            raise ValueError(f"row_batch takes the keys {self.keys}, in that order: got {features.keys()}")
        if values.numel() != batch * feats or not bool((features.lengths() == 1).all()):
            raise ValueError(
                f"row_batch takes one id per sample and feature: {values.numel()} ids for {batch} x {feats}, "
                f"lengths from {int(features.lengths().min())} to {int(features.lengths().max())}"
            )
        ids = values.view(feats, batch)
        table = self._table().detach().clone()
        rows = ids + layout.starts.to(ids.dtype).unsqueeze(1)
        counts = torch.bincount(rows.reshape(-1), minlength=table.shape[0])
        return RowBatch(table.requires_grad_(), ids, counts, layout)

    def update_rows(self, batch: RowBatch) -> None:
        """Apply `batch.table.grad` through the fused optimizer, to the rows the batch touched.

        The optimizer runs in FBGEMM's backward, so the gradient goes in as the backward of a
        lookup of those rows, one per bag (V bags per feature, a row's bag at its id): FBGEMM sums
        a row's gradient over its ids before its update, so this is the update the batch's own
        lookup makes, on each touched row once. Rows the batch did not touch are left alone, as
        they are by a lookup, for optimizers with state too.
        """
        layout, grad = batch.layout, batch.table.grad
        assert self._direct is not None
        if grad is None:  # the loss did not reach the rows: nothing to update
            return
        per = layout.slots_per_feature
        touched = batch.counts > 0
        lengths = torch.zeros(len(self.keys) * per, dtype=torch.int32)  # a KJT's: feature-major
        lengths[layout.slot_of_row] = touched.int()
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(lengths, 0)
        rows = torch.arange(len(touched), dtype=torch.int32)[touched]  # slot order is row order
        pooled = self._direct[1](rows, offsets, None)  # [V, F * D]
        grad_slots = grad.new_zeros(len(lengths), grad.shape[1]).index_copy_(0, layout.slot_of_row, grad)
        pooled.backward(grad_slots.view(len(self.keys), per, -1).transpose(0, 1).reshape(pooled.shape))

    def trust_ids(self) -> None:
        """Skip FBGEMM's per-batch id bounds check: for a caller that feeds only ids already
        checked against their tables (`data.loader.InMemoryDataset` checks at load). The check
        took 1.8% of a census training step (median of alternating rounds). Fused tables only."""
        for kernel in self._kernels():
            kernel.bounds_check_mode_int = BoundsCheckMode.NONE.value

    @property
    def checks_ids(self) -> bool:
        """Whether FBGEMM checks every batch's ids against the tables (off after `trust_ids`)."""
        return any(k.bounds_check_mode_int != BoundsCheckMode.NONE.value for k in self._kernels())

    def table_ids(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Feature ids → row ids in their (possibly packed) table: what the EBC takes."""
        if not self._needs_offsets:
            return features
        per_key = features.length_per_key()
        values = features.values() + self._shift(per_key, features.values())
        return KeyedJaggedTensor(
            self.keys, values, lengths=features.lengths(), offsets=features.offsets(), length_per_key=per_key
        )

    def _shift(self, per_key: list[int], values: torch.Tensor) -> torch.Tensor:
        """Each value's id offset, for a batch of these per-key lengths: made once per batch shape
        (a training run has two), since expanding it per batch cost more than adding it."""
        key = (tuple(per_key), values.device, values.dtype)
        shift = self._shifts.get(key)
        if shift is None:
            if len(self._shifts) >= 8:
                self._shifts.clear()
            offsets = self.id_offsets.to(device=values.device, dtype=values.dtype)
            shift = self._shifts[key] = torch.repeat_interleave(offsets, torch.tensor(per_key, device=values.device))
        return shift

    def _direct_kernel(self) -> tuple[nn.Module, nn.Module] | None:
        """(ebc, its one FBGEMM kernel) when a batch can go straight to the kernel, else None.

        A fused EBC's forward splits the batch into one JaggedTensor per feature and concatenates
        them again for its single FBGEMM call: at census scale (32 features, batches of 1024)
        that costs more than the lookup. When every table runs in one kernel (one pooling, one
        dtype: packing makes this the common case) and the kernel's feature order is the keys',
        the batch's values and offsets are already the kernel's input. A tuple, so the kernel is
        not registered twice; `ebc` is kept to notice when sharding has replaced the module.
        """
        ebc = self.ebc
        if not isinstance(ebc, FusedEmbeddingBagCollection) or ebc.is_weighted() or len(ebc._emb_modules) != 1:
            return None
        order = [f for tables in ebc._key_to_tables.values() for t in tables for f in t.feature_names]
        return (ebc, ebc._emb_modules[0]) if order == self.keys == ebc._embedding_names else None

    def _table_bags(self) -> tuple[nn.Module, list[tuple[nn.EmbeddingBag, int]]] | None:
        """(ebc, [(a table's EmbeddingBag, its number of features)]) when a plain EBC's batch can
        be looked up table by table, else None.

        A plain EBC (what a trained model is scored with) splits the batch into one JaggedTensor
        per feature, in Python, and calls its table once per feature. When the keys run table by
        table in the tables' own feature order, a table's features are one contiguous slice of the
        batch, and one call per table pools them all: the same op on the same rows. Measured on
        the serving benchmark's model (a request of 101 rows): the lookup fell from 21% to 15% of
        the server's CPU samples, the whole handler from 1.69 to 1.57 ms (alternating runs).
        """
        ebc = self.ebc
        if not isinstance(ebc, EmbeddingBagCollection) or ebc.is_weighted() or ebc._embedding_names != self.keys:
            return None
        names = [f for t in ebc._embedding_bag_configs for f in t.feature_names]
        if names != self.keys:
            return None
        bags = ebc.embedding_bags
        return ebc, [(bags[t.name], len(t.feature_names)) for t in ebc._embedding_bag_configs]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings per feature (a sharded EBC may order the keys differently)."""
        features = self.table_ids(features)
        if features.keys() == self.keys:
            direct, by_table = self._direct, self._by_table
            if direct is not None and direct[0] is self.ebc:
                pooled = direct[1](features.values().int(), features.offsets().int(), None)  # the EBC's own call
                return KeyedTensor(keys=self.keys, values=pooled, length_per_key=self.ebc._length_per_key)
            if by_table is not None and by_table[0] is self.ebc and features.stride() > 0:
                return self._lookup_by_table(features, by_table[1])
        return self.ebc(features)

    def _lookup_by_table(self, features: KeyedJaggedTensor, tables: list[tuple[nn.EmbeddingBag, int]]) -> KeyedTensor:
        """A plain EBC's forward, one EmbeddingBag call per table (`_table_bags`)."""
        values, offsets, batch = features.values(), features.offsets(), features.stride()
        offsets = offsets.to(values.dtype)  # the bag takes ids and offsets of one dtype
        bounds = offsets[::batch].tolist()  # where each key's values start (and the last ends)
        blocks, key = [], 0
        for bag, count in tables:
            start, end = bounds[key], bounds[key + count]
            bag_offsets = offsets[key * batch : (key + count) * batch + 1]
            pooled = bag(values[start:end], bag_offsets - start if start else bag_offsets)  # [count*B, dim]
            blocks.append(pooled.view(count, batch, -1).transpose(0, 1).reshape(batch, -1))
            key += count
        pooled = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return KeyedTensor(keys=self.keys, values=pooled, length_per_key=self.ebc._lengths_per_embedding)

    def concat(self, pooled: KeyedTensor) -> torch.Tensor:
        """Pooled embeddings → [B, output_dim] in the unsharded column order."""
        if pooled.keys() == self.output_keys:
            return pooled.values()
        return KeyedTensor.regroup([pooled], [self.output_keys])[0]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.concat(self.lookup(features))


def embedding_memory_bytes(features: Manifest | Sequence[SparseFeatureInfo], bytes_per_value: int = 4) -> int:
    """Bytes of embedding weights a model of these sparse features holds: sum of rows x dim x 4 (fp32).

    Weights only: optimizer state (e.g. Adagrad's one value per weight, row-wise Adagrad's one per
    row) and gradients come on top. Packing small tables (:func:`plan_tables`) does not change it.
    """
    infos = features.sparse_features if isinstance(features, Manifest) else features
    return sum(int(f.num_embeddings) * int(f.embedding_dim) * bytes_per_value for f in infos)


def embedding_memory_per_rank(
    features: Manifest | Sequence[SparseFeatureInfo], world_size: int, bytes_per_value: int = 4
) -> list[int]:
    """Embedding weight bytes on each of `world_size` ranks under table-wise sharding.

    Greedy largest-table-first placement onto the least loaded rank, a simple stand-in for a
    planner's table-wise plan: the maximum is the memory a rank must have for the weights.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    infos = features.sparse_features if isinstance(features, Manifest) else features
    sizes = sorted((int(f.num_embeddings) * int(f.embedding_dim) * bytes_per_value for f in infos), reverse=True)
    ranks = [0] * world_size
    for size in sizes:
        ranks[ranks.index(min(ranks))] += size
    return ranks
