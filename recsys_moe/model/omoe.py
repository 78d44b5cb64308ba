"""OMoE: MMoE's experts with a single gate shared by all tasks (the MMoE paper's ablation).

Every task sees the same mixture of experts, so it shows how much MMoE gains from letting each
task route for itself.
"""

from __future__ import annotations

from typing import Any

from recsys_moe.model.mmoe import MMoE


def OMoE(d_in: int, num_tasks: int, **kwargs: Any) -> MMoE:  # noqa: N802 (reads like a class)
    return MMoE(d_in, num_tasks, num_gates=1, **kwargs)
