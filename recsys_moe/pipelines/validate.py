"""Row-level validation of raw data against a feature spec.

Every row either passes or gets a `_reject_reason` that names the field and the problem; nothing
is dropped silently, so counts reconcile (rows in = rows out + rows rejected).
"""

from __future__ import annotations

import polars as pl

from recsys_moe.features.expressions import compile_expression
from recsys_moe.features.spec import Feature, FeatureSpec, Task
from recsys_moe.pipelines.coerce import dense_number, id_problems

REASON = "_reject_reason"


class SchemaError(ValueError):
    """The raw data lacks columns the spec needs: a whole-run failure, not a row reject."""


def check_columns(schema: pl.Schema, spec: FeatureSpec, where: str, with_labels: bool = True) -> None:
    """Raise SchemaError naming the missing columns. Scoring (`with_labels=False`) needs only the
    features' columns."""
    needed = spec.raw_columns if with_labels else spec.input_columns
    missing = [c for c in needed if c not in schema]
    if missing:
        raise SchemaError(f"{where}: columns required by spec '{spec.name}' are missing: {missing}")


def _text(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.String, strict=False)


def _dense_checks(f: Feature, dtype: pl.DataType) -> list[tuple[pl.Expr, pl.Expr]]:
    raw = pl.col(f.source_column)
    num = dense_number(f.source_column, dtype)
    if num is None:
        given = raw.is_not_null() if f.nullable else pl.lit(True)
        return [(given, pl.lit(f"{f.name}: {dtype} values are not numbers"))]
    checks = [
        (raw.is_not_null() & num.is_null(), pl.format(f"{f.name}: not a number ({{}})", _text(f.source_column))),
        (num.is_nan() | num.is_infinite(), pl.lit(f"{f.name}: not finite")),
    ]
    if not f.nullable:
        checks.append((raw.is_null(), pl.lit(f"{f.name}: null in a non-nullable feature")))
    if f.min is not None:
        checks.append((num < f.min, pl.format(f"{f.name}: {{}} is below the minimum {f.min}", num)))
    if f.max is not None:
        checks.append((num > f.max, pl.format(f"{f.name}: {{}} is above the maximum {f.max}", num)))
    return checks


def label_checks(t: Task) -> list[tuple[pl.Expr, pl.Expr]]:
    """(condition, reason) pairs that reject a row's label of task `t` (training and the gate)."""
    expr = compile_expression(t.label)
    value = expr.expr.cast(pl.Float64, strict=False)
    nulls = pl.any_horizontal([pl.col(c).is_null() for c in sorted(expr.columns)])
    checks = [(nulls | value.is_null(), pl.lit(f"label {t.name}: null or not a number"))]
    if t.type == "binary":
        checks.append((~value.is_in([0.0, 1.0]), pl.format(f"label {t.name}: {{}} is not 0/1", value)))
    else:
        checks.append((value.is_nan() | value.is_infinite(), pl.lit(f"label {t.name}: not finite")))
    return checks


def reject_reason(spec: FeatureSpec, schema: pl.Schema, with_labels: bool = True) -> pl.Expr:
    """The first failing check of a row, as text; null when the row is valid. Scoring checks the
    features only (`with_labels=False`): the same checks training applied, so no skew. The checks
    depend on the columns' dtypes (`schema`): an id column of floats is checked for integers."""
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    for f in spec.features:
        if f.kind == "dense":
            checks += _dense_checks(f, schema.get(f.source_column, pl.String()))
            continue
        if not f.nullable:
            checks.append((pl.col(f.source_column).is_null(), pl.lit(f"{f.name}: null in a non-nullable feature")))
        checks += id_problems(f, schema.get(f.source_column, pl.String()))
    for t in spec.tasks if with_labels else []:
        checks += label_checks(t)
    whens = [pl.when(cond.fill_null(False)).then(reason) for cond, reason in checks]
    return pl.coalesce(whens).alias(REASON)


def validate(
    frame: pl.DataFrame, spec: FeatureSpec, where: str, with_labels: bool = True
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw rows into (valid rows, rejected rows with their reason)."""
    check_columns(frame.schema, spec, where, with_labels)
    marked = frame.with_columns(reject_reason(spec, frame.schema, with_labels))
    rejected = marked.filter(pl.col(REASON).is_not_null())
    valid = marked.filter(pl.col(REASON).is_null()).drop(REASON)
    return valid, rejected
