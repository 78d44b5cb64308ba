"""One rank of sharded training; run by torchrun (`recsys-moe train --nproc N` starts it):

    torchrun --standalone --nproc-per-node 2 -m recsys_moe.distributed.train --data DIR --config RUN.yaml

The loop is single-process training's (`recsys_moe.training.loop.fit`); `ShardedEngine` supplies
what differs:

* `train.batch_size` is the global batch: each rank takes `batch_size // world_size` rows per step,
  so a step sees as many rows as a single-process step and an epoch has as many steps.
* Each rank reads its own contiguous slice of the training rows and shuffles it per epoch; all
  ranks run the same number of steps (the smallest share).
* Validation: each rank scores a contiguous slice; scores and labels are all-gathered, so
  per-task AUC / logloss / R² are computed on all rows, exactly, and every rank sees the same
  numbers (early stopping agrees across ranks).
* Rank 0 alone talks to MLflow, prints, and writes best/: the sharded tables gathered into the
  single-process state dict, loadable by `MultiTaskRanker` and `recsys_moe.scoring.Scorer`.
* The final valid/test metrics are computed on rank 0 from the exported best/ model by the
  single-process `evaluate`, which also checks that the export loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
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

from recsys_moe import atomic, logs
from recsys_moe.config import RunConfig, load_config, set_field, validated
from recsys_moe.data.id_dropout import drop_to_oov, oov_rates, step_generator
from recsys_moe.data.loader import Batch, InMemoryDataset
from recsys_moe.distributed import checkpoint as dcheckpoint
from recsys_moe.distributed.model import ShardedRanker, build_sharded, full_state_dict
from recsys_moe.distributed.plan import plan_rows, plan_summary, weight_bytes_per_rank
from recsys_moe.kernels import gemm
from recsys_moe.model.embeddings import plan_tables
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.signals import die_with_parent, terminate_as_interrupt
from recsys_moe.tracking.tracker import NullTracker, Tracker, open_tracker
from recsys_moe.training import checkpoint
from recsys_moe.training.checkpoint import Progress
from recsys_moe.training.evaluation import Evaluation, GateSums, per_task_metrics
from recsys_moe.training.loop import EpochStats, ShardingInfo, TrainResult, fit
from recsys_moe.training.optimizer import dense_optimizer
from recsys_moe.training.precision import use_bf16, warn_if_unused
from recsys_moe.training.schedule import LrSchedule, StepControl

log = logging.getLogger(__name__)

PLAN_FILE = "sharding_plan.json"
RESULT_FILE = "distributed_result.json"
TOKEN_ENV = "RECSYS_MOE_LAUNCH_TOKEN"  # set by a launcher for its ranks; rank 0 writes it into the result
CONFIG_ENV = "RECSYS_MOE_RUN_CONFIG"  # the launcher's run config (JSON), preferred to --config's file


def read_share(
    manifest: Manifest, split: str, keys: list[str], tasks: list[str], rank: int, world: int
) -> InMemoryDataset:
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


def _all_gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate a [n_r, ...] tensor over ranks, in rank order (n_r may differ by rank), on the CPU."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).cpu()


def evaluate_sharded(
    model: ShardedRanker,
    share: InMemoryDataset,
    total_rows: int,
    batch_size: int,
    device: torch.device,
    selection: str = "auc",
) -> Evaluation:
    """Exact per-task metrics over all ranks' slices. A collective: every rank runs the same
    number of forward passes (the sharded lookup exchanges embeddings with every rank)."""
    ranker, dmp = model.ranker, model.dmp
    world = dist.get_world_size()  # the ranker is called directly: no DDP needed without gradients
    per_rank = -(-total_rows // world)  # the largest share
    n_batches = max(-(-per_rank // batch_size), 1)
    was_training = dmp.training
    dmp.eval()
    logits, gates = [], GateSums()
    try:
        with torch.no_grad():  # not inference_mode: FBGEMM's CPU lookup rejects inference tensors
            for idx in torch.arange(len(share)).tensor_split(n_batches):
                batch = share.batch(idx).to(device)
                out = ranker(batch.dense, batch.sparse)
                logits.append(out.logits)
                gates.add(out.gate_weights)
    finally:
        dmp.train(was_training)
    local = torch.cat(logits) if logits else torch.zeros(0, len(ranker.task_names), device=device)
    scores = ranker.scores(_all_gather_rows(local.float(), device))
    labels = _all_gather_rows(share.labels.to(device), device)
    if gates.totals is not None:
        for total in gates.totals:
            dist.all_reduce(total)
    groups = _all_gather_rows(share.groups.to(device), device) if share.groups is not None else None
    metrics = per_task_metrics(scores, labels, ranker.task_names, ranker.task_types, groups, selection)
    return gates.evaluation(metrics, labels.shape[0], scores)


def device_and_backend() -> tuple[torch.device, str]:
    """One GPU per rank with NCCL where there are GPUs, else the CPU with gloo."""
    if torch.cuda.is_available() and os.environ.get("RECSYS_MOE_FORCE_CPU") != "1":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


class ShardedEngine:
    """N ranks: the ranker's tables sharded by DistributedModelParallel, each rank on its share
    of the rows, TorchRec's pipeline overlapping the next batch's all-to-all, DCP checkpoints."""

    def __init__(self, manifest: Manifest, config: RunConfig) -> None:
        tc = config.train
        if not manifest.sparse_features:
            raise ValueError(
                f"spec {manifest.spec.name!r} has no sparse features: there are no embedding tables to shard, "
                "so train it in one process (recsys-moe train without --nproc)"
            )
        self.manifest, self.config = manifest, config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.label = f" ({self.world} ranks)"
        self.device, _ = device_and_backend()
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.run_dir = config.run_dir(manifest.spec.name)

        self.model = build_sharded(manifest, config, self.device, self.world)
        self.ranker, self.dmp = self.model.ranker, self.model.dmp
        self.weighting = self.model.step.weighting
        self.plan = plan_rows(self.model.plan)
        self.plan_summary = plan_summary(self.model.plan)
        if self.is_main:
            print(f"sharding plan ({self.world} ranks, {self.device.type}):\n{self.plan_summary}", flush=True)
            atomic.write_json(self.run_dir / PLAN_FILE, self.plan)
        self.bf16 = use_bf16(tc.precision, self.device)
        self.extra_params: dict[str, Any] = {
            "world_size": self.world,
            "backend": dist.get_backend(),
            "dense_products": "bf16" if self.bf16 else "fp32",
            **{f"plan.{r['table']}": f"{r['sharding']}:{r['ranks']}" for r in self.plan},
        }
        self.extra_tags = {"distributed": f"{self.world}x{self.device.type}"}
        self.extra_files = [(self.run_dir / PLAN_FILE, "sharding")]

        # Dense parameters (and data-parallel tables) under Adam; sharded tables carry their fused optimizer.
        dense = list(in_backward_optimizer_filter(self.dmp.named_parameters()))
        self.dense_names = [n for n, _ in dense]
        self.optimizer = dense_optimizer([p for _, p in dense], tc)

        keys, tasks = self.ranker.sparse.keys, self.ranker.task_names
        self.train_share = read_share(manifest, "train", keys, tasks, self.rank, self.world)
        self.valid_share = read_share(manifest, "valid", keys, tasks, self.rank, self.world)
        self.valid_rows = manifest.splits["valid"].rows_out
        self.local_batch = max(tc.batch_size // self.world, 1)
        self.rows_per_rank = manifest.splits["train"].rows_out // self.world  # the smallest share
        self.steps = -(-self.rows_per_rank // self.local_batch)
        if tc.max_steps_per_epoch:
            self.steps = min(self.steps, tc.max_steps_per_epoch)
        self.control = StepControl(self.optimizer, LrSchedule.from_config(tc, self.steps))
        self.pipeline: TrainPipelineSparseDist | None = None  # made after a restore, at the first epoch
        self.pipelined: list[str] = []
        self.dmp.train()

    def restore(self, found: Path) -> Progress:
        progress = dcheckpoint.load(found, self.dmp, self.optimizer, self.dense_names)
        if self.is_main:
            print(
                f"resumed {found} (written by {progress.world_size} ranks) at epoch {progress.epoch + 1}, "
                f"step {progress.step}",
                flush=True,
            )
        return progress

    def train_epoch(self, epoch: int, progress: Progress, bar: bool) -> EpochStats:
        tc, tasks = self.config.train, self.ranker.task_names
        first = progress.step if epoch == progress.epoch else 0
        # A resumed epoch continues the rows and loss it had counted (rank 0 holds the sums).
        loss_sum = torch.zeros(len(tasks), device=self.device)
        rows = 0.0
        if first and self.is_main:
            loss_sum += torch.tensor(progress.loss_sum, device=self.device)
            rows = progress.rows
        if self.pipeline is None:
            # TorchRec's pipeline: batch i+1's sparse all-to-all overlaps batch i's forward and backward.
            self.pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device, execute_all_batches=True)
        n_seen, start = 0, time.perf_counter()
        bf16_before = gemm.bf16_product_count()
        self.control.start(epoch * self.steps + first)
        order = epoch_order(len(self.train_share), tc.seed, epoch, self.rank)[: self.rows_per_rank]
        chunks = order.split(self.local_batch)[: self.steps]
        rates = oov_rates(self.manifest.spec, self.ranker.sparse.keys)

        def batch(step: int) -> Batch:
            b = self.train_share.batch(chunks[step])
            if rates is not None:
                b = drop_to_oov(b, rates, step_generator(tc.seed, epoch, step, self.rank))
            return _table_batch(self.ranker, b)

        batches = (batch(step) for step in range(first, len(chunks)))
        for step in range(first, len(chunks)):
            with gemm.bf16_products(self.bf16):
                loss_sum += self.pipeline.progress(batches)  # forward, backward (tables updated inside), Adam step
            rows += len(chunks[step])
            n_seen += len(chunks[step])
            if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < self.steps:
                partial = self._all_sum(loss_sum, rows)  # the epoch's loss so far, over all ranks
                self.save_last(
                    dataclasses.replace(
                        progress, epoch=epoch, step=step + 1, loss_sum=partial[:-1].tolist(), rows=float(partial[-1])
                    )
                )
        self.pipelined = [
            n for n, m in self.dmp.named_modules() if any(m is p for p in self.pipeline._pipelined_modules)
        ]
        self.pipeline.detach()  # validation calls the ranker's own forward
        elapsed = time.perf_counter() - start
        if self.bf16 and n_seen:
            self.bf16 = warn_if_unused(bf16_before)
        stats = self._all_sum(loss_sum, rows, float(n_seen))
        return EpochStats(
            loss=(stats[:-2] / max(float(stats[-2]), 1.0)).tolist(), samples_per_s=float(stats[-1]) / elapsed
        )

    def _all_sum(self, sums: torch.Tensor, *counts: float) -> torch.Tensor:
        """[per-task sums..., counts...] summed over ranks, float64 on the CPU."""
        both = torch.cat([sums.double(), torch.tensor(counts, dtype=torch.float64, device=sums.device)])
        dist.all_reduce(both)
        return both.cpu()

    def validate(self) -> Evaluation:
        tc = self.config.train
        return evaluate_sharded(
            self.model, self.valid_share, self.valid_rows, tc.eval_batch_size, self.device, tc.selection_metric
        )

    def best_weights(self) -> dict[str, torch.Tensor] | None:
        return full_state_dict(self.dmp)

    def save_last(self, progress: Progress, bundle: dict[str, Any] | None = None) -> None:
        """A DCP checkpoint of every rank's tensors (the bundle config is for best/ only)."""
        dcheckpoint.save(self.run_dir, self.dmp, self.optimizer, self.dense_names, progress)

    def finish(self) -> ShardingInfo | None:
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)  # MiB
        peaks = [torch.zeros_like(peak) for _ in range(self.world)]
        dist.all_gather(peaks, peak)
        dist.barrier()
        if not self.is_main:
            return None
        tables = plan_tables(self.manifest.sparse_features, self.config.model.pack_tables_below).tables
        return ShardingInfo(
            world_size=self.world,
            device=self.device.type,
            plan=self.plan,
            plan_summary=self.plan_summary,
            pipelined_modules=self.pipelined,
            peak_rss_mib_per_rank=[float(p) for p in peaks],
            weight_bytes_per_rank=weight_bytes_per_rank(self.model.plan, tables, self.world),
        )

    def final_model(self, weights: dict[str, torch.Tensor]) -> MultiTaskRanker:
        """The export, checked: loaded strictly into the single-process model."""
        plain = MultiTaskRanker(self.manifest, self.config.model, self.config.train.tasks)
        plain.load_state_dict(weights)
        return plain

    def holdout(self, split: str) -> InMemoryDataset:
        keys, tasks = self.ranker.sparse.keys, self.ranker.task_names
        return InMemoryDataset.from_split(self.manifest, split, keys, tasks)


def train_distributed(
    manifest: Manifest, config: RunConfig, tracker: Tracker | None = None, resume: bool = False
) -> TrainResult | None:
    """Train on every rank of the initialised process group; rank 0 returns the result."""
    engine = ShardedEngine(manifest, config)
    return fit(engine, manifest, config, tracker or NullTracker(), resume=resume, progress_bar=False)


def run_config(path: str | None, overrides: list[str]) -> RunConfig:
    """The config this rank's launcher resolved (`CONFIG_ENV`), else the `--config` file; then `--set`."""
    given = os.environ.get(CONFIG_ENV)
    if not given:
        return load_config(path, overrides)
    raw = json.loads(given)
    for assignment in overrides:
        set_field(raw, assignment)
    return validated(RunConfig, raw, f"${CONFIG_ENV}", "run config")


def check_ranks_agree(config: RunConfig, manifest: Manifest) -> None:
    """Every rank, on every node, trains one config on one dataset: nodes launched with different
    settings, or reading different copies of the data, fail here rather than train a mixture."""
    fields = config.model_dump(mode="json", exclude={"train": {"checkpoint_dir"}})
    mine = hashlib.sha256(json.dumps([fields, manifest.digest], sort_keys=True).encode()).hexdigest()
    seen: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if len(set(seen)) > 1:
        groups: dict[str | None, list[int]] = {}
        for rank, digest in enumerate(seen):
            groups.setdefault(digest, []).append(rank)
        raise RuntimeError(
            "the ranks were started with different run configs or datasets (ranks grouped by what they saw: "
            f"{sorted(groups.values())}); start every node with the same command, data and checkpoint directory"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_moe.distributed.train")
    parser.add_argument("--data", required=True, help="dataset directory (or its manifest.json)")
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint dir's last/")
    args = parser.parse_args(argv)
    die_with_parent()  # a rank whose torchrun agent was killed stops too (see signals.die_with_parent)
    config = run_config(args.config, args.set)
    _, backend = device_and_backend()
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if rank == 0:
        logs.setup()
    else:
        logging.basicConfig(level=logging.WARNING)
    manifest = Manifest.load(args.data)
    check_ranks_agree(config, manifest)
    run_dir = config.run_dir(manifest.spec.name)
    run_id = checkpoint.resume_run_id(run_dir) if args.resume else None
    tracker = (
        open_tracker(config.tracking, manifest.spec.name, config.model.arch, run_id) if rank == 0 else NullTracker()
    )
    try:
        with terminate_as_interrupt(), tracker:  # torchrun forwards SIGTERM: the run ends KILLED
            result = train_distributed(manifest, config, tracker, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None:
        atomic.write_json(run_dir / RESULT_FILE, {**result.to_json(), "launch_token": os.environ.get(TOKEN_ENV)})
        summary = "  ".join(
            f"{t} auc {m['auc']:.4f}" if "auc" in m else f"{t} r2 {m['r2']:.4f}"
            for t, m in result.valid.metrics.items()
        )
        print(f"best epoch {result.best_epoch}: {summary} | model: {result.model_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
