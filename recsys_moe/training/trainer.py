"""The training loop: epochs of multi-task training, validation per task, early stopping on the
mean of the per-task scores, the best model kept, then one test evaluation.

Selection uses the mean over tasks, never one task alone: picking the epoch on one task silently
trades the others away.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.config import RunConfig
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.tracking.tracker import NullTracker, Tracker
from recsys_moe.training import checkpoint
from recsys_moe.training.losses import UncertaintyWeighting, per_task_losses, task_weights, training_loss
from recsys_moe.training.metrics import task_metrics

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, dict[str, float]]  # task → metric → value
    gate_means: np.ndarray | None = None  # [T, E] mean gate weight per task and expert
    gate_routed: np.ndarray | None = None  # [T, E] share of samples with a non-zero weight on the expert
    gate_entropy: np.ndarray | None = None  # [T] mean entropy of each task's gate (nats)
    scores: torch.Tensor | None = None  # [N, T] probabilities (binary) or values (regression), in row order

    @property
    def score(self) -> float:
        return float(np.mean([m["score"] for m in self.metrics.values()]))

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_{task}_{k}": v for task, m in self.metrics.items() for k, v in m.items() if k != "score"}
        out[f"{prefix}_mean_score"] = self.score
        return out

    def gate_metrics(self, tasks: list[str], sparse_routing: bool) -> dict[str, float]:
        """Per task: gate entropy, mean weight per expert, and (top-k) routed share per expert."""
        if self.gate_means is None or self.gate_entropy is None or self.gate_routed is None:
            return {}
        out = {}
        for t, task in enumerate(tasks):
            out[f"gate_{task}_entropy"] = float(self.gate_entropy[t])
            for e in range(self.gate_means.shape[1]):
                out[f"gate_{task}_e{e}_weight"] = float(self.gate_means[t, e])
                if sparse_routing:
                    out[f"gate_{task}_e{e}_routed"] = float(self.gate_routed[t, e])
        return out

    def collapsed_experts(self, threshold: float, sparse_routing: bool) -> list[int]:
        """Experts no task uses: every task's mean weight (top-k: routed share) is under threshold."""
        usage = self.gate_routed if sparse_routing else self.gate_means
        if usage is None:
            return []
        return [int(e) for e in np.flatnonzero(usage.max(axis=0) < threshold)]


@dataclass
class TrainResult:
    run_id: str | None
    tracking_uri: str | None
    best_epoch: int
    history: list[dict[str, float]]
    valid: Evaluation
    test: Evaluation
    model_dir: Path
    train_samples_per_s: float
    tasks: list[str] = field(default_factory=list)


def evaluate(model: MultiTaskRanker, dataset: InMemoryDataset, batch_size: int) -> Evaluation:
    """Per-task metrics on a dataset. Restores the model's train/eval mode on the way out, so a
    validation pass in the middle of training never leaves dropout switched off."""
    was_training = model.training
    model.eval()
    try:
        scores, sums = [], None
        with torch.no_grad():
            for batch in dataset.batches(batch_size):
                out = model(batch.dense, batch.sparse)
                scores.append(out.logits)
                if out.gate_weights is not None:
                    w = out.gate_weights  # [B, T, E]
                    entropy = -(w * w.clamp_min(1e-12).log()).sum(dim=-1)  # [B, T]
                    step = (w.sum(0), (w > 0).sum(0).double(), entropy.sum(0))
                    sums = step if sums is None else tuple(a + b for a, b in zip(sums, step))
        logits = torch.cat(scores) if scores else torch.zeros(0, len(model.task_names))
    finally:
        model.train(was_training)
    scores = model.scores(logits)
    metrics = {
        task: task_metrics(kind, scores[:, i], dataset.labels[:, i])
        for i, (task, kind) in enumerate(zip(model.task_names, model.task_types))
    }
    if sums is None:
        return Evaluation(metrics=metrics, scores=scores)
    n = max(len(dataset), 1)
    means, routed, entropy = (x.double().numpy() / n for x in sums)
    return Evaluation(metrics=metrics, gate_means=means, gate_routed=routed, gate_entropy=entropy, scores=scores)


def _model_config(manifest: Manifest, config: RunConfig, model: MultiTaskRanker) -> dict[str, Any]:
    return {
        "model": config.model.model_dump(mode="json"),
        "tasks": model.task_names,
        "task_types": model.task_types,
        "sparse_keys": model.sparse.keys,
        "dense_features": manifest.dense_features,
        "spec_name": manifest.spec.name,
        "spec_hash": manifest.spec_hash,
        "dataset_digest": manifest.digest,
    }


def _dense_optimizer(model: MultiTaskRanker, config: RunConfig, extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for n, p in model.named_parameters() if not n.startswith("sparse.ebc.")] + extra
    # fused=True: one kernel over all parameters (3x faster than foreach on CPU here).
    return torch.optim.Adam(params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=True)


def train(
    manifest: Manifest,
    config: RunConfig,
    tracker: Tracker | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    tc = config.train
    tracker = tracker or NullTracker()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    run_dir = tc.checkpoint_dir or Path("runs") / f"{manifest.spec.name}-{config.model.arch}"
    last_dir, best_dir = run_dir / "last", run_dir / "best"

    fused = (tc.embedding_optimizer, {"lr": tc.embedding_lr})
    model = MultiTaskRanker(manifest, config.model, tc.tasks, fused_optimizer=fused)
    tasks = model.task_names
    weighting = UncertaintyWeighting(len(tasks)) if tc.task_weighting == "uncertainty" else None
    optimizer = _dense_optimizer(model, config, list(weighting.parameters()) if weighting else [])
    model_config = {**_model_config(manifest, config, model), "run_id": tracker.run_id}
    is_binary = torch.tensor([t == "binary" for t in model.task_types])
    loss_weights = task_weights(manifest, tasks)

    load = tqdm(total=3, desc="load data", disable=not progress, leave=False)
    data = {}
    for split in ("train", "valid", "test"):
        data[split] = InMemoryDataset.from_split(manifest, split, model.sparse.keys, tasks)
        load.update(1)
    load.close()

    generator = torch.Generator().manual_seed(tc.seed)
    start_epoch, best_score, best_epoch, bad_epochs = 0, -math.inf, -1, 0
    history: list[dict[str, float]] = []
    if resume and (last_dir / checkpoint.TRAIN_STATE).exists():
        weights, state = checkpoint.load_train_state(last_dir)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        model.sparse.ebc.fused_optimizer().load_state_dict(state["embedding_optimizer"])  # type: ignore[union-attr]
        if weighting is not None:
            weighting.load_state_dict(state["task_weighting"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        bad_epochs, history = state["bad_epochs"], json.loads(state["history"])
        log.info("resumed from %s at epoch %d", last_dir, start_epoch)

    if start_epoch == 0:
        tracker.log_params({**config.flat(), "tasks": ",".join(tasks), "spec": manifest.spec.name,
                            "spec_hash": manifest.spec_hash, "train_rows": len(data["train"]),
                            "parameters": sum(p.numel() for p in model.parameters())})  # fmt: skip
        tracker.set_tags({"spec": manifest.spec.name, "arch": config.model.arch, "dataset_digest": manifest.digest})
        if manifest.root is not None:
            tracker.log_file(manifest.root / "manifest.json", "dataset")
            for split in ("train", "valid", "test"):
                tracker.log_dataset(f"{manifest.spec.name}-{split}", manifest.digest, str(manifest.root), split)

    steps_per_epoch = data["train"].num_batches(tc.batch_size)
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    samples_per_s: list[float] = []
    model.train()
    for epoch in range(start_epoch, tc.epochs):
        if bad_epochs >= tc.patience:  # a resumed run that had already stopped early
            break
        train_loss, rate = _train_epoch(
            model, optimizer, data["train"], tc.batch_size, steps_per_epoch, generator, is_binary, loss_weights,
            weighting, tc.balance_loss_weight, desc=f"epoch {epoch + 1}/{tc.epochs}", progress=progress,
        )  # fmt: skip
        samples_per_s.append(rate)

        val = evaluate(model, data["valid"], tc.eval_batch_size)
        record = {"epoch": epoch + 1, "train_samples_per_s": rate, "val_mean_score": val.score}
        record.update({f"train_{t}_loss": float(v) for t, v in zip(tasks, train_loss)})
        record.update(val.flat("val"))
        if weighting is not None:
            record.update({f"task_weight_{t}": float(w) for t, w in zip(tasks, weighting.weights())})
        history.append(record)
        sparse_routing = config.model.gate != "softmax"
        tracker.log_metrics(val.gate_metrics(tasks, sparse_routing), step=epoch + 1)
        collapsed = val.collapsed_experts(tc.collapse_threshold, sparse_routing)
        if collapsed:
            log.warning(
                "epoch %d: experts %s are nearly unused by every task (below %.3f); consider "
                "train.balance_loss_weight > 0, a higher model.gate_temperature or fewer experts",
                epoch + 1, collapsed, tc.collapse_threshold,
            )  # fmt: skip
        tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        summary = "  ".join(f"{t} {m.get('auc', m.get('r2', float('nan'))):.4f}" for t, m in val.metrics.items())
        line = f"epoch {epoch + 1}: validation {summary} | mean {val.score:.4f} | {rate:,.0f} samples/s"
        if progress:
            tqdm.write(line)
        else:
            log.info(line)

        if val.score > best_score:
            best_score, best_epoch, bad_epochs = val.score, epoch + 1, 0
            checkpoint.save_model(best_dir, model, model_config)
        else:
            bad_epochs += 1
        checkpoint.save_train_state(last_dir, model, model_config, {
            "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": json.dumps(history), "optimizer": optimizer.state_dict(),
            "embedding_optimizer": model.sparse.ebc.fused_optimizer().state_dict(),  # type: ignore[union-attr]
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "task_weighting": weighting.state_dict() if weighting is not None else {},
        })  # fmt: skip
        if bad_epochs >= tc.patience:
            log.info("early stop: no improvement of the mean validation score for %d epochs", bad_epochs)

    weights, _ = checkpoint.load_weights(best_dir)
    model.load_state_dict(weights)
    valid = evaluate(model, data["valid"], tc.eval_batch_size)
    test = evaluate(model, data["test"], tc.eval_batch_size)
    if manifest.root is not None:  # make best/ a self-contained bundle: weights, config, manifest, vocabularies
        for rel in ["manifest.json", *manifest.vocab_files.values()]:
            (best_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.root / rel, best_dir / rel)
    _log_results(
        tracker, history, valid, test, tasks, model.task_types, best_epoch, config.model.gate != "softmax"
    )
    throughput = float(np.median(samples_per_s)) if samples_per_s else math.nan
    return TrainResult(
        run_id=tracker.run_id, tracking_uri=tracker.uri, best_epoch=best_epoch, history=history,
        valid=valid, test=test, model_dir=best_dir, train_samples_per_s=throughput, tasks=tasks,
    )  # fmt: skip


def _train_epoch(
    model: MultiTaskRanker,
    optimizer: torch.optim.Optimizer,
    data: InMemoryDataset,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    is_binary: torch.Tensor,
    loss_weights: torch.Tensor,
    weighting: UncertaintyWeighting | None,
    balance_weight: float,
    desc: str,
    progress: bool,
) -> tuple[torch.Tensor, float]:
    """One pass over shuffled training data; returns (mean loss per task, samples/s)."""
    bar = tqdm(total=steps, desc=desc, disable=not progress, unit="batch")
    loss_sum, n_seen, start = torch.zeros(len(loss_weights)), 0, time.perf_counter()
    for step, batch in enumerate(data.batches(batch_size, shuffle=True, generator=generator)):
        if step >= steps:
            break
        out = model(batch.dense, batch.sparse)
        per_task = per_task_losses(out.logits, batch.labels, is_binary)
        loss = training_loss(per_task, loss_weights, weighting, out.gates, balance_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # embedding rows are updated inside this call (fused optimizer)
        optimizer.step()
        loss_sum += per_task.detach() * len(batch)
        n_seen += len(batch)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
    bar.close()
    return loss_sum / max(n_seen, 1), n_seen / (time.perf_counter() - start)


def _log_results(
    tracker: Tracker,
    history: list[dict[str, float]],
    valid: Evaluation,
    test: Evaluation,
    tasks: list[str],
    task_types: list[str],
    best_epoch: int,
    sparse_routing: bool,
) -> None:
    tracker.log_metrics({**test.flat("test"), "best_epoch": best_epoch})
    if tracker.run_id is None:  # not tracking: skip rendering plots nobody will see
        return
    from recsys_moe.tracking import plots

    if history:
        metric = {t: "auc" if k == "binary" else "mse" for t, k in zip(tasks, task_types)}
        tracker.log_figure(plots.validation_curves(history, tasks, metric, best_epoch), "validation_curves.png")
    if valid.gate_means is not None:
        tracker.log_figure(plots.gate_heatmap(valid.gate_means, tasks), "gate_heatmap.png")
    if valid.gate_routed is not None and sparse_routing:
        title = "share of samples routed to each expert"
        tracker.log_figure(plots.gate_heatmap(valid.gate_routed, tasks, title), "gate_routing_heatmap.png")
