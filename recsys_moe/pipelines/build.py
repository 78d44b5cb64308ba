"""Raw data + feature spec → validated, model-ready parquet shards and a manifest.

The dataset directory is built beside its destination and swapped in (`recsys_moe.atomic`), so a
crash never leaves half a dataset that looks whole, and a re-run replaces rather than duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import polars as pl
from tqdm.auto import tqdm

from recsys_moe import atomic
from recsys_moe.features.spec import FeatureSpec
from recsys_moe.pipelines.fit import FittedState, fit
from recsys_moe.pipelines.manifest import EventsInfo, Manifest, SparseFeatureInfo, SplitInfo, TaskInfo
from recsys_moe.pipelines.sources import load_splits
from recsys_moe.pipelines.transform import encode, label_column, typed
from recsys_moe.pipelines.validate import REASON, validate

log = logging.getLogger(__name__)


class RejectRateError(RuntimeError):
    """Too many rows failed validation: the data is more likely broken than noisy."""


ROW_GROUP = 262_144


def _write_shards(frame: pl.DataFrame, directory: Path, rows_per_shard: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    n_shards = max(1, -(-frame.height // rows_per_shard))
    for i in range(n_shards):
        path = directory / f"part-{i:05d}.parquet"
        # One chunk and a fixed row-group size: the same rows give the same bytes, so the
        # dataset digest names the data (Polars' parallel chunking would vary the row groups).
        shard = frame.slice(i * rows_per_shard, rows_per_shard).rechunk()
        shard.write_parquet(path, statistics=True, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths


def _reason_counts(reasons: pl.Series) -> dict[str, int]:
    """Reasons grouped by field ("age: not a number (x)" → "age: not a number")."""
    kinds = reasons.str.replace(r" \(.*\)$", "").str.replace(r": -?[\d.e+-]+ is", ": value is")
    return dict(kinds.value_counts().iter_rows())


def _check_rate(what: str, rejected: int, total: int, max_rate: float, reasons: dict[str, int]) -> None:
    rate = rejected / max(total, 1)
    if rate > max_rate:
        raise RejectRateError(
            f"{what}: {rejected} of {total} rows rejected ({rate:.1%} > max_reject_rate "
            f"{max_rate:.1%}); top reasons: {reasons}"
        )


def build_frames(
    raw: Mapping[str, pl.LazyFrame | pl.DataFrame],
    spec: FeatureSpec,
    out_dir: Path,
    source: str,
    rows_per_shard: int = 1_000_000,
    max_reject_rate: float = 0.05,
    progress: bool = True,
    events: EventsInfo | None = None,
    event_rejects: pl.DataFrame | None = None,
) -> Manifest:
    """Build a dataset from raw splits (must include 'train'); vocabularies are fitted on train only.
    `events`/`event_rejects`: the event log's contract check that ran before splitting."""
    if "train" not in raw:
        raise ValueError(f"raw splits must include 'train' (got {sorted(raw)})")
    out_dir = Path(out_dir)
    with atomic.building(out_dir, "manifest.json") as work:
        if events is not None and event_rejects is not None and event_rejects.height:
            (work / "rejects").mkdir(exist_ok=True)
            events.rejects = "rejects/events.parquet"
            event_rejects.write_parquet(work / events.rejects)
            events.reject_reasons = _reason_counts(event_rejects[REASON])
            _check_rate("events", event_rejects.height, events.rows_in, max_reject_rate, events.reject_reasons)
        steps = tqdm(total=3 * len(raw) + 1, desc=f"pipeline {spec.name}", disable=not progress, unit="step")
        valid: dict[str, pl.DataFrame] = {}
        splits: dict[str, SplitInfo] = {}
        for split, frame in raw.items():
            steps.set_postfix_str(f"validate {split}")
            frame = frame.collect(engine="streaming") if isinstance(frame, pl.LazyFrame) else frame
            ok, rejected = validate(frame, spec, where=f"{source}:{split}")
            rejects_rel = None
            reasons: dict[str, int] = {}
            if rejected.height:
                rejects_rel = f"rejects/{split}.parquet"
                (work / "rejects").mkdir(exist_ok=True)
                rejected.write_parquet(work / rejects_rel)
                reasons = _reason_counts(rejected[REASON])
            _check_rate(split, rejected.height, frame.height, max_reject_rate, reasons)
            valid[split] = typed(ok, spec).collect()
            raw_rel = None
            if split != "train":
                raw_rel = f"raw/{split}.parquet"
                (work / "raw").mkdir(exist_ok=True)
                ok.select(spec.raw_columns).write_parquet(work / raw_rel)
            splits[split] = SplitInfo(
                shards=[],
                rows_in=frame.height,
                rows_out=ok.height,
                rows_rejected=rejected.height,
                rejects=rejects_rel,
                reject_reasons=reasons,
                raw=raw_rel,
            )
            assert splits[split].rows_in == splits[split].rows_out + splits[split].rows_rejected
            steps.update(1)

        steps.set_postfix_str("fit vocabularies and statistics on train")
        state = fit(valid["train"], spec)
        vocab_files = state.save_vocabularies(work)
        steps.update(1)

        all_shards: list[Path] = []
        for split, frame in valid.items():
            steps.set_postfix_str(f"transform {split}")
            encoded = encode(frame.lazy(), spec, state).collect()
            steps.update(1)
            steps.set_postfix_str(f"write {split}")
            shards = _write_shards(encoded, work / split, rows_per_shard)
            splits[split].shards = [str(p.relative_to(work)) for p in shards]
            all_shards += shards
            steps.update(1)
        steps.close()

        train = valid["train"]
        manifest = Manifest(
            spec=spec,
            spec_hash=spec.digest(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=source,
            sparse_features=[
                SparseFeatureInfo(
                    name=f.name,
                    kind=f.kind,
                    num_embeddings=state.num_embeddings(f),
                    embedding_dim=f.table_dim,
                    pooling=f.pooling,
                    max_length=f.max_length if f.kind == "multi_hot" else 1,
                )
                for f in spec.sparse_features
            ],
            dense_features=[f.name for f in spec.dense_features],
            tasks=[
                TaskInfo(
                    name=t.name,
                    type=t.type,
                    weight=t.weight,
                    train_mean=float(cast(float, train[label_column(t.name)].mean())),
                )
                for t in spec.tasks
            ],
            vocab_files=vocab_files,
            statistics=state.statistics(),
            splits=splits,
            events=events,
            digest=atomic.sha256(all_shards),
        )
        manifest.save(work)
    manifest.root = out_dir
    for split, info in splits.items():
        log.info("%s: %d rows in, %d out, %d rejected", split, info.rows_in, info.rows_out, info.rows_rejected)
    return manifest


def default_history_dir(out_dir: Path) -> Path:
    """Where a dataset's history features are kept between builds: beside it, `<out>.history`."""
    return Path(out_dir).with_name(f"{Path(out_dir).name}.history")


def check_paths(data_dir: Path, out_dir: Path, history_dir: Path | None) -> None:
    """The raw data is read only, and the outputs neither overlap it nor each other: a rebuild
    replaces the dataset folder, which must hold nothing else."""
    outputs = {"--out": out_dir, **({"--history-dir": history_dir} if history_dir is not None else {})}
    for flag, path in outputs.items():
        if atomic.inside(path, data_dir) or atomic.inside(data_dir, path):
            raise ValueError(
                f"{flag} {path} and --data {data_dir} overlap: outputs go beside the raw data, never into it"
            )
    if history_dir is not None and (atomic.inside(history_dir, out_dir) or atomic.inside(out_dir, history_dir)):
        raise ValueError(
            f"--history-dir {history_dir} and --out {out_dir} overlap: a rebuild of the dataset replaces --out"
        )


def build(
    spec: FeatureSpec,
    data_dir: Path,
    out_dir: Path,
    rows_per_shard: int = 1_000_000,
    max_reject_rate: float = 0.05,
    progress: bool = True,
    history_dir: Path | None = None,
    rebuild_history: bool = False,
) -> Manifest:
    """Read the raw splits named by the spec's dataset source, then build the dataset. A spec
    with `history:` first checks the event log's contract and brings its history features up to
    date (in `history_dir`, default `<out_dir>.history` beside the dataset; only new days are
    computed). Nothing is written into the raw data, and no output may contain another."""
    if spec.dataset is None:
        raise ValueError(f"spec '{spec.name}' has no 'dataset' section: use build_frames() with your own splits")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    history_dir = Path(history_dir) if history_dir is not None else default_history_dir(out_dir)
    check_paths(data_dir, out_dir, history_dir if spec.history is not None else None)
    source = f"{spec.dataset.source}:{data_dir}"
    if spec.history is None:
        raw = load_splits(spec.dataset, Path(data_dir))
        return build_frames(raw, spec, out_dir, source, rows_per_shard, max_reject_rate, progress)
    from recsys_moe.pipelines.event_log import prepare

    ready = prepare(spec, data_dir, history_dir, rebuild_history, progress)
    events = EventsInfo(
        rows_in=ready.rows_in,
        rows_out=ready.rows_in - ready.rejects.height,
        rows_rejected=ready.rejects.height,
        history_dir=str(ready.history_dir),
        days_computed=ready.days_computed,
    )
    return build_frames(
        ready.splits, spec, out_dir, source, rows_per_shard, max_reject_rate, progress, events, ready.rejects
    )


def load_state(manifest: Manifest) -> FittedState:
    """The fitted vocabularies and statistics a manifest's dataset was transformed with."""
    if manifest.root is None:
        raise ValueError("manifest was not loaded from disk")
    return FittedState.load(manifest.root, manifest.vocab_files, manifest.statistics)
