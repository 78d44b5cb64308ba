"""Raw data sources: each turns a data directory into train/valid/test lazy frames."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys_moe.features.spec import DatasetSource


def load_splits(source: DatasetSource, data_dir: Path) -> dict[str, pl.LazyFrame]:
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"{data_dir}: raw data directory not found")
    if source.source == "census":
        from recsys_moe.pipelines.sources import census

        return census.splits(data_dir, **source.options)
    if source.source == "synthetic":
        from recsys_moe.pipelines.sources import events

        return events.splits(data_dir, **source.options)
    if source.source == "criteo_like":
        from recsys_moe.pipelines.sources import criteo

        return criteo.splits(data_dir, **source.options)
    from recsys_moe.pipelines.sources import files

    return files.splits(data_dir)
