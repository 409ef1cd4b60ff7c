"""``ModelConfig``: every option of ``EmbeddingProcessor`` and its ``CubicCore``, owned by the model layer.

``EmbeddingProcessor(input_dim, config)`` takes it whole, and its defaults are the model that
``python -m cubecore.train`` trains: one set of defaults.  A new model option is one field here plus its use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from ..checks import check_choice, check_int, check_ints, check_number
from ..errors import InvalidValueError
from ..ops.front import BACKENDS
from ..ops.rule import (ACTIVATIONS, BOUNDARY_NAMES, MAX_HIDDEN_LAYERS, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS,
                        PERCEPTIONS, UPDATES)
from ..sections import ConfigSection
from .reshaper import STRATEGIES, check_fits


@dataclass
class ModelConfig(ConfigSection):
    section = "model"

    lattice_size: Tuple[int, int, int] = (8, 8, 6)
    state_size: int = 8
    hidden_size: int = 32
    # hidden layers of the update net, each of hidden_size
    hidden_layers: int = field(default=1, metadata={"saved_before": 1})
    steps: int = 4
    neighbourhood: str = field(default="von_neumann", metadata={"saved_before": "von_neumann"})
    perception: str = field(default="concat", metadata={"saved_before": "concat"})
    # learned filters per state channel, with perception='depthwise'
    perception_filters: int = field(default=3, metadata={"saved_before": 3})
    boundary: str = "zeros"
    activation: str = "tanh"
    output_activation: str = field(default="tanh", metadata={"saved_before": "tanh"})
    output_bias: bool = field(default=True, metadata={"saved_before": True})
    update: str = "residual"
    step_size: float = 0.5
    # the chance that a cell applies its change in a step
    fire_rate: float = field(default=1.0, metadata={"saved_before": 1.0})
    # the channel whose 3x3x3 maximum keeps a cell alive (None: no mask)
    alive_channel: Optional[int] = field(default=None, metadata={"saved_before": None})
    alive_threshold: float = field(default=0.1, metadata={"saved_before": 0.1})
    reshaping_method: str = "simple"  # how the embedding is laid onto the lattice (EmbeddingReshaper)
    position_channels: int = 0  # learned channels per cell added to the external input
    # learned projections of the whole embedding added to every cell's external input
    global_channels: int = field(default=8, metadata={"saved_before": 0})
    # output = input + readout (zero-initialised): the model starts as the identity
    readout_skip: bool = field(default=True, metadata={"saved_before": False})
    backend: str = "auto"

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
        """The ``CubicCore`` options this section sets (everything but the lattice, sizes and input)."""
        return dict(steps=self.steps, boundary=self.boundary, activation=self.activation, update=self.update,
                    step_size=self.step_size, backend=self.backend, neighbourhood=self.neighbourhood,
                    perception=self.perception, perception_filters=self.perception_filters,
                    output_activation=self.output_activation, output_bias=self.output_bias,
                    fire_rate=self.fire_rate, alive_channel=self.alive_channel,
                    alive_threshold=self.alive_threshold)

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
