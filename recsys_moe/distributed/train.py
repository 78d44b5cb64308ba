"""One rank of sharded training; run by torchrun (`recsys-moe train --nproc N` starts it):

    torchrun --standalone --nproc-per-node 2 -m recsys_moe.distributed.train --data DIR --config RUN.yaml

Same loop as single-process training (`recsys_moe.training.trainer`), with these differences:

* `train.batch_size` is the global batch: each rank takes `batch_size // world_size` rows per step,
  so a step sees as many rows as a single-process step and an epoch has as many steps.
* Each rank reads its own share of the training rows (every world_size-th row, from its rank on)
  and shuffles it per epoch; all ranks run the same number of steps (the smallest share).
* Validation and test: each rank scores a contiguous slice; scores and labels are all-gathered, so
  per-task AUC / logloss / R² are computed on all rows, exactly, and every rank sees the same
  numbers (early stopping agrees across ranks).
* Rank 0 alone talks to MLflow, prints, and writes best/: the sharded tables gathered into the
  single-process state dict, loadable by `MultiTaskRanker` and `recsys_moe.scoring.Scorer`.
* The final valid/test metrics are computed on rank 0 from the exported best/ model by the
  single-process `evaluate`, which also checks that the export loads.

"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.config import RunConfig, load_config
from recsys_moe.data.loader import Batch, InMemoryDataset
from recsys_moe.distributed import checkpoint as dcheckpoint
from recsys_moe.distributed.model import ShardedRanker, build_sharded, full_state_dict
from recsys_moe.distributed.plan import plan_rows, plan_summary, weight_bytes_per_rank
from recsys_moe.model.embeddings import plan_tables
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.tracking.tracker import NullTracker, Tracker
from recsys_moe.training import checkpoint
from recsys_moe.training.metrics import task_metrics
from recsys_moe.training.trainer import Evaluation, _log_results, _model_config, evaluate

log = logging.getLogger(__name__)

PLAN_FILE = "sharding_plan.json"
RESULT_FILE = "distributed_result.json"


def read_share(manifest: Manifest, split: str, keys: list[str], tasks: list[str], rank: int, world: int) -> InMemoryDataset:
    """This rank's contiguous slice of a split's rows: a lazy scan with a slice, so a rank reads only
    the parquet shards (and row groups) that hold its rows, never the whole split."""
    bounds = np.linspace(0, manifest.splits[split].rows_out, world + 1).round().astype(int)
    start, length = int(bounds[rank]), int(bounds[rank + 1] - bounds[rank])
    frame = pl.scan_parquet(manifest.shard_paths(split)).slice(start, length).collect()
    return InMemoryDataset(frame, manifest, keys, tasks)


def epoch_order(n: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """A rank's shuffle for an epoch, a function of (seed, epoch, rank) alone: the data position
    in a checkpoint is then just (epoch, step)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank))


def _table_batch(ranker: MultiTaskRanker, batch: Batch) -> Batch:
    """Offset ids into packed tables in the loader, so the EBC's input is a field of the batch."""
    return Batch(batch.dense, ranker.sparse.table_ids(batch.sparse), batch.labels)


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n_r, ...] tensor over ranks, in rank order (n_r may differ by rank)."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def evaluate_sharded(model: ShardedRanker, share: InMemoryDataset, total_rows: int, batch_size: int) -> Evaluation:
    """Exact per-task metrics over all ranks' slices. A collective: every rank runs the same
    number of forward passes (the sharded lookup exchanges embeddings with every rank)."""
    ranker, dmp = model.ranker, model.dmp
    world = dist.get_world_size()  # the ranker is called directly: no DDP needed without gradients
    n_batches = max(-(-(-(-total_rows // world)) // batch_size), 1)
    was_training = dmp.training
    dmp.eval()
    logits, sums = [], None
    try:
        with torch.no_grad():  # not inference_mode: FBGEMM's CPU lookup rejects inference tensors
            for idx in torch.arange(len(share)).tensor_split(n_batches):
                batch = share.batch(idx)
                out = ranker(batch.dense, batch.sparse)
                logits.append(out.logits)
                if out.gate_weights is not None:
                    w = out.gate_weights
                    entropy = -(w * w.clamp_min(1e-12).log()).sum(dim=-1)
                    step = (w.sum(0).double(), (w > 0).sum(0).double(), entropy.sum(0).double())
                    sums = step if sums is None else tuple(a + b for a, b in zip(sums, step))
    finally:
        dmp.train(was_training)
    local = torch.cat(logits) if logits else torch.zeros(0, len(ranker.task_names))
    all_logits = _all_gather_rows(local.float())
    labels = _all_gather_rows(share.labels)
    scores = ranker.scores(all_logits)
    metrics = {
        task: task_metrics(kind, scores[:, i], labels[:, i])
        for i, (task, kind) in enumerate(zip(ranker.task_names, ranker.task_types))
    }
    if sums is None:
        return Evaluation(metrics=metrics, scores=scores)
    for s in sums:
        dist.all_reduce(s)
    n = max(labels.shape[0], 1)
    means, routed, entropy = (x.numpy() / n for x in sums)
    return Evaluation(metrics=metrics, gate_means=means, gate_routed=routed, gate_entropy=entropy, scores=scores)


def _device() -> tuple[torch.device, str]:
    if torch.cuda.is_available() and os.environ.get("RECSYS_MOE_FORCE_CPU") != "1":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _tracker(config: RunConfig, manifest: Manifest, rank: int, resume: bool) -> Tracker:
    """Rank 0's MLflow run; a resumed run continues the run its checkpoint names."""
    if rank != 0 or not config.tracking.enabled:
        return NullTracker()
    from recsys_moe.tracking.tracker import MlflowTracker

    run_dir = config.train.checkpoint_dir or Path("runs") / f"{manifest.spec.name}-{config.model.arch}"
    found = dcheckpoint.latest(run_dir) if resume else None
    run_id = dcheckpoint.read_progress(found).get("run_id") if found is not None else None
    experiment = config.tracking.experiment or f"recsys-moe/{manifest.spec.name}"
    return MlflowTracker(experiment, run_name=config.tracking.run_name, run_id=run_id)


def train_distributed(
    manifest: Manifest, config: RunConfig, tracker: Tracker | None = None, resume: bool = False
) -> dict[str, Any] | None:
    """Train on every rank of the initialised process group; rank 0 returns a result summary."""
    tc = config.train
    rank, world = dist.get_rank(), dist.get_world_size()
    tracker = tracker or NullTracker()
    device, _ = _device()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = tc.checkpoint_dir or Path("runs") / f"{manifest.spec.name}-{config.model.arch}"
    best_dir = run_dir / "best"

    model = build_sharded(manifest, config, device, world)
    ranker, dmp = model.ranker, model.dmp
    tasks = ranker.task_names
    summary = plan_summary(model.plan)
    if rank == 0:
        print(f"sharding plan ({world} ranks, {device.type}):\n{summary}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PLAN_FILE).write_text(json.dumps(plan_rows(model.plan), indent=1))

    # Dense parameters (and data-parallel tables) under Adam; sharded tables carry their fused optimizer.
    dense = list(in_backward_optimizer_filter(dmp.named_parameters()))
    dense_names = [n for n, _ in dense]
    optimizer = torch.optim.Adam([p for _, p in dense], lr=tc.lr, weight_decay=tc.weight_decay)
    weighting = model.step.weighting
    model_config = {**_model_config(manifest, config, ranker), "run_id": tracker.run_id}

    keys = ranker.sparse.keys
    train_share = read_share(manifest, "train", keys, tasks, rank, world)
    valid_share = read_share(manifest, "valid", keys, tasks, rank, world)
    total = {s: manifest.splits[s].rows_out for s in ("train", "valid")}

    progress: dict[str, Any] = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0,
                                "history": [], "loss_sum": [0.0] * len(tasks), "rows": 0.0}  # fmt: skip
    found = dcheckpoint.latest(run_dir) if resume else None
    if found is not None:
        progress = dcheckpoint.load(found, dmp, optimizer, dense_names)
        if rank == 0:
            print(f"resumed {found} (written by {progress['world_size']} ranks) at epoch {progress['epoch'] + 1}, "
                  f"step {progress['step']}", flush=True)  # fmt: skip
    elif resume and rank == 0:
        print(f"no checkpoint in {run_dir / 'last'}: starting from scratch", flush=True)

    if rank == 0 and progress["epoch"] == 0 and progress["step"] == 0:
        tracker.log_params({**config.flat(), "tasks": ",".join(tasks), "spec": manifest.spec.name,
                            "spec_hash": manifest.spec_hash, "train_rows": total["train"], "world_size": world,
                            "backend": dist.get_backend(),
                            **{f"plan.{r['table']}": f"{r['sharding']}:{r['ranks']}" for r in plan_rows(model.plan)}})  # fmt: skip
        tracker.set_tags({"spec": manifest.spec.name, "arch": config.model.arch, "dataset_digest": manifest.digest,
                          "distributed": f"{world}x{device.type}"})  # fmt: skip
        tracker.log_file(run_dir / PLAN_FILE, "sharding")
        if manifest.root is not None:
            tracker.log_file(manifest.root / "manifest.json", "dataset")

    local_bs = max(tc.batch_size // world, 1)
    rows_per_rank = total["train"] // world  # the smallest share: equal steps on every rank
    steps = -(-rows_per_rank // local_bs)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    history: list[dict[str, float]] = progress["history"]
    pipelined: list[str] = []
    rates: list[float] = [h["train_samples_per_s"] for h in history]

    def save_checkpoint(epoch: int, step: int, loss_sum: torch.Tensor, rows: float) -> None:
        partial = torch.cat([loss_sum.cpu().double(), torch.tensor([rows], dtype=torch.float64)])
        dist.all_reduce(partial)  # the epoch's loss so far, over all ranks: independent of the world size
        progress.update(epoch=epoch, step=step, loss_sum=partial[:-1].tolist(), rows=float(partial[-1]),
                        history=history, run_id=tracker.run_id)  # fmt: skip
        dcheckpoint.save(run_dir, dmp, optimizer, dense_names, progress)

    # TorchRec's pipeline: batch i+1's sparse all-to-all overlaps batch i's forward and backward.
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    dmp.train()
    for epoch in range(progress["epoch"], tc.epochs):
        if progress["bad_epochs"] >= tc.patience:
            break
        first = progress["step"] if epoch == progress["epoch"] else 0
        # A resumed epoch continues the rows and loss it had counted (rank 0 holds the sums).
        loss_sum = torch.zeros(len(tasks), device=device)
        rows = 0.0
        if first and rank == 0:
            loss_sum += torch.tensor(progress["loss_sum"], device=device)
            rows = progress["rows"]
        n_seen, start = 0, time.perf_counter()
        order = epoch_order(len(train_share), tc.seed, epoch, rank)[:rows_per_rank]
        chunks = order.split(local_bs)[:steps]
        batches = (_table_batch(ranker, train_share.batch(idx)) for idx in chunks[first:])
        for step in range(first, len(chunks)):
            sums = pipeline.progress(batches)  # forward, backward (tables updated inside), Adam step
            loss_sum += sums
            rows += len(chunks[step])
            n_seen += len(chunks[step])
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(epoch, step + 1, loss_sum, rows)
        pipelined = [n for n, m in dmp.named_modules() if any(m is p for p in pipeline._pipelined_modules)]
        pipeline.detach()  # validation calls the ranker's own forward
        elapsed = time.perf_counter() - start
        stats = torch.cat([loss_sum.cpu().double(), torch.tensor([rows, float(n_seen)], dtype=torch.float64)])
        dist.all_reduce(stats)
        train_loss = stats[:-2] / max(float(stats[-2]), 1.0)
        rate = float(stats[-1]) / elapsed
        rates.append(rate)

        val = evaluate_sharded(model, valid_share, total["valid"], tc.eval_batch_size)
        record: dict[str, float] = {"epoch": epoch + 1, "train_samples_per_s": rate, "val_mean_score": val.score}
        record.update({f"train_{t}_loss": float(v) for t, v in zip(tasks, train_loss)})
        record.update(val.flat("val"))
        if weighting is not None:
            record.update({f"task_weight_{t}": float(w) for t, w in zip(tasks, weighting.weights())})
        history.append(record)
        improved = val.score > progress["best_score"]
        if improved:
            progress.update(best_score=val.score, best_epoch=epoch + 1, bad_epochs=0)
        else:
            progress["bad_epochs"] += 1
        weights = full_state_dict(dmp) if improved else None  # a collective: every rank takes part
        if rank == 0:
            tracker.log_metrics(val.gate_metrics(tasks, config.model.gate != "softmax"), step=epoch + 1)
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            line = "  ".join(f"{t} {m.get('auc', m.get('r2', float('nan'))):.4f}" for t, m in val.metrics.items())
            print(f"epoch {epoch + 1}: validation {line} | mean {val.score:.4f} | {rate:,.0f} samples/s "
                  f"({world} ranks)", flush=True)  # fmt: skip
            if weights is not None:
                checkpoint.save_weights(best_dir, weights, model_config)
        save_checkpoint(epoch + 1, 0, torch.zeros(len(tasks)), 0.0)
    best_epoch = progress["best_epoch"]
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)  # MiB
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    dist.barrier()
    if rank != 0:
        return None

    # The export, checked: loaded strictly into the single-process model and evaluated by it.
    weights, _ = checkpoint.load_weights(best_dir)
    plain = MultiTaskRanker(manifest, config.model, tc.tasks)
    plain.load_state_dict(weights)
    data = {s: InMemoryDataset.from_split(manifest, s, plain.sparse.keys, tasks) for s in ("valid", "test")}
    valid = evaluate(plain, data["valid"], tc.eval_batch_size)
    test = evaluate(plain, data["test"], tc.eval_batch_size)
    if manifest.root is not None:
        for rel in ["manifest.json", *manifest.vocab_files.values()]:
            (best_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.root / rel, best_dir / rel)
    _log_results(tracker, history, valid, test, tasks, plain.task_types, best_epoch, config.model.gate != "softmax")
    result = {
        "run_id": tracker.run_id, "tracking_uri": tracker.uri, "world_size": world, "device": device.type,
        "best_epoch": best_epoch, "history": history, "model_dir": str(best_dir),
        "valid": valid.metrics, "test": test.metrics, "plan": plan_rows(model.plan), "plan_summary": summary,
        "train_samples_per_s": float(np.median(rates)) if rates else math.nan, "tasks": tasks,
        "pipelined_modules": pipelined, "peak_rss_mib_per_rank": [float(p) for p in peaks],
        "weight_bytes_per_rank": weight_bytes_per_rank(
            model.plan, plan_tables(manifest.sparse_features, config.model.pack_tables_below).tables, world),
    }  # fmt: skip
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_moe.distributed.train")
    parser.add_argument("--data", required=True, help="dataset directory (or its manifest.json)")
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint dir's last/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.set)
    _, backend = _device()
    dist.init_process_group(backend)
    rank = dist.get_rank()
    manifest = Manifest.load(args.data)
    tracker = _tracker(config, manifest, rank, args.resume)
    try:
        result = train_distributed(manifest, config, tracker, resume=args.resume)
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    tracker.close()
    if result is not None:
        print(f"best epoch {result['best_epoch']}: " + "  ".join(
            f"{t} auc {m['auc']:.4f}" if "auc" in m else f"{t} r2 {m['r2']:.4f}" for t, m in result["valid"].items()
        ) + f" | model: {result['model_dir']}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
