"""Tests for the raw-event contract: each reject reason, the rule order, reconciliation (every
row lands in exactly one output), frame-level errors, and a property test that random
corruption of a clean log never loses or duplicates a row."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_moe.pipelines.contract import REJECT_REASON, ContractError, EventContract, check_events
from recsys_moe.pipelines.sources.synthetic import SyntheticConfig, generate, impressions_contract, write

CONTRACT = EventContract(
    event_id="impression_id",
    time="ts",
    required=("impression_id", "ts", "user_id", "item_id"),
    flags=("click", "conversion"),
    requires=(("conversion", "click"),),
    delayed=(("conversion", "conversion_ts", 7),),
    types={"user_id": "int", "item_id": "int", "price": "float", "device": "string"},
)
DAY = datetime.date(2026, 1, 2)
T0 = datetime.datetime(2026, 1, 2, 10)
N = 20


def clean(n: int = N) -> pl.DataFrame:
    """A valid log of one day: every 4th row (from row 1) converts two hours after its click."""
    ts = [T0 + datetime.timedelta(minutes=i) for i in range(n)]
    conv = [int(i % 4 == 1) for i in range(n)]
    return pl.DataFrame(
        {
            "impression_id": list(range(n)),
            "ts": ts,
            "user_id": [i % 5 for i in range(n)],
            "item_id": [i % 7 for i in range(n)],
            "price": [1.5 + i for i in range(n)],
            "device": ["ios", "web"] * (n // 2) + ["ios"] * (n % 2),
            "click": [i % 2 for i in range(n)],
            "conversion": conv,
            "conversion_ts": [t + datetime.timedelta(hours=2) if c else None for t, c in zip(ts, conv)],
            "tag": [f"r{i}" for i in range(n)],  # not in the contract: passes through untouched
            "day": [DAY] * n,
        },
        schema_overrides={
            "click": pl.Int8,
            "conversion": pl.Int8,
            "ts": pl.Datetime("us"),
            "conversion_ts": pl.Datetime("us"),
        },
    )


def as_strings(df: pl.DataFrame) -> pl.DataFrame:
    """The same log as text, as a CSV or JSON source would give it."""
    return df.with_columns(pl.all().cast(pl.Utf8))


def run(df: pl.DataFrame, contract: EventContract = CONTRACT) -> tuple[pl.DataFrame, pl.DataFrame]:
    valid, rejected = pl.collect_all(list(check_events(df.lazy(), contract)))
    return valid, rejected


def set_cell(df: pl.DataFrame, row: int, column: str, value: Any) -> pl.DataFrame:
    values = df[column].to_list()
    values[row] = value
    return df.with_columns(pl.Series(column, values, dtype=df.schema[column]))


def reasons(df: pl.DataFrame) -> dict[Any, str]:
    """impression_id → reason of the rejected rows (asserting the counts reconcile)."""
    valid, rejected = run(df)
    assert valid.height + rejected.height == df.height
    return dict(zip(rejected["impression_id"], rejected[REJECT_REASON]))


# --------------------------------------------------------------------------------------------
# clean input


def test_clean_frame_passes_unchanged() -> None:
    valid, rejected = run(clean())
    assert rejected.height == 0
    assert rejected.columns == [*clean().columns, REJECT_REASON]
    assert valid.equals(clean())


def test_clean_text_frame_passes_and_is_typed() -> None:
    valid, rejected = run(as_strings(clean()))
    assert rejected.height == 0
    expected = clean().with_columns(
        pl.col("impression_id", "day").cast(pl.Utf8),  # untyped in the contract: left as text
        pl.col("user_id", "item_id").cast(pl.Int64),
    )
    assert valid.equals(expected)


def test_unsorted_rows_are_not_rejected() -> None:
    shuffled = clean().sample(fraction=1.0, shuffle=True, seed=3)
    valid, rejected = run(shuffled)
    assert rejected.height == 0
    assert valid.equals(shuffled)  # input order kept


def test_boundaries_of_the_attribution_window_are_valid() -> None:
    df = set_cell(clean(), 1, "conversion_ts", T0 + datetime.timedelta(minutes=1))  # == ts
    df = set_cell(df, 5, "conversion_ts", T0 + datetime.timedelta(minutes=5, days=7))  # == ts + 7 days
    assert reasons(df) == {}


def test_without_partition_column_the_day_is_not_checked() -> None:
    df = set_cell(clean().drop("day"), 3, "ts", T0 + datetime.timedelta(days=3))
    assert reasons(df) == {}


# --------------------------------------------------------------------------------------------
# each reason

Mutation = Callable[[pl.DataFrame], pl.DataFrame]
CASES: list[tuple[str, Mutation, str]] = [
    ("null required", lambda d: set_cell(d, 3, "user_id", None), "user_id: null"),
    ("null time", lambda d: set_cell(d, 3, "ts", None), "ts: null"),
    ("null flag", lambda d: set_cell(d, 3, "click", None), "click: null"),
    ("flag not 0/1", lambda d: set_cell(d, 3, "click", 2), "click: 2 is not 0/1"),
    ("negative flag", lambda d: set_cell(d, 3, "conversion", -1), "conversion: -1 is not 0/1"),
    (
        "conversion without click",
        lambda d: set_cell(set_cell(d, 2, "conversion", 1), 2, "conversion_ts", T0 + datetime.timedelta(hours=3)),
        "conversion: 1 without click",
    ),
    (
        "delayed time without flag",
        lambda d: set_cell(d, 3, "conversion_ts", T0 + datetime.timedelta(hours=3)),
        "conversion_ts: set but conversion is 0",
    ),
    (
        "flag without delayed time",
        lambda d: set_cell(d, 1, "conversion_ts", None),
        "conversion_ts: null but conversion is 1",
    ),
    ("delayed before time", lambda d: set_cell(d, 1, "conversion_ts", T0), "conversion_ts: before ts"),
    (
        "delayed too late",
        lambda d: set_cell(d, 1, "conversion_ts", T0 + datetime.timedelta(days=7, minutes=2)),
        "conversion_ts: more than 7 days after ts",
    ),
    (
        "time outside partition",
        lambda d: set_cell(d, 3, "ts", datetime.datetime(2026, 1, 3, 10)),
        "ts: 2026-01-03 10:00 is not in partition day=2026-01-02",
    ),
    ("duplicate", lambda d: set_cell(d, 17, "impression_id", 3), "impression_id: duplicate (first seen at row 3)"),
]


@pytest.mark.parametrize(("mutate", "reason"), [(m, r) for _, m, r in CASES], ids=[c[0] for c in CASES])
def test_each_reason(mutate: Mutation, reason: str) -> None:
    df = mutate(clean())
    rejected = reasons(df)
    assert list(rejected.values()) == [reason]


TEXT_CASES: list[tuple[str, str, str]] = [
    ("ts", "abc", "ts: not a datetime (abc)"),
    ("user_id", "x1", "user_id: not an int (x1)"),
    ("user_id", "1.5", "user_id: not an int (1.5)"),
    ("price", "cheap", "price: not a float (cheap)"),
    ("conversion_ts", "soon", "conversion_ts: not a datetime (soon)"),
    ("click", "yes", "click: yes is not 0/1"),
    ("day", "yesterday", "day: not a date (yesterday)"),
    ("day", "2026-01-02 00:00", "day: not a date (2026-01-02 00:00)"),
]


@pytest.mark.parametrize(("column", "value", "reason"), TEXT_CASES, ids=[c[2] for c in TEXT_CASES])
def test_each_type_reason_on_text(column: str, value: str, reason: str) -> None:
    df = set_cell(as_strings(clean()), 5, column, value)
    assert reasons(df) == {"5": reason}


def test_float_that_is_not_an_int() -> None:
    df = clean().with_columns(pl.col("user_id").cast(pl.Float64))
    df = set_cell(set_cell(df, 4, "user_id", 2.5), 6, "user_id", float("inf"))
    assert reasons(df) == {4: "user_id: not an int (2.5)", 6: "user_id: not an int (inf)"}
    valid, _ = run(df)
    assert valid.schema["user_id"] == pl.Int64  # integral floats come back as ints


def test_long_values_are_cut_in_reasons() -> None:
    df = set_cell(as_strings(clean()), 2, "ts", "x" * 500)
    assert reasons(df) == {"2": f"ts: not a datetime ({'x' * 40})"}


def test_first_broken_rule_is_the_reason() -> None:
    df = set_cell(set_cell(clean(), 3, "user_id", None), 3, "click", 2)  # null beats flag
    df = set_cell(set_cell(df, 5, "click", 7), 5, "conversion_ts", T0)  # flag beats delayed
    df = set_cell(df, 9, "ts", datetime.datetime(2026, 1, 5))  # partition beats requires/delayed
    df = set_cell(set_cell(df, 9, "conversion", 1), 9, "click", 0)
    assert reasons(df) == {
        3: "user_id: null",
        5: "click: 7 is not 0/1",
        9: "ts: 2026-01-05 00:00 is not in partition day=2026-01-02",
    }


def test_duplicates_keep_the_first_and_reject_every_later_one() -> None:
    df = clean()
    for row in (6, 11, 19):
        df = set_cell(df, row, "impression_id", 2)
    valid, rejected = run(df)
    assert valid.filter(pl.col("impression_id") == 2)["tag"].to_list() == ["r2"]
    assert rejected["tag"].to_list() == ["r6", "r11", "r19"]
    assert set(rejected[REJECT_REASON]) == {"impression_id: duplicate (first seen at row 2)"}


def test_a_duplicate_of_an_invalid_row_is_kept() -> None:
    """Only valid rows count as a first occurrence: a corrupt copy then a clean retry keeps the retry."""
    df = set_cell(set_cell(clean(), 4, "click", 5), 12, "impression_id", 4)
    valid, rejected = run(df)
    assert dict(zip(rejected["tag"], rejected[REJECT_REASON])) == {"r4": "click: 5 is not 0/1"}
    assert valid.filter(pl.col("impression_id") == 4)["tag"].to_list() == ["r12"]


def test_partition_day_as_text_and_hive_scan(tmp_path: Path) -> None:
    df = set_cell(clean().with_columns(pl.col("day").cast(pl.Utf8)), 0, "ts", datetime.datetime(2026, 1, 1, 23, 59))
    assert reasons(df) == {0: "ts: 2026-01-01 23:59 is not in partition day=2026-01-02"}
    # a hive-partitioned directory gives the day column from the path
    out = tmp_path / "events" / "day=2026-01-02"
    out.mkdir(parents=True)
    set_cell(clean(), 7, "ts", datetime.datetime(2026, 1, 4, 8)).drop("day").write_parquet(out / "part-0.parquet")
    log = pl.scan_parquet(tmp_path / "events", hive_partitioning=True)
    valid, rejected = pl.collect_all(list(check_events(log, CONTRACT)))
    assert valid.height == N - 1
    assert rejected[REJECT_REASON].to_list() == ["ts: 2026-01-04 08:00 is not in partition day=2026-01-02"]


# --------------------------------------------------------------------------------------------
# reconciliation and frame-level errors


def test_counts_reconcile_with_many_problems() -> None:
    df = clean(200)
    for row, column, value in [
        (3, "user_id", None),
        (8, "click", 3),
        (10, "conversion", 1),
        (21, "conversion_ts", None),
        (40, "impression_id", 41),
        (50, "impression_id", 3),
        (60, "ts", None),
        (70, "click", None),
    ]:
        df = set_cell(df, row, column, value)
    df = pl.concat([df, df.slice(100, 30)])  # 30 exact duplicates appended
    valid, rejected = run(df)
    assert valid.height + rejected.height == df.height
    assert Counter(valid["impression_id"].to_list() + rejected["impression_id"].to_list()) == Counter(
        df["impression_id"].to_list()
    )
    assert Counter(valid["tag"].to_list() + rejected["tag"].to_list()) == Counter(df["tag"].to_list())
    assert valid["impression_id"].is_unique().all()
    assert rejected[REJECT_REASON].null_count() == 0
    assert dict(zip(rejected["tag"].head(7), rejected[REJECT_REASON].head(7))) == {
        "r3": "user_id: null",
        "r8": "click: 3 is not 0/1",
        "r10": "conversion: 1 without click",
        "r21": "conversion_ts: null but conversion is 1",
        "r41": "impression_id: duplicate (first seen at row 40)",
        "r60": "ts: null",
        "r70": "click: null",
    }  # row 50 took id 3, whose first copy (row 3) is invalid: row 50 is kept
    assert rejected.height == 7 + 30
    assert set(rejected[REJECT_REASON].tail(30).str.extract(r"row (\d+)").cast(pl.Int64)) == set(range(100, 130))


def test_missing_columns_raise_naming_them() -> None:
    with pytest.raises(ContractError, match="missing columns: user_id, conversion_ts"):
        check_events(clean().drop("user_id", "conversion_ts").lazy(), CONTRACT)
    with pytest.raises(ValueError, match="price"):  # a ContractError is a ValueError
        check_events(clean().drop("price").lazy(), CONTRACT)


def test_impossible_dtype_raises() -> None:
    df = clean().with_columns(pl.col("ts").dt.epoch("us"))
    with pytest.raises(ContractError, match="ts is Int64, cannot hold datetime"):
        check_events(df.lazy(), CONTRACT)


def test_existing_reject_reason_column_raises() -> None:
    with pytest.raises(ContractError, match=REJECT_REASON):
        check_events(clean().with_columns(pl.lit("x").alias(REJECT_REASON)).lazy(), CONTRACT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"types": {"ts": "int"}}, "ts is a time column"),
        ({"types": {"user_id": "integer"}}, "unknown types"),
        ({"requires": (("conversion", "view"),)}, "not flags"),
        ({"delayed": (("conversion", "conversion_ts", -1),)}, "max_days"),
    ],
)
def test_contract_definition_is_validated(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"event_id": "id", "time": "ts", "required": (), "flags": ("click", "conversion")}
    with pytest.raises(ValueError, match=message):
        EventContract(**{**base, **kwargs})


def test_synthetic_log_satisfies_its_contract(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_users=300, n_items=200, n_impressions=30_000, n_days=5, attribution_days=2, seed=5)
    write(generate(cfg), tmp_path)
    log = pl.scan_parquet(tmp_path / "impressions", hive_partitioning=True)
    valid, rejected = pl.collect_all(list(check_events(log, impressions_contract(cfg.attribution_days))))
    assert rejected.height == 0
    assert valid.height == cfg.n_impressions
    assert valid.select(pl.col("conversion").sum()).item() > 0


# --------------------------------------------------------------------------------------------
# property: corruption never loses or duplicates rows, and what passes satisfies the contract

COLUMNS = [c for c in clean().columns if c != "tag"]
GARBAGE = st.sampled_from(
    [
        *["", "abc", "2", "-1", "1.5", "nan", "9" * 30],
        *["2026-13-45", "2026-01-03 09:00:00", "2026-01-02 00:00", "2025-12-31"],  # near-miss times and days
    ]
)
ROW = st.integers(0, N - 1)
CORRUPTION = st.one_of(
    st.tuples(st.just("set"), ROW, st.sampled_from(COLUMNS), st.none() | GARBAGE),
    st.tuples(st.just("flag"), ROW, st.sampled_from(["click", "conversion"]), st.sampled_from(["0", "1"])),
    st.tuples(st.just("dup_id"), ROW, ROW, st.none()),
    st.tuples(st.just("copy_row"), ROW, st.none(), st.none()),
    st.tuples(st.just("shift"), ROW, st.sampled_from(["ts", "conversion_ts"]), st.integers(-10 * 24, 10 * 24)),
)


def _corrupt(rows: list[dict[str, Any]], op: tuple[Any, ...]) -> None:
    kind, i, a, b = op
    i %= len(rows)
    if kind in ("set", "flag"):
        rows[i][a] = b
    elif kind == "dup_id":
        rows[i]["impression_id"] = rows[a % len(rows)]["impression_id"]
    elif kind == "copy_row":
        rows.append({**rows[i], "tag": f"copy{len(rows)}"})
    elif kind == "shift":
        value = rows[i][a]
        parsed = None if value is None else _parse(value)
        if parsed is not None:
            rows[i][a] = str(parsed + datetime.timedelta(hours=b))


def _parse(value: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value)
    except ValueError:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(CORRUPTION, max_size=12), shuffle_seed=st.none() | st.integers(0, 1000))
def test_corruption_never_loses_rows(ops: list[tuple[Any, ...]], shuffle_seed: int | None) -> None:
    rows = as_strings(clean()).to_dicts()
    for op in ops:
        _corrupt(rows, op)
    df = pl.DataFrame(rows, schema=as_strings(clean()).schema)
    if shuffle_seed is not None:
        df = df.sample(fraction=1.0, shuffle=True, seed=shuffle_seed)
    valid, rejected = run(df)

    # every input row lands in exactly one output (tags are unique per input row)
    assert valid.height + rejected.height == df.height
    assert sorted(valid["tag"].to_list() + rejected["tag"].to_list()) == sorted(df["tag"].to_list())
    assert Counter(valid["impression_id"].to_list() + rejected["impression_id"].to_list()) == Counter(
        df["impression_id"].to_list()
    )
    assert rejected[REJECT_REASON].null_count() == 0 and (rejected[REJECT_REASON].str.len_chars() > 0).all()
    if not ops:
        assert rejected.height == 0

    # what passes satisfies the contract
    assert valid["impression_id"].is_unique().all()
    assert valid.select("impression_id", "ts", "user_id", "item_id").null_count().sum_horizontal().item() == 0
    assert valid["click"].is_in([0, 1]).all() and valid["conversion"].is_in([0, 1]).all()
    assert (valid["conversion"] <= valid["click"]).all()
    assert (valid["conversion_ts"].is_null() == (valid["conversion"] == 0)).all()
    delay = valid["conversion_ts"] - valid["ts"]
    assert (delay.drop_nulls() >= datetime.timedelta(0)).all()
    assert (delay.drop_nulls() <= datetime.timedelta(days=7)).all()
    assert (valid["ts"].dt.date().cast(pl.Utf8) == valid["day"]).all()
