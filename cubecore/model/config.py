"""``ModelConfig``: every option of ``EmbeddingProcessor`` and its ``CubicCore``, owned by the model layer.

``EmbeddingProcessor(input_dim, config)`` takes it whole, and its defaults are the model that
``python -m cubecore.train`` trains: one set of defaults.  A new model option is one field here plus its use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

from ..checks import check_choice, check_int, check_ints, check_number
from ..errors import InvalidValueError
from ..ops.front import BACKENDS
from ..ops.reference import ACTIVATIONS, BOUNDARIES, UPDATES
from ..sections import ConfigSection
from .reshaper import STRATEGIES, fitting_lattices


@dataclass
class ModelConfig(ConfigSection):
    section = "model"

    lattice_size: Tuple[int, int, int] = (8, 8, 6)
    state_size: int = 8
    hidden_size: int = 32
    steps: int = 4
    boundary: str = "wall"
    activation: str = "tanh"
    update: str = "residual"
    step_size: float = 0.5
    reshaping_method: str = "simple"  # how the embedding is laid onto the lattice (EmbeddingReshaper)
    position_channels: int = 0  # learned channels per cell added to the external input
    # learned projections of the whole embedding added to every cell's external input
    global_channels: int = field(default=8, metadata={"saved_before": 0})
    # output = input + readout (zero-initialised): the model starts as the identity
    readout_skip: bool = field(default=True, metadata={"saved_before": False})
    backend: str = "auto"

    def check(self) -> None:
        for key, allowed in (("boundary", BOUNDARIES), ("activation", ACTIVATIONS), ("update", UPDATES),
                             ("reshaping_method", STRATEGIES), ("backend", BACKENDS)):
            check_choice(self.key(key), getattr(self, key), allowed)
        for key in ("state_size", "hidden_size", "steps"):
            check_int(self.key(key), getattr(self, key), minimum=1)
        for key in ("position_channels", "global_channels"):
            check_int(self.key(key), getattr(self, key), minimum=0)
        check_ints(self.key("lattice_size"), self.lattice_size, 3, minimum=1)
        check_number(self.key("step_size"), self.step_size, minimum=0.0, strict_minimum=True)

    @property
    def cells(self) -> int:
        x, y, z = self.lattice_size
        return x * y * z

    def check_fits(self, dim: int) -> None:
        """The lattice must hold an embedding of ``dim`` exactly unless the reshaper projects."""
        if self.reshaping_method != "projection" and dim % self.cells:
            fits = ", ".join(f"{x}x{y}x{z}" for x, y, z, _ in fitting_lattices(dim, near=self.lattice_size)[:4])
            raise InvalidValueError(
                f"{self.key('lattice_size')} {self.lattice_size} does not fit the teacher's dim {dim} with "
                f"reshaping_method={self.reshaping_method!r}; lattices that fit: {fits}, or use "
                f"reshaping_method='projection'")
