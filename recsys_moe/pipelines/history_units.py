"""The history pipeline cut into units of work, each holding one bucket of the log or one day of
it, so that a log larger than one machine runs on many workers (the Airflow DAG
`dags/history_features.py` maps them) and, unit after unit, in one process (`recsys-moe history`).

Why it is exact: an entity's features of an event depend only on the stream events that share
the entity's key. Entities are grouped by their first key column (`user` and `user x category`
both start with `user_id`), and the events filed by a hash of that column into buckets; bucket
b's rows then get from bucket b's events alone the numbers the whole log gives them. No unit
approximates anything: `tests/test_history_units.py` checks the output against `write_days`
(and so against the brute force) byte for byte on logs of many shapes.

The units, in dependency order. Every output is written atomically, and a unit run twice
writes the same rows, so Airflow may retry any of them:

1. `check_day(day)`: one raw day partition through the event contract's rules 1-6. Valid events
   go to `valid/day=D.parquet` (what the day's output rows are made of) and, with only the
   columns a group reads, to `events/by=<column>/bucket=<b>/day=D.parquet`; their ids to
   `ids/bucket=<k>/day=D.parquet`; the rejected rows with their reason to `rejects/day=D.parquet`.
2. `find_duplicates(id bucket)`: rule 7 across days (the first valid row of an id is kept):
   `duplicates/bucket=<k>.parquet`, normally empty.
3. `bucket_features(column, bucket, days)`: one bucket's events of [first day - look-back, last
   day] through the same index and search as `history.add_history`; per day, that bucket's rows
   with the group's columns: `features/by=<column>/day=D/bucket=<b>.parquet`.
4. `assemble_day(day)`: the day's valid events with every group's columns, placed by each row's
   position in its day (numbered by `check_day`, carried through the features units) rather
   than joined on the event id, in `write_days`' row and column order: `<out>/day=D/part-0.parquet`.

Memory: a features unit holds 1/buckets of the look-back window's events; a check or assemble
unit one day. Rows are numbered as the in-memory contract numbers them (day partitions in
order, each sorted by time and event id), so reject reasons name the same rows when every event
time is set and on its partition's day.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl

from recsys_moe import atomic
from recsys_moe.features.history import HistorySpec
from recsys_moe.features.spec import FeatureSpec
from recsys_moe.pipelines.contract import REJECT_REASON, check_events
from recsys_moe.pipelines.event_log import contract_for
from recsys_moe.pipelines.history import (
    HISTORY_MARKER,
    claim_history_dir,
    day_path,
    entity_features,
    is_marked,
    mark_history_dir,
    rate_columns,
    write_day,
)
from recsys_moe.pipelines.sources import events

log = logging.getLogger(__name__)

ROW = "__raw_row"  # a row's number in the whole log's input order, kept through every unit
POS = "__day_pos"  # a valid row's number within its day (the day's output order, before duplicates)
WORK_MARKER = "history_units.json"  # in a work folder: the spec and bucket counts it was filed with


@dataclass(frozen=True)
class Plan:
    """Where a partitioned build lives and how it is cut. The work folder holds the units'
    intermediate files; `out_dir` the day partitions, as `history.write_days` lays them out."""

    spec: FeatureSpec
    work_dir: Path
    out_dir: Path
    buckets: int = 16  # per key column: features units per day range
    id_buckets: int = 4  # duplicate-finding units

    def __post_init__(self) -> None:
        if self.spec.history is None:
            raise ValueError(f"spec {self.spec.name!r} has no history section")
        for name in ("buckets", "id_buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def history(self) -> HistorySpec:
        assert self.spec.history is not None
        return self.spec.history

    def groups(self) -> dict[str, HistorySpec]:
        """Key column → the history spec of the entities whose key starts with it."""
        h = self.history
        out: dict[str, HistorySpec] = {}
        for column in dict.fromkeys(keys[0] for keys in h.entities.values()):
            entities = {e: keys for e, keys in h.entities.items() if keys[0] == column}
            sequences = [s for s in h.sequences if s.entity in entities]
            out[column] = h.model_copy(update={"entities": entities, "sequences": sequences, "time_features": False})
        return out

    def feature_units(self) -> list[tuple[str, int]]:
        """Every (key column, bucket): the units of step 3, as Airflow maps them."""
        return [(column, b) for column in self.groups() for b in range(self.buckets)]

    def marker(self) -> str:
        return json.dumps(
            {
                "history": self.history.model_dump(mode="json"),
                "buckets": self.buckets,
                "id_buckets": self.id_buckets,
                "polars": pl.__version__,  # bucket hashes are Polars' own
            },
            sort_keys=True,
        )

    # -- paths
    def valid_path(self, day: datetime.date) -> Path:
        return self.work_dir / "valid" / f"day={day.isoformat()}.parquet"

    def rejects_path(self, day: datetime.date) -> Path:
        return self.work_dir / "rejects" / f"day={day.isoformat()}.parquet"

    def events_path(self, column: str, bucket: int, day: datetime.date) -> Path:
        return self.work_dir / "events" / f"by={column}" / f"bucket={bucket:04d}" / f"day={day.isoformat()}.parquet"

    def ids_dir(self, bucket: int) -> Path:
        return self.work_dir / "ids" / f"bucket={bucket:04d}"

    def ids_path(self, bucket: int, day: datetime.date) -> Path:
        return self.ids_dir(bucket) / f"day={day.isoformat()}.parquet"

    def duplicates_path(self, bucket: int) -> Path:
        return self.work_dir / "duplicates" / f"bucket={bucket:04d}.parquet"

    def features_path(self, column: str, day: datetime.date, bucket: int) -> Path:
        return self.work_dir / "features" / f"by={column}" / f"day={day.isoformat()}" / f"bucket={bucket:04d}.parquet"


def _bucket(frame: pl.DataFrame, column: str, buckets: int) -> pl.Expr:
    """A key's bucket: the same on every day, so integer keys hash as Int64 whatever their width."""
    key = pl.col(column).cast(pl.Int64) if frame.schema[column].is_integer() else pl.col(column)
    return (key.hash(seed=0) % buckets).cast(pl.Int64)


def _fast(frame: pl.DataFrame, path: Path) -> Path:
    """Intermediate files: Snappy writes several times faster than the default zstd (and LZ4)."""
    return atomic.write_parquet(frame, path, compression="snappy", statistics=False)


# -- 1. check -------------------------------------------------------------------------------
def check_day(plan: Plan, raw: pl.LazyFrame, day: datetime.date, first_row: int) -> tuple[int, int]:
    """One raw day partition (`raw`, with its `day` column) through the contract's rules 1-6;
    `first_row` is the number of rows of the days before it. Returns (rows, rejected)."""
    h = plan.history
    contract = contract_for(plan.spec)
    schema = raw.collect_schema()
    part = [contract.partition] if contract.partition in schema else []
    checked = list(dict.fromkeys([*contract.required, *contract.flags, *h.raw_columns(), *part]))
    # Numbered in the order the in-memory build reads the log: by time, then event id.
    frame = raw.select(checked).sort(h.time, h.event_id, maintain_order=True).with_row_index(ROW, offset=first_row)
    valid_lazy, rejected_lazy = check_events(frame, contract, duplicates=False)
    valid, rejected = pl.collect_all([valid_lazy, rejected_lazy])
    # POS: a valid row's place in its day's output order, carried through the features units so
    # that assembling a day places their columns by index instead of joining on the event id.
    valid = valid.select(ROW, *h.raw_columns()).with_row_index(POS)
    _fast(valid, plan.valid_path(day))
    atomic.write_parquet(rejected, plan.rejects_path(day))
    ids = valid.select(ROW, h.event_id).with_columns(_bucket(valid, h.event_id, plan.id_buckets).alias("__b"))
    for b, part_ in _split(ids, "__b", plan.id_buckets):
        _fast(part_, plan.ids_path(b, day))
    for column, group in plan.groups().items():
        keep = [ROW, POS, *group.raw_columns()]
        filed = valid.select(keep).with_columns(_bucket(valid, column, plan.buckets).alias("__b"))
        for b, part_ in _split(filed, "__b", plan.buckets):
            _fast(part_, plan.events_path(column, b, day))
    return valid.height + rejected.height, rejected.height


def _split(frame: pl.DataFrame, by: str, n: int) -> Iterable[tuple[int, pl.DataFrame]]:
    """Every bucket 0..n-1 with its rows (empty ones too: a missing file means an unfinished unit)."""
    parts = {key[0]: p for key, p in frame.partition_by(by, as_dict=True, maintain_order=True).items()}
    empty = frame.clear()
    for b in range(n):
        yield b, parts.get(b, empty).drop(by)


# -- 2. duplicates --------------------------------------------------------------------------
def find_duplicates(plan: Plan, bucket: int) -> int:
    """Rule 7 over every day checked so far: each later valid row of an event id is a duplicate
    of its first. Writes them (row, event id, reason); returns how many."""
    h = plan.history
    paths = sorted(plan.ids_dir(bucket).glob("day=*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no day is checked yet ({plan.work_dir / 'ids'} is empty)")
    # Days in order, each in row order: the first of an id in this frame is its first row.
    ids = pl.concat([pl.read_parquet(p) for p in paths])
    later = ids.filter(~pl.col(h.event_id).is_first_distinct())
    firsts = ids.filter(pl.col(h.event_id).is_in(later.get_column(h.event_id).implode())).unique(
        h.event_id, keep="first", maintain_order=True
    )
    dups = (
        later.join(firsts.rename({ROW: "__first"}), on=h.event_id, how="left", maintain_order="left")
        .select(
            ROW,
            h.event_id,
            pl.format(f"{h.event_id}: duplicate (first seen at row {{}})", "__first").alias(REJECT_REASON),
        )
        .sort(ROW)
    )
    atomic.write_parquet(dups, plan.duplicates_path(bucket))
    return dups.height


def _duplicate_rows(plan: Plan) -> pl.DataFrame:
    paths = [plan.duplicates_path(b) for b in range(plan.id_buckets)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the duplicates units have not all run: {missing[0]} is missing")
    return pl.concat([pl.read_parquet(p, columns=[ROW]) for p in paths])


# -- 3. features ----------------------------------------------------------------------------
def bucket_features(plan: Plan, raw_dir: Path, column: str, bucket: int, days: list[datetime.date]) -> int:
    """The group of `column`'s columns for bucket `bucket`'s rows of each of `days` (from the
    bucket's events of the look-back window); returns the rows written. Every day of the raw log
    in the window must have been checked: a missing one would silently drop its events."""
    group = plan.groups()[column]
    lookback = datetime.timedelta(days=group.lookback_days)
    first, last = min(days), max(days)
    window = [d for d in raw_days(raw_dir) if first - lookback <= d <= last]
    unchecked = [d for d in window if not plan.events_path(column, bucket, d).is_file()]
    if unchecked or not set(days) <= set(window):
        missing = unchecked or sorted(set(days) - set(window))
        raise FileNotFoundError(f"day {missing[0]} of {raw_dir} is not checked yet (run its check unit first)")
    paths = [plan.events_path(column, bucket, d) for d in window]
    events = pl.concat([pl.read_parquet(p) for p in paths]).join(_duplicate_rows(plan), on=ROW, how="anti")
    rows = 0
    # Without the rates: the assembly makes them from the counts, a third fewer columns to file.
    for day, frame in entity_features(events.drop(ROW), group, sorted(days), carry=(POS,), rates=False).items():
        _fast(frame, plan.features_path(column, day, bucket))
        rows += frame.height
    return rows


# -- 4. assemble ----------------------------------------------------------------------------
def assemble_day(plan: Plan, day: datetime.date) -> int:
    """The day's output partition → its rows; a day without valid events writes nothing, as
    `write_days` writes nothing for it."""
    h = plan.history
    valid = pl.read_parquet(plan.valid_path(day))
    keep = ~valid.get_column(ROW).is_in(_duplicate_rows(plan).get_column(ROW).implode())
    frame = valid.filter(keep).drop(ROW, POS)
    if frame.height == 0:
        return 0
    kept_pos = np.flatnonzero(keep.to_numpy())
    for column in plan.groups():
        paths = [plan.features_path(column, day, b) for b in range(plan.buckets)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"the features units of {day} have not all run: {missing[0]} is missing")
        part = pl.concat([pl.read_parquet(p) for p in paths])
        # Place each bucket's rows at their position in the day: an index, not a join.
        where = np.full(valid.height, -1, dtype=np.int64)
        where[part.get_column(POS).to_numpy()] = np.arange(part.height)
        order = where[kept_pos]
        if part.height != frame.height or (order < 0).any():
            raise RuntimeError(f"{day}: {part.height} rows of {column} features for {frame.height} events")
        part = part[order]
        if not part.get_column(h.event_id).equals(frame.get_column(h.event_id)):
            raise RuntimeError(f"{day}: the {column} features are not those of the day's events")
        frame = frame.hstack(part.drop(h.event_id, POS))
    rates = rate_columns(h, lambda c: frame.get_column(c).to_numpy())
    frame = frame.with_columns(pl.Series(c, v) for c, v in rates.items())
    if h.time_features:
        t = frame.get_column(h.time)
        frame = frame.with_columns(
            t.dt.hour().cast(pl.Int8).alias("event_hour"), t.dt.weekday().cast(pl.Int8).alias("event_dow")
        )
    write_day(frame.select(*h.raw_columns(), *h.columns()), plan.out_dir, day)
    return frame.height


def rejects(plan: Plan) -> pl.DataFrame:
    """Every rejected row so far (the contract's columns, `reject_reason`, its row number), by row.
    Duplicates are looked up in the days' valid files, which are read only where they hold one."""
    days = [pl.read_parquet(p) for p in sorted((plan.work_dir / "rejects").glob("day=*.parquet"))]
    dup = pl.concat([pl.read_parquet(plan.duplicates_path(b)) for b in range(plan.id_buckets)])
    valid = sorted((plan.work_dir / "valid").glob("day=*.parquet"))
    if dup.height and valid:
        rows = pl.scan_parquet(valid).drop(POS).join(dup.lazy().drop(plan.history.event_id), on=ROW).collect()
    else:
        rows = dup.clear()
    return pl.concat([*days, rows], how="diagonal_relaxed").sort(ROW)


# -- the whole build in one process ------------------------------------------------------------
def raw_days(raw_dir: Path) -> list[datetime.date]:
    """The day partitions of a raw event log, in order; an error when it has none."""
    where = Path(raw_dir) / "impressions"
    days = []
    for part in sorted(where.glob("day=*")):
        try:
            days.append(datetime.date.fromisoformat(part.name.removeprefix("day=")))
        except ValueError:
            raise ValueError(f"{part}: a partition name must be day=YYYY-MM-DD") from None
    if not days:
        raise ValueError(f"{where}: no day=YYYY-MM-DD partitions (is {raw_dir} an event log?)")
    return days


def raw_day(raw_dir: Path, day: datetime.date) -> pl.LazyFrame:
    """One day partition of the raw log as the in-memory build reads the whole: joined with the
    user and item tables, with its `day`."""
    return events.joined(Path(raw_dir), with_day=True, day=day)


def row_offsets(raw_dir: Path, days: list[datetime.date]) -> dict[datetime.date, int]:
    """The number of the first row of each day in the whole log's input order (from the parquet
    footers: nothing is read). A day whose files cannot be read is an error naming it."""
    offsets, total = {}, 0
    for day in days:
        offsets[day] = total
        where = Path(raw_dir) / "impressions" / f"day={day.isoformat()}"
        try:
            total += pl.scan_parquet(where / "*.parquet").select(pl.len()).collect().item()
        except (pl.exceptions.PolarsError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: cannot read its parquet files ({first})") from exc
    return offsets


@dataclass
class Units:
    """What to run to compute `days`: the days to check (the look-back days they need whose check
    is missing or older than their raw files, and always the days themselves), the id buckets, the
    features units (per chunk of consecutive days) and the days to assemble."""

    days: list[datetime.date]
    check_days: list[datetime.date]
    id_buckets: list[int]
    feature_units: list[tuple[str, int, list[datetime.date]]]

    def count(self) -> int:
        return len(self.check_days) + len(self.id_buckets) + len(self.feature_units) + len(self.days)

    def to_xcom(self) -> dict:
        """As Airflow maps them: lists of JSON values."""
        return {
            "days": [d.isoformat() for d in self.days],
            "check_days": [d.isoformat() for d in self.check_days],
            "id_buckets": self.id_buckets,
            "feature_units": [[c, b, [d.isoformat() for d in ds]] for c, b, ds in self.feature_units],
        }


def _fresh(plan: Plan, raw_dir: Path, day: datetime.date) -> bool:
    done = plan.valid_path(day)
    files = list((Path(raw_dir) / "impressions" / f"day={day.isoformat()}").glob("*.parquet"))
    return done.is_file() and all(f.stat().st_mtime <= done.stat().st_mtime for f in files)


def units_for(plan: Plan, raw_dir: Path, days: list[datetime.date], chunk_days: int = 31) -> Units:
    all_days = raw_days(raw_dir)
    unknown = sorted(set(days) - set(all_days))
    if unknown:
        raise ValueError(f"days not in the raw log {raw_dir}: {', '.join(map(str, unknown))}")
    lookback = datetime.timedelta(days=plan.history.lookback_days)
    needed = [d for d in all_days if any(t - lookback <= d < t for t in days) and not _fresh(plan, raw_dir, d)]
    targets = sorted(set(days))
    chunks = [targets[i : i + chunk_days] for i in range(0, len(targets), chunk_days)]
    return Units(
        days=targets,
        check_days=sorted({*needed, *targets}),
        id_buckets=list(range(plan.id_buckets)),
        feature_units=[(c, b, chunk) for chunk in chunks for c, b in plan.feature_units()],
    )


def run_check(plan: Plan, raw_dir: Path, day: datetime.date) -> tuple[int, int]:
    """Unit 1 for one day of the raw log at `raw_dir`: (rows, rejected)."""
    offsets = row_offsets(raw_dir, [d for d in raw_days(raw_dir) if d <= day])
    return check_day(plan, raw_day(raw_dir, day), day, offsets[day])


@dataclass
class Built:
    days: list[datetime.date]  # the days computed
    rows_checked: int  # rows of the days checked in this build
    rejected: int  # of those, rejected by rules 1-6
    duplicates: int  # duplicates found over every checked day
    rows_out: int  # rows of the days computed
    units: int
    peak_rss_mib: float = 0.0  # the largest resident memory of a process while it ran one unit


def _unit(kind: str, plan: Plan, raw_dir: Path, arg: object, first_row: int) -> tuple[object, float]:
    """One unit by name, and the peak RSS (MiB) of the process that ran it (an upper bound for
    the unit: a worker's peak covers the units it ran before)."""
    import resource

    if kind == "check":
        day = cast(datetime.date, arg)
        out: object = check_day(plan, raw_day(raw_dir, day), day, first_row)
    elif kind == "duplicates":
        out = find_duplicates(plan, cast(int, arg))
    elif kind == "features":
        column, bucket, days = cast(tuple[str, int, list[datetime.date]], arg)
        out = bucket_features(plan, raw_dir, column, bucket, days)
    else:
        out = assemble_day(plan, cast(datetime.date, arg))
    return out, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_local(
    plan: Plan,
    raw_dir: Path,
    days: list[datetime.date] | None = None,
    progress: bool = True,
    chunk_days: int = 31,
    workers: int = 1,
    on_unit: Callable[[str], None] | None = None,
    rebuild: bool = False,
) -> Built:
    """Every unit, stage after stage: the same files as the mapped DAG writes. `days`: the days to
    compute (default every day of the raw log). `workers` > 1 runs each stage's units in that many
    processes, as an Airflow pool of that many workers would; 1 runs them in this process.
    `rebuild` first drops what the folders hold (see `own`)."""
    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    all_days = raw_days(raw_dir)
    offsets = row_offsets(raw_dir, all_days)  # an unreadable day fails here, before anything is dropped
    own(plan, rebuild)
    units = units_for(plan, raw_dir, all_days if days is None else days, chunk_days)
    built = Built(days=units.days, rows_checked=0, rejected=0, duplicates=0, rows_out=0, units=units.count())
    stages: list[tuple[str, list]] = [
        ("check", units.check_days),
        ("duplicates", units.id_buckets),
        ("features", units.feature_units),
        ("assemble", units.days),
    ]
    bar = tqdm(total=units.count(), desc="history units", unit="unit", disable=not progress)
    pool = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: Polars' thread pool does not survive a fork
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for kind, args in stages:
            calls = [(kind, plan, raw_dir, a, offsets.get(a, 0) if kind == "check" else 0) for a in args]
            results = pool.map(_unit, *zip(*calls)) if pool and calls else (_unit(*c) for c in calls)
            for arg, (out, rss) in zip(args, results):
                built.peak_rss_mib = max(built.peak_rss_mib, rss)
                if kind == "check":
                    rows, rejected = cast(tuple[int, int], out)
                    built.rows_checked, built.rejected = built.rows_checked + rows, built.rejected + rejected
                elif kind == "duplicates":
                    built.duplicates += cast(int, out)
                elif kind == "assemble":
                    built.rows_out += cast(int, out)
                bar.update(1)
                if on_unit:
                    on_unit(f"{kind} {arg}")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.close()
    finish(plan)
    log.info(
        "history units: %d run, %d day(s) → %s, %d rows", built.units, len(built.days), plan.out_dir, built.rows_out
    )
    return built


def finish(plan: Plan) -> None:
    """Mark the output folder as holding this spec's day partitions (as `update_days` does)."""
    mark_history_dir(plan.out_dir, plan.history)


def own(plan: Plan, rebuild: bool = False) -> None:
    """Take the work and output folders (each new, empty or ours). Work filed with another spec,
    bucket count or Polars version is dropped; so are day partitions of another spec, exactly as
    `history.update_days` drops them (the marker is blanked first, so a kill in between leaves a
    folder the next build rebuilds rather than trusts). `rebuild` drops both whatever they hold."""
    atomic.check_owned(plan.work_dir, WORK_MARKER)
    atomic.check_owned(plan.out_dir, HISTORY_MARKER)  # both refused before either is touched
    # The output folder's marker first: the default work folder lies inside it.
    claim_history_dir(plan.out_dir, plan.history, rebuild)
    marker = plan.work_dir / WORK_MARKER
    if rebuild or not marker.is_file() or marker.read_text() != plan.marker():
        atomic.write_text(marker, "")
        for sub in ("valid", "rejects", "events", "ids", "duplicates", "features"):
            if (plan.work_dir / sub).is_dir():
                shutil.rmtree(plan.work_dir / sub)
        atomic.write_text(marker, plan.marker())


def missing_days(plan: Plan, raw_dir: Path) -> list[datetime.date]:
    """The raw log's days that the output folder lacks (every day when it holds another spec's)."""
    current = is_marked(plan.out_dir, plan.history)
    return [d for d in raw_days(raw_dir) if not (current and day_path(plan.out_dir, d).is_file())]
