"""The input contract for ids: which raw values a categorical or multi-hot feature accepts, how
each becomes the text its vocabulary holds, and the reason a row is rejected otherwise.

Every path applies it: the training pipeline, batch scoring, the HTTP endpoint, the pyfunc and
the promotion gate (they all go through `validate.reject_reason` and `transform.typed`, and the
endpoint's request models through `id_text`). So an id arrives the same way from any of them:

* strings stay as they are; integers become their text (`123` → "123");
* an integral float is the integer it holds (`1632.0` → "1632": what pandas writes for an integer
  column with nulls), never "1632.0", which would miss the vocabulary and score as unseen;
* a float that is not an exact integer, a list where one id is expected, a string where a list
  is expected, booleans and other types that are not ids are rejected with a reason naming the
  feature.
"""

from __future__ import annotations

import math

import polars as pl

from recsys_moe.features.spec import Feature

EXACT = 2.0**53  # floats hold every integer up to here exactly


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)


def _is_list(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.List | pl.Array)


def _inner(dtype: pl.DataType) -> pl.DataType:
    """The element type of a List or Array column."""
    assert isinstance(dtype, pl.List | pl.Array)
    inner = dtype.inner
    return inner() if isinstance(inner, type) else inner  # a bare class, e.g. pl.String, as an instance


def _is_number(dtype: pl.DataType) -> bool:
    return dtype.is_float() or isinstance(dtype, pl.Decimal)


def _scalar_id_ok(dtype: pl.DataType) -> bool:
    return _is_text(dtype) or dtype.is_integer() or _is_number(dtype) or dtype == pl.Null or dtype.is_temporal()


def _integral(x: pl.Expr) -> pl.Expr:
    return x.is_finite() & (x == x.floor()) & (x.abs() <= EXACT)


def _id_text(x: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A scalar id column as text (rejected values become null: validation names them first)."""
    if _is_number(dtype):
        number = x.cast(pl.Float64)
        return pl.when(_integral(number)).then(number.cast(pl.Int64, strict=False).cast(pl.String))
    if dtype == pl.Null:
        return x.cast(pl.String)
    return x.cast(pl.String, strict=False)


def dense_number(column: str, dtype: pl.DataType) -> pl.Expr | None:
    """A dense feature's raw column as Float64 (values that are not numbers become null), or None
    when the column's type holds no numbers at all (structs, lists, binary): every given value
    of it is then rejected, rather than the cast failing the whole batch."""
    col = pl.col(column)
    if isinstance(dtype, pl.Categorical | pl.Enum):
        return col.cast(pl.String).cast(pl.Float64, strict=False)
    if isinstance(dtype, pl.Struct | pl.List | pl.Array | pl.Binary | pl.Object):
        return None
    return col.cast(pl.Float64, strict=False)


def id_problems(f: Feature, dtype: pl.DataType) -> list[tuple[pl.Expr, pl.Expr]]:
    """(condition, reason) pairs that reject a row's value of categorical/multi-hot `f`."""
    col = pl.col(f.source_column)
    given = col.is_not_null()
    if f.kind == "categorical":
        if _is_list(dtype):
            return [(given, pl.lit(f"{f.name}: a list where one id is expected"))]
        if not _scalar_id_ok(dtype):
            return [(given, pl.lit(f"{f.name}: {dtype} values are not ids"))]
        if _is_number(dtype):
            number = col.cast(pl.Float64)
            return [(given & ~_integral(number), pl.format(f"{f.name}: {{}} is not an id", number))]
        return []
    if f.separator is not None:  # a separated string of ids
        if _is_list(dtype):
            return [(given, pl.lit(f"{f.name}: a list where a {f.separator!r}-separated string is expected"))]
        if not _is_text(dtype) and dtype != pl.Null:
            return [(given, pl.lit(f"{f.name}: a {dtype} where a {f.separator!r}-separated string is expected"))]
        return []
    if dtype == pl.Null:
        return []
    if not _is_list(dtype):
        what = "a string" if _is_text(dtype) else f"a single {dtype} value"
        return [(given, pl.lit(f"{f.name}: {what} where a list of ids is expected"))]
    inner = _inner(dtype)
    if not _scalar_id_ok(inner) or _is_list(inner):
        return [(given, pl.lit(f"{f.name}: a list of {inner} values, not ids"))]
    if _is_number(inner):
        bad = col.list.eval(~_integral(pl.element().cast(pl.Float64)).fill_null(False)).list.any()
        return [(given & bad, pl.lit(f"{f.name}: a value in the list is not an id (not an exact integer)"))]
    return []


def typed_ids(f: Feature, dtype: pl.DataType) -> pl.Expr:
    """Categorical → String; multi-hot → List(String), at most `max_length` values, nulls dropped."""
    col = pl.col(f.source_column)
    if f.kind == "categorical":
        if not _scalar_id_ok(dtype):
            return pl.lit(None, pl.String).alias(f.name)  # rejected rows only
        return _id_text(col, dtype).alias(f.name)
    if f.separator is not None:
        lst = col.cast(pl.String, strict=False).str.split(f.separator) if not _is_list(dtype) else None
    elif dtype == pl.Null:
        lst = col.cast(pl.List(pl.String))
    elif _is_list(dtype) and _scalar_id_ok(_inner(dtype)) and not _is_list(_inner(dtype)):
        inner = _inner(dtype)
        lst = col.list.eval(_id_text(pl.element(), inner)) if not _is_text(inner) else col.cast(pl.List(pl.String))
    else:
        lst = None
    if lst is None:
        return pl.lit(None, pl.List(pl.String)).alias(f.name)  # rejected rows only
    # Null elements carry nothing; sources list the most recent or relevant values first.
    return lst.list.drop_nulls().list.head(f.max_length).alias(f.name)


def id_text(value: object) -> str | None:
    """One id from a request (JSON), the way `typed_ids` converts a column: ValueError if it is
    not one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: a bool is an int to Python, not an id to us
        raise ValueError(f"{value!r} is not an id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == math.floor(value) and abs(value) <= EXACT:
        return str(int(value))
    raise ValueError(f"{value!r} is not an id")
