"""Sharded training: TorchRec planner + DistributedModelParallel over N ranks (gloo on the CPU,
NCCL on CUDA), launched by `recsys-moe train --nproc N` through torchrun."""
