"""A spec with history features, built from a raw event log with bad events in it: every event is
either used or rejected with a reason, the counts reconcile, and a rebuild computes no day twice."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from recsys_moe.features import load_spec
from recsys_moe.pipelines.build import RejectRateError, build
from recsys_moe.pipelines.sources import synthetic
from recsys_moe.pipelines.validate import REASON


@pytest.fixture(scope="module")
def dirty_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("dirty")
    config = synthetic.SyntheticConfig(n_users=300, n_items=200, n_impressions=6_000, n_days=12, seed=4)
    synthetic.write(synthetic.generate(config), raw)
    day = sorted((raw / "impressions").glob("day=*"))[3] / "part-0.parquet"
    frame = pl.read_parquet(day)
    clicked = frame.filter(pl.col("click") == 1)
    bad = pl.concat(
        [
            frame.head(2),  # duplicates of events already in the log
            frame.filter(pl.col("click") == 0)
            .head(1)
            .with_columns(
                pl.lit(1, pl.Int8).alias("conversion"),
                pl.col("ts").alias("conversion_ts"),
                pl.col("impression_id") + 10_000_000,
            ),  # conversion without click
            clicked.head(1).with_columns(pl.lit(None, pl.Int64).alias("user_id"), pl.col("impression_id") + 20_000_000),
            clicked.head(1).with_columns(
                pl.lit(1, pl.Int8).alias("conversion"),
                (pl.col("ts") - dt.timedelta(hours=1)).alias("conversion_ts"),
                pl.col("impression_id") + 30_000_000,
            ),
            frame.head(1).with_columns(
                pl.col("ts") + dt.timedelta(days=2),
                pl.col("impression_id") + 40_000_000,
                pl.col("conversion_ts") + dt.timedelta(days=2),
            ),  # filed under the wrong day
        ],
        how="vertical_relaxed",
    )
    pl.concat([frame, bad.cast(frame.schema)]).write_parquet(day)
    return raw


def test_bad_events_are_rejected_with_reasons_and_counts_reconcile(dirty_raw: Path, tmp_path: Path) -> None:
    spec = load_spec("synthetic_history")
    manifest = build(spec, dirty_raw, tmp_path / "ds", progress=False)
    events = manifest.events
    assert events is not None
    assert events.rows_in == 6_000 + 6 and events.rows_rejected == 6
    assert events.rows_in == events.rows_out + events.rows_rejected
    assert sum(s.rows_in for s in manifest.splits.values()) == events.rows_out
    rejects = pl.read_parquet(tmp_path / "ds" / events.rejects)  # type: ignore[operator]
    reasons = sorted(rejects[REASON].to_list())
    assert sum("duplicate" in r for r in reasons) == 2
    assert any(r.startswith("conversion: 1 without click") for r in reasons)
    assert any(r.startswith("user_id: null") for r in reasons)
    assert any(r.startswith("conversion_ts: before ts") for r in reasons)
    assert any("is not in partition day=" in r for r in reasons)
    assert set(rejects.columns) >= {"impression_id", "ts", "user_id", "click", "day", REASON}  # the whole raw row
    # The history features made it into the shards, one column per feature.
    train = pl.read_parquet(manifest.shard_paths("train")[0])
    assert {"user_ctr_7d", "item_clicks_30d", "recent_clicks", "event_hour"} <= set(train.columns)
    assert events.days_computed == 12
    again = build(spec, dirty_raw, tmp_path / "ds", progress=False)
    assert again.events is not None and again.events.days_computed == 0  # incremental: nothing new
    assert again.digest == manifest.digest


def test_too_many_bad_events_fail_loudly(dirty_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(RejectRateError, match=r"events: 6 of 6006 rows rejected .*conversion"):
        build(
            load_spec("synthetic_history"),
            dirty_raw,
            tmp_path / "ds",
            max_reject_rate=0.0005,
            progress=False,
            history_dir=tmp_path / "h",
        )
