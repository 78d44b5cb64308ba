"""`recsys-moe train --nproc N [--nnodes M --rdzv-endpoint HOST:PORT]`: the same training under
torchrun, N ranks on this host (and on each of M hosts).

The resolved run config is written beside the checkpoints and handed to every rank, so all ranks
(and a later reader) see exactly the config this launch resolved; rank 0 writes the result. On
several nodes every node runs the same command with the same run directory and dataset on shared
storage; the ranks meet through a c10d rendezvous at the endpoint (a port on one of the nodes),
and only the node whose torchrun started rank 0 gets the result (a token in its environment,
written back by rank 0, says which).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from recsys_moe import atomic
from recsys_moe.config import RunConfig
from recsys_moe.distributed.train import CONFIG_ENV, RESULT_FILE, TOKEN_ENV
from recsys_moe.training.loop import TrainResult

CONFIG_FILE = "distributed_config.yaml"


@dataclass(frozen=True)
class Nodes:
    """Where the nodes of a multi-node run meet: torchrun's c10d rendezvous."""

    count: int
    endpoint: str  # HOST:PORT on one of the nodes, the same on every node
    run_id: str = "recsys-moe"  # the rendezvous id, the same on every node

    def __post_init__(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        if self.count < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.count}")
        if not host or not port.isdigit():
            raise ValueError(f"--rdzv-endpoint {self.endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29400")

    def torchrun_args(self) -> list[str]:
        return [
            f"--nnodes={self.count}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
        ]


def torchrun_command(
    data: str | Path, config_path: Path, nproc: int, resume: bool = False, nodes: Nodes | None = None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "recsys_moe.distributed.agent",  # torchrun, ended when this launcher dies
        *(nodes.torchrun_args() if nodes is not None else ["--standalone"]),
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
    nodes: Nodes | None = None,
    token: str | None = None,
) -> subprocess.Popen:
    """Start torchrun with N ranks in a new process group (so it can be stopped as one) and return.
    `token`: what rank 0 writes into the result if it runs under this launch."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    config = config.model_copy(deep=True)
    config.train.checkpoint_dir = run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    # The run's record. On several nodes every launcher writes it (an atomic replace), so each hands
    # its own ranks its own config in the environment too: a node started with other settings is
    # then caught by the ranks' agreement check instead of silently taking the last node's file.
    atomic.write_text(config_path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    if nodes is None:  # on several nodes the others' ranks may already be running: leave it to rank 0
        (run_dir / RESULT_FILE).unlink(missing_ok=True)
    child_env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
        **({TOKEN_ENV: token} if token else {}),
        CONFIG_ENV: config.model_dump_json(),
    }
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen(
        torchrun_command(data, config_path, nproc, resume, nodes),
        env=child_env,
        stdout=pipe,
        stderr=pipe,
        text=True,
        start_new_session=True,
    )


def read_result(run_dir: Path, token: str) -> TrainResult | None:
    """Rank 0's result in `run_dir`, if rank 0 ran under the launch that holds `token`."""
    try:
        raw = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if raw.pop("launch_token", None) != token:
        return None
    return TrainResult.from_json(raw)


def launch(
    data: str | Path,
    config: RunConfig,
    nproc: int,
    run_dir: Path,
    env: dict[str, str] | None = None,
    capture: bool = False,
    resume: bool = False,
    nodes: Nodes | None = None,
) -> tuple[subprocess.CompletedProcess, TrainResult | None]:
    """Run N ranks to completion; returns the process and rank 0's result (None if it failed, or
    if rank 0 ran on another node)."""
    token = uuid.uuid4().hex
    proc = start(data, config, nproc, run_dir, env, capture, resume, nodes, token)
    try:
        out, err = proc.communicate()
    except BaseException:  # Ctrl-C: stop every rank, not just torchrun
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    # Rank 0's result, as the TrainResult single-process training returns: registering a sharded
    # run needs no special case.
    return done, read_result(run_dir, token) if proc.returncode == 0 else None
