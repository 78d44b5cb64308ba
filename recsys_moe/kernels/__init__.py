"""Expert-block kernels: routed (top-k) and dense experts with their gate-weighted combine.

The torch paths live in `dense` and `grouped` (any device), and `projected` (the dense block with
its first layer taken through a small embedding table's rows, for CPU training); the model blocks
sit on top of them and nothing here imports the model. The Triton ones live in `triton_experts` and are
not imported here: triton decides between GPU and interpreter mode when the kernels are defined,
so the caller chooses when that import happens.
"""

from recsys_moe.kernels.dense import combine, dense_experts_combine, stacked_mlp
from recsys_moe.kernels.grouped import Routing, route, topk_experts_combine

__all__ = ["Routing", "combine", "dense_experts_combine", "route", "stacked_mlp", "topk_experts_combine"]
