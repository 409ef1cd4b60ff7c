"""Floors that a learned map must beat to have learned anything, beside ``EmbeddingMetrics``' identity, mean
and ridge: ``offset`` (the input plus the multiple of the mean training target that maximises the training
pairs' mean cosine: what a model that learned "identity plus a constant" scores), and the trained floors
(``TRAINED_FLOORS``), which the trainer trains with the run's own loss, epochs and best-epoch rule: ``mlp`` (a
one-hidden-layer MLP with a skip path, as many parameters as the cube) and ``linear`` (output = input + W input,
W zero-initialised: the standard query adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int, check_tensor
from ..errors import InvalidValueError


def offset_fit(inputs: torch.Tensor, targets: torch.Tensor, grid: int = 4001) -> torch.Tensor:
    """The vector c * mean(targets), with c >= 0 the value that maximises the mean cosine between
    ``inputs + c * mean(targets)`` and ``targets`` over the pairs (a grid, then a finer one around the best)."""
    check_tensor("inputs", inputs, "[N, dim]", ndim=2)
    check_tensor("targets", targets, "[N, dim]", ndim=2)
    x, y = inputs.double(), targets.double()
    m = y.mean(0)
    r = m.dot(m)
    if r == 0:
        return torch.zeros_like(m).float()
    # cos(x + c m, y) = (x.y + c m.y) / (|x + c m| |y|), with |x + c m|^2 = |x|^2 + 2 c x.m + c^2 |m|^2
    a, b, p, q = (x * y).sum(1), y @ m, (x * x).sum(1), x @ m
    ny = y.norm(dim=1).clamp_min(1e-12)

    def mean_cosine(c: torch.Tensor) -> torch.Tensor:
        c = c[:, None]
        return ((a + c * b) / ((p + 2 * c * q + c * c * r).clamp_min(1e-24).sqrt() * ny)).mean(1)

    top = 50.0 * (p.mean().sqrt() / r.sqrt()).item()  # far past where the mean dominates the input
    cs = torch.linspace(0.0, top, grid, dtype=torch.float64)
    best = cs[mean_cosine(cs).argmax()]
    step = top / (grid - 1)
    fine = torch.linspace(max(0.0, best.item() - step), best.item() + step, grid, dtype=torch.float64)
    c = fine[mean_cosine(fine).argmax()]
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


class ResidualLinear(nn.Module):
    """output = input + W input, W [dim, dim] zero-initialised and without bias: the linear query adapter with a
    residual path (LlamaIndex's and Chroma's embedding adapters, Search-Adaptor).  It starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)

    def get_info(self):
        return {"parameters": self.linear.weight.numel(), "active_backend": "torch"}


# The floors the trainer trains the way it trains the cube, in the order they are reported.
TRAINED_FLOORS = ("mlp", "linear")


def floor_settings(name: str, dim: int, parameters: int) -> dict:
    """What a trained floor's model needs besides ``dim``, for a cube of ``parameters`` parameters (stored with
    the floor's weights)."""
    if name == "mlp":
        return {"hidden": SkipMLP.hidden_for(dim, parameters)}
    if name == "linear":
        return {}
    raise InvalidValueError(f"unknown trained floor {name!r}; known: {list(TRAINED_FLOORS)}")


def floor_model(name: str, dim: int, settings: dict) -> nn.Module:
    """The (untrained) model of the trained floor ``name`` with ``settings`` as ``floor_settings`` gave them."""
    if name == "mlp":
        return SkipMLP(dim, int(settings["hidden"]))
    if name == "linear":
        return ResidualLinear(dim)
    raise InvalidValueError(f"unknown trained floor {name!r}; known: {list(TRAINED_FLOORS)}")
