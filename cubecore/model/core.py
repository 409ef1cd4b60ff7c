"""``CubicCore``: the lattice of cells sharing one cell network, as an ordinary ``nn.Module``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import check_bool, check_choice, check_int, check_ints, check_number, check_tensor
from ..errors import InvalidTypeError, InvalidValueError
from ..ops.front import BACKENDS, cpu_engine, product_precision, resolve_backend, run_rule
from ..ops.rule import MAX_HIDDEN_LAYERS, PERCEPTIONS, Rule


class CubicCore(nn.Module):
    """A 3D lattice of cells that all share one small network, run for ``steps`` synchronous steps: a 3D neural
    cellular automaton.

    ``forward(external, state=None)`` maps ``external`` [B, X, Y, Z, input_size] (None when input_size is 0)
    to the final state [B, X, Y, Z, state_size].  The initial state is zeros unless given.
    ``forward(..., return_trajectory=True)`` returns the state of every step instead, [steps + 1, B, X, Y, Z,
    state_size] (entry 0 the initial state, the last the final state), for inspection (:mod:`cubecore.training.viz`);
    gradients flow through its last entry on every backend (see :func:`cubecore.propagate`).
    ``forward(..., fire_mask=M)`` replays a rollout with the fire masks M [steps, B, X, Y, Z] (bool) instead of
    drawing them at ``fire_rate``.

    The rule's options are those of :func:`cubecore.propagate`: ``neighbourhood``, ``perception`` (``concat``,
    or ``depthwise`` with ``perception_filters`` learned filters per channel), ``hidden_size`` (an int for one
    hidden layer, or a sequence of one or two sizes), ``activation``, ``output_activation``, ``output_bias``,
    ``update``, ``step_size``, ``fire_rate``, ``alive_channel``, ``alive_threshold``, ``dead_state``, ``boundary``.
    Their defaults are the original rule: the rule's choices those of :class:`cubecore.ops.rule.Rule`, read from
    it (``ModelConfig``, the embedding model's options, reads its defaults from here in turn).
    Weights: ``perception`` [state, F, slots] (depthwise only), then ``w1`` [hidden, inputs], ``b1``, and one
    (weight, bias) pair per further layer, the last, ``w{n}`` [state, hidden], the output layer (its bias None
    with ``output_bias=False``).
    """

    def __init__(
        self,
        lattice_size: Sequence[int] = (8, 8, 12),
        state_size: int = 8,
        hidden_size: Union[int, Sequence[int]] = 16,
        input_size: int = 1,
        steps: int = 10,
        boundary: str = Rule.boundary,
        activation: str = Rule.activation,
        update: str = Rule.update,
        step_size: float = Rule.step_size,
        backend: str = "auto",
        *,
        neighbourhood: str = Rule.neighbourhood,
        perception: str = "concat",
        perception_filters: int = 3,
        output_activation: str = Rule.output_activation,
        output_bias: bool = True,
        fire_rate: float = 1.0,
        alive_channel: Optional[int] = Rule.alive_channel,
        alive_threshold: float = Rule.alive_threshold,
        dead_state: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.lattice_size = check_ints("lattice_size", lattice_size, 3, minimum=1)
        self.state_size = check_int("state_size", state_size, minimum=1)
        self.hidden_sizes = _hidden_sizes(hidden_size)
        self.input_size = check_int("input_size", input_size, minimum=0)
        self.steps = check_int("steps", steps, minimum=1)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.rule = Rule(neighbourhood, boundary, activation, output_activation, update, step_size, alive_channel,
                         alive_threshold)
        self.rule.check_lattice((1, *self.lattice_size, self.state_size))
        self.perception_kind = check_choice("perception", perception, PERCEPTIONS)
        self.perception_filters = check_int("perception_filters", perception_filters, minimum=1)
        self.output_bias = check_bool("output_bias", output_bias)
        self.fire_rate = check_number("fire_rate", fire_rate, minimum=0.0, maximum=1.0, strict_minimum=True)
        S, E, K = self.state_size, self.input_size, self.rule.slots
        if self.perception_kind == "depthwise":
            self.perception = nn.Parameter(torch.empty(S, self.perception_filters, K))
            reads = S * self.perception_filters + E
        else:
            self.register_parameter("perception", None)
            reads = K * S + E
        sizes = (reads, *self.hidden_sizes, S)
        self.layer_names = tuple((f"w{i + 1}", f"b{i + 1}") for i in range(len(sizes) - 1))
        for i, (wname, bname) in enumerate(self.layer_names):
            setattr(self, wname, nn.Parameter(torch.empty(sizes[i + 1], sizes[i])))
            last = i == len(self.layer_names) - 1
            if last and not self.output_bias:
                self.register_parameter(bname, None)
            else:
                setattr(self, bname, nn.Parameter(torch.empty(sizes[i + 1])))
        if dead_state is not None:
            if alive_channel is None:
                raise InvalidValueError("dead_state is the state of cells that the alive mask resets: set "
                                        "alive_channel too, or leave dead_state None")
            dead = torch.as_tensor(dead_state, dtype=torch.get_default_dtype())
            if dead.shape != (S,):
                raise InvalidValueError(f"dead_state must hold state_size = {S} values, got shape {tuple(dead.shape)}")
            self.register_buffer("dead_state", dead.clone())
        else:
            self.dead_state = None
        self.reset_parameters()

    @property
    def hidden_size(self) -> int:
        """The first hidden layer's size."""
        return self.hidden_sizes[0]

    def layers(self) -> Tuple[Optional[torch.Tensor], ...]:
        """The update net's tensors in :func:`cubecore.propagate`'s order: w1, b1, ..., w_out, b_out."""
        return tuple(getattr(self, name) for pair in self.layer_names for name in pair)

    def reset_parameters(self) -> None:
        for wname, bname in self.layer_names:
            nn.init.xavier_uniform_(getattr(self, wname))
            if getattr(self, bname) is not None:
                nn.init.zeros_(getattr(self, bname))
        if self.perception is not None:  # each filter a weighted sum of its slots at the scale of one state
            nn.init.normal_(self.perception, std=1.0 / math.sqrt(self.rule.slots))

    def forward(self, external: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                return_trajectory: bool = False, fire_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        check_bool("return_trajectory", return_trajectory)
        dead = None if self.dead_state is None else self.dead_state.to(state.dtype)
        # The rule's options were checked when the core was built (run_rule checks the tensors only).
        return run_rule(state, external, self.layers(), self.rule, self.steps, perception=self.perception,
                        fire_rate=self.fire_rate, fire_mask=fire_mask, dead_state=dead, backend=self.backend,
                        return_trajectory=return_trajectory)

    def active_backend(self) -> str:
        """The backend ``forward`` would use for this module's current device and dtype."""
        return resolve_backend(self.backend, self.w1.device, self.w1.dtype, self.state_size,
                               hidden_layers=len(self.hidden_sizes))

    def cpu_engine(self) -> Optional[str]:
        """The engine the CPU kernel runs this module's update net on (``cubecore.ops.front.cpu_engine``), or
        None where ``forward`` does not run the CPU kernel."""
        if self.w1.device.type != "cpu" or self.active_backend() != "kernel":
            return None
        return cpu_engine(self.w1.dtype, self.hidden_sizes)

    def _hidden_size(self) -> Union[int, Tuple[int, ...]]:
        """``hidden_size`` as given: one int for one hidden layer."""
        return self.hidden_sizes if len(self.hidden_sizes) > 1 else self.hidden_sizes[0]

    def precision(self, autocast_dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """The precision the kernel runs this module's update net's products in (``cubecore.ops.front.
        product_precision``; ``cubecore.info()["precisions"]`` says the rule), for its device and dtype, without
        autocast or under autocast to ``autocast_dtype``; None where ``forward`` does not run the kernel."""
        if self.active_backend() != "kernel":
            return None
        return product_precision(self.w1.device.type, self.w1.dtype, autocast_dtype, self.hidden_sizes)

    def get_info(self) -> Dict[str, Any]:
        """The sizes, every field of the rule (``self.rule``, a :class:`cubecore.ops.rule.Rule`), the perception,
        output bias, fire rate and backend, the backend, CPU engine and products' precision in use (without
        autocast: ``precision(autocast_dtype)`` says it under autocast), the parameters, device and dtype."""
        return {
            "lattice_size": self.lattice_size,
            "cells": self.lattice_size[0] * self.lattice_size[1] * self.lattice_size[2],
            "state_size": self.state_size,
            "hidden_size": self._hidden_size(),
            "input_size": self.input_size,
            "steps": self.steps,
            **dataclasses.asdict(self.rule),
            "perception": self.perception_kind,
            "perception_filters": self.perception_filters if self.perception is not None else None,
            "output_bias": self.output_bias,
            "fire_rate": self.fire_rate,
            "backend": self.backend,
            "active_backend": self.active_backend(),
            "cpu_engine": self.cpu_engine(),
            "precision": self.precision(),
            "parameters": sum(p.numel() for p in self.parameters()),
            "device": str(self.w1.device),
            "dtype": str(self.w1.dtype).replace("torch.", ""),
        }

    def extra_repr(self) -> str:
        """The sizes, the rule's fields (the alive mask's where there is one), the perception (its filters where
        depthwise), the output bias and fire rate where not the default, and the backend."""
        rule = dataclasses.asdict(self.rule)
        if rule["alive_channel"] is None:
            del rule["alive_channel"], rule["alive_threshold"]
        parts = [f"lattice_size={self.lattice_size}", f"state_size={self.state_size}",
                 f"hidden_size={self._hidden_size()}", f"input_size={self.input_size}", f"steps={self.steps}",
                 *(f"{name}={value!r}" for name, value in rule.items()), f"perception={self.perception_kind!r}"]
        if self.perception is not None:
            parts.append(f"perception_filters={self.perception_filters}")
        if not self.output_bias:
            parts.append("output_bias=False")
        if self.fire_rate < 1.0:
            parts.append(f"fire_rate={self.fire_rate}")
        return ", ".join(parts + [f"backend={self.backend!r}"])


def _hidden_sizes(hidden_size: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """One hidden size, or a sequence of 1 .. MAX_HIDDEN_LAYERS of them, as a tuple."""
    if isinstance(hidden_size, (list, tuple)):
        if not 1 <= len(hidden_size) <= MAX_HIDDEN_LAYERS:
            raise InvalidValueError(f"hidden_size must be an int or 1 to {MAX_HIDDEN_LAYERS} ints (one per hidden "
                                    f"layer), got {hidden_size!r}")
        return tuple(check_int("hidden_size", h, minimum=1) for h in hidden_size)
    if isinstance(hidden_size, str) or not hasattr(hidden_size, "__index__"):
        raise InvalidTypeError(f"hidden_size must be an int or a sequence of ints, got {hidden_size!r}")
    return (check_int("hidden_size", hidden_size, minimum=1),)
