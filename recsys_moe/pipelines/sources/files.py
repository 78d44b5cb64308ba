"""Any raw data already split by the user: DIR/{train,valid,test}.{parquet,csv}."""

from __future__ import annotations

from pathlib import Path

import polars as pl

SPLITS = ("train", "valid", "test")


def scan(path: Path) -> pl.LazyFrame:
    if path.suffix == ".parquet" or path.is_dir():
        return pl.scan_parquet(path)
    if path.suffix == ".csv":
        return pl.scan_csv(path, infer_schema_length=10_000)
    raise ValueError(f"{path}: unsupported file type (use .parquet or .csv)")


def splits(data_dir: Path) -> dict[str, pl.LazyFrame]:
    out: dict[str, pl.LazyFrame] = {}
    for split in SPLITS:
        found = [p for p in (data_dir / f"{split}.parquet", data_dir / f"{split}.csv", data_dir / split) if p.exists()]
        if not found:
            raise FileNotFoundError(f"{data_dir}: no {split}.parquet, {split}.csv or {split}/ found")
        out[split] = scan(found[0])
    return out
