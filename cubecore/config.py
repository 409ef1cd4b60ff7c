"""``TrainingConfig``: every setting of a training run, loaded from and saved to YAML, checked on the way in."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import yaml

from .reference import ACTIVATIONS, BOUNDARIES, UPDATES

MODES = ("autoencoder", "dialogue", "mixed")
OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cosine", "mse", "combined")
RESHAPINGS = ("simple", "adaptive", "semantic", "projection")
PRECISIONS = ("fp32", "bf16")
SECTION = "cube_training"


@dataclass
class TrainingConfig:
    # what to learn
    mode: str = "dialogue"
    data: str = "chatterbot"  # a named source or a file
    teacher: str = "minilm"
    mixed_dialogue_fraction: float = 0.5  # mixed mode: share of dialogue pairs among all training pairs
    max_samples: Optional[int] = None
    validation_split: float = 0.2
    # the cube
    lattice_size: Tuple[int, int, int] = (8, 8, 6)
    state_size: int = 8
    hidden_size: int = 32
    steps: int = 4
    boundary: str = "wall"
    activation: str = "tanh"
    update: str = "residual"
    step_size: float = 0.5
    reshaping_method: str = "simple"
    backend: str = "auto"
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 32
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    loss_function: str = "combined"
    cosine_weight: float = 0.7
    mse_weight: float = 0.3
    convergence_threshold: float = 1e-4  # minimum improvement of validation loss ...
    patience: int = 8  # ... within this many epochs, else stop
    target_similarity: Optional[float] = None  # stop once validation cosine reaches it
    # the run
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    output_dir: str = "runs/cube"
    checkpoint_every: int = 1
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    # -- checks ---------------------------------------------------------------------------------------------

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            optional = type(None) in typing.get_args(hint)
            if value is None:
                if not optional:
                    raise TypeError(f"config key {f.name!r} must not be empty")
                continue
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
            if typing.get_origin(base) is tuple:
                if not isinstance(value, (list, tuple)) or len(value) != 3 or \
                        any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                    raise TypeError(f"config key {f.name!r} must be three ints, got {value!r}")
                setattr(self, f.name, tuple(value))
            elif base is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"config key {f.name!r} must be a number, got {value!r}")
                setattr(self, f.name, float(value))
            elif base is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"config key {f.name!r} must be an int, got {value!r}")
            elif base is str and not isinstance(value, str):
                raise TypeError(f"config key {f.name!r} must be a string, got {value!r}")

    def _check_values(self) -> None:
        choices = {"mode": MODES, "boundary": BOUNDARIES, "activation": ACTIVATIONS, "update": UPDATES,
                   "optimizer": OPTIMIZERS, "loss_function": LOSSES, "reshaping_method": RESHAPINGS,
                   "precision": PRECISIONS, "backend": ("auto", "kernel", "reference")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r} must be one of {allowed}, got {getattr(self, key)!r}")
        positive = ("state_size", "hidden_size", "steps", "epochs", "batch_size", "checkpoint_every", "patience")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)!r}")
        if any(v < 1 for v in self.lattice_size):
            raise ValueError(f"config key 'lattice_size' must be positive, got {self.lattice_size}")
        for key in ("learning_rate", "step_size"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be > 0, got {getattr(self, key)!r}")
        for key in ("weight_decay", "warmup_epochs", "grad_clip", "cosine_weight", "mse_weight",
                    "convergence_threshold"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 < self.validation_split < 1.0:
            raise ValueError(f"config key 'validation_split' must be in (0, 1), got {self.validation_split}")
        if not 0.0 <= self.mixed_dialogue_fraction <= 1.0:
            raise ValueError(f"config key 'mixed_dialogue_fraction' must be in [0, 1], got {self.mixed_dialogue_fraction}")
        if self.target_similarity is not None and not -1.0 <= self.target_similarity <= 1.0:
            raise ValueError(f"config key 'target_similarity' must be in [-1, 1], got {self.target_similarity}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"config key 'max_samples' must be >= 2, got {self.max_samples}")

    def check_fits(self, dim: int) -> None:
        """The lattice must hold the teacher's embedding exactly unless the reshaper projects."""
        cells = self.lattice_size[0] * self.lattice_size[1] * self.lattice_size[2]
        if self.reshaping_method != "projection" and dim % cells:
            from .reshaper import fitting_lattices

            fits = ", ".join(f"{x}x{y}x{z}" for x, y, z, _ in fitting_lattices(dim, near=self.lattice_size)[:4])
            raise ValueError(f"config key 'lattice_size' {self.lattice_size} does not fit the teacher's dim {dim} "
                             f"with reshaping_method={self.reshaping_method!r}; lattices that fit: {fits}, or use "
                             f"reshaping_method='projection'")

    # -- YAML and overrides -----------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lattice_size"] = list(self.lattice_size)
        return d

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainingConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "TrainingConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with a '{SECTION}:' section")
        section = data.get(SECTION, data)
        if not isinstance(section, dict):
            raise ValueError(f"{path}: '{SECTION}' must be a mapping")
        return cls.from_dict(section)

    def save_yaml(self, path: Union[str, Path]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump({SECTION: self.to_dict()}, sort_keys=False))

    def override(self, **values: Any) -> "TrainingConfig":
        merged = self.to_dict()
        unknown = sorted(set(values) - set(merged))
        if unknown:
            raise KeyError(f"unknown config key(s) {unknown}; known keys: {sorted(merged)}")
        merged.update(values)
        return TrainingConfig.from_dict(merged)


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
