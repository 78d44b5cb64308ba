"""Checkpoints of sharded training, written with torch.distributed.checkpoint (DCP) in one layout
that depends on neither the world size nor the plan, so a run saved on 2 ranks resumes on 1 and
the other way round:

    model.<param>                     every parameter; sharded tables as ShardedTensors
    embedding_optim.<table>.<state>   the fused embedding optimizer (FBGEMM's momentum1, ...)
    dense_optim.<param>.<state>       Adam's state keyed by parameter name, not by position
    rng.rank<r>                       rank r's torch RNG, restored on rank r when there is one
    progress.json                     epoch, step, best score, history, partial epoch loss

DCP writes every rank's shards in parallel and reshards on load: each rank reads only the pieces
that its tables hold under the new plan (TorchRec has no ready utility for this). A checkpoint is
written to `.last.tmp/` and renamed to `last/` once every rank has finished, so a kill at any
moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recsys_moe.training.checkpoint import commit_dir, committed, staging_dir

PROGRESS = "progress.json"
METADATA = ".metadata"  # DCP's index of what every rank wrote


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / METADATA).exists() and (directory / PROGRESS).exists()


def latest(run_dir: Path) -> Path | None:
    """`last/` of a run, if it holds a sharded checkpoint."""
    found = committed(run_dir / "last")
    return found if found is not None and is_sharded_checkpoint(found) else None


def read_progress(directory: Path) -> dict[str, Any]:
    return json.loads((directory / PROGRESS).read_text())


def _embedding_state(dmp: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The fused optimizer's own state dict and the same tensors under layout names."""
    own = dmp.fused_optimizer.state_dict()  # type: ignore[operator,union-attr]
    flat = {}
    for param_key, states in own["state"].items():
        table = param_key.removesuffix(".weight").rsplit(".", 1)[-1]
        for name, tensor in states.items():
            flat[f"embedding_optim.{table}.{name.rsplit('.', 1)[-1]}"] = tensor
    return own, flat


def _dense_state(optimizer: torch.optim.Optimizer, names: list[str], template: bool) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state under parameter names; `template` allocates it for loading."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len(names), "one name per optimized parameter"
    out = {}
    for name, p in zip(names, params):
        state = optimizer.state.get(p, {})
        if template:
            state = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for key, value in state.items():
            out[f"dense_optim.{name}.{key}"] = value
    return out


def save(
    run_dir: Path,
    dmp: nn.Module,
    optimizer: torch.optim.Optimizer,
    dense_names: list[str],
    progress: dict[str, Any],
) -> Path:
    """A collective: every rank calls it with the same progress; returns `last/`."""
    rank, target = dist.get_rank(), run_dir / "last"
    tmp = target.with_name(f".{target.name}.tmp")
    if rank == 0:
        staging_dir(target)
    dist.barrier()
    state: dict[str, Any] = {f"model.{k}": v for k, v in dmp.state_dict().items()}
    state.update(_embedding_state(dmp)[1])
    state.update(_dense_state(optimizer, dense_names, template=False))
    state[f"rng.rank{rank}"] = torch.get_rng_state()
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        (tmp / PROGRESS).write_text(json.dumps({**progress, "world_size": dist.get_world_size()}, indent=1))
        commit_dir(tmp, target)
    dist.barrier()
    return target


def load(directory: Path, dmp: nn.Module, optimizer: torch.optim.Optimizer, dense_names: list[str]) -> dict[str, Any]:
    """Restore model, both optimizers and this rank's RNG in place; returns the progress."""
    rank = dist.get_rank()
    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    model = {f"model.{k}": v for k, v in dmp.state_dict().items()}
    own, embedding = _embedding_state(dmp)
    dense = _dense_state(optimizer, dense_names, template=True)
    rng = {f"rng.rank{rank}": torch.get_rng_state()}
    missing = sorted(k for k in [*model, *embedding] if k not in stored)
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "was it written for another model config or spec?")  # fmt: skip
    wanted = {**model, **embedding, **{k: v for k, v in {**dense, **rng}.items() if k in stored}}
    dcp.load(wanted, checkpoint_id=directory)

    dmp.load_state_dict({k.removeprefix("model."): v for k, v in model.items()})
    dmp.fused_optimizer.load_state_dict(own)  # type: ignore[operator,union-attr]
    restored = {}
    for i, name in enumerate(dense_names):
        keys = {s: f"dense_optim.{name}.{s}" for s in ("step", "exp_avg", "exp_avg_sq")}
        if all(k in stored for k in keys.values()):
            restored[i] = {s: wanted[k] for s, k in keys.items()}
    optimizer.load_state_dict({"state": restored, "param_groups": optimizer.state_dict()["param_groups"]})
    if f"rng.rank{rank}" in stored:
        torch.set_rng_state(wanted[f"rng.rank{rank}"])
    return read_progress(directory)


def load_full(directory: Path) -> dict[str, torch.Tensor]:
    """Every entry of a sharded checkpoint as one full tensor, in this process, without a process
    group: how to inspect a checkpoint or take its `model.*` weights into single-process code."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    out = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, checkpoint_id=directory, no_dist=True)
    return out
