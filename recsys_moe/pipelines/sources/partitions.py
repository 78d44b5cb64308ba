"""Day-partitioned event logs, as the synthetic and Criteo-like sources write them:
`directory/day=YYYY-MM-DD/part-0.parquet`, each file written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from recsys_moe import atomic


def write_day_partitions(frame: pl.DataFrame, directory: Path, id_column: str) -> set[str]:
    """``directory/day=YYYY-MM-DD/part-0.parquet`` by the ``ts`` column, each written atomically
    → the partition names written (callers decide what to do with other days)."""
    if not frame["ts"].is_sorted():
        frame = frame.sort("ts", id_column)
    # ts is sorted, so each day is a contiguous slice: find run boundaries, no partition_by copy.
    runs = frame["ts"].dt.date().rle()
    written: set[str] = set()
    offset = 0
    for length, day in zip(runs.struct.field("len"), runs.struct.field("value")):
        part = f"day={day.isoformat()}"
        atomic.write_parquet(frame.slice(offset, length), directory / part / "part-0.parquet")
        written.add(part)
        offset += length
    directory.mkdir(parents=True, exist_ok=True)
    return written


def remove_other_days(directory: Path, keep: set[str]) -> None:
    """Remove the `day=` partitions of an earlier write that `keep` does not name, so a rewrite
    never mixes two logs."""
    for stale in directory.glob("day=*"):
        if stale.name not in keep:
            shutil.rmtree(stale)
