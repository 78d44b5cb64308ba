"""N independent MLPs held as stacked weights, run as one GEMM plus batched GEMMs.

Experts and task towers are both "the same MLP shape, N times". A Python loop over N small
`nn.Linear`s spends its time in dispatch; stacking turns the first layer on a shared input into a
single [B, d] x [d, N*h] GEMM and every deeper layer into one `baddbmm`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from recsys_moe.kernels.dense import stacked_mlp


class StackedMLP(nn.Module):
    """`num` MLPs with layer sizes `d_in → hidden[0] → ... → hidden[-1]`.

    Input [B, d_in] (shared by all) or [num, B, d_in] (one per MLP); output [num, B, hidden[-1]].
    ReLU follows every layer but the last unless `activate_last`.
    """

    def __init__(
        self, num: int, d_in: int, hidden: Sequence[int], activate_last: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        dims = [d_in, *hidden]
        self.num, self.d_in = num, d_in
        self.activate_last = activate_last
        self.dropout = dropout
        # Layer 0 is stored [d_in, num, h] so that on a shared input it is one [d_in, num*h]
        # matrix with no copy; deeper layers are [num, h_in, h_out] for baddbmm.
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(d_in, num, dims[1]))]
            + [nn.Parameter(torch.empty(num, dims[i], dims[i + 1])) for i in range(1, len(hidden))]
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num, 1, dims[i + 1])) for i in range(len(hidden)))
        self.reset_parameters()

    def layer_weight(self, i: int) -> torch.Tensor:
        """Layer i's weights as [num, d_in, d_out] (a view)."""
        return self.weights[0].permute(1, 0, 2) if i == 0 else self.weights[i]

    def reset_parameters(self) -> None:
        for i, b in enumerate(self.biases):
            w = self.layer_weight(i)
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default init, per MLP
            nn.init.uniform_(w, -math.sqrt(3.0) * bound, math.sqrt(3.0) * bound)  # kaiming_uniform(a=sqrt(5))
            nn.init.uniform_(b, -bound, bound)

    @property
    def drops(self) -> bool:
        """Whether a forward now applies dropout. The fused expert blocks (`kernels.dense`) have
        none, so MMoE, OMoE and PLE run this module's own forward while it is true."""
        return self.training and self.dropout > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stacked_mlp(
            x, list(self.weights), list(self.biases), self.activate_last, self.dropout if self.training else 0.0
        )
