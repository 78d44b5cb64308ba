"""Scheduled retraining, one step per function: what the Airflow DAG `dags/retrain_ranking.py` runs.

Every step takes the day's `RetrainRun` (and the records of earlier steps) and returns a typed
record that travels to the next task as an XCom (`Record.to_xcom`), so the DAG only wires steps
together and each step can be run and tested without Airflow. Heavy imports (polars, torch,
mlflow) happen inside the steps.

One run works on one **day**: the last complete day before the run's logical date
(`run.interval_day`). Everything it writes lives under ``<home>/retrain/<dag_id>/<day>/``:

* ``features/``  the Polars pipeline's dataset for the window of days ending on that day;
* ``model/``     the training checkpoints, ``model/best`` the model bundle, ``model/train.json``;
* ``scores/``    the next day's candidates and their scores by the champion;
* ``summary.json`` the run summary.

The days a run reads are partitions of the event log (``impressions/day=YYYY-MM-DD/``) that
land on their own schedule. `check_inputs` says which of them are still missing: the DAG's sensors
poke it until they are all there or their timeout passes (`wait_timeout_message` names what never
came), so lateness is waited for, not retried into. `emit_events` writes the synthetic log's days
first when the run emits its own events.

Every output is written through `recsys_moe.atomic` (directories swapped in, files renamed in), so
a retry or a re-run of the same day replaces its outputs instead of duplicating or half-writing
them. Registration is idempotent too: a version is tagged with the DAG id, the day and its
training run, and a re-run finds and re-uses it (and its recorded gate decision) instead of
registering a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field

from recsys_moe import atomic
from recsys_moe.retrain.run import Record, RetrainRun, SyntheticFeed

if TYPE_CHECKING:
    import polars as pl

    from recsys_moe.config import RunConfig

log = logging.getLogger(__name__)

# Model-version / run tags that key a registration to the DAG run that made it.
TAG_DAG, TAG_DAY, TAG_RUN, TAG_FINGERPRINT = "retrain.dag_id", "retrain.interval", "run_id", "retrain.fingerprint"
TAG_APPLIED = "retrain.applied"  # set once the promote/keep branch has moved the aliases


Wait = Literal["events", "candidates"]  # what a sensor waits for: the window's days, or the next day


class Emitted(Record):
    """What `emit_events` did: the synthetic days it wrote (none when events come from upstream)."""

    emit: bool
    source_dir: str
    days: list[str]


class InputCheck(Record):
    """What a sensor found in the event log: the days it waits for and the paths still missing."""

    wait: Wait
    source_dir: str
    days: list[str]
    missing: list[str]

    @property
    def ready(self) -> bool:
        return not self.missing


class Features(Record):
    features_dir: str
    digest: str
    rows: dict[str, int]
    rejected: dict[str, int]


class Trained(Record):
    """What `model/train.json` records (plus whether this run re-used it)."""

    run_id: str
    experiment_id: str
    fingerprint: str
    bundle_dir: str
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    tasks: list[str]
    reused: bool = False


class GateResult(Record):
    """The promotion gate's decision for the day's model (nothing in the registry moved yet)."""

    promote: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float]
    champion_version: str | None
    rows: int
    tags: dict[str, str]  # the decision as model-version tags (`gate.*`)
    reused: bool
    version: str | None  # the version an earlier run of the day registered, if any


class Registration(Record):
    name: str
    version: str
    model_uri: str
    created: bool


class Aliases(Record):
    promoted: bool
    changed: bool
    champion: str | None
    challenger: str | None


class PeriodScores(Record):
    day: str
    candidates: str
    rows: int
    champion: str | None
    output: str | None
    rows_scored: int = 0
    rows_rejected: int = 0
    mean_score: dict[str, float] = Field(default_factory=dict)


# -- 1. events and features ------------------------------------------------------------------
def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _partition(source_dir: Path, day: date) -> Path:
    return source_dir / "impressions" / f"day={day.isoformat()}"


def wait_days(run: RetrainRun, wait: Wait) -> list[date]:
    """The days whose partitions a run needs: its window (`build_features`) or the day after it,
    whose impressions are the candidates `score_next_period` scores."""
    first, last = run.window
    return _days(first, last) if wait == "events" else [last + timedelta(days=1)]


def required_inputs(source_dir: Path, days: list[date]) -> list[Path]:
    """Everything reading `days` of the log needs: the user and item tables and one partition a day."""
    return [source_dir / "users.parquet", source_dir / "items.parquet", *(_partition(source_dir, d) for d in days)]


def is_present(path: Path) -> bool:
    """A table is a file; a day partition is a directory with at least one parquet file in it (an
    empty directory is a writer that has not landed anything yet)."""
    if path.suffix == ".parquet":
        return path.is_file()
    return path.is_dir() and any(path.glob("*.parquet"))


def check_inputs(run: RetrainRun, wait: Wait) -> InputCheck:
    """Which of the inputs a run waits for are there yet: what a sensor pokes."""
    days = wait_days(run, wait)
    missing = [str(p) for p in required_inputs(run.source_dir, days) if not is_present(p)]
    return InputCheck(wait=wait, source_dir=str(run.source_dir), days=[d.isoformat() for d in days], missing=missing)


def wait_timeout_message(check: InputCheck, waited: timedelta, timeout: timedelta) -> str:
    """Why a sensor gave up: what it waited for, how long, and the paths that never appeared."""
    what = "window's events" if check.wait == "events" else "next day's candidates"
    return (
        f"the {what} ({check.days[0]}..{check.days[-1]}) did not land in {check.source_dir} within "
        f"{timeout} (waited {waited}); missing: {', '.join(check.missing)}"
    )


def ensure_events(source_dir: str | Path, days: list[date], feed: SyntheticFeed) -> list[str]:
    """Emit the synthetic source's partitions of `days` that are missing → the days written.

    Existing partitions are never rewritten: they are the log (and a test may have planted
    degraded ones). Each emitted day is deterministic (`pipelines.sources.synthetic.generate_day`).
    """
    from recsys_moe.pipelines.sources import synthetic

    source_dir = Path(source_dir)
    config = synthetic.SyntheticConfig(
        n_users=feed.n_users, n_items=feed.n_items, n_impressions=feed.impressions_per_day, seed=feed.seed
    )
    written = []
    for day in days:
        if not (_partition(source_dir, day) / "part-0.parquet").is_file():
            synthetic.write_partitions(synthetic.generate_day(config, day), source_dir)
            written.append(day.isoformat())
    if written:
        log.info("synthetic source %s: emitted days %s", source_dir, written)
    return written


def _window_frames(source_dir: Path, days: list[date]) -> pl.LazyFrame:
    """The joined event rows (impressions + users + items) of `days` only, lazily."""
    import polars as pl

    from recsys_moe.pipelines.sources import events

    missing = [str(p) for p in required_inputs(source_dir, days) if not is_present(p)]
    if missing:  # the sensors wait for these: only a partition removed since gets here
        raise FileNotFoundError(f"{source_dir}: missing {missing}")
    return events.joined(source_dir).filter(pl.col("ts").dt.date().is_in(days))


def emit_events(run: RetrainRun) -> Emitted:
    """With `synthetic.emit`, write the synthetic log's missing partitions of the run's window and
    of the next day (whose candidates get scored), so the sensors find them; otherwise nothing:
    the events come from upstream and the sensors wait for them."""
    if not run.params.synthetic.emit:
        log.info("synthetic.emit is off: waiting for upstream events in %s", run.source_dir)
        return Emitted(emit=False, source_dir=str(run.source_dir), days=[])
    first, day = run.window
    days = ensure_events(run.source_dir, _days(first, day + timedelta(days=1)), run.params.synthetic)
    return Emitted(emit=True, source_dir=str(run.source_dir), days=days)


def build_features(run: RetrainRun) -> Features:
    """Build the dataset of the run's window: train on its first days, validate and test on its last
    (the spec's `valid_days`/`test_days`), vocabularies fitted on train only. Replaces any earlier
    build of the same day (atomic directory swap)."""
    from recsys_moe.features import load_spec
    from recsys_moe.pipelines.build import build_frames
    from recsys_moe.pipelines.sources.events import time_splits

    spec = load_spec(run.params.spec)
    if spec.dataset is None or spec.dataset.source != "synthetic":
        raise ValueError(
            f"spec {spec.name!r}: the retraining DAG needs a day-partitioned event log (dataset "
            f"source 'synthetic'), not {spec.dataset.source if spec.dataset else None!r}"
        )
    first, day = run.window
    valid_days = int(spec.dataset.options.get("valid_days", 1))
    test_days = int(spec.dataset.options.get("test_days", 1))
    if run.params.window_days <= valid_days + test_days:
        raise ValueError(
            f"window_days={run.params.window_days} leaves no training days "
            f"({valid_days} validation + {test_days} test days)"
        )
    where = f"{run.source_dir}[{first}..{day}]"
    raw = time_splits(_window_frames(run.source_dir, _days(first, day)), where, valid_days, test_days)
    manifest = build_frames(raw, spec, run.features_dir, f"synthetic:{where}", progress=False)
    rows = {split: info.rows_out for split, info in manifest.splits.items()}
    log.info("features for %s..%s → %s: %s", first, day, run.features_dir, rows)
    return Features(
        features_dir=str(run.features_dir),
        digest=manifest.digest,
        rows=rows,
        rejected={s: i.rows_rejected for s, i in manifest.splits.items()},
    )


# -- 2. train --------------------------------------------------------------------------------
def _run_config(run: RetrainRun, checkpoint_dir: Path) -> RunConfig:
    from recsys_moe.config import load_config

    overrides = [f"model.arch={run.params.arch}", *run.params.overrides, f"train.checkpoint_dir={checkpoint_dir}"]
    return load_config(run.params.run_config, overrides)


def _fingerprint(manifest_digest: str, spec_hash: str, config_flat: dict[str, Any]) -> str:
    """What a model depends on: the data, the spec and the run config (not where it is written)."""
    flat = {k: v for k, v in config_flat.items() if k not in ("train.checkpoint_dir", "tracking.run_name")}
    blob = json.dumps({"data": manifest_digest, "spec": spec_hash, "config": flat}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished_run(uri: str, run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info
    except MlflowException:
        return False
    return bool(info.status == "FINISHED" and info.lifecycle_stage == "active")


def train_model(run: RetrainRun) -> Trained:
    """Train on the day's dataset, tracked as one MLflow run; the bundle lands in `model/best`.

    Idempotent: when `model/train.json` records a finished run with the same fingerprint (same
    data, spec and config), that model is re-used rather than trained (and tracked) again.
    """
    from recsys_moe.pipelines.manifest import Manifest
    from recsys_moe.tracking.tracker import MlflowTracker
    from recsys_moe.training.trainer import train

    manifest = Manifest.load(run.features_dir)
    fingerprint = _fingerprint(manifest.digest, manifest.spec_hash, _run_config(run, run.model_dir).flat())
    record_path = run.model_dir / "train.json"
    if record_path.is_file():
        record = Trained.model_validate_json(record_path.read_text())
        if record.fingerprint == fingerprint and _finished_run(run.tracking_uri, record.run_id):
            log.info(
                "day %s already trained with the same data and config: re-using run %s (%s)",
                run.day,
                record.run_id,
                run.model_dir,
            )
            return record.model_copy(update={"reused": True})

    tracker = MlflowTracker(
        run.params.experiment, run_name=f"{run.dag_id}-{run.day}", uri=run.tracking_uri, source=f"airflow:{run.dag_id}"
    )
    with atomic.building(run.model_dir, "train.json") as work, tracker:
        tracker.set_tags({TAG_DAG: run.dag_id, TAG_DAY: run.day.isoformat(), TAG_FINGERPRINT: fingerprint})
        result = train(manifest, _run_config(run, work), tracker=tracker, progress=False)
        assert result.run_id is not None
        record = Trained(
            run_id=result.run_id,
            experiment_id=tracker.experiment_id,
            fingerprint=fingerprint,
            bundle_dir=str(run.model_dir / "best"),
            best_epoch=result.best_epoch,
            valid=result.valid.flat("valid"),
            test=result.test.flat("test"),
            tasks=result.tasks,
        )
        atomic.write_json(work / "train.json", record.model_dump(mode="json", exclude={"reused"}), sort_keys=True)
    log.info("trained %s for %s: run %s, test %s", run.params.arch, run.day, result.run_id, record.test)
    return record


# -- 3. evaluate against the champion --------------------------------------------------------
def _version_tags(run: RetrainRun, run_id: str) -> dict[str, str]:
    return {TAG_DAG: run.dag_id, TAG_DAY: run.day.isoformat(), TAG_RUN: run_id}


def _recorded_decision(tags: dict[str, str], version: str) -> GateResult:
    def metrics(prefix: str) -> dict[str, float]:
        return {k.removeprefix(prefix): float(v) for k, v in tags.items() if k.startswith(prefix)}

    return GateResult(
        promote=tags["gate.decision"] == "promoted",
        reason=tags.get("gate.reason", ""),
        candidate=metrics("gate.candidate."),
        champion=metrics("gate.champion."),
        champion_version=tags.get("gate.champion_version"),
        rows=int(tags.get("gate.holdout_rows", 0)),
        tags={k: v for k, v in tags.items() if k.startswith("gate.")},
        reused=True,
        version=version,
    )


def evaluate(run: RetrainRun, trained: Trained) -> GateResult:
    """Score the new model and the current champion on the day's holdout (the test split's raw rows,
    each model through its own bundle) and decide; nothing in the registry changes yet.

    A re-run of a day whose version already carries a gate decision returns that decision
    (``reused``) instead of gating again: against itself, or a later champion, it would say
    something else.
    """
    from recsys_moe.pipelines.manifest import Manifest
    from recsys_moe.registry.promotion import (
        CHAMPION,
        PromotionConfig,
        default_metrics,
        evaluate_candidate,
        read_holdout,
        require_baselines,
    )
    from recsys_moe.registry.versions import Registry
    from recsys_moe.scoring import Scorer

    registry, name = Registry(run.tracking_uri), run.params.model_name
    existing = registry.find_versions(name, _version_tags(run, trained.run_id))
    if existing:
        tags = registry.client.get_model_version(name, existing[-1]).tags or {}
        if "gate.decision" in tags:
            decision = _recorded_decision(tags, existing[-1])
            log.info(
                "%s v%s (day %s) was already gated: %s — %s",
                name,
                existing[-1],
                run.day,
                tags["gate.decision"],
                decision.reason,
            )
            return decision

    holdout = read_holdout(Manifest.load(run.features_dir).raw_path("test"))
    champion = registry.alias_version(name, CHAMPION)
    config = PromotionConfig(
        margin=run.params.margin, tolerance=run.params.tolerance, beat_baselines_by=run.params.beat_baselines_by
    )
    candidate = Scorer(trained.bundle_dir)
    gated = evaluate_candidate(
        candidate, registry.scorer(name, champion) if champion else None, holdout, config, champion
    )
    if config.beat_baselines_by is not None:
        run_metrics = registry.client.get_run(trained.run_id).data.metrics
        require_baselines(gated, run_metrics, default_metrics(candidate), config)
    log.info(
        "candidate for %s vs champion %s on %d holdout rows: %s — %s",
        run.day,
        champion,
        gated.rows,
        "promote" if gated.promote else "keep the champion",
        gated.reason,
    )
    return GateResult(
        promote=gated.promote,
        reason=gated.reason,
        candidate=gated.candidate,
        champion=gated.champion,
        champion_version=champion,
        rows=gated.rows,
        tags=gated.tags(),
        reused=False,
        version=existing[-1] if existing else None,
    )


# -- 4. register -----------------------------------------------------------------------------
def _logged_model(uri: str, run_id: str) -> str | None:
    """The pyfunc an earlier attempt already logged for `run_id` (a crash before registering)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    except Exception:  # an older store without logged models: just log again
        return None
    ready = [m for m in models if str(getattr(m, "status", "")).endswith("READY")]
    return f"models:/{ready[0].model_id}" if ready else None


def register(run: RetrainRun, trained: Trained, decision: GateResult) -> Registration:
    """Log the model as a pyfunc in its training run and register it as a new version of the model,
    tagged with the DAG id, the day and the run, and with the gate decision. A re-run re-uses the
    version it finds for those tags: never a duplicate."""
    from recsys_moe.pipelines.manifest import Manifest
    from recsys_moe.registry.package import log_model
    from recsys_moe.registry.promotion import read_holdout
    from recsys_moe.registry.versions import Registry

    registry, name = Registry(run.tracking_uri), run.params.model_name
    tags = _version_tags(run, trained.run_id)
    existing = registry.find_versions(name, tags)
    if existing:
        version = existing[-1]
        model_uri = str(registry.client.get_model_version(name, version).source)
        log.info("%s v%s is already registered for day %s: re-using it", name, version, run.day)
    else:
        found = _logged_model(run.tracking_uri, trained.run_id)
        if found is None:
            example = read_holdout(Manifest.load(run.features_dir).raw_path("test")).head(5)
            found = log_model(Path(trained.bundle_dir), trained.run_id, example, tracking_uri=run.tracking_uri)
        model_uri = found
        version = registry.register(model_uri, name, tags={**tags, TAG_FINGERPRINT: trained.fingerprint})
        log.info("registered %s v%s (%s) for day %s", name, version, model_uri, run.day)
    if not decision.reused:
        registry.record_decision(name, version, decision.tags)
    return Registration(name=name, version=version, model_uri=model_uri, created=not existing)


# -- 5. promote or keep ----------------------------------------------------------------------
def apply_decision(run: RetrainRun, registration: Registration, promote: bool) -> Aliases:
    """Move the aliases for the decision once: `champion` to the version if it won, else
    `challenger`. A re-run finds the version's `retrain.applied` tag and changes nothing (the
    champion may have moved on since). The move is a compare-and-set against the champion the
    gate compared with: if another promoter moved it meanwhile, the version stays a challenger."""
    from recsys_moe.registry.promotion import CHALLENGER, CHAMPION
    from recsys_moe.registry.versions import Registry, StaleDecisionError

    registry = Registry(run.tracking_uri)
    name, version = registration.name, registration.version
    tags = registry.client.get_model_version(name, version).tags or {}
    changed = tags.get(TAG_APPLIED) != "true"
    if changed:
        try:
            registry.apply_decision(name, version, promote, tags.get("gate.champion_version"))
        except StaleDecisionError as exc:
            log.warning("%s; v%s is kept as challenger", exc, version)
            registry.apply_decision(name, version, False, None, {"gate.stale": str(exc)[:500]})
            promote = False
        registry.client.set_model_version_tag(name, version, TAG_APPLIED, "true")
        log.info("%s v%s: %s", name, version, "now the champion" if promote else "kept as challenger")
    else:
        log.info("%s v%s: aliases were already set by an earlier run of day %s; leaving them", name, version, run.day)
    return Aliases(
        promoted=promote,
        changed=changed,
        champion=registry.alias_version(name, CHAMPION),
        challenger=registry.alias_version(name, CHALLENGER),
    )


# -- 6. batch-score the next period ----------------------------------------------------------
def score_next_period(run: RetrainRun) -> PeriodScores:
    """Score the next day's candidates with the champion → `scores/scores.parquet`.

    The candidates are the next day's impressions (joined with users and items, labels dropped)
    from the same source: what the ranker will be asked about tomorrow. They are written to
    `scores/candidates.parquet` first, so the scores can be traced to their input.
    """
    import polars as pl

    from recsys_moe.features import load_spec
    from recsys_moe.registry.promotion import CHAMPION
    from recsys_moe.registry.versions import Registry
    from recsys_moe.scoring.batch import remove_result, score_parquet

    spec = load_spec(run.params.spec)
    next_day = run.day + timedelta(days=1)
    columns = list(dict.fromkeys([*spec.keys, *spec.input_columns]))
    candidates = _window_frames(run.source_dir, [next_day]).select(columns).collect()
    candidates_path = atomic.write_parquet(candidates, run.scores_dir / "candidates.parquet")

    registry, name = Registry(run.tracking_uri), run.params.model_name
    champion = registry.alias_version(name, CHAMPION)
    scores = PeriodScores(
        day=next_day.isoformat(),
        candidates=str(candidates_path),
        rows=candidates.height,
        champion=champion,
        output=None,
    )
    if champion is None:
        log.warning("%s has no champion: nothing scores the candidates of %s", name, next_day)
        remove_result(run.scores_dir / "scores.parquet")  # an earlier run's: no champion scores them now
        return scores
    report = score_parquet(
        registry.scorer(name, champion),
        candidates_path,
        run.scores_dir / "scores.parquet",
        progress=False,
        model=f"models:/{name}/{champion}",
    )
    scored = pl.read_parquet(report.output)
    log.info("scored %d candidates of %s with %s v%s → %s", report.rows_out, next_day, name, champion, report.output)
    return scores.model_copy(
        update={
            "output": str(report.output),
            "rows": report.rows_in,
            "rows_scored": report.rows_out,
            "rows_rejected": report.rows_rejected,
            "mean_score": {t: float(cast(float, scored[t].mean())) for t in scored.columns if t not in spec.keys},
        }
    )


# -- 7. summary ------------------------------------------------------------------------------
def _ui_base(uri: str) -> str:
    """Where the MLflow UI of this store is: the server itself, or `mlflow ui`'s default address."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://localhost:5000"


def summarize(
    run: RetrainRun,
    features: Features,
    trained: Trained,
    decision: GateResult,
    registration: Registration,
    scores: PeriodScores,
) -> dict[str, Any]:
    """Write `summary.json` for the day: data, metrics, the decision, versions, aliases, MLflow links."""
    from recsys_moe.registry.promotion import CHALLENGER, CHAMPION
    from recsys_moe.registry.versions import Registry
    from recsys_moe.tracking.store import ui_command

    registry, name = Registry(run.tracking_uri), registration.name
    ui = _ui_base(run.tracking_uri)
    summary: dict[str, Any] = {
        "dag_id": run.dag_id,
        "day": run.day.isoformat(),
        "window": [d.isoformat() for d in run.window],
        "params": {
            **run.params.model_dump(
                mode="json",
                include={
                    "spec",
                    "window_days",
                    "arch",
                    "margin",
                    "tolerance",
                    "beat_baselines_by",
                    "overrides",
                    "model_name",
                },
            ),
            "source_dir": str(run.source_dir),
        },
        "features": features.to_xcom(),
        "training": trained.model_dump(
            mode="json", include={"run_id", "best_epoch", "valid", "test", "fingerprint", "reused"}
        ),
        "decision": decision.model_dump(mode="json", exclude={"tags", "version"}),
        "promoted": decision.promote,
        "model": {**registration.to_xcom()},
        "aliases": {alias: registry.alias_version(name, alias) for alias in (CHAMPION, CHALLENGER)},
        "scores": scores.to_xcom(),
        "mlflow": {
            "tracking_uri": run.tracking_uri,
            "run": f"runs:/{trained.run_id}",
            "run_url": f"{ui}/#/experiments/{trained.experiment_id}/runs/{trained.run_id}",
            "model_version_url": f"{ui}/#/models/{name}/versions/{registration.version}",
            "ui": ui_command(run.tracking_uri),
        },
        "outputs": run.outputs(),
    }
    atomic.write_json(run.summary_path, summary, sort_keys=True)
    verdict = "promoted to champion" if decision.promote else "not promoted (challenger)"
    log.info(
        "day %s: %s v%s %s — %s; champion v%s; %s",
        run.day,
        name,
        registration.version,
        verdict,
        decision.reason,
        summary["aliases"][CHAMPION],
        summary["mlflow"]["run_url"],
    )
    return summary
