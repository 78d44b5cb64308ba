"""Weights as safetensors plus a JSON config, never pickles.

`best/` holds the model to ship (weights + model config + tasks); `last/` holds what a killed
run needs to resume (weights, optimizer states, epoch, history, RNG), loaded with
`weights_only=True` so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TRAIN_STATE = "train_state.pt"


def staging_dir(directory: Path) -> Path:
    """An empty sibling to write into; `commit_dir` swaps it in, so a kill never leaves half a checkpoint."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, directory: Path) -> None:
    """Replace `directory` by `tmp`. Between the two renames only `.<name>.old` exists: see `committed`."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def committed(directory: Path) -> Path | None:
    """The directory, or its previous version when a kill fell between `commit_dir`'s two renames."""
    old = directory.with_name(f".{directory.name}.old")
    return directory if directory.exists() else old if old.exists() else None


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(directory: Path, model: nn.Module, config: dict[str, Any]) -> Path:
    return save_weights(directory, state_tensors(model), config)


def save_weights(directory: Path, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """A model directory from a state dict already in hand (e.g. gathered from sharded tables)."""
    tmp = staging_dir(directory)
    save_file(weights, str(tmp / WEIGHTS))
    (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=1))
    commit_dir(tmp, directory)
    return directory


def load_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(directory / WEIGHTS)), json.loads((directory / MODEL_CONFIG).read_text())


def save_train_state(directory: Path, model: nn.Module, config: dict[str, Any], state: dict[str, Any]) -> None:
    tmp = staging_dir(directory)
    save_file(state_tensors(model), str(tmp / WEIGHTS))
    (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=1))
    torch.save(state, tmp / TRAIN_STATE)
    commit_dir(tmp, directory)


def load_train_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_file(str(directory / WEIGHTS))
    state = torch.load(directory / TRAIN_STATE, weights_only=True)
    return weights, state
