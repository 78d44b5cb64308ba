"""torchrun worker for tests: load a sharded checkpoint on this world size and write it again.

torchrun --nproc-per-node N tests/reshard_worker.py DATA CONFIG SRC DST
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_moe.config import load_config
from recsys_moe.distributed import checkpoint
from recsys_moe.distributed.model import build_sharded
from recsys_moe.pipelines.manifest import Manifest


def main() -> None:
    data, config_path, src, dst = sys.argv[1:5]
    dist.init_process_group("gloo")
    config = load_config(config_path, [])
    model = build_sharded(Manifest.load(data), config, torch.device("cpu"), dist.get_world_size())
    dense = list(in_backward_optimizer_filter(model.dmp.named_parameters()))
    optimizer = torch.optim.Adam([p for _, p in dense], lr=config.train.lr)
    names = [n for n, _ in dense]
    progress = checkpoint.load(Path(src), model.dmp, optimizer, names)
    checkpoint.save(Path(dst), model.dmp, optimizer, names, progress)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
