"""Single-process training: `train()` runs the shared loop (`loop.fit`) with `LocalEngine`, which
holds the model, its two optimizers and the three splits in memory."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys_moe.allocator import retain_freed_memory
from recsys_moe.config import RunConfig
from recsys_moe.data.id_dropout import drop_to_oov, oov_rates, step_generator
from recsys_moe.data.loader import InMemoryDataset
from recsys_moe.kernels import gemm
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest
from recsys_moe.threads import ThreadGovernor
from recsys_moe.tracking.tracker import NullTracker, Tracker
from recsys_moe.training import checkpoint
from recsys_moe.training.checkpoint import Progress
from recsys_moe.training.evaluation import Evaluation, evaluate
from recsys_moe.training.loop import EpochStats, ShardingInfo, TrainResult, fit
from recsys_moe.training.losses import UncertaintyWeighting, per_task_losses, task_weights, training_loss
from recsys_moe.training.optimizer import dense_optimizer
from recsys_moe.training.precision import use_bf16, warn_if_unused
from recsys_moe.training.schedule import LrSchedule, StepControl

log = logging.getLogger(__name__)


class LocalEngine:
    """One process: the ranker with FBGEMM's fused embedding optimizer, Adam for the rest, the
    splits decoded once into tensors, and a shuffle generator that checkpoints with the run."""

    is_main = True
    label = ""

    def __init__(self, manifest: Manifest, config: RunConfig, progress_bar: bool = True) -> None:
        tc = config.train
        retain_freed_memory()  # no page faults on every step's activations (recsys_moe/allocator.py)
        self.threads = ThreadGovernor(tc.threads)  # fixed, or what the host can give (re-checked while training)
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        self.config = config
        self.run_dir = config.run_dir(manifest.spec.name)
        fused = (tc.embedding_optimizer, {"lr": tc.embedding_lr})
        self.ranker = MultiTaskRanker(manifest, config.model, tc.tasks, fused_optimizer=fused)
        tasks = self.ranker.task_names
        self.weighting = UncertaintyWeighting(len(tasks)) if tc.task_weighting == "uncertainty" else None
        dense = [p for n, p in self.ranker.named_parameters() if not n.startswith("sparse.ebc.")]
        self.optimizer = dense_optimizer(dense + (list(self.weighting.parameters()) if self.weighting else []), tc)
        self.is_binary = torch.tensor([t == "binary" for t in self.ranker.task_types])
        self.loss_weights = task_weights(manifest, tasks)
        self.data: dict[str, InMemoryDataset] = {}
        for split in tqdm(("train", "valid", "test"), desc="load data", disable=not progress_bar, leave=False):
            self.data[split] = InMemoryDataset.from_split(manifest, split, self.ranker.sparse.keys, tasks)
        self.ranker.sparse.trust_ids()  # every id was checked as the splits loaded
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.oov_rates = oov_rates(manifest.spec, self.ranker.sparse.keys)
        self.steps = self.data["train"].num_batches(tc.batch_size)
        if tc.max_steps_per_epoch:
            self.steps = min(self.steps, tc.max_steps_per_epoch)
        self.control = StepControl(self.optimizer, LrSchedule.from_config(tc, self.steps))
        self.bf16 = use_bf16(tc.precision)
        # The first layer through the table rows (kernels/projected.py), where it applies and pays.
        self.rows_apply = (
            tc.first_layer_on_rows
            and self.ranker.trains_on_rows
            and self.ranker.sparse.rows_pay_off(tc.batch_size)
            and tc.embedding_l2 == 0  # the penalty reads the looked-up embeddings
        )
        self.extra_params: dict[str, Any] = {
            "parameters": sum(p.numel() for p in self.ranker.parameters()),
            "dense_products": "bf16" if self.bf16 else "fp32",  # asked for and the CPU has it
            "first_layer": "table rows" if self.on_rows else "lookup",  # see train.first_layer_on_rows
        }
        self.extra_tags: dict[str, str] = {}
        self.extra_files: list[tuple[Path, str]] = []
        self.ranker.train()

    @property
    def on_rows(self) -> bool:
        """Whether steps take the first layer through the table rows: where it applies, in fp32
        (bf16 products are the plain path's first-layer GEMMs)."""
        return self.rows_apply and not self.bf16

    def restore(self, found: Path) -> Progress:
        weights, state, progress = checkpoint.load_train_state(found)
        try:
            self.ranker.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
            self.ranker.sparse.fused_optimizer().load_state_dict(state["embedding_optimizer"])
            if self.weighting is not None:
                self.weighting.load_state_dict(state["task_weighting"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(
                f"{found} does not fit this model: was it written with another config or spec? "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
        log.info("resumed from %s at epoch %d", found, progress.epoch + 1)
        return progress

    def train_epoch(self, epoch: int, progress: Progress, bar: bool) -> EpochStats:
        """One pass over the shuffled training rows."""
        tc = self.config.train
        batches = self.data["train"].batches(tc.batch_size, shuffle=True, generator=self.generator)
        loss_sum, n_seen, start = torch.zeros(len(self.loss_weights)), 0, time.perf_counter()
        bf16_before = gemm.bf16_product_count()
        self.control.start(epoch * self.steps)
        desc = f"epoch {epoch + 1}/{tc.epochs}"
        with tqdm(total=self.steps, desc=desc, disable=not bar, unit="batch") as bars:  # closed even when stopped
            for step, batch in enumerate(batches):
                if step >= self.steps:
                    break
                self.threads.tick()
                if self.oov_rates is not None:
                    batch = drop_to_oov(batch, self.oov_rates, step_generator(tc.seed, epoch, step))
                rows, embeddings = None, None
                if self.on_rows:
                    out, rows = self.ranker.forward_rows(batch.sparse, batch.dense)
                else:
                    pooled = self.ranker.lookup(batch.sparse)
                    with gemm.bf16_products(self.bf16):  # the backward keeps what the forward used
                        out = self.ranker.from_pooled(pooled, batch.dense)
                    embeddings = pooled.values() if pooled is not None else None
                per_task = per_task_losses(out.logits, batch.labels, self.is_binary)
                loss = training_loss(
                    per_task,
                    self.loss_weights,
                    self.weighting,
                    out.gates,
                    tc.balance_loss_weight,
                    embeddings,
                    tc.embedding_l2,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # embedding rows are updated inside this call (fused optimizer)...
                if rows is not None:  # ...or here, when the lookup was not in the graph
                    self.ranker.sparse.update_rows(rows)
                self.optimizer.step()
                loss_sum += per_task.detach() * len(batch)
                n_seen += len(batch)
                if step % 50 == 0:
                    bars.set_postfix(loss=f"{loss.item():.4f}")
                bars.update(1)
        elapsed = time.perf_counter() - start
        if self.bf16 and n_seen:
            self.bf16 = warn_if_unused(bf16_before)  # once: a model without bf16 products stays fp32
        return EpochStats(loss=(loss_sum / max(n_seen, 1)).tolist(), samples_per_s=n_seen / elapsed)

    def validate(self) -> Evaluation:
        tc = self.config.train
        return evaluate(self.ranker, self.data["valid"], tc.eval_batch_size, tc.selection_metric)

    def best_weights(self) -> dict[str, torch.Tensor]:
        return checkpoint.state_tensors(self.ranker)

    def save_last(self, progress: Progress, bundle: dict[str, Any]) -> None:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "embedding_optimizer": self.ranker.sparse.fused_optimizer().state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "task_weighting": self.weighting.state_dict() if self.weighting is not None else {},
        }
        checkpoint.save_train_state(self.run_dir / "last", self.ranker, bundle, state, progress)

    def finish(self) -> ShardingInfo | None:
        return None

    def final_model(self, weights: dict[str, torch.Tensor]) -> MultiTaskRanker:
        self.ranker.load_state_dict(weights)
        return self.ranker

    def holdout(self, split: str) -> InMemoryDataset:
        return self.data[split]


def train(
    manifest: Manifest,
    config: RunConfig,
    tracker: Tracker | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainResult:
    """Train in this process; `resume` continues from the run directory's `last/` checkpoint."""
    engine = LocalEngine(manifest, config, progress)
    result = fit(engine, manifest, config, tracker or NullTracker(), resume=resume, progress_bar=progress)
    assert result is not None  # one process is the main rank
    return result
