"""The history pipeline in units of work (`pipelines/history_units.py`) against the in-memory
build (`event_log.history_step`, itself checked against a brute force in test_history.py): the
same bytes in every day partition and the same rejected rows, on logs of many shapes."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_moe.atomic import OwnershipError
from recsys_moe.features import load_spec
from recsys_moe.pipelines import history_units as hu
from recsys_moe.pipelines.event_log import history_step
from recsys_moe.pipelines.history import day_path
from recsys_moe.pipelines.sources import events, synthetic

_SPEC = load_spec("synthetic_history")
assert _SPEC.history is not None
# Short sequences and windows, so that truncation and window edges happen in small logs.
_HISTORY = _SPEC.history.model_copy(
    update={
        "windows_days": [1, 3],
        "attribution_days": 2,
        "sequences": [_SPEC.history.sequences[0].model_copy(update={"max_length": 3})],
    }
)
SPEC = _SPEC.model_copy(update={"history": _HISTORY})
START = dt.datetime(2026, 1, 1)


def write_log(root: Path, seed: int, n: int, days: int, users: int, items: int, dirty: bool) -> Path:
    """A raw log laid out as the synthetic source writes it, with hour-grained times (ties at
    window edges), conversions landing days later, and (when `dirty`) rows the contract rejects:
    duplicated ids on the same and on other days, null users, conversions without a click."""
    r = np.random.default_rng(seed)
    hours = np.sort(r.integers(0, days * 24, n))
    ts = [START + dt.timedelta(hours=int(h)) for h in hours]
    click = (r.random(n) < 0.4).astype(np.int8)
    conv = ((r.random(n) < 0.4) & (click == 1)).astype(np.int8)
    delay = r.integers(0, 2 * 24 + 1, n)
    ids = r.permutation(n).astype(np.int64) * 3
    user = r.integers(0, users, n).astype(object)
    if dirty and n > 4:
        for i in r.choice(n, size=max(1, n // 10), replace=False):
            j = int(r.integers(0, n))
            ids[i] = ids[j]  # a duplicate, of a row on this day or on another
        user[r.choice(n, size=max(1, n // 20), replace=False)] = None
        bad = r.choice(n, size=max(1, n // 20), replace=False)
        conv[bad], click[bad] = 1, 0
    imps = pl.DataFrame(
        {
            "impression_id": ids,
            "ts": ts,
            "user_id": pl.Series(user.tolist(), dtype=pl.Int64),
            "item_id": r.integers(0, items, n),
            "position": np.zeros(n, dtype=np.int32),
            "device": ["web"] * n,
            "click": click,
            "conversion": conv,
            "conversion_ts": [t + dt.timedelta(hours=int(d)) if c else None for t, c, d in zip(ts, conv, delay)],
            "dwell_seconds": np.zeros(n),
        },
        schema=synthetic.IMPRESSIONS_SCHEMA,
    )
    raw = root / "raw"
    for day, part in imps.with_columns(pl.col("ts").dt.date().alias("d")).partition_by("d", as_dict=True).items():
        out = raw / "impressions" / f"day={day[0].isoformat()}"
        out.mkdir(parents=True)
        part.drop("d").sample(fraction=1.0, shuffle=True, seed=seed).write_parquet(out / "part-0.parquet")
    pl.DataFrame({"user_id": np.arange(users, dtype=np.int64)}).write_parquet(raw / "users.parquet")
    categories = r.choice(["a", "b", "c"], items)
    pl.DataFrame({"item_id": np.arange(items, dtype=np.int64), "category": categories}).write_parquet(
        raw / "items.parquet"
    )
    return raw


def in_memory(spec, raw: Path, out: Path) -> tuple[list[dt.date], pl.DataFrame]:
    """The reference: the whole log through the contract and `write_days` (as `prepare` runs them)."""
    frame = events.joined(raw, with_day=True).with_row_index(hu.ROW)
    _valid, rejected, days = history_step(spec, frame, out, progress=False)
    return days, rejected.select(hu.ROW, "impression_id", "reject_reason").sort(hu.ROW)


def assert_same_days(days: list[dt.date], a: Path, b: Path) -> None:
    assert days
    for day in days:
        assert day_path(a, day).read_bytes() == day_path(b, day).read_bytes(), day
    assert sorted(p.parent.name for p in a.glob("day=*/part-0.parquet")) == sorted(
        p.parent.name for p in b.glob("day=*/part-0.parquet")
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 400),
    days=st.integers(1, 9),
    users=st.integers(1, 12),
    items=st.integers(1, 9),
    buckets=st.integers(1, 5),
    id_buckets=st.integers(1, 3),
    chunk_days=st.integers(1, 4),
    dirty=st.booleans(),
)
def test_units_equal_the_in_memory_build_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    n: int,
    days: int,
    users: int,
    items: int,
    buckets: int,
    id_buckets: int,
    chunk_days: int,
    dirty: bool,
) -> None:
    root = tmp_path_factory.mktemp("log")
    raw = write_log(root, seed, n, days, users, items, dirty)
    written, rejected = in_memory(SPEC, raw, root / "memory")
    plan = hu.Plan(SPEC, root / "work", root / "units", buckets=buckets, id_buckets=id_buckets)
    built = hu.build_local(plan, raw, progress=False, chunk_days=chunk_days)
    if written:
        assert_same_days(written, root / "memory", root / "units")
    # The same rows rejected, with the same reasons, down to the row numbers of duplicates.
    got = hu.rejects(plan).select(hu.ROW, "impression_id", "reject_reason").sort(hu.ROW)
    assert got.to_dicts() == rejected.to_dicts()
    assert built.rows_checked == n == built.rows_out + built.rejected + built.duplicates


def test_a_medium_log_in_worker_processes_and_then_day_by_day(tmp_path: Path) -> None:
    """A synthetic log of 40 days (the real generator, a 30-day window plus a 7-day attribution),
    built by two worker processes; then, from the first 35 days' build, the last days one run
    each (as the daily DAG adds them): every day partition equals the in-memory build's."""
    config = synthetic.SyntheticConfig(n_users=2_000, n_items=500, n_impressions=120_000, n_days=40, seed=5)
    synthetic.write(synthetic.generate(config), tmp_path / "raw")
    spec = load_spec("synthetic_history")
    written, rejected = in_memory(spec, tmp_path / "raw", tmp_path / "memory")
    assert len(written) == 40 and rejected.height == 0

    plan = hu.Plan(spec, tmp_path / "work", tmp_path / "units", buckets=7, id_buckets=3)
    built = hu.build_local(plan, tmp_path / "raw", progress=False, workers=2)
    assert_same_days(written, tmp_path / "memory", tmp_path / "units")
    assert built.rows_out == built.rows_checked == 120_000 and built.peak_rss_mib > 0

    daily = hu.Plan(spec, tmp_path / "work2", tmp_path / "daily", buckets=3, id_buckets=2)
    hu.build_local(daily, tmp_path / "raw", days=written[:35], progress=False)
    for day in written[35:]:
        assert hu.missing_days(daily, tmp_path / "raw") == [d for d in written if d >= day]
        units = hu.units_for(daily, tmp_path / "raw", [day])
        assert units.check_days == [day]  # its look-back days were checked by earlier runs
        hu.build_local(daily, tmp_path / "raw", days=[day], progress=False)
    assert_same_days(written, tmp_path / "memory", tmp_path / "daily")


def test_folders_are_taken_only_when_ours_and_dropped_when_the_spec_changes(tmp_path: Path) -> None:
    raw = write_log(tmp_path, seed=1, n=200, days=5, users=5, items=4, dirty=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OwnershipError, match="not written by recsys-moe"):
        hu.build_local(hu.Plan(SPEC, tmp_path / "work", mine), raw, progress=False)
    assert (mine / "notes.txt").read_text() == "precious" and not (tmp_path / "work" / "valid").exists()

    plan = hu.Plan(SPEC, tmp_path / "work", tmp_path / "out", buckets=2)
    hu.build_local(plan, raw, progress=False)
    assert hu.missing_days(plan, raw) == []
    other = SPEC.model_copy(update={"history": _HISTORY.model_copy(update={"windows_days": [2]})})
    replan = hu.Plan(other, tmp_path / "work", tmp_path / "out", buckets=3)
    assert len(hu.missing_days(replan, raw)) == 5  # another spec's days do not count
    hu.own(replan)
    assert not list((tmp_path / "out").glob("day=*")) and not (tmp_path / "work" / "features").exists()


ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "recsys_moe.cli"]


def test_cli_builds_what_the_log_lacks_and_says_what_it_rejected(tmp_path: Path) -> None:
    raw = write_log(tmp_path, seed=3, n=300, days=6, users=6, items=5, dirty=True)
    written, rejected = in_memory(SPEC, raw, tmp_path / "memory")
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(SPEC.model_dump(mode="json", exclude_none=True), sort_keys=False))
    args = [*CLI, "history", "--spec", str(spec_file), "--data", str(raw), "--out", str(tmp_path / "out")]
    first = subprocess.run([*args, "--days", "2026-01-01..2026-01-03"], capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert "3 day(s) (2026-01-01..2026-01-03)" in first.stdout
    rest = subprocess.run([*args, "--buckets", "3"], capture_output=True, text=True, check=False)
    assert rest.returncode == 0, rest.stderr
    # New buckets refile the work (every day is checked again) but change no result: the days
    # already there stay, and only the missing ones are computed.
    assert "3 day(s) (2026-01-04..2026-01-06)" in rest.stdout
    assert f"{rejected.height - len(re.findall('duplicate', ' '.join(rejected['reject_reason'])))} rejected" in (
        rest.stdout.replace(",", "")
    )
    assert_same_days(written, tmp_path / "memory", tmp_path / "out")
    again = subprocess.run([*args, "--buckets", "3"], capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "up to date" in again.stdout

    bad = subprocess.run([*args, "--days", "2026-01-03..2026-01-01"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --days: '2026-01-03..2026-01-01' ends before it starts"
    absent = subprocess.run([*args, "--days", "2025-12-01"], capture_output=True, text=True, check=False)
    assert absent.returncode == 2 and "days not in the raw log" in absent.stderr
    not_a_log = [*CLI, "history", "--data", str(tmp_path), "--out", str(tmp_path / "out2")]
    wrong = subprocess.run(not_a_log, capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "no day=YYYY-MM-DD partitions" in wrong.stderr
    assert not (tmp_path / "out2").exists()
    (raw / "impressions" / "day=2026-01-03" / "part-0.parquet").write_text("not parquet")  # a torn upload
    torn = subprocess.run([*args, "--rebuild"], capture_output=True, text=True, check=False)
    assert torn.returncode == 2 and torn.stderr.startswith(
        f"error: {raw / 'impressions' / 'day=2026-01-03'}: cannot read"
    )
    assert len(torn.stderr.strip().splitlines()) == 1
    assert_same_days(written, tmp_path / "memory", tmp_path / "out")  # nothing was dropped first
