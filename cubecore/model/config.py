"""``ModelConfig``: every option of ``EmbeddingProcessor`` and its ``CubicCore``, owned by the model layer.

``EmbeddingProcessor(input_dim, config)`` takes it whole, and its defaults are the model that
``python -m cubecore.train`` trains: one set of defaults.  A new model option is one field here plus its use.

The defaults of the core's options are ``CubicCore``'s (the original rule, ``cubecore.ops.rule.Rule``'s), read
from it, except where the embedding model is its own: its sizes (a lattice of 8x8x6 = 384 cells for the
default teacher's 384-D embedding, 32 hidden values, 4 steps) and its update (``residual`` with
``step_size=0.5``, where ``CubicCore`` replaces the state).  ``core_options`` hands ``CubicCore`` every field
that is one of its options.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from ..checks import check_choice, check_int, check_ints, check_number
from ..errors import InvalidValueError
from ..ops.front import BACKENDS
from ..ops.rule import (ACTIVATIONS, BOUNDARY_NAMES, MAX_HIDDEN_LAYERS, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS,
                        PERCEPTIONS, UPDATES)
from ..sections import ConfigSection
from .core import CubicCore
from .reshaper import STRATEGIES, check_fits

_CORE_OPTIONS = inspect.signature(CubicCore).parameters
# The core's sizes and input, which EmbeddingProcessor passes itself (``hidden_size`` here is one layer's size).
_CORE_SIZES = ("lattice_size", "state_size", "hidden_size", "input_size")


def _core_default(name: str, **metadata: Any):
    """A field whose default is CubicCore's option ``name``'s: one default for both."""
    return field(default=_CORE_OPTIONS[name].default, metadata=metadata)


@dataclass
class ModelConfig(ConfigSection):
    section = "model"

    lattice_size: Tuple[int, int, int] = (8, 8, 6)
    state_size: int = 8
    hidden_size: int = 32
    # hidden layers of the update net, each of hidden_size
    hidden_layers: int = field(default=1, metadata={"saved_before": 1})
    steps: int = 4
    neighbourhood: str = _core_default("neighbourhood", saved_before="von_neumann")
    perception: str = _core_default("perception", saved_before="concat")
    # learned filters per state channel, with perception='depthwise'
    perception_filters: int = _core_default("perception_filters", saved_before=3)
    boundary: str = _core_default("boundary")
    activation: str = _core_default("activation")
    output_activation: str = _core_default("output_activation", saved_before="tanh")
    output_bias: bool = _core_default("output_bias", saved_before=True)
    update: str = "residual"
    step_size: float = 0.5
    # the chance that a cell applies its change in a step
    fire_rate: float = _core_default("fire_rate", saved_before=1.0)
    # the channel whose 3x3x3 maximum keeps a cell alive (None: no mask)
    alive_channel: Optional[int] = _core_default("alive_channel", saved_before=None)
    alive_threshold: float = _core_default("alive_threshold", saved_before=0.1)
    reshaping_method: str = "simple"  # how the embedding is laid onto the lattice (EmbeddingReshaper)
    position_channels: int = 0  # learned channels per cell added to the external input
    # learned projections of the whole embedding added to every cell's external input
    global_channels: int = field(default=8, metadata={"saved_before": 0})
    # output = input + readout (zero-initialised): the model starts as the identity
    readout_skip: bool = field(default=True, metadata={"saved_before": False})
    backend: str = _core_default("backend")

    def check(self) -> None:
        for key, allowed in (("boundary", BOUNDARY_NAMES), ("activation", ACTIVATIONS), ("update", UPDATES),
                             ("neighbourhood", NEIGHBOURHOODS), ("perception", PERCEPTIONS),
                             ("output_activation", OUTPUT_ACTIVATIONS), ("reshaping_method", STRATEGIES),
                             ("backend", BACKENDS)):
            check_choice(self.key(key), getattr(self, key), allowed)
        for key in ("state_size", "hidden_size", "steps", "perception_filters"):
            check_int(self.key(key), getattr(self, key), minimum=1)
        check_int(self.key("hidden_layers"), self.hidden_layers, minimum=1, maximum=MAX_HIDDEN_LAYERS)
        for key in ("position_channels", "global_channels"):
            check_int(self.key(key), getattr(self, key), minimum=0)
        check_ints(self.key("lattice_size"), self.lattice_size, 3, minimum=1)
        check_number(self.key("step_size"), self.step_size, minimum=0.0, strict_minimum=True)
        check_number(self.key("fire_rate"), self.fire_rate, minimum=0.0, maximum=1.0, strict_minimum=True)
        if self.alive_channel is not None:
            check_int(self.key("alive_channel"), self.alive_channel, minimum=0, maximum=self.state_size - 1)
        if self.boundary == "reflect" and min(self.lattice_size) < 2:
            raise InvalidValueError(f"{self.key('boundary')} 'reflect' needs every lattice side >= 2, got "
                                    f"{self.lattice_size} (use 'replicate')")

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]):
        """As a run or model folder saved it.  Before the rule family (no ``neighbourhood`` key), ``reflect``
        named what is now ``replicate`` (the edge cell read again); such a config loads as ``replicate``."""
        if isinstance(values, Mapping):
            if "neighbourhood" not in values and values.get("boundary") == "reflect":
                values = {**values, "boundary": "replicate"}
            # A saved model must say what it is: a key missing (and not added after it was saved) would
            # silently take today's default and build another model than the one that was trained.
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                       and "saved_before" not in f.metadata and f.name != "backend"]
            if missing:
                raise InvalidValueError(f"the saved model config lacks the key(s) {missing}")
        return super().from_saved(values)

    def core_options(self) -> dict:
        """The ``CubicCore`` options this section sets, by name: every field that is one of its options but the
        lattice and sizes (``CubicCore(lattice_size, state_size, hidden_sizes, input_size, **core_options())``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in _CORE_OPTIONS and f.name not in _CORE_SIZES}

    @property
    def hidden_sizes(self) -> Tuple[int, ...]:
        return (self.hidden_size,) * self.hidden_layers

    @property
    def cells(self) -> int:
        x, y, z = self.lattice_size
        return x * y * z

    def check_fits(self, dim: int, what: str = "an embedding") -> None:
        """That the lattice holds ``what`` of ``dim`` under the reshaping method: the reshaper's check
        (``cubecore.model.reshaper.check_fits``), said in this section's keys."""
        check_fits(dim, self.lattice_size, self.reshaping_method, lattice_name=self.key("lattice_size"),
                   strategy_name="reshaping_method", what=what)
