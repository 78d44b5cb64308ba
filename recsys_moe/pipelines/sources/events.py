"""The synthetic event log as a ranking data set: impressions joined with their side tables.

Splits are by time (the last days are validation and test), as a ranking model is always trained
on the past and judged on the future.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import polars as pl

from recsys_moe.pipelines.sources import synthetic


def joined(raw_dir: Path, with_day: bool = False, day: date | None = None) -> pl.LazyFrame:
    """Impressions with their user and item columns (`day`: one day partition only)."""
    users, items, impressions = synthetic.read(raw_dir, with_day, day)
    # Keep the log's order: an unordered join would make every rebuild's shards differ.
    return impressions.join(users, on="user_id", how="left", maintain_order="left").join(
        items, on="item_id", how="left", maintain_order="left"
    )


def splits(raw_dir: Path, valid_days: int = 1, test_days: int = 1) -> dict[str, pl.LazyFrame]:
    return time_splits(joined(raw_dir), f"{raw_dir}", valid_days, test_days)


def time_splits(frame: pl.LazyFrame, where: str, valid_days: int = 1, test_days: int = 1) -> dict[str, pl.LazyFrame]:
    """Train / valid / test by the `ts` column: the last `test_days` are test, the `valid_days`
    before them validation, everything earlier training."""
    day = pl.col("ts").dt.date()
    first, last = frame.select(day.min().alias("a"), day.max().alias("b")).collect().row(0)
    if first is None:
        raise ValueError(f"{where}: no events")
    test_start = last - timedelta(days=test_days - 1)
    valid_start = test_start - timedelta(days=valid_days)
    if valid_start <= first:
        raise ValueError(
            f"{where}: {(last - first).days + 1} days of events is too few for "
            f"{valid_days} validation and {test_days} test days plus training days"
        )
    return {
        "train": frame.filter(day < valid_start),
        "valid": frame.filter((day >= valid_start) & (day < test_start)),
        "test": frame.filter(day >= test_start),
    }
