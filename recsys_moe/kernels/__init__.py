"""Expert-block kernels: routed (top-k) and dense experts with their gate-weighted combine.

The torch paths live in `grouped` (any device). The Triton ones live in `triton_experts` and are
not imported here: triton decides between GPU and interpreter mode when the kernels are defined,
so the caller chooses when that import happens.
"""

from recsys_moe.kernels.grouped import Routing, dense_experts_combine, route, topk_experts_combine

__all__ = ["Routing", "dense_experts_combine", "route", "topk_experts_combine"]
