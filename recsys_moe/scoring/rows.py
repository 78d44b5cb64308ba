"""Request-sized rows → model tensors, without a data frame: the online endpoint's fast path.

For 100 rows, the general path (a polars frame, the input contract's expressions, the encoding
expressions, the loader's tensors) is per-call overhead, not work: 9-15x the model's forward
of the same rows (benchmarks/results/serving.md). This module encodes the same rows with plain
Python and numpy: dictionary lookups for vocabularies, the same arithmetic for dense transforms.

It is not a second input contract. It handles only rows that are certainly valid: values of the
types the endpoint's request models produce, no null in a non-nullable feature, dense values
finite and within their range. For anything else `encode` returns None and the caller takes the
general path, so every reject, and its reason, still comes from `pipelines.validate`. Parity with
the general path (same scores within 1e-6, same rejects) is tested in tests/test_row_encoder.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recsys_moe.features.spec import Feature, FeatureSpec
from recsys_moe.pipelines.fit import OOV, FittedState


@lru_cache(maxsize=65536)
def _hashed(value: str, buckets: int) -> int:
    """`fit.stable_hash_ids` of one value (cached: a server sees the same ids again and again)."""
    return 1 + int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") % buckets


@dataclass
class _Ids:
    """Text id → embedding row, for one categorical or multi-hot feature."""

    vocab: dict[str, int] | None  # None: hashed
    buckets: int = 0

    def many(self, values: Sequence[str | None]) -> list[int]:
        """The rows of `values`; None (null) → OOV."""
        if self.vocab is not None:
            get = self.vocab.get
            return [get(v, OOV) for v in values]  # type: ignore[arg-type]  # None is never a key
        return [OOV if v is None else _hashed(v, self.buckets) for v in values]


def _ids(f: Feature, state: FittedState) -> _Ids:
    if f.vocab_policy.kind == "hash":
        return _Ids(None, f.vocab_policy.hash_buckets)
    return _Ids({v: i + 1 for i, v in enumerate(state.vocabularies[f.name])})


_TEXT = {str, type(None)}
_NUMBERS = {float, int, type(None)}  # exact types: a bool is not a number here, as in the request models


class RowEncoder:
    """Rows given as columns of Python values → (dense, KJT).

    `columns` holds one value per row for each raw column; `shared` one value for every row (a
    rank request's context): it is checked and encoded once, then repeated.
    """

    def __init__(self, spec: FeatureSpec, state: FittedState, sparse_keys: Sequence[str]) -> None:
        self.spec = spec
        self.state = state
        self.sparse_keys = list(sparse_keys)
        by_name = {f.name: f for f in spec.features}
        self._sparse = [by_name[k] for k in self.sparse_keys]
        self._dense = spec.dense_features
        self._ids = {f.name: _ids(f, state) for f in spec.features if f.kind != "dense"}
        self._bounds = {
            f.name: np.asarray(state.dense[f.name].boundaries, dtype=np.float64)
            for f in spec.features
            if f.kind == "dense" and f.transform == "bucketize"
        }

    # -- dense ---------------------------------------------------------------------------------
    @staticmethod
    def _numbers(f: Feature, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """(values with nulls as NaN, null mask), or None when a row needs the input contract."""
        if not set(map(type, values)) <= _NUMBERS:
            return None
        try:
            if None in values:
                if not f.nullable:
                    return None
                nulls = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
                x = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            else:
                nulls = np.zeros(len(values), dtype=bool)
                x = np.array(values, dtype=np.float64)
        except OverflowError:  # an int beyond float64: not finite, the contract's to reject
            return None
        given = x[~nulls]
        if not np.isfinite(given).all():
            return None
        if f.min is not None and (given < f.min).any():
            return None
        if f.max is not None and (given > f.max).any():
            return None
        return x, nulls

    def _dense_value(self, f: Feature, x: np.ndarray, nulls: np.ndarray) -> np.ndarray:
        """`transform._encode` of a dense feature, in numpy (float64, as polars computes it)."""
        stats = self.state.dense[f.name]
        filled = np.where(nulls, stats.mean, x)
        if f.transform == "log1p":
            filled = np.sign(filled) * np.log1p(np.abs(filled))
        if f.transform in ("standardize", "log1p"):
            filled = (filled - stats.t_mean) / stats.t_std
        return filled

    def _buckets(self, f: Feature, x: np.ndarray, nulls: np.ndarray) -> np.ndarray:
        filled = np.where(nulls, self.state.dense[f.name].mean, x)
        ids = np.searchsorted(self._bounds[f.name], filled, side="right").astype(np.int64) + 1
        return np.where(nulls, OOV, ids)

    # -- ids -----------------------------------------------------------------------------------
    def _single(self, f: Feature, values: Sequence[Any]) -> list[int] | None:
        types = set(map(type, values))
        if not types <= _TEXT or (not f.nullable and type(None) in types):
            return None
        return self._ids[f.name].many(values)

    def _lists(self, f: Feature, values: Sequence[Any]) -> list[list[int]] | None:
        """`coerce.typed_ids` then the vocabulary, per row: nulls dropped, the first max_length."""
        if not f.nullable and any(v is None for v in values):
            return None
        ids, out = self._ids[f.name], list[list[int]]()
        for v in values:
            if v is None:
                out.append([])
                continue
            if f.separator is not None:
                if type(v) is not str:
                    return None
                items: list[Any] = v.split(f.separator)
            else:
                if type(v) is not list or not set(map(type, v)) <= _TEXT:
                    return None
                items = [e for e in v if e is not None]
            out.append(ids.many(items[: f.max_length]))
        return out

    # -- rows → tensors ------------------------------------------------------------------------
    def encode(
        self, columns: Mapping[str, Sequence[Any]], n: int, shared: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, KeyedJaggedTensor] | None:
        """(dense [n, n_dense] float32, KJT in the model's key order), or None when any row might
        be rejected (or a value is of a type this path does not read): take the general path."""
        shared = shared or {}

        def values_of(f: Feature) -> Sequence[Any] | None:
            """The column's values: one per row, or one for all (a list of one)."""
            if f.source_column in shared:
                return [shared[f.source_column]]
            values = columns.get(f.source_column)
            return values if values is not None and len(values) == n else None

        numbers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f in self.spec.features:
            if f.kind != "dense":
                continue
            values = values_of(f)
            checked = None if values is None else self._numbers(f, values)
            if checked is None:
                return None
            numbers[f.name] = checked
        dense = np.empty((n, len(self._dense)), dtype=np.float32)
        for j, f in enumerate(self._dense):
            dense[:, j] = self._dense_value(f, *numbers[f.name])  # a shared value broadcasts
        keyed_values: list[np.ndarray] = []
        keyed_lengths: list[np.ndarray] = []
        for f in self._sparse:
            if f.kind == "dense":  # bucketized
                keyed_values.append(np.broadcast_to(self._buckets(f, *numbers[f.name]), (n,)))
                keyed_lengths.append(np.ones(n, dtype=np.int32))
                continue
            raw = values_of(f)
            if raw is None:
                return None
            if f.kind == "categorical":
                single = self._single(f, raw)
                if single is None:
                    return None
                keyed_values.append(np.broadcast_to(np.asarray(single, dtype=np.int64), (n,)))
                keyed_lengths.append(np.ones(n, dtype=np.int32))
                continue
            lists = self._lists(f, raw)
            if lists is None:
                return None
            flat = np.fromiter((i for row in lists for i in row), dtype=np.int64)
            lengths = np.fromiter((len(row) for row in lists), dtype=np.int32, count=len(lists))
            keyed_values.append(np.tile(flat, n) if len(lists) < n else flat)
            keyed_lengths.append(np.broadcast_to(lengths, (n,)))
        if not keyed_lengths:
            sparse = KeyedJaggedTensor(
                keys=self.sparse_keys,
                values=torch.zeros(0, dtype=torch.int64),
                lengths=torch.zeros(0, dtype=torch.int32),
            )
            return torch.from_numpy(dense), sparse
        # Offsets and per-key lengths too, from numpy: the KJT's own computation of them took
        # 9% of the server's CPU samples under load (torch ops and TorchRec's Python, per request).
        lengths = np.concatenate(keyed_lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        sparse = KeyedJaggedTensor(
            keys=self.sparse_keys,
            values=torch.from_numpy(np.concatenate(keyed_values)),
            lengths=torch.from_numpy(lengths),
            offsets=torch.from_numpy(offsets),
            length_per_key=[int(offsets[(i + 1) * n] - offsets[i * n]) for i in range(len(keyed_lengths))],
        )
        return torch.from_numpy(dense), sparse
