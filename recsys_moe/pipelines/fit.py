"""Vocabularies and statistics, fitted on the training split only.

Fitting on validation or test rows would leak their distribution into the model, so `fit` sees
only train. The result is saved beside the shards and reloaded by serving, so training and
serving transform raw rows with the same state.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from recsys_moe.features.spec import Feature, FeatureSpec

OOV = 0  # row 0 of every table: unseen, rare or null values


@dataclass
class DenseStats:
    mean: float  # of the raw value, used to fill nulls
    t_mean: float  # of the transformed value, used to standardize
    t_std: float
    min: float | None
    max: float | None
    null_count: int
    boundaries: list[float] = field(default_factory=list)  # bucketize only


@dataclass
class FittedState:
    """Everything `transform` needs besides the spec."""

    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    dense: dict[str, DenseStats] = field(default_factory=dict)

    def num_embeddings(self, f: Feature) -> int:
        if f.kind == "dense":
            return len(self.dense[f.name].boundaries) + 2  # OOV/null + one row per bucket
        if f.vocab_policy.kind == "hash":
            return f.vocab_policy.hash_buckets + 1
        return len(self.vocabularies[f.name]) + 1

    def save_vocabularies(self, directory: Path) -> dict[str, str]:
        """One parquet file per fitted vocabulary (they can be large); returns the files by feature."""
        (directory / "vocab").mkdir(parents=True, exist_ok=True)
        files = {}
        for name, values in self.vocabularies.items():
            rel = f"vocab/{name}.parquet"
            pl.DataFrame({"value": values, "id": np.arange(1, len(values) + 1, dtype=np.int64)}).write_parquet(
                directory / rel
            )
            files[name] = rel
        return files

    def statistics(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(stats) for name, stats in self.dense.items()}

    @classmethod
    def load(cls, directory: Path, vocab_files: dict[str, str], statistics: dict[str, dict[str, Any]]) -> FittedState:
        vocabularies = {
            name: pl.read_parquet(directory / rel).sort("id")["value"].to_list() for name, rel in vocab_files.items()
        }
        return cls(vocabularies=vocabularies, dense={k: DenseStats(**v) for k, v in statistics.items()})


def stable_hash_ids(values: pl.Series, buckets: int) -> pl.Series:
    """Hash strings to 1..buckets with blake2b: unlike Polars' own hash, stable across versions,
    so a model trained today still maps the same values after an upgrade."""
    uniques = values.drop_nulls().unique()
    ids = [
        1 + int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % buckets
        for v in uniques.to_list()
    ]
    mapped = values.replace_strict(uniques, pl.Series(ids, dtype=pl.Int64), default=OOV, return_dtype=pl.Int64)
    return mapped.fill_null(OOV)


def stable_hash_lists(values: pl.Series, buckets: int) -> pl.Series:
    """`stable_hash_ids` on every element of a List(String) column in one pass over all rows'
    values (a `list.eval` of a Python function would call it once per row). Null or empty lists
    give empty lists."""
    rows = pl.DataFrame({"row": pl.int_range(len(values), eager=True), "v": values}).explode("v")
    rows = rows.filter(pl.col("v").is_not_null())
    rows = rows.with_columns(stable_hash_ids(rows["v"], buckets).alias("id"))
    per_row = rows.group_by("row", maintain_order=True).agg("id")
    every = pl.DataFrame({"row": pl.int_range(len(values), eager=True)}).join(per_row, on="row", how="left")
    return every["id"].fill_null(pl.lit([], pl.List(pl.Int64))).rename(values.name)


def signed_log1p(x: pl.Expr) -> pl.Expr:
    return x.sign() * x.abs().log1p()


def _fit_vocab(values: pl.Series, f: Feature) -> list[str]:
    policy = f.vocab_policy
    counts = values.drop_nulls().value_counts(name="n").filter(pl.col("n") >= policy.min_count)
    counts = counts.sort(["n", values.name], descending=[True, False])
    if policy.max_size is not None:
        counts = counts.head(policy.max_size)
    return counts[values.name].to_list()


def _fit_dense(values: pl.Series, f: Feature) -> DenseStats:
    raw = values.cast(pl.Float64)
    mean = float(cast(float, raw.mean())) if raw.drop_nulls().len() else 0.0
    filled = raw.fill_null(mean)
    transformed = (
        filled.to_frame().select(signed_log1p(pl.col(raw.name))).to_series() if f.transform == "log1p" else filled
    )
    std = float(cast(float, transformed.std()) or 0.0)
    boundaries: list[float] = []
    if f.transform == "bucketize":
        qs = np.quantile(filled.to_numpy(), np.linspace(0, 1, f.num_buckets + 1)[1:-1])
        boundaries = sorted({float(q) for q in qs})
    return DenseStats(
        mean=mean,
        t_mean=float(cast(float, transformed.mean()) or 0.0),
        t_std=std if std > 0 and math.isfinite(std) else 1.0,
        min=cast(float | None, raw.min()),
        max=cast(float | None, raw.max()),
        null_count=raw.null_count(),
        boundaries=boundaries,
    )


def fit(train: pl.DataFrame, spec: FeatureSpec) -> FittedState:
    """Fit on validated training rows in the typed layout of `transform.typed`."""
    state = FittedState()
    for f in spec.features:
        col = train[f.name]
        if f.kind == "dense":
            state.dense[f.name] = _fit_dense(col, f)
        elif f.vocab_policy.kind == "fitted":
            state.vocabularies[f.name] = _fit_vocab(col.explode() if f.kind == "multi_hot" else col, f)
    return state
