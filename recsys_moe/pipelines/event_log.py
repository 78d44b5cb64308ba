"""An event log with history features as a dataset source: contract → history → time splits.

Bad events are removed *before* anything is computed from them (a duplicated impression would
count twice in every window, a conversion without a click would leak a label), with a reason per
rejected row. History features are kept in day partitions beside the raw log and extended
incrementally: a rebuild computes only the days it has not computed yet (`pipelines/history.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys_moe.features.spec import FeatureSpec
from recsys_moe.pipelines.contract import REJECT_REASON, EventContract, check_events
from recsys_moe.pipelines.history import update_days
from recsys_moe.pipelines.sources import events as event_source
from recsys_moe.pipelines.validate import REASON

_RAW_ROW = "__raw_row"

log = logging.getLogger(__name__)


def contract_for(spec: FeatureSpec) -> EventContract:
    h = spec.history
    assert h is not None
    required = [h.event_id, h.time, *(c for cols in h.entities.values() for c in cols)]
    flags = [s.flag for s in h.streams.values() if s.flag is not None]
    # HistorySpec guarantees a stream that `requires` another and its parent both have flags.
    requires = [(str(s.flag), str(h.streams[s.requires].flag)) for s in h.streams.values() if s.requires]
    delayed = [(s.flag, s.time, h.attribution_days) for s in h.streams.values() if s.flag and s.time]
    return EventContract(
        event_id=h.event_id,
        time=h.time,
        required=tuple(dict.fromkeys(required)),
        flags=tuple(flags),
        requires=tuple(requires),
        delayed=tuple(delayed),
    )


@dataclass
class Prepared:
    splits: dict[str, pl.LazyFrame]
    rows_in: int
    rejects: pl.DataFrame  # rejected events, with `reject_reason`
    history_dir: Path
    days_computed: int


def history_step(
    spec: FeatureSpec,
    raw: pl.LazyFrame,
    history_dir: Path,
    rebuild: bool = False,
    progress: bool = True,
    chunk_days: int = 31,
) -> tuple[pl.DataFrame, pl.DataFrame, list]:
    """Contract, then history features for the days `history_dir` lacks. Only the columns these
    two steps read are loaded: (valid rows, rejected rows with their reason, days computed)."""
    h = spec.history
    assert h is not None
    contract = contract_for(spec)
    row = [_RAW_ROW] if _RAW_ROW in raw.collect_schema() else []
    day = [contract.partition] if contract.partition in raw.collect_schema() else []
    checked = [*row, *dict.fromkeys([*contract.required, *contract.flags, *h.raw_columns(), *day])]
    valid, rejected = pl.collect_all(check_events(raw.select(checked), contract))
    computed = update_days(
        valid.lazy().select(h.raw_columns()), h, history_dir, rebuild=rebuild, chunk_days=chunk_days, progress=progress
    )
    log.info("history features: %d day(s) computed into %s", len(computed), history_dir)
    return valid, rejected, computed


def prepare(
    spec: FeatureSpec, raw_dir: Path, history_dir: Path, rebuild: bool = False, progress: bool = True
) -> Prepared:
    """Check the raw events, bring their history features up to date, split by time.

    Only the columns the contract and the history read are held in memory at once; the other
    columns are joined back per split, lazily."""
    h = spec.history
    if h is None or spec.dataset is None or spec.dataset.source != "synthetic":
        raise ValueError(f"spec '{spec.name}': history features need an event-log source (dataset.source: synthetic)")
    # With the partition day: an event filed under another day's partition is rejected.
    raw = event_source.joined(Path(raw_dir), with_day=True).with_row_index(_RAW_ROW)
    valid, rejected, computed = history_step(spec, raw, history_dir, rebuild, progress)
    features = pl.scan_parquet(history_dir / "day=*" / "*.parquet", hive_partitioning=False).select(
        h.event_id, *h.columns()
    )
    kept = raw.join(valid.lazy().select(_RAW_ROW), on=_RAW_ROW, how="semi", maintain_order="left")
    frame = kept.drop(_RAW_ROW, "day").join(features, on=h.event_id, how="left", maintain_order="left")
    rejects = (
        raw.join(
            rejected.lazy().select(_RAW_ROW, pl.col(REJECT_REASON).alias(REASON)), on=_RAW_ROW, maintain_order="right"
        )
        .drop(_RAW_ROW)
        .collect()
    )
    options = spec.dataset.options
    splits = event_source.time_splits(frame, str(raw_dir), options.get("valid_days", 1), options.get("test_days", 1))
    return Prepared(
        splits=splits,
        rows_in=valid.height + rejected.height,
        rejects=rejects,
        history_dir=history_dir,
        days_computed=len(computed),
    )
