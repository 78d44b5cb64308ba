"""Batches of (dense, KJT, labels) from a manifest's parquet shards.

A split is decoded once into contiguous tensors; a batch is then a gather by index. Decoding
parquet per batch would cost more than the model's forward and backward at census scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys_moe.pipelines.manifest import Manifest, SparseFeatureInfo
from recsys_moe.pipelines.transform import key_column, label_column


@dataclass
class Batch(Pipelineable):
    """Pipelineable: TorchRec's train pipelines move it to the device and start its sparse
    all-to-all ahead of the forward pass."""

    dense: torch.Tensor  # [B, n_dense] float32
    sparse: KeyedJaggedTensor  # keys in the model's order
    labels: torch.Tensor  # [B, T] float32

    def __len__(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.dense, self.labels):
            t.record_stream(stream)
        self.sparse.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory())


class InMemoryDataset:
    def __init__(
        self,
        frame: pl.DataFrame,
        manifest: Manifest,
        sparse_keys: Sequence[str],
        tasks: Sequence[str] | None,
        sequential: bool = False,
    ) -> None:
        """`sequential=True` for data read in order only (scoring): the ids stay feature-major as
        polars hands them over, so no row-major copy is made and an in-order batch's KJT values
        are one contiguous run per feature. Training keeps rows whole for its shuffled gathers."""
        self.sparse_keys = list(sparse_keys)
        self.tasks = list(tasks) if tasks is not None else []
        info = {f.name: f for f in manifest.sparse_features}
        missing = [k for k in self.sparse_keys if k not in info]
        if missing:
            raise ValueError(f"sparse keys {missing} are not in the manifest")
        n = self.num_rows = frame.height
        dense = frame.select(manifest.dense_features).to_numpy().astype(np.float32, copy=False)
        self.dense = torch.from_numpy(np.array(dense.reshape(n, len(manifest.dense_features)), order="C"))
        self.multi_hot = {k for k in self.sparse_keys if info[k].kind == "multi_hot"}
        single = [k for k in self.sparse_keys if k not in self.multi_hot]
        self.single_rows = {k: i for i, k in enumerate(single)}
        # Row-major [N, F]: a batch gathers whole rows (a cache line or two each), not F strided
        # reads. Sequential: feature-major [F, N] (polars' to_numpy, transposed), read in slices.
        ids = frame.select(single).to_numpy() if single else np.zeros((n, 0))
        self.sequential = sequential
        if sequential:
            self.ids = torch.from_numpy(np.array(ids.T, dtype=np.int64, order="C", copy=None))
        else:
            self.ids = torch.from_numpy(np.array(ids, dtype=np.int64, order="C"))
        self.padded = {k: self._pad(frame[k], info[k].max_length) for k in self.multi_hot}
        labels = frame.select([label_column(t) for t in self.tasks]).to_numpy() if self.tasks else np.zeros((n, 0))
        self.labels = torch.from_numpy(np.array(labels, dtype=np.float32, order="C"))
        # GAUC's groups: a stable 64-bit hash of the spec's group_key, equal across ranks' shares.
        group = manifest.spec.group_key
        column = key_column(group) if group is not None else None
        self.groups: torch.Tensor | None = None
        if column is not None and column in frame.columns:
            self.groups = torch.from_numpy(frame[column].hash(seed=0).reinterpret(signed=True).to_numpy().copy())
        self._unit: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see _unit_lengths
        self._check_ids(info)
        if all(info[k].num_embeddings <= 2**31 for k in single):
            # int32, FBGEMM's own index type: a batch gathers, transposes and offsets half the
            # bytes, and the lookup converts nothing (checked above in int64).
            self.ids = self.ids.int()

    def _check_ids(self, info: dict[str, SparseFeatureInfo]) -> None:
        """Every id inside its table, checked once here: a shard written with another manifest
        gets an error naming the feature, not FBGEMM's per-batch warning that maps the id to row
        0, and a model fed only from here can skip that per-batch check (`SparseArch.trust_ids`)."""
        single = [k for k in self.sparse_keys if k not in self.multi_hot]
        ranges: dict[str, tuple[int, int]] = {}
        if single and self.num_rows:
            dim = 1 if self.sequential else 0  # feature-major [F, N] or row-major [N, F]
            # One pass: int64 amin and amax each run in scalars without AVX-512 (5.7 ms for a
            # batch chunk of 65,536 census rows, against 0.65 ms for aminmax).
            lows, highs = (t.tolist() for t in torch.aminmax(self.ids, dim=dim))
            ranges = {k: (lows[i], highs[i]) for i, k in enumerate(single)}
        for k, padded in self.padded.items():
            present = padded[padded != -1]  # -1 is the padding
            if present.numel():
                ranges[k] = (int(present.min()), int(present.max()))
        for k, (low, high) in ranges.items():
            rows = info[k].num_embeddings
            if low < 0 or high >= rows:
                bad = low if low < 0 else high
                raise ValueError(
                    f"sparse feature {k!r}: id {bad} is outside its table's rows [0, {rows}); "
                    "was this split written with another manifest or vocabulary?"
                )

    @staticmethod
    def _pad(column: pl.Series, max_length: int) -> torch.Tensor:
        """A List(Int64) column → [N, max_length] with -1 padding."""
        lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = column.explode().drop_nulls().to_numpy().astype(np.int64)
        out = np.full((len(column), max_length), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(column)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = flat
        return torch.from_numpy(out)

    @classmethod
    def from_split(
        cls, manifest: Manifest, split: str, sparse_keys: Sequence[str], tasks: Sequence[str]
    ) -> InMemoryDataset:
        frame = pl.concat([pl.read_parquet(p) for p in manifest.shard_paths(split)])
        return cls(frame, manifest, sparse_keys, tasks)

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, idx: torch.Tensor | slice) -> Batch:
        """The rows `idx`: an index tensor (a shuffled batch) or a slice (in order: views, no gather)."""

        def rows(t: torch.Tensor) -> torch.Tensor:  # index_select: 2-5x faster than t[idx] here
            return t.index_select(0, idx) if isinstance(idx, torch.Tensor) else t[idx]

        dense = rows(self.dense)
        n = dense.shape[0]
        if self.sequential:  # the single-id features' ids, [F, B]: a slice per feature
            ids = self.ids.index_select(1, idx) if isinstance(idx, torch.Tensor) else self.ids[:, idx]
        else:  # one gather of whole rows
            ids = rows(self.ids).t()
        labels = rows(self.labels)
        if not self.multi_hot:  # fast path: the KJT's values are the ids, feature by feature
            lengths, offsets = self._unit_lengths(n)
            per_key = [n] * len(self.sparse_keys)
            sparse = KeyedJaggedTensor(
                self.sparse_keys, ids.reshape(-1), lengths=lengths, offsets=offsets, length_per_key=per_key
            )
            return Batch(dense=dense, sparse=sparse, labels=labels)
        vals, lens = [], []
        for k in self.sparse_keys:
            if k in self.multi_hot:
                p = rows(self.padded[k])
                mask = p >= 0
                vals.append(p[mask])
                lens.append(mask.sum(dim=1, dtype=torch.int32))
            else:
                vals.append(ids[self.single_rows[k]])
                lens.append(torch.ones(n, dtype=torch.int32))
        sparse = KeyedJaggedTensor(keys=self.sparse_keys, values=torch.cat(vals), lengths=torch.cat(lens))
        return Batch(dense=dense, sparse=sparse, labels=labels)

    def _unit_lengths(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lengths (all 1) and offsets of a batch of n rows of single ids, made once per n.

        With them and `length_per_key` a KJT carries what its consumers (id dropout, the table
        offsets, FBGEMM's input) would otherwise recompute from the lengths on every batch: about
        0.1 ms of a census step in reductions and cumulative sums over 32k lengths. Shared by the
        batches of one size: nothing downstream writes a KJT's lengths.
        """
        unit = self._unit.get(n)
        if unit is None:
            if len(self._unit) >= 8:  # scoring may see many sizes: keep a few
                self._unit.clear()
            count = n * len(self.single_rows)
            unit = self._unit[n] = (
                torch.ones(count, dtype=torch.int32),
                torch.arange(count + 1, dtype=torch.int32),
            )
        return unit

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        order = torch.randperm(self.num_rows, generator=generator) if shuffle else None
        for start in range(0, self.num_rows, batch_size):
            yield self.batch(
                order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
            )

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_rows // batch_size)
