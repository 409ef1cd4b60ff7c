"""Floors that a learned map must beat to have learned anything, beside ``EmbeddingMetrics``' identity, mean
and ridge: ``offset`` (the input plus a fitted multiple of the mean training target: what a model that learned
"identity plus a constant" scores) and ``mlp`` (a one-hidden-layer MLP with a skip path, as many parameters as
the cube, trained the same way).
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_int, check_tensor


def offset_fit(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The vector c * mean(targets), c minimising |targets - inputs - c * mean(targets)|^2 over the pairs."""
    check_tensor("inputs", inputs, "[N, dim]", ndim=2)
    check_tensor("targets", targets, "[N, dim]", ndim=2)
    m = targets.double().mean(0)
    denom = inputs.shape[0] * m.dot(m)
    c = (targets.double() - inputs.double()).sum(0).dot(m) / denom if denom > 0 else torch.tensor(0.0)
    return (c * m).float()


class SkipMLP(nn.Module):
    """output = input + W2 tanh(W1 input + b1) + b2, the last layer zero-initialised: it starts as the
    identity, which the dialogue task's inputs are already close to, and learns the difference."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = check_int("dim", dim, minimum=1), check_int("hidden", hidden, minimum=1)
        self.inner = nn.Linear(dim, hidden)
        self.outer = nn.Linear(hidden, dim)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.tanh(self.inner(x)))

    @staticmethod
    def hidden_for(dim: int, parameters: int) -> int:
        """The hidden size whose parameter count, hidden * (2 dim + 1) + dim, comes closest to ``parameters``."""
        return max(1, round((parameters - dim) / (2 * dim + 1)))

    def get_info(self):
        return {"parameters": sum(p.numel() for p in self.parameters()), "active_backend": "torch",
                "hidden": self.hidden}
