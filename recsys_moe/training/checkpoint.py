"""What a run writes to disk: the model bundle in `best/` and the resume point in `last/`.

`best/` is the bundle to ship, complete on its own: weights (safetensors), the model config
(JSON), the dataset's manifest and vocabularies. `last/` holds what a killed run needs to resume:
`progress.json` (epoch, step, early-stopping state, history) beside the tensors, either
single-process (`train_state.pt`, loaded with `weights_only=True`, so a checkpoint cannot run
code) or sharded (a `torch.distributed.checkpoint`, see `recsys_moe.distributed.checkpoint`).
Nothing is ever unpickled, and every directory is written beside its destination and swapped in
(`recsys_moe.atomic`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from recsys_moe import atomic
from recsys_moe.config import ModelConfig
from recsys_moe.model.ranker import MultiTaskRanker
from recsys_moe.pipelines.manifest import Manifest

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAIN_STATE = "train_state.pt"  # single-process optimizer states and RNG
PROGRESS = "progress.json"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index: a sharded checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed the way it was asked to."""


@dataclass
class Progress:
    """Where a run stands, besides its tensors: stored as `last/progress.json`."""

    epoch: int = 0  # epochs completed, i.e. the next epoch to run (0-based)
    step: int = 0  # steps already done inside `epoch` (sharded runs checkpoint mid-epoch)
    best_score: float = -math.inf
    best_epoch: int = -1  # 1-based; -1 before the first validation
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch
    loss_sum: list[float] = field(default_factory=list)  # the partial epoch's per-task loss sums
    rows: float = 0.0  # and the rows they cover
    run_id: str | None = None  # the MLflow run a resumed run keeps logging into
    world_size: int = 1

    @property
    def fresh(self) -> bool:
        return self.epoch == 0 and self.step == 0

    def improved(self, score: float, epoch: int) -> bool:
        """Record an epoch's validation score; True when it is the best so far (the first epoch
        always is, so there is a best model even when a split makes every score NaN)."""
        if score > self.best_score or self.best_epoch < 0:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


def read_progress(directory: Path) -> Progress:
    path = Path(directory) / PROGRESS
    try:
        if path.stat().st_size > 256 * 1024 * 1024:
            raise ValueError("over 256 MiB")
        return Progress.from_json(path.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def latest(run_dir: Path) -> Path | None:
    """The run's `last/` checkpoint (or its previous version, when a kill fell mid-swap)."""
    found = atomic.committed(Path(run_dir) / "last")
    return found if found is not None and (found / PROGRESS).is_file() else None


def check_run_dir(run_dir: Path) -> None:
    """Before training: best/ and last/ are absent, empty or a run's own (never a user's folder)."""
    atomic.check_owned(Path(run_dir) / "best", MODEL_CONFIG)
    atomic.check_owned(Path(run_dir) / "last", PROGRESS)


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / SHARDED_METADATA).exists()


def resume_run_id(run_dir: Path) -> str | None:
    """The MLflow run of the run's last checkpoint, for a resumed run to log into."""
    found = latest(run_dir)
    return read_progress(found).run_id if found is not None else None


# -- the bundle ------------------------------------------------------------------------------
def bundle_config(
    manifest: Manifest, model: ModelConfig, ranker: MultiTaskRanker, run_id: str | None
) -> dict[str, Any]:
    """`model_config.json`: how to rebuild the model and where it came from."""
    return {
        "model": model.model_dump(mode="json"),
        "tasks": ranker.task_names,
        "task_types": ranker.task_types,
        "sparse_keys": ranker.sparse.keys,
        "dense_features": manifest.dense_features,
        "spec_name": manifest.spec.name,
        "spec_hash": manifest.spec_hash,
        "dataset_digest": manifest.digest,
        "run_id": run_id,
    }


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_bundle(
    directory: Path, weights: dict[str, torch.Tensor], config: dict[str, Any], manifest: Manifest | None = None
) -> Path:
    """A model directory, whole: weights, config and (from a manifest loaded from disk) the
    manifest with its vocabularies, which scoring needs to encode raw rows."""
    with atomic.building(directory, MODEL_CONFIG, reclaim=True) as work:
        atomic.write_safetensors(weights, work / WEIGHTS)
        atomic.write_json(work / MODEL_CONFIG, config)
        if manifest is not None and manifest.root is not None:
            for rel in ["manifest.json", *manifest.vocab_files.values()]:
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(manifest.root / rel, work / rel)
    return directory


def load_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(directory / WEIGHTS)), json.loads((directory / MODEL_CONFIG).read_text())


# -- single-process resume point -------------------------------------------------------------
def save_train_state(
    directory: Path, model: nn.Module, config: dict[str, Any], state: dict[str, Any], progress: Progress
) -> None:
    """`last/`: the weights (a loadable model, like `best/`), optimizer states and RNG, progress."""
    with atomic.building(directory, PROGRESS, reclaim=True) as work:
        atomic.write_safetensors(state_tensors(model), work / WEIGHTS)
        atomic.write_json(work / MODEL_CONFIG, config)
        torch.save(state, work / TRAIN_STATE)
        atomic.write_text(work / PROGRESS, progress.to_json())


def load_train_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Progress]:
    if is_sharded(directory):
        raise CheckpointError(
            f"{directory} was written by sharded training on {read_progress(directory).world_size} rank(s); "
            "resume it with --nproc N (any N: the tables are resharded)"
        )
    progress = read_progress(directory)
    try:
        weights = load_file(str(directory / WEIGHTS))
        state = torch.load(directory / TRAIN_STATE, weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign files: say so in one line
        raise CheckpointError(
            f"{directory}: a corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "remove it to start over, or resume from a copy"
        ) from None
    return weights, state, progress
