"""The cell rule in plain PyTorch.

This is the contract every backend computes: the oracle the kernels are tested against and the ``eager``
baseline of the benchmarks.  It favours readability over speed and works on any device and float dtype.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from ..errors import InvalidValueError

BOUNDARIES = ("wall", "periodic", "reflect")
ACTIVATIONS = ("tanh", "relu", "sigmoid")
UPDATES = ("replace", "residual")

# Neighbour slots in their fixed order: (lattice axis of a [B, X, Y, Z, S] tensor, offset).
NEIGHBOUR_SLOTS = ((1, -1), (1, +1), (2, -1), (2, +1), (3, -1), (3, +1))


def shift(state: torch.Tensor, axis: int, offset: int, boundary: str) -> torch.Tensor:
    """Return ``n`` with ``n[..., i, ...] = state[..., i + offset, ...]`` under the given boundary."""
    size = state.shape[axis]
    if boundary == "periodic":
        return torch.roll(state, shifts=-offset, dims=axis)
    if offset < 0:
        inner = state.narrow(axis, 0, size - 1)
        edge = state.narrow(axis, 0, 1)
    else:
        inner = state.narrow(axis, 1, size - 1)
        edge = state.narrow(axis, size - 1, 1)
    if boundary == "wall":
        edge = torch.zeros_like(edge)
    elif boundary != "reflect":
        raise InvalidValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    parts = [edge, inner] if offset < 0 else [inner, edge]
    return torch.cat(parts, dim=axis)


def neighbours(state: torch.Tensor, boundary: str) -> List[torch.Tensor]:
    """The six neighbour states of every cell, in slot order x-1, x+1, y-1, y+1, z-1, z+1."""
    return [shift(state, axis, offset, boundary) for axis, offset in NEIGHBOUR_SLOTS]


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "relu":
        return torch.relu(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    raise InvalidValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def step_reference(
    state: torch.Tensor,
    external: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    boundary: str = "wall",
    activation: str = "tanh",
    update: str = "replace",
    step_size: float = 1.0,
) -> torch.Tensor:
    """One synchronous step: every cell reads the previous states of its six neighbours and itself."""
    inputs = torch.cat(neighbours(state, boundary) + [state, external], dim=-1)
    hidden = activate(F.linear(inputs, w1, b1), activation)
    change = torch.tanh(F.linear(hidden, w2, b2))
    if update == "replace":
        return change
    if update == "residual":
        return state + step_size * change
    raise InvalidValueError(f"update must be one of {UPDATES}, got {update!r}")


def propagate_reference(
    state: torch.Tensor,
    external: Optional[torch.Tensor],
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    steps: int,
    boundary: str = "wall",
    activation: str = "tanh",
    update: str = "replace",
    step_size: float = 1.0,
) -> torch.Tensor:
    """Run ``steps`` synchronous steps from ``state`` [B, X, Y, Z, S] and return the final state.

    ``external`` is [B, X, Y, Z, E] (or None for E = 0) and is fed to every step unchanged.
    """
    if external is None:
        external = state.new_zeros(state.shape[:-1] + (0,))
    for _ in range(steps):
        state = step_reference(state, external, w1, b1, w2, b2, boundary, activation, update, step_size)
    return state


def trajectory_reference(state, external, w1, b1, w2, b2, *, steps: int, boundary: str = "wall",
                         activation: str = "tanh", update: str = "replace", step_size: float = 1.0) -> torch.Tensor:
    """The states at every step, [steps + 1, B, X, Y, Z, S] (entry 0 the initial state), differentiable
    throughout; its last entry is ``propagate_reference``'s result."""
    if external is None:
        external = state.new_zeros(state.shape[:-1] + (0,))
    states = [state]
    for _ in range(steps):
        states.append(step_reference(states[-1], external, w1, b1, w2, b2, boundary, activation, update,
                                     step_size))
    return torch.stack(states)
