"""The training loop, one for single-process and sharded training: epochs of multi-task
training, validation per task, early stopping on the mean of the per-task scores, the best model
kept, then one evaluation of it on validation and test, every step tracked.

Selection uses the mean over tasks, never one task alone: picking the epoch on one task silently
trades the others away.

What one process and N ranks do differently (the model's wrapping, each rank's rows, reductions
across ranks, checkpoint formats) lives behind `Engine`: `recsys_moe.training.trainer.LocalEngine`
and `recsys_moe.distributed.train.ShardedEngine`. Everything else is here, once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from recsys_moe.config import RunConfig, TrainConfig
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.tracking.tracker import Tracker
from recsys_moe.training import checkpoint
from recsys_moe.training.baselines import fit_baselines
from recsys_moe.training.checkpoint import Progress
from recsys_moe.training.evaluation import Evaluation, evaluate
from recsys_moe.training.losses import UncertaintyWeighting

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    loss: list[float]  # mean training loss per task, over every row of the epoch (all ranks)
    samples_per_s: float  # rows per second over all ranks


@dataclass
class ShardingInfo:
    """What a sharded run adds to its result: where the tables went and what each rank held."""

    world_size: int
    device: str
    plan: list[dict[str, Any]]  # one row per table: sharding type, kernel, ranks, shards
    plan_summary: str
    pipelined_modules: list[str]  # modules whose input all-to-all TorchRec's pipeline overlapped
    peak_rss_mib_per_rank: list[float]
    weight_bytes_per_rank: list[int]


@dataclass
class TrainResult:
    """The one result of training, single-process or sharded (where rank 0 returns it)."""

    run_id: str | None
    tracking_uri: str | None
    best_epoch: int
    history: list[dict[str, float]]
    valid: Evaluation
    test: Evaluation
    model_dir: Path
    train_samples_per_s: float
    tasks: list[str] = field(default_factory=list)
    sharding: ShardingInfo | None = None
    baselines: list[dict[str, Any]] = field(default_factory=list)  # training.baselines.Baseline as dicts

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: the metrics of the evaluations (not their scores or gate arrays)."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("valid", "test")},
            "model_dir": str(self.model_dir),
            "valid": self.valid.metrics,
            "test": self.test.metrics,
            "sharding": dataclasses.asdict(self.sharding) if self.sharding is not None else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainResult:
        sharding = raw.get("sharding")
        return cls(
            **{k: v for k, v in raw.items() if k not in ("valid", "test", "model_dir", "sharding")},
            valid=Evaluation(metrics=raw["valid"]),
            test=Evaluation(metrics=raw["test"]),
            model_dir=Path(raw["model_dir"]),
            sharding=ShardingInfo(**sharding) if sharding is not None else None,
        )


class Engine(Protocol):
    """The parts of training that depend on how the model runs: one process, or N ranks."""

    ranker: MultiTaskRanker  # task names and types; sharded: the ranker inside the wrapped model
    weighting: UncertaintyWeighting | None  # learned task weights, when train.task_weighting asks
    is_main: bool  # rank 0 (always, in one process): it tracks, reports and writes best/
    label: str  # appended to each epoch's line, e.g. " (2 ranks)"
    extra_params: dict[str, Any]  # tracked with the run's config
    extra_tags: dict[str, str]
    extra_files: list[tuple[Path, str]]  # (file, artifact directory) logged at the start

    def restore(self, found: Path) -> Progress:
        """Load `last/` (model, optimizers, RNG, data position) in place; its progress."""
        ...

    def train_epoch(self, epoch: int, progress: Progress, bar: bool) -> EpochStats:
        """One epoch (a resumed one from `progress.step`); may write mid-epoch checkpoints."""
        ...

    def validate(self) -> Evaluation:
        """Exact per-task metrics on the whole validation split (a collective when sharded)."""
        ...

    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """The single-process state dict, on the main rank (a collective when sharded)."""
        ...

    def save_last(self, progress: Progress, bundle: dict[str, Any]) -> None:
        """Write `last/` (a collective when sharded); `bundle` is the model's config."""
        ...

    def finish(self) -> ShardingInfo | None:
        """After the last epoch (a collective when sharded); what a sharded run reports."""
        ...

    def final_model(self, weights: dict[str, torch.Tensor]) -> MultiTaskRanker:
        """Main rank: a single-process ranker holding `weights` (the best epoch's)."""
        ...

    def holdout(self, split: str) -> InMemoryDataset:
        """Main rank: a whole evaluation split."""
        ...


def fit(
    engine: Engine,
    manifest: Manifest,
    config: RunConfig,
    tracker: Tracker,
    *,
    resume: bool = False,
    progress_bar: bool = True,
) -> TrainResult | None:
    """Train to the end or to early stopping; the result on the main rank, None on the others."""
    tc = config.train
    run_dir = config.run_dir(manifest.spec.name)
    best_dir = run_dir / "best"
    tasks = engine.ranker.task_names
    checkpoint.check_run_dir(run_dir)
    if tc.selection_metric == "gauc" and manifest.spec.group_key is None:
        raise ValueError(
            f"train.selection_metric=gauc needs a group_key in spec {manifest.spec.name!r} (e.g. group_key: user_id)"
        )
    found = checkpoint.latest(run_dir) if resume else None
    if found is not None:
        progress = engine.restore(found)
    else:
        if resume and engine.is_main:
            log.warning("no checkpoint in %s: starting from scratch", run_dir / "last")
        progress = Progress(run_id=tracker.run_id, loss_sum=[0.0] * len(tasks))
    if progress.fresh and engine.is_main:
        log_start(tracker, manifest, config, engine)
    bundle = checkpoint.bundle_config(manifest, config.model, engine.ranker, tracker.run_id)
    say = tqdm.write if progress_bar else log.info

    for epoch in range(progress.epoch, tc.epochs):
        if stops_early(progress, tc):  # a resumed run that had already stopped early
            break
        stats = engine.train_epoch(epoch, progress, progress_bar)
        val = engine.validate()
        record = epoch_record(epoch + 1, stats, val, tasks, engine.weighting)
        progress.history.append(record)
        weights = engine.best_weights() if progress.improved(val.score, epoch + 1) else None
        if engine.is_main:
            report_epoch(tracker, record, val, tasks, config, say, engine.label)
            if weights is not None:
                checkpoint.save_bundle(best_dir, weights, bundle, manifest)
        del weights  # a copy of every table: freed before save_last makes another
        progress = dataclasses.replace(progress, epoch=epoch + 1, step=0, loss_sum=[0.0] * len(tasks), rows=0.0)
        engine.save_last(progress, bundle)
        if stops_early(progress, tc) and engine.is_main:
            log.info("early stop: no improvement of the mean validation score for %d epochs", progress.bad_epochs)

    sharding = engine.finish()
    if not engine.is_main:
        return None
    model = engine.final_model(checkpoint.load_weights(best_dir)[0])
    valid = evaluate(model, engine.holdout("valid"), tc.eval_batch_size, tc.selection_metric)
    test = evaluate(model, engine.holdout("test"), tc.eval_batch_size, tc.selection_metric)
    log_results(tracker, progress.history, valid, test, model, progress.best_epoch, config.model.gate != "softmax")
    baselines = []
    if tc.baselines:
        data = {split: engine.holdout(split) for split in ("train", "valid", "test")}
        baselines = fit_baselines(manifest, data, tasks, model.task_types, tc.selection_metric, tc.seed)
        for b in baselines:
            tracker.log_metrics(b.flat())
            tracker.set_tags({f"baseline.{b.name}": b.detail})
    rates = [r["train_samples_per_s"] for r in progress.history]
    return TrainResult(
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        best_epoch=progress.best_epoch,
        history=progress.history,
        valid=valid,
        test=test,
        model_dir=best_dir,
        train_samples_per_s=statistics.median(rates) if rates else math.nan,
        tasks=tasks,
        sharding=sharding,
        baselines=[dataclasses.asdict(b) for b in baselines],
    )


def stops_early(progress: Progress, tc: TrainConfig) -> bool:
    """`patience` epochs without a better validation score, and at least `min_epochs` done."""
    return progress.bad_epochs >= tc.patience and progress.epoch >= min_epochs(tc)


def min_epochs(tc: TrainConfig) -> int:
    """`train.min_epochs`, or half of the planned epochs (rounded up)."""
    return tc.min_epochs if tc.min_epochs is not None else (tc.epochs + 1) // 2


def epoch_record(
    epoch: int, stats: EpochStats, val: Evaluation, tasks: list[str], weighting: UncertaintyWeighting | None
) -> dict[str, float]:
    """One epoch's numbers: what MLflow plots, `history` keeps and a checkpoint carries."""
    record: dict[str, float] = {"epoch": epoch, "train_samples_per_s": stats.samples_per_s, "val_mean_score": val.score}
    record.update({f"train_{t}_loss": float(v) for t, v in zip(tasks, stats.loss)})
    record.update(val.flat("val"))
    if weighting is not None:
        record.update({f"task_weight_{t}": float(w) for t, w in zip(tasks, weighting.weights())})
    return record


def log_start(tracker: Tracker, manifest: Manifest, config: RunConfig, engine: Engine) -> None:
    """What a new run records once: its config, its data and what the engine adds."""
    spec = manifest.spec.name
    tracker.log_params(
        {
            **config.flat(),
            "tasks": ",".join(engine.ranker.task_names),
            "spec": spec,
            "spec_hash": manifest.spec_hash,
            "train_rows": manifest.splits["train"].rows_out,
            **engine.extra_params,
        }
    )
    tracker.set_tags({"spec": spec, "arch": config.model.arch, "dataset_digest": manifest.digest, **engine.extra_tags})
    for path, artifact_dir in engine.extra_files:
        tracker.log_file(path, artifact_dir)
    if manifest.root is not None:
        tracker.log_file(manifest.root / "manifest.json", "dataset")
        for split in ("train", "valid", "test"):
            tracker.log_dataset(f"{spec}-{split}", manifest.digest, str(manifest.root), split)


def report_epoch(
    tracker: Tracker,
    record: dict[str, float],
    val: Evaluation,
    tasks: list[str],
    config: RunConfig,
    say: Any,
    label: str,
) -> None:
    """An epoch's metrics to MLflow, a warning for experts no task uses, one line for people."""
    epoch = int(record["epoch"])
    sparse_routing = config.model.gate != "softmax"
    tracker.log_metrics(val.gate_metrics(tasks, sparse_routing), step=epoch)
    threshold = config.train.collapse_threshold
    collapsed = val.collapsed_experts(threshold, sparse_routing)
    if collapsed:
        log.warning(
            "epoch %d: experts %s are nearly unused by every task (below %.3f); consider "
            "train.balance_loss_weight > 0, a higher model.gate_temperature or fewer experts",
            epoch,
            collapsed,
            threshold,
        )
    tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
    summary = "  ".join(f"{t} {m.get('auc', m.get('r2', float('nan'))):.4f}" for t, m in val.metrics.items())
    rate = record["train_samples_per_s"]
    say(f"epoch {epoch}: validation {summary} | mean {val.score:.4f} | {rate:,.0f} samples/s{label}")


def log_results(
    tracker: Tracker,
    history: list[dict[str, float]],
    valid: Evaluation,
    test: Evaluation,
    model: MultiTaskRanker,
    best_epoch: int,
    sparse_routing: bool,
) -> None:
    """The selected model's test metrics, and the plots: validation curves and gate heatmaps."""
    tracker.log_metrics({**test.flat("test"), "best_epoch": best_epoch})
    if tracker.run_id is None:  # not tracking: skip rendering plots nobody will see
        return
    from recsys_moe.tracking import plots

    tasks = model.task_names
    if history:
        metric = {t: "auc" if k == "binary" else "mse" for t, k in zip(tasks, model.task_types)}
        tracker.log_figure(plots.validation_curves(history, tasks, metric, best_epoch), "validation_curves.png")
    if valid.gate_means is not None:
        tracker.log_figure(plots.gate_heatmap(valid.gate_means, tasks), "gate_heatmap.png")
    if valid.gate_routed is not None and sparse_routing:
        title = "share of samples routed to each expert"
        tracker.log_figure(plots.gate_heatmap(valid.gate_routed, tasks, title), "gate_routing_heatmap.png")
