"""``CubicCore``: the lattice of cells sharing one cell network, as an ordinary ``nn.Module``."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checks import check_choice, check_int, check_ints, check_number, check_tensor
from ..ops.front import BACKENDS, propagate, resolve_backend
from ..ops.reference import ACTIVATIONS, BOUNDARIES, UPDATES
from ..errors import InvalidValueError


class CubicCore(nn.Module):
    """A 3D lattice of cells that all share one small network, run for ``steps`` synchronous steps.

    ``forward(external, state=None)`` maps ``external`` [B, X, Y, Z, input_size] (None when input_size is 0)
    to the final state [B, X, Y, Z, state_size].  The initial state is zeros unless given.
    ``forward(..., return_trajectory=True)`` returns the state of every step instead, [steps + 1, B, X, Y, Z,
    state_size] (entry 0 the initial state, the last the final state), for inspection (:mod:`cubecore.training.viz`);
    gradients flow through its last entry on every backend (see :func:`cubecore.propagate`).
    Weights: ``w1`` [hidden, 7*state+input], ``b1`` [hidden], ``w2`` [state, hidden], ``b2`` [state].
    """

    def __init__(
        self,
        lattice_size: Sequence[int] = (8, 8, 12),
        state_size: int = 8,
        hidden_size: int = 16,
        input_size: int = 1,
        steps: int = 10,
        boundary: str = "wall",
        activation: str = "tanh",
        update: str = "replace",
        step_size: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.lattice_size = check_ints("lattice_size", lattice_size, 3, minimum=1)
        self.state_size = check_int("state_size", state_size, minimum=1)
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.input_size = check_int("input_size", input_size, minimum=0)
        self.steps = check_int("steps", steps, minimum=1)
        self.boundary = check_choice("boundary", boundary, BOUNDARIES)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.update = check_choice("update", update, UPDATES)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.step_size = check_number("step_size", step_size)
        S, H, E = self.state_size, self.hidden_size, self.input_size
        self.w1 = nn.Parameter(torch.empty(H, 7 * S + E))
        self.b1 = nn.Parameter(torch.empty(H))
        self.w2 = nn.Parameter(torch.empty(S, H))
        self.b2 = nn.Parameter(torch.empty(S))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.w1)
        nn.init.xavier_uniform_(self.w2)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, external: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                return_trajectory: bool = False) -> torch.Tensor:
        X, Y, Z = self.lattice_size
        if external is None and self.input_size > 0:
            raise InvalidValueError(f"external [B, {X}, {Y}, {Z}, {self.input_size}] is required (input_size > 0)")
        if external is not None:
            doc = f"[B, {X}, {Y}, {Z}, {self.input_size}]"
            check_tensor("external", external, doc, ndim=5)
            if tuple(external.shape[1:]) != (X, Y, Z, self.input_size):
                raise InvalidValueError(f"external must have shape {doc}, got {tuple(external.shape)}")
        if state is None:
            if external is None:
                raise InvalidValueError("with input_size = 0, pass the initial state [B, X, Y, Z, state_size]")
            state = self.w1.new_zeros((external.shape[0], X, Y, Z, self.state_size))
        else:
            doc = f"[B, {X}, {Y}, {Z}, {self.state_size}]"
            check_tensor("state", state, doc, ndim=5)
            if tuple(state.shape[1:]) != (X, Y, Z, self.state_size):
                raise InvalidValueError(f"state must have shape {doc}, got {tuple(state.shape)}")
        return propagate(
            state, external, self.w1, self.b1, self.w2, self.b2, steps=self.steps, boundary=self.boundary,
            activation=self.activation, update=self.update, step_size=self.step_size, backend=self.backend,
            return_trajectory=return_trajectory,
        )

    def active_backend(self) -> str:
        """The backend ``forward`` would use for this module's current device and dtype."""
        return resolve_backend(self.backend, self.w1.device, self.w1.dtype, self.state_size)

    def get_info(self) -> Dict[str, Any]:
        return {
            "lattice_size": self.lattice_size,
            "cells": self.lattice_size[0] * self.lattice_size[1] * self.lattice_size[2],
            "state_size": self.state_size,
            "hidden_size": self.hidden_size,
            "input_size": self.input_size,
            "steps": self.steps,
            "boundary": self.boundary,
            "activation": self.activation,
            "update": self.update,
            "step_size": self.step_size,
            "backend": self.backend,
            "active_backend": self.active_backend(),
            "parameters": sum(p.numel() for p in self.parameters()),
            "device": str(self.w1.device),
            "dtype": str(self.w1.dtype).replace("torch.", ""),
        }

    def extra_repr(self) -> str:
        return (
            f"lattice_size={self.lattice_size}, state_size={self.state_size}, hidden_size={self.hidden_size}, "
            f"input_size={self.input_size}, steps={self.steps}, boundary={self.boundary!r}, "
            f"activation={self.activation!r}, update={self.update!r}, backend={self.backend!r}"
        )
