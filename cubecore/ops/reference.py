"""The cell rule in plain PyTorch.

This is the contract every backend computes: the oracle the kernels are tested against and the ``eager``
baseline of the benchmarks.  It favours readability over speed and works on any device and float dtype.
One step reads as an NCA step does: perceive, update, fire, alive.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidValueError
from .rule import (ACTIVATIONS, BOUNDARIES, BOUNDARY_ALIASES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, PERCEPTIONS,
                   SLOT_OFFSETS, UPDATES, Rule, canonical_boundary)

__all__ = ["ACTIVATIONS", "BOUNDARIES", "BOUNDARY_ALIASES", "NEIGHBOURHOODS", "OUTPUT_ACTIVATIONS", "PERCEPTIONS",
           "UPDATES", "Rule", "activate", "alive_mask", "neighbour_states", "pad", "perceive", "propagate_reference",
           "operand", "rounded", "step_reference", "trajectory_reference", "update_net"]

Layers = Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]


def _edge_index(size: int, boundary: str, device: torch.device) -> torch.Tensor:
    """For an axis of ``size`` cells padded by one on each side: which cell each padded position reads
    (``size`` stands for a plane of zeros)."""
    i = torch.arange(-1, size + 1, device=device)
    if boundary == "zeros":
        return torch.where((i >= 0) & (i < size), i, size)
    if boundary == "circular":
        return i % size
    if boundary == "replicate":
        return i.clamp(0, size - 1)
    if boundary == "reflect":  # the mirror cell: -1 reads 1, size reads size - 2
        return torch.where(i < 0, -i, torch.where(i >= size, 2 * size - 2 - i, i))
    raise InvalidValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")


def pad(state: torch.Tensor, boundary: str) -> torch.Tensor:
    """``state`` [B, X, Y, Z, S] padded by one cell on each side of X, Y and Z under ``boundary`` (as
    ``F.pad(mode=...)`` pads, by indexing, so that it differentiates to any order)."""
    boundary = canonical_boundary(boundary)
    for axis in (1, 2, 3):
        size = state.shape[axis]
        if boundary == "reflect" and size < 2:
            raise InvalidValueError(f"boundary='reflect' needs every lattice side >= 2, got {size}")
        zeros = state.new_zeros(state.shape[:axis] + (1,) + state.shape[axis + 1:])
        state = torch.cat([state, zeros], dim=axis).index_select(axis, _edge_index(size, boundary, state.device))
    return state


def neighbour_states(state: torch.Tensor, neighbourhood: str = "von_neumann", boundary: str = "zeros"
                     ) -> List[torch.Tensor]:
    """The state each cell reads through every slot (``rule.SLOT_OFFSETS`` order), each [B, X, Y, Z, S]."""
    padded = pad(state, boundary)
    X, Y, Z = state.shape[1:4]
    return [padded[:, 1 + dx:1 + dx + X, 1 + dy:1 + dy + Y, 1 + dz:1 + dz + Z] for dx, dy, dz in
            SLOT_OFFSETS[neighbourhood]]


def perceive(state: torch.Tensor, external: torch.Tensor, perception: Optional[torch.Tensor],
             neighbourhood: str, boundary: str) -> torch.Tensor:
    """What a cell's update net reads: with ``perception`` None (``concat``) its slots' states, then its
    external input; with a depthwise weight [S, F, slots], channel ``c*F + f`` = filter f applied to channel c
    over the slots (``Conv3d(S, S*F, 3, groups=S, bias=False)`` for ``moore``), then its external input."""
    read = neighbour_states(state, neighbourhood, boundary)
    if perception is None:
        return torch.cat(read + [external], dim=-1)
    S, F_, K = perception.shape
    seen = torch.einsum("bxyzsk,sfk->bxyzsf", torch.stack(read, dim=-1), perception)
    return torch.cat([seen.reshape(*state.shape[:-1], S * F_), external], dim=-1)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(x)
    if activation == "relu":
        return torch.relu(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "identity":
        return x
    raise InvalidValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def rounded(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t``'s values as a kernel of ``precision`` (op_args.PRECISIONS) holds its products' multiplicands: float32,
    then TF32 (10 mantissa bits, to nearest, ties away from zero, as cvt.rna), bfloat16 or float16 (to nearest
    even); in ``t``'s dtype, without gradient."""
    f = t.detach().float()
    if precision == "tf32":
        f = ((f.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    elif precision in ("bfloat16", "float16"):
        f = f.to(getattr(torch, precision)).float()
    elif precision != "ieee":
        raise InvalidValueError(f"precision must be one of ieee, tf32, bfloat16, float16, got {precision!r}")
    return f.to(t.dtype)


def operand(t: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """A product's operand as a kernel of that precision reads it: its own values ("ieee"), or :func:`rounded`,
    with the gradient passing straight through, so that the reference twins a kernel of lower precision in the
    forward (and its masks' decisions)."""
    if precision == "ieee":
        return t
    return t + (rounded(t, precision) - t).detach()


def update_net(inputs: torch.Tensor, layers: Layers, activation: str, output_activation: str,
               precision: str = "ieee") -> torch.Tensor:
    """The cell's change: hidden layers with ``activation``, then the output layer with ``output_activation``;
    each product's operands as a kernel of ``precision`` reads them (:func:`operand`)."""
    x = inputs
    for weight, bias in layers[:-1]:
        x = activate(F.linear(operand(x, precision), operand(weight, precision), bias), activation)
    weight, bias = layers[-1]
    return activate(F.linear(operand(x, precision), operand(weight, precision), bias), output_activation)


def alive_mask(state: torch.Tensor, channel: int, threshold: float) -> torch.Tensor:
    """[B, X, Y, Z] bool: where some value of ``channel`` in the cell's 3x3x3 block (cells beyond the lattice
    ignored) exceeds ``threshold``.  A constant of the step: no gradient flows through it.

    A NaN exceeds nothing: it neither keeps a block alive nor kills it (``max_pool3d`` alone would propagate it and
    kill the whole block, resetting a diverged cell and its 26 neighbours to the dead state, so that the NaN
    vanished from the result; this way it stays in the state, where ``isnan`` or anomaly detection finds it)."""
    alive = state[..., channel].detach().unsqueeze(1)
    alive = alive.masked_fill(alive.isnan(), float("-inf"))
    return F.max_pool3d(alive, kernel_size=3, stride=1, padding=1).squeeze(1) > threshold


def step_reference(state: torch.Tensor, external: Optional[torch.Tensor], *weights: Optional[torch.Tensor],
                   perception: Optional[torch.Tensor] = None, fire: Optional[torch.Tensor] = None,
                   dead_state: Optional[torch.Tensor] = None, rule: Optional[Rule] = None,
                   **rule_options) -> torch.Tensor:
    """One synchronous step of every cell from the previous states; ``weights`` are w1, b1, ..., w_out, b_out
    (a bias may be None); ``fire`` [B, X, Y, Z] bool, where the change applies (None: everywhere)."""
    return _step(state, _external(state, external), _layers(weights), perception, fire, dead_state,
                 rule or Rule(**rule_options))[0]


def _step(state, external, layers, perception, fire, dead_state, rule: Rule, precision: str = "ieee"):
    change = update_net(perceive(state, external, perception, rule.neighbourhood, rule.boundary), layers,
                        rule.activation, rule.output_activation, precision)
    if rule.update == "residual":
        new = state + rule.step_size * change
        if fire is not None:  # a cell that does not fire keeps its state, whatever its change (NaN included)
            new = torch.where(fire.unsqueeze(-1), new, state)
    elif fire is not None:
        new = torch.where(fire.unsqueeze(-1), change, state)
    else:
        new = change
    life = None
    if rule.alive_channel is not None:
        life = alive_mask(state, rule.alive_channel, rule.alive_threshold) & alive_mask(
            new, rule.alive_channel, rule.alive_threshold)
        dead = state.new_zeros(state.shape[-1]) if dead_state is None else dead_state
        new = torch.where(life.unsqueeze(-1), new, dead)
    return new, life


def _external(state: torch.Tensor, external: Optional[torch.Tensor]) -> torch.Tensor:
    return state.new_zeros(state.shape[:-1] + (0,)) if external is None else external


def _layers(weights: Sequence[Optional[torch.Tensor]]) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    if len(weights) < 4 or len(weights) % 2:
        raise InvalidValueError(f"the update net's tensors come in (weight, bias) pairs, at least two layers "
                                f"(w1, b1, w_out, b_out), got {len(weights)} tensors")
    return [(weights[i], weights[i + 1]) for i in range(0, len(weights), 2)]


def trajectory_reference(state: torch.Tensor, external: Optional[torch.Tensor], *weights: Optional[torch.Tensor],
                         steps: int, perception: Optional[torch.Tensor] = None,
                         fire_mask: Optional[torch.Tensor] = None, dead_state: Optional[torch.Tensor] = None,
                         rule: Optional[Rule] = None, precision: str = "ieee", **rule_options) -> torch.Tensor:
    """The states at every step, [steps + 1, B, X, Y, Z, S] (entry 0 the initial state), differentiable
    throughout.  ``fire_mask`` [steps, B, X, Y, Z] bool: where each step's change applies (None: everywhere);
    ``precision``: the products' operands as a kernel of that precision reads them (:func:`operand`)."""
    rule = rule or Rule(**rule_options)
    rule.check_lattice(tuple(state.shape))
    external, layers = _external(state, external), _layers(weights)
    states = [state]
    for t in range(steps):
        fire = None if fire_mask is None else fire_mask[t]
        states.append(_step(states[-1], external, layers, perception, fire, dead_state, rule, precision)[0])
    return torch.stack(states)


def propagate_reference(state: torch.Tensor, external: Optional[torch.Tensor], *weights: Optional[torch.Tensor],
                        steps: int, perception: Optional[torch.Tensor] = None,
                        fire_mask: Optional[torch.Tensor] = None, dead_state: Optional[torch.Tensor] = None,
                        rule: Optional[Rule] = None, precision: str = "ieee", **rule_options) -> torch.Tensor:
    """Run ``steps`` synchronous steps from ``state`` [B, X, Y, Z, S] and return the final state.

    ``external`` is [B, X, Y, Z, E] (or None for E = 0) and is fed to every step unchanged; ``weights`` are the
    update net's (weight, bias) pairs, first layer first (see :func:`cubecore.propagate` for every option);
    ``precision``: the products' operands as a kernel of that precision reads them (:func:`operand`).
    """
    rule = rule or Rule(**rule_options)
    rule.check_lattice(tuple(state.shape))
    external, layers = _external(state, external), _layers(weights)
    for t in range(steps):
        fire = None if fire_mask is None else fire_mask[t]
        state = _step(state, external, layers, perception, fire, dead_state, rule, precision)[0]
    return state
