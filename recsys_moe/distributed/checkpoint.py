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

Loading runs no code from the checkpoint: DCP keeps its index (`.metadata`) as a pickle, which
`SafeReader` unpickles with an allowlist of DCP's own metadata classes, and it accepts only tensor
entries stored in the checkpoint's own shard files (tensors are read with `weights_only=True`).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torchrec.distributed.model_parallel import DistributedModelParallel

from recsys_moe import atomic
from recsys_moe.training.checkpoint import (
    PROGRESS,
    CheckpointError,
    Progress,
    is_sharded,
    read_progress,
)
from recsys_moe.training.checkpoint import (
    SHARDED_METADATA as METADATA,
)

METADATA_LIMIT = 64 * 1024 * 1024  # an index this size would describe millions of tables
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
# Everything DCP's index holds: its dataclasses, torch sizes, dtypes and layouts, a path.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
        "BytesStorageMetadata",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", *(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint index refers to {module}.{name}, which a checkpoint never holds")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with an index that cannot run code (see the module's docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA
        if not path.is_file():
            raise CheckpointError(f"{self.path}: not a sharded checkpoint (no {METADATA})")
        if path.stat().st_size > METADATA_LIMIT:
            raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, over the limit of {METADATA_LIMIT:,}")
        try:
            with open(path, "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable checkpoint index ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a checkpoint index")
        for key, meta in metadata.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor, and this checkpoint holds only tensors")
        for info in (metadata.storage_data or {}).values():
            if not _SHARD_FILE.match(str(info.relative_path)):
                raise CheckpointError(f"{path}: a shard points outside the checkpoint ({info.relative_path!r})")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def _embedding_state(dmp: DistributedModelParallel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The fused optimizer's own state dict and the same tensors under layout names."""
    own = dmp.fused_optimizer.state_dict()
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
    dmp: DistributedModelParallel,
    optimizer: torch.optim.Optimizer,
    dense_names: list[str],
    progress: Progress,
) -> Path:
    """A collective: every rank calls it with the same progress; returns `last/`."""
    rank, target = dist.get_rank(), Path(run_dir) / "last"
    atomic.check_owned(target, PROGRESS)  # every rank, before any collective: all refuse alike
    # Rank 0 makes the staging directory (reclaiming one a kill left) and tells the others.
    where: list[Path | None] = [atomic.staging_dir(target, reclaim=True) if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    tmp = where[0]
    assert tmp is not None
    state: dict[str, Any] = {f"model.{k}": v for k, v in dmp.state_dict().items()}
    state.update(_embedding_state(dmp)[1])
    state.update(_dense_state(optimizer, dense_names, template=False))
    state[f"rng.rank{rank}"] = torch.get_rng_state()
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        atomic.write_text(tmp / PROGRESS, dataclasses.replace(progress, world_size=dist.get_world_size()).to_json())
        atomic.check_owned(target, PROGRESS)
        atomic.swap_in(tmp, target)
    dist.barrier()
    return target


def load(
    directory: Path, dmp: DistributedModelParallel, optimizer: torch.optim.Optimizer, dense_names: list[str]
) -> Progress:
    """Restore model, both optimizers and this rank's RNG in place; returns the progress."""
    if not is_sharded(directory):
        raise CheckpointError(f"{directory} was written by single-process training: resume it without --nproc")
    rank = dist.get_rank()
    reader = SafeReader(directory)
    stored = reader.read_metadata().state_dict_metadata
    model = {f"model.{k}": v for k, v in dmp.state_dict().items()}
    own, embedding = _embedding_state(dmp)
    dense = _dense_state(optimizer, dense_names, template=True)
    rng = {f"rng.rank{rank}": torch.get_rng_state()}
    missing = sorted(k for k in [*model, *embedding] if k not in stored)
    if missing:
        raise ValueError(
            f"{directory}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "was it written for another model config or spec?"
        )
    wanted = {**model, **embedding, **{k: v for k, v in {**dense, **rng}.items() if k in stored}}
    try:
        dcp.load(wanted, storage_reader=SafeReader(directory))
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated shard file, a foreign one
        raise CheckpointError(f"{directory}: a corrupt checkpoint ({type(exc).__name__}: {exc})"[:500]) from None

    dmp.load_state_dict({k.removeprefix("model."): v for k, v in model.items()})
    dmp.fused_optimizer.load_state_dict(own)
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
    stored = SafeReader(directory).read_metadata().state_dict_metadata
    out = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, storage_reader=SafeReader(directory), no_dist=True)
    return out
