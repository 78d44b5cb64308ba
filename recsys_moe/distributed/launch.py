"""`recsys-moe train --nproc N`: the same training under torchrun, N ranks on this host.

The resolved run config is written beside the checkpoints and handed to every rank, so all ranks
(and a later reader) see exactly the config this launch resolved; rank 0 writes the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from recsys_moe import atomic
from recsys_moe.config import RunConfig
from recsys_moe.distributed.train import RESULT_FILE
from recsys_moe.training.loop import TrainResult

CONFIG_FILE = "distributed_config.yaml"


def torchrun_command(data: str | Path, config_path: Path, nproc: int, resume: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recsys_moe.distributed.train",
        "--data",
        str(data),
        "--config",
        str(config_path),
        *(["--resume"] if resume else []),
    ]


def start(
    data: str | Path,
    config: RunConfig,
    nproc: int,
    run_dir: Path,
    env: dict[str, str] | None = None,
    capture: bool = False,
    resume: bool = False,
) -> subprocess.Popen:
    """Start torchrun with N ranks in a new process group (so it can be stopped as one) and return."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    config = config.model_copy(deep=True)
    config.train.checkpoint_dir = run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    atomic.write_text(config_path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen(
        torchrun_command(data, config_path, nproc, resume),
        env=child_env,
        stdout=pipe,
        stderr=pipe,
        text=True,
        start_new_session=True,
    )


def launch(
    data: str | Path,
    config: RunConfig,
    nproc: int,
    run_dir: Path,
    env: dict[str, str] | None = None,
    capture: bool = False,
    resume: bool = False,
) -> tuple[subprocess.CompletedProcess, TrainResult | None]:
    """Run N ranks to completion; returns the process and rank 0's result (None if it failed)."""
    proc = start(data, config, nproc, run_dir, env, capture, resume)
    try:
        out, err = proc.communicate()
    except BaseException:  # Ctrl-C: stop every rank, not just torchrun
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result_path = run_dir / RESULT_FILE
    ok = proc.returncode == 0 and result_path.exists()
    # Rank 0's result, as the TrainResult single-process training returns: registering a sharded
    # run needs no special case.
    return done, TrainResult.from_json(json.loads(result_path.read_text())) if ok else None
