"""Point-in-time history features with Polars and numpy: counts, smoothed rates and recent-item
sequences over the events strictly before each row (semantics in `features/history.py`).

How, without a Python loop or a per-row window scan:

* Every event time becomes its rank among the log's distinct times, and every entity key a dense
  integer code, so (entity, time) packs into one Int64 whose order is (entity, time).
* Each stream's events, as those keys, are sorted once. The number of the entity's stream events
  in [t - w, t) is then searchsorted(key of (entity, t)) - searchsorted(key of (entity, t - w)),
  both on the left side, which is what makes the count *strictly* before t. The queries are
  sorted by (entity, time) first, so the binary searches walk memory in order.
* A sequence is read off the same sorted stream: the last N events before t, newest first.
* Days are independent given a bounded look-back (`HistorySpec.lookback_days`): building day D
  needs the events of [D - lookback, D], and gives the same rows as a build over the whole log.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_moe import atomic
from recsys_moe.features.history import HistorySpec


def _positions(times: pl.Series, at: pl.Series) -> pl.Series:
    """Index of the first distinct time >= each of `at`: times compare as these integers do."""
    return times.search_sorted(at, side="left").cast(pl.Int64)


def _sequence(hi: np.ndarray, lo: np.ndarray, values: pl.Series, max_length: int) -> pl.Series:
    """Per row, values[hi - 1], values[hi - 2], ... down to values[max(lo, hi - max_length)]."""
    n = np.minimum(hi - lo, max_length)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], n)
    flat = values.to_numpy()[np.repeat(hi - 1, n) - within]
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pl.Series(values.name, lists).cast(pl.List(values.dtype))


def _column_codes(values: pl.Series) -> np.ndarray:
    """Small non-negative integers, equal where the values are equal (nulls 0). Only equality
    matters, so integer ids in a range not much wider than the column skip the sort that dense
    ranks cost (a third of the index's time on a log of user ids)."""
    if values.dtype.is_integer() and values.len() > 0:
        lo, hi = cast(int | None, values.min()), cast(int | None, values.max())
        if lo is not None and hi is not None and hi - lo < 4 * values.len():
            return (values.cast(pl.Int64) - (lo - 1)).fill_null(0).to_numpy()
    if values.dtype == pl.Utf8:  # a hash table, not a sort: 20x faster than ranking strings
        return (values.cast(pl.Categorical).to_physical().cast(pl.Int64) + 1).fill_null(0).to_numpy()
    return values.rank("dense").cast(pl.Int64).fill_null(0).to_numpy()


def _entity_codes(events: pl.DataFrame, keys: list[str], ranks: dict[str, np.ndarray]) -> np.ndarray:
    """One Int64 per distinct entity key: column codes combined column by column (nulls are a value).
    `ranks` caches each column's codes across entities (user_id serves user and user x category)."""
    code, radix = np.zeros(events.height, dtype=np.int64), 1
    for key in keys:
        if key not in ranks:
            ranks[key] = _column_codes(events.get_column(key))
        size = int(ranks[key].max(initial=0)) + 1
        code, radix = code * size + ranks[key], radix * size
    if radix >= 2**31:  # keep room for the time rank: fall back to ranking the whole key
        code = events.select(pl.struct(keys).rank("dense").cast(pl.Int64)).to_series().to_numpy()
    return code


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable"), in a third of the time: Polars sorts on every core."""
    frame = pl.DataFrame({"k": keys}).with_row_index("i")
    return frame.sort("k", maintain_order=True).get_column("i").to_numpy().astype(np.int64, copy=False)


@dataclass
class _Index:
    """The log prepared once for any number of row slices: each entity's code per event and, per
    entity x stream, the stream's events as sorted (entity, time rank) keys (plus the sequences'
    values in that order)."""

    spec: HistorySpec
    events: pl.DataFrame  # sorted by (time, event id)
    times: pl.Series  # every distinct event time, sorted
    codes: dict[str, np.ndarray]  # entity -> code * scale per event
    sorted_keys: dict[tuple[str, str], np.ndarray]
    sequence_values: dict[str, pl.Series]

    @property
    def scale(self) -> int:
        return len(self.times) + 1


def _index(events: pl.DataFrame, spec: HistorySpec) -> _Index:
    # Every event time as its rank among all distinct times: (entity, time rank) packs into one
    # Int64 whose order is (entity, time), so "events of this entity before t" is a binary search.
    stamps = [events.get_column(s.time or spec.time) for s in spec.streams.values()]
    times = pl.concat(stamps).drop_nulls().unique().sort()
    ranks: dict[str, np.ndarray] = {}
    codes = {e: _entity_codes(events, keys, ranks) * (len(times) + 1) for e, keys in spec.entities.items()}
    index = _Index(spec, events, times, codes, {}, {})
    for name, stream in spec.streams.items():
        when = events.get_column(stream.time or spec.time)
        has = when.is_not_null() if stream.flag is None else (events.get_column(stream.flag) == 1) & when.is_not_null()
        positions = _positions(times, when.filter(has)).to_numpy()
        mask = has.to_numpy()
        for entity, code in codes.items():
            # Events arrive sorted by (time, event id): a stable sort on (entity, time) keeps
            # ties in id order, which is the order sequences list them in.
            keyed = code[mask] + positions
            order = _stable_argsort(keyed)
            index.sorted_keys[(entity, name)] = keyed[order]
            for q in spec.sequences:
                if q.entity == entity and q.stream == name:
                    index.sequence_values[q.name] = events.get_column(q.value).filter(has).gather(order).alias(q.name)
    return index


def _window_starts(index: _Index, lo: int, hi: int) -> dict[int, np.ndarray]:
    """Per window w (and 0), the time rank of t - w for rows lo..hi: shared by every entity."""
    t_rows = index.events.get_column(index.spec.time).slice(lo, hi - lo)
    days = [0, *index.spec.windows_days]
    return {d: _positions(index.times, t_rows - datetime.timedelta(days=d)).to_numpy() for d in days}


def _entity_columns(
    index: _Index, entity: str, lo: int, hi: int, positions: dict[int, np.ndarray]
) -> dict[str, np.ndarray | pl.Series]:
    """Counts and sequences of one entity for rows lo..hi (a thread: numpy and Polars release the GIL)."""
    spec = index.spec
    columns: dict[str, np.ndarray | pl.Series] = {}
    row_code = index.codes[entity][lo:hi]
    # Queries in (entity, time) order: binary searches over sorted needles stay in cache (equal
    # needles find equal answers, so their order among themselves does not matter).
    perm = np.argsort(row_code + positions[0])
    bound = {d: (row_code + pos)[perm] for d, pos in positions.items()}
    for name in spec.streams:
        before = {d: np.searchsorted(index.sorted_keys[(entity, name)], q, side="left") for d, q in bound.items()}
        for w in spec.windows_days:
            columns[spec.column(entity, name, w)] = _unpermute(before[0] - before[w], perm).astype(np.int32)
        for q in spec.sequences:
            if q.entity == entity and q.stream == name:
                newest, oldest = _unpermute(before[0], perm), _unpermute(before[max(spec.windows_days)], perm)
                columns[q.name] = _sequence(newest, oldest, index.sequence_values[q.name], q.max_length)
    return columns


def _history_columns(index: _Index, lo: int, hi: int) -> dict[str, np.ndarray | pl.Series]:
    """Every entity column (counts, rates, sequences) of rows lo..hi; no time features."""
    spec = index.spec
    with ThreadPoolExecutor(max_workers=min(len(spec.entities), os.cpu_count() or 1)) as pool:
        starts = _window_starts(index, lo, hi)
        parts = list(pool.map(lambda e: _entity_columns(index, e, lo, hi, starts), spec.entities))
    columns: dict[str, np.ndarray | pl.Series] = {k: v for part in parts for k, v in part.items()}
    columns.update(rate_columns(spec, lambda c: cast(np.ndarray, columns[c])))  # counts: arrays
    return columns


def rate_columns(spec: HistorySpec, count: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every smoothed rate from its counts (`count(name)` → the count column as int32): one
    formula wherever rates are computed, so they agree to the bit."""
    out = {}
    for entity in spec.entities:
        for name, rate in spec.rates.items():
            for w in spec.windows_days:
                num, den = (
                    count(spec.column(entity, rate.numerator, w)),
                    count(spec.column(entity, rate.denominator, w)),
                )
                out[spec.column(entity, name, w)] = ((num + rate.strength * rate.prior) / (den + rate.strength)).astype(
                    np.float32
                )
    return out


def _features(index: _Index, lo: int, hi: int) -> pl.DataFrame:
    """Rows lo..hi of the index's events with every history column."""
    spec = index.spec
    columns = _history_columns(index, lo, hi)
    rows = index.events.slice(lo, hi - lo)
    if spec.time_features:
        t = rows.get_column(spec.time)
        columns["event_hour"], columns["event_dow"] = t.dt.hour().cast(pl.Int8), t.dt.weekday().cast(pl.Int8)
    return rows.hstack([pl.Series(c, columns[c]) for c in spec.columns()])


def _sorted_events(events: pl.LazyFrame | pl.DataFrame, spec: HistorySpec) -> pl.DataFrame:
    return events.lazy().sort([spec.time, spec.event_id]).collect()


def _first_at(events: pl.DataFrame, spec: HistorySpec, when: datetime.datetime) -> int:
    return int(events.get_column(spec.time).search_sorted(when, side="left"))


def add_history(
    events: pl.LazyFrame | pl.DataFrame, spec: HistorySpec, since: datetime.datetime | None = None
) -> pl.DataFrame:
    """The rows of `events` at or after `since` (all rows if None), sorted by (time, event id),
    with every column of `spec.columns()` added. `events` must hold every event the features can
    look at: `spec.lookback_days` before `since`."""
    frame = _sorted_events(events, spec)
    lo = _first_at(frame, spec, since) if since is not None else 0
    return _features(_index(frame, spec), lo, frame.height)


def entity_features(
    events: pl.LazyFrame | pl.DataFrame,
    spec: HistorySpec,
    days: list[datetime.date],
    carry: tuple[str, ...] = (),
    rates: bool = True,
) -> dict[datetime.date, pl.DataFrame]:
    """Per day of `days`: the event id, the `carry` columns of `events` and every entity column
    (counts, rates, sequences; not the time features) of that day's rows of `events`, sorted by
    (time, event id); without the rates when `rates` is false (`rate_columns` makes them from the
    counts). One index serves every day, so `events` must hold `spec.lookback_days` before the
    first of them. The kernel of a partitioned build (`pipelines/history_units.py`):
    `events` may be any set of entity keys' complete streams, and each key's rows come out as
    from the whole log."""
    frame = _sorted_events(events, spec)
    index = _index(frame, spec)
    out: dict[datetime.date, pl.DataFrame] = {}
    for day in days:
        at = datetime.datetime.combine(day, datetime.time())
        lo, hi = _first_at(frame, spec, at), _first_at(frame, spec, at + datetime.timedelta(days=1))
        columns = _history_columns(index, lo, hi)
        kept = frame.select(spec.event_id, *carry).slice(lo, hi - lo)
        skip = set() if rates else set(spec.rate_columns())
        names = [c for c in spec.columns() if c in columns and c not in skip]
        out[day] = kept.hstack([pl.Series(c, columns[c]) for c in names])
    return out


def _unpermute(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[perm] = values
    return out


def _days(events: pl.LazyFrame, spec: HistorySpec) -> list[datetime.date]:
    day = pl.col(spec.time).dt.date()
    return sorted(events.select(day.unique()).collect().to_series().drop_nulls().to_list())


def _runs(days: list[datetime.date], longest: int) -> list[list[datetime.date]]:
    """Consecutive days grouped into runs of at most `longest` days."""
    runs: list[list[datetime.date]] = []
    for d in sorted(days):
        if runs and (d - runs[-1][-1]).days == 1 and len(runs[-1]) < longest:
            runs[-1].append(d)
        else:
            runs.append([d])
    return runs


HISTORY_MARKER = "history_spec.json"  # in a history folder: the spec its day partitions were computed with


def day_path(out_dir: Path, day: datetime.date) -> Path:
    return out_dir / f"day={day.isoformat()}" / "part-0.parquet"


DAY_ROW_GROUP = 100_000  # fixed, so a day's file is the same bytes whichever build wrote it


def write_day(frame: pl.DataFrame, out_dir: Path, day: datetime.date) -> Path:
    """A day's history rows, atomically. Left to itself Polars sizes row groups by how the frame
    is chunked, which differs between the in-memory and the partitioned build."""
    return atomic.write_parquet(frame, day_path(out_dir, day), row_group_size=DAY_ROW_GROUP)


def write_days(
    events: pl.LazyFrame,
    spec: HistorySpec,
    out_dir: Path,
    days: list[datetime.date],
    chunk_days: int = 31,
    progress: bool = True,
) -> list[Path]:
    """The history rows of each of `days`, written to out_dir/day=D/part-0.parquet (atomically).

    Consecutive days (at most `chunk_days`) share one index, built from the events of
    [first day - lookback, last day] only; each day's rows are then computed and written on their
    own. Memory holds the window's events, the index and one day of features, never the whole
    log's features, and a day's rows are the same whichever run computed them."""
    from tqdm.auto import tqdm

    lookback = datetime.timedelta(days=spec.lookback_days)
    written = []
    runs = _runs(days, chunk_days)
    for run in tqdm(runs, desc="history features", unit="chunk", disable=not progress or len(runs) < 2):
        start = datetime.datetime.combine(run[0], datetime.time())
        end = datetime.datetime.combine(run[-1], datetime.time()) + datetime.timedelta(days=1)
        window = events.filter((pl.col(spec.time) >= start - lookback) & (pl.col(spec.time) < end))
        frame = _sorted_events(window, spec)
        index = _index(frame, spec)  # once per run of days; then one day's rows at a time
        for day in run:
            at = datetime.datetime.combine(day, datetime.time())
            lo, hi = _first_at(frame, spec, at), _first_at(frame, spec, at + datetime.timedelta(days=1))
            if lo == hi:
                continue
            written.append(write_day(_features(index, lo, hi), out_dir, day))
    return written


def update_days(
    events: pl.LazyFrame,
    spec: HistorySpec,
    out_dir: Path,
    rebuild: bool = False,
    chunk_days: int = 31,
    progress: bool = True,
) -> list[datetime.date]:
    """Bring out_dir up to date with the event log: compute the days it lacks (every day when
    `rebuild` or when the history spec changed). Returns the days computed.

    `out_dir` is refused unless it is new, empty or one this function made (it holds
    `history_spec.json`), and only its `day=` partitions are ever removed. The marker is blanked
    before any partition goes and written with the spec once every day is there, so a kill in
    between leaves a folder the next run rebuilds rather than trusts.
    """
    out_dir = Path(out_dir)
    claim_history_dir(out_dir, spec, rebuild)
    in_log = _days(events, spec)
    for stale in set(out_dir.glob("day=*")) - {day_path(out_dir, d).parent for d in in_log}:
        shutil.rmtree(stale)  # a day no longer in the log
    days = [d for d in in_log if not day_path(out_dir, d).exists()]
    write_days(events, spec, out_dir, days, chunk_days, progress)
    mark_history_dir(out_dir, spec)
    return days


def claim_history_dir(out_dir: Path, spec: HistorySpec, rebuild: bool = False) -> None:
    """Take a history folder (new, empty or ours, else `OwnershipError`). Day partitions of
    another spec, or all of them with `rebuild`, are removed; the marker is blanked first, so a
    kill in between leaves a folder the next build rebuilds rather than trusts."""
    atomic.check_owned(out_dir, HISTORY_MARKER)
    marker = out_dir / HISTORY_MARKER
    if rebuild or not marker.is_file() or marker.read_text() != spec.model_dump_json():
        atomic.write_text(marker, "")  # ours from now on, and stale until marked
        for stale in out_dir.glob("day=*"):
            shutil.rmtree(stale)


def mark_history_dir(out_dir: Path, spec: HistorySpec) -> None:
    """Every day partition in `out_dir` is now of `spec`."""
    atomic.write_text(out_dir / HISTORY_MARKER, spec.model_dump_json())


def is_marked(out_dir: Path, spec: HistorySpec) -> bool:
    marker = out_dir / HISTORY_MARKER
    return marker.is_file() and marker.read_text() == spec.model_dump_json()
