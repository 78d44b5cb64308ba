"""`recsys-moe train --nproc N`: the same training under torchrun, N ranks on this host.

The resolved run config is written beside the checkpoints and handed to every rank, so all ranks
(and a later reader) see exactly the config this launch resolved; rank 0 writes the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from recsys_moe.config import RunConfig
from recsys_moe.distributed.train import RESULT_FILE

CONFIG_FILE = "distributed_config.yaml"


def torchrun_command(data: str | Path, config_path: Path, nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "recsys_moe.distributed.train", "--data", str(data), "--config", str(config_path),
    ]  # fmt: skip


def launch(data: str | Path, config: RunConfig, nproc: int, run_dir: Path, env: dict[str, str] | None = None,
           capture: bool = False) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:  # fmt: skip
    """Run N ranks to completion; returns the process and rank 0's result (None if it failed)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    config = config.model_copy(deep=True)
    config.train.checkpoint_dir = run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    proc = subprocess.run(torchrun_command(data, config_path, nproc), env=child_env, capture_output=capture,
                          text=True, check=False)  # fmt: skip
    result_path = run_dir / RESULT_FILE
    result = json.loads(result_path.read_text()) if proc.returncode == 0 and result_path.exists() else None
    return proc, result
