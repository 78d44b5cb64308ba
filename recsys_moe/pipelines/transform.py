"""Raw rows → model-ready columns. Shared by the training pipeline and by serving.

Output layout (one row per example): `key:<name>` passthrough keys, one Int64 column per
categorical feature (row id in its table), one List(Int64) per multi-hot feature, one Float32
per dense feature, and `label:<task>` Float32 labels when labels are present.
"""

from __future__ import annotations

import polars as pl

from recsys_moe.features.expressions import compile_expression
from recsys_moe.features.spec import Feature, FeatureSpec
from recsys_moe.pipelines.coerce import dense_number, typed_ids
from recsys_moe.pipelines.fit import OOV, FittedState, signed_log1p, stable_hash_ids, stable_hash_lists


def key_column(name: str) -> str:
    return f"key:{name}"


def label_column(task: str) -> str:
    return f"label:{task}"


def _typed_feature(f: Feature, dtype: pl.DataType) -> pl.Expr:
    if f.kind == "dense":
        number = dense_number(f.source_column, dtype)
        return (number if number is not None else pl.lit(None, pl.Float64)).alias(f.name)  # rejected rows only
    return typed_ids(f, dtype)


def typed_columns(spec: FeatureSpec, schema: pl.Schema, with_labels: bool = True) -> list[pl.Expr]:
    """The expressions of `typed` for raw columns of these dtypes (a scorer keeps them per schema)."""
    exprs = [pl.col(k).alias(key_column(k)) for k in spec.keys]
    exprs += [_typed_feature(f, schema.get(f.source_column, pl.String())) for f in spec.features]
    if with_labels:
        exprs += [compile_expression(t.label).expr.cast(pl.Float32).alias(label_column(t.name)) for t in spec.tasks]
    return exprs


def typed(frame: pl.LazyFrame | pl.DataFrame, spec: FeatureSpec, with_labels: bool = True) -> pl.LazyFrame:
    """Cast raw columns to one column per feature, by the input contract (`coerce`); validation
    has already rejected the values it refuses."""
    frame = frame.lazy()
    return frame.select(typed_columns(spec, frame.collect_schema(), with_labels))


def _ids(f: Feature, state: FittedState) -> pl.Expr:
    col = pl.col(f.name)
    if f.vocab_policy.kind == "hash":
        buckets = f.vocab_policy.hash_buckets
        hashed = lambda s: stable_hash_ids(s, buckets)  # noqa: E731
        return col.map_batches(hashed, return_dtype=pl.Int64)
    return _vocab_ids(col, state.vocabularies[f.name])


def _vocab_ids(values: pl.Expr, vocab: list[str]) -> pl.Expr:
    """Value → 1 + its position in the vocabulary; unseen or null → OOV (0).

    A cast to an Enum of the vocabulary: its lookup table is built once, with the expression,
    so scoring 100 rows against a 1M-entry vocabulary costs a lookup per row, not a rebuild of
    the table per request (as `replace_strict` would). The Enum's first category is a string
    the vocabulary lacks, so a value's physical index is already 1 + its position and an unseen
    one (null after the cast, or that string) is OOV: two passes fewer than adding 1.
    """
    assert OOV == 0, "the Enum's first category stands for OOV"
    absent = "\x00"
    while absent in vocab:
        absent += "\x00"
    return values.cast(pl.Enum([absent, *vocab]), strict=False).to_physical().fill_null(OOV).cast(pl.Int64)


def _encode(f: Feature, state: FittedState) -> pl.Expr:
    col = pl.col(f.name)
    if f.kind == "dense":
        stats = state.dense[f.name]
        filled = col.fill_null(stats.mean)
        if f.transform == "bucketize":
            bounds = pl.Series(stats.boundaries, dtype=pl.Float64)
            bucket = pl.lit(bounds).search_sorted(filled, side="right").cast(pl.Int64) + 1
            return pl.when(col.is_null()).then(pl.lit(OOV, pl.Int64)).otherwise(bucket).alias(f.name)
        value = signed_log1p(filled) if f.transform == "log1p" else filled
        if f.transform in ("standardize", "log1p"):
            value = (value - stats.t_mean) / stats.t_std
        return value.cast(pl.Float32).alias(f.name)
    if f.kind == "categorical":
        return _ids(f, state).fill_null(OOV).alias(f.name)
    if f.vocab_policy.kind == "hash":
        buckets = f.vocab_policy.hash_buckets
        hashed = col.map_batches(lambda s: stable_hash_lists(s, buckets), return_dtype=pl.List(pl.Int64))
        return hashed.fill_null(pl.lit([], pl.List(pl.Int64))).alias(f.name)
    element = _vocab_ids(pl.element(), state.vocabularies[f.name])
    return col.list.eval(element).fill_null(pl.lit([], pl.List(pl.Int64))).alias(f.name)


def encoders(spec: FeatureSpec, state: FittedState) -> list[pl.Expr]:
    """The encoding expressions, built once: a scorer reuses them for every request rather than
    rebuilding its vocabulary lookups each time."""
    return [_encode(f, state) for f in spec.features]


def encode(
    typed_frame: pl.LazyFrame, spec: FeatureSpec, state: FittedState, exprs: list[pl.Expr] | None = None
) -> pl.LazyFrame:
    """Typed columns → table row ids and normalized dense values."""
    return typed_frame.with_columns(exprs if exprs is not None else encoders(spec, state))


def transform(
    raw: pl.LazyFrame | pl.DataFrame, spec: FeatureSpec, state: FittedState, with_labels: bool = True
) -> pl.LazyFrame:
    return encode(typed(raw, spec, with_labels), spec, state)
