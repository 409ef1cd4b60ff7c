"""The choices of the cell rule, their names and checks, in one place: the reference, the op front, the
modules and the model configuration all read them from here.

A rule is one NCA step: every cell *perceives* the states of its neighbourhood (``von_neumann``: the six faces
and itself; ``moore``: the 26 neighbours and itself), either by handing them all to the update net
(``concat``) or through learned depthwise filters (``depthwise``); the *update net* (one or two hidden
layers) maps the perception and the cell's external input to a change; the change applies where the cell
*fires* (``replace`` or ``residual``); an optional *alive mask* resets cells with no living neighbour.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..checks import check_choice, check_int, check_number
from ..errors import InvalidValueError

NEIGHBOURHOODS = ("von_neumann", "moore")
PERCEPTIONS = ("concat", "depthwise")
# PyTorch's padding vocabulary (``Conv3d(padding_mode=...)``, ``F.pad(mode=...)``): what a cell reads beyond
# the lattice's edge.  ``zeros`` reads zeros, ``circular`` wraps round, ``replicate`` reads the edge cell,
# ``reflect`` the mirror cell (the edge not repeated).
BOUNDARIES = ("zeros", "circular", "replicate", "reflect")
# Older names whose meaning is unchanged.  (Before the rule family, ``reflect`` meant what ``replicate``
# means now; saved models and runs of that time load as ``replicate``: see ModelConfig.from_saved.)
BOUNDARY_ALIASES = {"wall": "zeros", "periodic": "circular"}
BOUNDARY_NAMES = BOUNDARIES + tuple(BOUNDARY_ALIASES)
ACTIVATIONS = ("tanh", "relu", "sigmoid")
OUTPUT_ACTIVATIONS = ("tanh", "identity")
UPDATES = ("replace", "residual")
MAX_HIDDEN_LAYERS = 2

# The cells a cell reads, as offsets (dx, dy, dz) along (X, Y, Z), in slot order.  von_neumann: x-1, x+1,
# y-1, y+1, z-1, z+1, then the cell itself.  moore: the row-major order of a 3x3x3 Conv3d kernel over
# {-1, 0, 1}^3 (a cross-correlation), so that a Conv3d weight [.., 3, 3, 3] reshapes straight into [.., 27].
SLOT_OFFSETS = {
    "von_neumann": ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1), (0, 0, 0)),
    "moore": tuple(itertools.product((-1, 0, 1), repeat=3)),
}


def canonical_boundary(name: str, argument: str = "boundary") -> str:
    """The boundary's name in PyTorch's vocabulary (``wall`` -> ``zeros``, ``periodic`` -> ``circular``)."""
    check_choice(argument, name, BOUNDARY_NAMES)
    return BOUNDARY_ALIASES.get(name, name)


def slots(neighbourhood: str) -> int:
    """How many cells a cell reads (itself included): 7 or 27."""
    return len(SLOT_OFFSETS[check_choice("neighbourhood", neighbourhood, NEIGHBOURHOODS)])


@dataclass(frozen=True)
class Rule:
    """The choices of one cell rule that are not weights: checked once, then handed to either backend."""

    neighbourhood: str = "von_neumann"
    boundary: str = "zeros"
    activation: str = "tanh"
    output_activation: str = "tanh"
    update: str = "replace"
    step_size: float = 1.0
    alive_channel: Optional[int] = None
    alive_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_choice("neighbourhood", self.neighbourhood, NEIGHBOURHOODS)
        object.__setattr__(self, "boundary", canonical_boundary(self.boundary))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        check_choice("update", self.update, UPDATES)
        object.__setattr__(self, "step_size", check_number("step_size", self.step_size))
        if self.alive_channel is not None:
            object.__setattr__(self, "alive_channel", check_int("alive_channel", self.alive_channel, minimum=0))
        object.__setattr__(self, "alive_threshold", check_number("alive_threshold", self.alive_threshold))

    @property
    def slots(self) -> int:
        return len(SLOT_OFFSETS[self.neighbourhood])

    def check_lattice(self, state_shape: Tuple[int, ...]) -> None:
        """What the rule needs of a state [B, X, Y, Z, S]: a mirror cell for ``reflect``, the alive channel."""
        if self.boundary == "reflect" and min(state_shape[1:4]) < 2:
            raise InvalidValueError(
                f"boundary='reflect' reads the mirror cell beyond each edge, so every lattice side must be >= 2, "
                f"got lattice {tuple(state_shape[1:4])} (use 'replicate' to read the edge cell itself)")
        if self.alive_channel is not None and self.alive_channel >= state_shape[4]:
            raise InvalidValueError(f"alive_channel must be < state_size = {state_shape[4]}, got {self.alive_channel}")

    def op_codes(self) -> List[int]:
        """The rule's part of the op's ``rule`` list (OpArgs.op_codes): the kernels' integer codes of
        (neighbourhood, boundary, activation, output_activation, update), then alive_channel (-1: no alive
        mask); csrc/op_args.h decodes it."""
        return [NEIGHBOURHOODS.index(self.neighbourhood), BOUNDARIES.index(self.boundary),
                ACTIVATIONS.index(self.activation), OUTPUT_ACTIVATIONS.index(self.output_activation),
                UPDATES.index(self.update), -1 if self.alive_channel is None else self.alive_channel]

    def op_values(self) -> List[float]:
        """The op's ``rule_values`` list: (step_size, alive_threshold)."""
        return [self.step_size, self.alive_threshold]

    @classmethod
    def from_op(cls, codes: Sequence[int], values: Sequence[float]) -> "Rule":
        """The rule of the op's ``rule`` and ``rule_values`` lists (the inverse of op_codes and op_values)."""
        neighbourhood, boundary, activation, output_activation, update, alive = codes
        return cls(NEIGHBOURHOODS[neighbourhood], BOUNDARIES[boundary], ACTIVATIONS[activation],
                   OUTPUT_ACTIVATIONS[output_activation], UPDATES[update], values[0],
                   None if alive < 0 else alive, values[1])
