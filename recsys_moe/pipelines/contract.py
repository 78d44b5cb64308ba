"""Raw-event contracts: what a log of events must satisfy before anything is computed from it.

Why: history features, labels and splits are computed straight from raw events, and raw logs
are dirty. A duplicated event is counted twice in every count and rate; a conversion without a
click, or a conversion time outside its attribution window, leaks or invents labels; a null or
unparseable event time cannot be placed in any point-in-time window; an event filed under the
wrong ``day=`` partition moves between train and test. An :class:`EventContract` declares the
rules once, and :func:`check_events` splits a frame into valid rows and rejected rows with a
reason each, so bad rows are counted and inspectable instead of silently dropped or used.

Rules, checked in this order; a rejected row carries the reason of the *first* rule it breaks
(later rules assume the earlier ones hold: a null `click` is reported as ``click: null``, not
also as ``conversion: 1 without click``):

1. null: the event id, the time, every ``required`` column and every flag is non-null
   (``user_id: null``);
2. type: every non-null value of a typed column casts to its type (``ts: not a datetime
   (abc)``); the time and the ``delayed`` time columns are always ``datetime``. Text casts
   strictly: ints and floats as Polars parses them (``1.5`` is not an int, and neither is a
   float 2.5), times in one of :data:`DATETIME_FORMATS` (ISO 8601, no zone);
3. partition: when the frame has a ``partition`` column (``day``, as Hive ``day=YYYY-MM-DD``
   directories give), it is a date (text: exactly ``YYYY-MM-DD``) and the event time falls on
   it (``ts: 2026-01-03 10:00 is not in partition day=2026-01-02``);
4. flags are 0 or 1 (``click: 2 is not 0/1``);
5. ``requires``: a flag set needs its parent flag set (``conversion: 1 without click``);
6. ``delayed``: the time column is set iff its flag is 1, and lies in [time, time + max_days]
   (``conversion_ts: set but conversion is 0``, ``conversion_ts: null but conversion is 1``,
   ``conversion_ts: before ts``, ``conversion_ts: more than 7 days after ts``);
7. duplicates: among the rows that pass rules 1-6, the first occurrence of an event id (in
   input order) is kept and every later one rejected (``impression_id: duplicate (first seen
   at row 17)``, rows numbered from 0 in input order). Only valid rows count as a first
   occurrence, so a corrupt copy followed by a clean retry keeps the clean one, and the
   kept row is always a valid one.

Event order is not a rule: real logs are not sorted, and point-in-time code sorts anyway.

Frame-level problems are not row problems: a column the contract names that the frame lacks,
or a column whose dtype can never hold its type (an integer ``ts``), raises
:class:`ContractError` before any row is looked at.

Valid rows keep the input's columns and order; a column whose dtype is not already of its
type (e.g. a string ``ts``) comes back converted (int → Int64, float → Float64, string → Utf8,
datetime → Datetime("us"), flags → Int8). Rejected rows keep the input values untouched, plus
``reject_reason``. Both results are lazy over one plan: collect them together
(``pl.collect_all([valid, rejected])``) so the checks run once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl

__all__ = ["DATETIME_FORMATS", "KINDS", "REJECT_REASON", "ContractError", "EventContract", "check_events"]

REJECT_REASON = "reject_reason"
KINDS = ("int", "float", "string", "datetime")
_CANONICAL: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "string": pl.Utf8(),
    "datetime": pl.Datetime("us"),
}
# String times are parsed with these formats, first match wins (explicit formats: lazy
# frames cannot infer one from the data, and inference would vary with the first row).
DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
_MAX_VALUE_CHARS = 40  # values quoted in reasons are cut to this
_ARTICLE = {"int": "an", "float": "a", "string": "a", "datetime": "a"}


class ContractError(ValueError):
    """The frame as a whole cannot be checked: columns missing or of an impossible dtype."""


@dataclass(frozen=True)
class EventContract:
    """Rules for a raw event log; see the module docstring for their order and reasons."""

    event_id: str  # unique per event
    time: str  # event time (datetime)
    required: tuple[str, ...]  # columns that must be non-null
    flags: tuple[str, ...] = ()  # 0/1 integer columns (non-null)
    requires: tuple[tuple[str, str], ...] = ()  # (flag, parent_flag): flag == 1 needs parent_flag == 1
    delayed: tuple[tuple[str, str, int], ...] = ()  # (flag, time_column, max_days)
    types: dict[str, str] = field(default_factory=dict)  # column -> "int" | "float" | "string" | "datetime"
    partition: str = "day"  # checked against the event time when the frame has this column

    def __post_init__(self) -> None:
        bad_kinds = {c: k for c, k in self.types.items() if k not in KINDS}
        if bad_kinds:
            raise ValueError(f"unknown types {bad_kinds}; use one of {KINDS}")
        for column in (self.time, *(t for _, t, _ in self.delayed)):
            if self.types.get(column, "datetime") != "datetime":
                raise ValueError(f"{column} is a time column, its type must be 'datetime'")
        undeclared = [f for pair in self.requires for f in pair if f not in self.flags]
        undeclared += [f for f, _, _ in self.delayed if f not in self.flags]
        if undeclared:
            raise ValueError(f"requires/delayed name columns that are not flags: {_unique(undeclared)}")
        for flag, column, max_days in self.delayed:
            if isinstance(max_days, bool) or not isinstance(max_days, int) or max_days < 0:
                raise ValueError(f"delayed ({flag}, {column}): max_days must be an int >= 0, got {max_days!r}")

    def kinds(self) -> dict[str, str]:
        """Every typed column → its type, the implicit datetime columns included."""
        implicit = {c: "datetime" for c in (self.time, *(t for _, t, _ in self.delayed))}
        return {**implicit, **self.types}

    def columns(self) -> list[str]:
        """Every column the contract names, in a stable order."""
        return _unique(
            [
                self.event_id,
                self.time,
                *self.required,
                *self.flags,
                *(c for pair in self.requires for c in pair),
                *(c for f, t, _ in self.delayed for c in (f, t)),
                *self.types,
            ]
        )


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# casting: which dtypes can hold a type at all, and the typed value (null where it does not cast)


def _accepts(dtype: pl.DataType, kind: str) -> bool:
    if dtype == pl.Null or dtype == pl.Utf8:
        return True
    if kind == "int":
        return dtype.is_numeric() or dtype == pl.Boolean
    if kind == "float":
        return dtype.is_numeric()
    if kind == "string":
        return not dtype.is_nested()
    return isinstance(dtype, (pl.Datetime, pl.Date))  # datetime


def _typed(name: str, dtype: pl.DataType, kind: str) -> pl.Expr:
    """`name` as `kind`; null where a non-null value does not cast (never raises)."""
    col = pl.col(name)
    if dtype == pl.Utf8:
        text = col.str.strip_chars()
        if kind == "datetime":
            return pl.coalesce([text.str.to_datetime(f, time_unit="us", strict=False) for f in DATETIME_FORMATS])
        return text.cast(_CANONICAL[kind], strict=False)
    if kind == "int" and dtype.is_float():  # 2.0 is an int, 2.5 and inf are not
        return pl.when(col.is_finite() & (col == col.floor())).then(col.cast(pl.Int64, strict=False))
    if kind == "int" and dtype == pl.Boolean:
        return col.cast(pl.Int64)
    if (kind == "int" and dtype.is_integer()) or (kind == "float" and dtype.is_numeric()):
        return col  # already of its type
    if kind == "datetime" and isinstance(dtype, pl.Datetime):
        return col
    return col.cast(_CANONICAL[kind], strict=False)


def _partition_day(name: str, dtype: pl.DataType) -> pl.Expr:
    """The partition column as a Date; text must be exactly YYYY-MM-DD, as Hive paths write it."""
    if dtype == pl.Utf8:
        return pl.col(name).str.to_date("%Y-%m-%d", strict=False)
    return pl.col(name).cast(pl.Date, strict=False)


def _output(name: str, dtype: pl.DataType, kind: str) -> pl.Expr:
    """The valid rows' column: unchanged when its dtype is of its type, else converted."""
    already = {
        "int": dtype.is_integer(),
        "float": dtype.is_float(),
        "string": dtype == pl.Utf8,
        "datetime": isinstance(dtype, pl.Datetime),
    }[kind]
    return pl.col(name) if already else _typed(name, dtype, kind).cast(_CANONICAL[kind]).alias(name)


def _shown(name: str) -> pl.Expr:
    """A value as it appears in a reason: its text, cut to _MAX_VALUE_CHARS."""
    return pl.col(name).cast(pl.Utf8, strict=False).str.slice(0, _MAX_VALUE_CHARS).fill_null("?")


def _reason(condition: pl.Expr, *parts: str | pl.Expr) -> pl.Expr:
    """`parts` joined as the reason where `condition` is true, else null (null counts as false)."""
    text = pl.concat_str([pl.lit(p) if isinstance(p, str) else p for p in parts])
    return pl.when(condition).then(text)


# ---------------------------------------------------------------------------------------------


def _check_schema(schema: pl.Schema, contract: EventContract) -> None:
    missing = [c for c in contract.columns() if c not in schema]
    if missing:
        raise ContractError(f"missing columns: {', '.join(missing)} (have: {', '.join(schema.names())})")
    wrong = [f"{c} is {schema[c]}, cannot hold {k}" for c, k in contract.kinds().items() if not _accepts(schema[c], k)]
    wrong += [f"{f} is {schema[f]}, cannot hold a 0/1 flag" for f in contract.flags if not _accepts(schema[f], "int")]
    if contract.partition in schema and not _accepts(schema[contract.partition], "datetime"):
        wrong.append(f"{contract.partition} is {schema[contract.partition]}, cannot hold a date")
    if wrong:
        raise ContractError("impossible column types: " + "; ".join(wrong))


def _rule_reasons(schema: pl.Schema, contract: EventContract) -> list[pl.Expr]:
    """Rules 1-6 as reason expressions, in order (see the module docstring)."""
    kinds = contract.kinds()
    typed = {c: _typed(c, schema[c], k) for c, k in kinds.items()}
    flag = {f: _typed(f, schema[f], "int") for f in contract.flags}
    time = typed[contract.time]
    reasons: list[pl.Expr] = []

    # 1. nulls
    for c in _unique([contract.event_id, contract.time, *contract.required, *contract.flags]):
        reasons.append(_reason(pl.col(c).is_null(), f"{c}: null"))
    # 2. types
    for c, k in kinds.items():
        unparsed = pl.col(c).is_not_null() & typed[c].is_null()
        reasons.append(_reason(unparsed, f"{c}: not {_ARTICLE[k]} {k} (", _shown(c), ")"))
    # 3. partition
    part = contract.partition
    if part in schema:
        day = _partition_day(part, schema[part])
        reasons.append(_reason(pl.col(part).is_not_null() & day.is_null(), f"{part}: not a date (", _shown(part), ")"))
        reasons.append(
            _reason(
                time.dt.date() != day,
                f"{contract.time}: ",
                time.dt.strftime("%Y-%m-%d %H:%M"),
                f" is not in partition {part}=",
                day.dt.strftime("%Y-%m-%d"),
            )
        )
    # 4. flags
    for f in contract.flags:
        reasons.append(_reason(flag[f].is_null() | ~flag[f].is_in([0, 1]), f"{f}: ", _shown(f), " is not 0/1"))
    # 5. requires
    for f, parent in contract.requires:
        reasons.append(_reason((flag[f] == 1) & (flag[parent] != 1), f"{f}: 1 without {parent}"))
    # 6. delayed
    for f, c, max_days in contract.delayed:
        at = typed[c]
        reasons += [
            _reason((flag[f] == 1) & pl.col(c).is_null(), f"{c}: null but {f} is 1"),
            _reason((flag[f] == 0) & pl.col(c).is_not_null(), f"{c}: set but {f} is 0"),
            _reason(at < time, f"{c}: before {contract.time}"),
            _reason(
                at > time + pl.duration(days=max_days),
                f"{c}: more than {max_days} day{'s' * (max_days != 1)} after {contract.time}",
            ),
        ]
    return reasons


def _fresh(schema: pl.Schema, base: str) -> str:
    name = base
    while name in schema:
        name = f"_{name}"
    return name


def check_events(
    frame: pl.LazyFrame, contract: EventContract, duplicates: bool = True
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(valid rows, rejected rows with an added `reject_reason` string column).

    Every input row lands in exactly one of the two, in input order. Raises
    :class:`ContractError` when the frame lacks a column the contract names or a column's
    dtype cannot hold its type. Collect both with ``pl.collect_all`` to run the checks once.
    `duplicates=False` leaves rule 7 to the caller: a partitioned build sees one day at a time
    and finds duplicates across days in a unit of its own (`pipelines/history_units.py`).
    """
    frame = frame.lazy()
    schema = frame.collect_schema()
    _check_schema(schema, contract)
    if REJECT_REASON in schema:
        raise ContractError(f"the frame already has a {REJECT_REASON!r} column")
    row, reason = _fresh(schema, "__contract_row"), _fresh(schema, "__contract_reason")

    # Rules 1-6: the first failing rule's reason, null for rows that pass them all.
    checked = frame.with_row_index(row).with_columns(pl.coalesce(_rule_reasons(schema, contract)).alias(reason))

    # Rule 7: the first *valid* row of each event id is kept, later valid rows are duplicates.
    event_id = contract.event_id
    id_kind = contract.kinds().get(event_id)
    key = pl.col(event_id) if id_kind is None else _typed(event_id, schema[event_id], id_kind)
    first = pl.when(pl.col(reason).is_null()).then(pl.col(row)).min().over(key)
    duplicate = _reason(
        pl.col(reason).is_null() & (pl.col(row) != first),
        f"{event_id}: duplicate (first seen at row ",
        first.cast(pl.Utf8),
        ")",
    )
    if duplicates:
        checked = checked.with_columns(pl.coalesce(pl.col(reason), duplicate).alias(reason))

    outputs = {c: _output(c, schema[c], k) for c, k in contract.kinds().items()}
    outputs |= {f: _output(f, schema[f], "int").cast(pl.Int8) for f in contract.flags if not schema[f].is_integer()}
    valid = checked.filter(pl.col(reason).is_null()).select([outputs.get(c, pl.col(c)) for c in schema.names()])
    rejected = checked.filter(pl.col(reason).is_not_null()).select(*schema.names(), pl.col(reason).alias(REJECT_REASON))
    return valid, rejected
