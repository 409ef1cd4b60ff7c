"""``TrainingConfig``: every setting of a training run, loaded from and saved to YAML, checked on the way in."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import re

import yaml

from ..checks import check_bool, check_choice, check_int, check_ints, check_keys, check_number, check_str
from ..ops.front import BACKENDS
from ..ops.reference import ACTIVATIONS, BOUNDARIES, UPDATES
from ..model.reshaper import STRATEGIES
from .tracking import LOGGERS

MODES = ("autoencoder", "dialogue", "mixed")
OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cosine", "mse", "infonce", "combined")
SELECT_BY = ("val_loss", "val_cosine", "val_mrr")  # how the best epoch is chosen (lowest loss, highest others)
PRECISIONS = ("fp32", "bf16")
SECTION = "cube_training"
MAX_SEED = 2**32 - 1  # numpy's limit; torch takes any of these
# Keys added after runs began to save their config, with the value that a saved config without them meant (the
# model of that time), where today's default differs: a checkpoint then rebuilds the model it was trained as.
SAVED_BEFORE_KEY = {"readout_skip": False, "global_channels": 0}


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
    position_channels: int = 0  # learned channels per cell added to the external input
    global_channels: int = 8  # learned projections of the whole embedding added to every cell's external input
    readout_skip: bool = True  # output = input + readout (zero-initialised): start as the identity
    backend: str = "auto"
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 32
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    loss_function: str = "combined"  # cosine | mse | infonce | combined (the weighted sum below)
    cosine_weight: float = 0.7
    mse_weight: float = 0.3
    infonce_weight: float = 0.0
    temperature: float = 0.1  # of the InfoNCE loss (in-batch negatives)
    select_by: str = "val_loss"  # the best epoch, whose weights reports score and best.pt holds
    convergence_threshold: float = 1e-4  # minimum improvement of validation loss ...
    patience: int = 8  # ... within this many epochs, else stop
    target_similarity: Optional[float] = None  # stop once validation cosine reaches it
    # the run
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    output_dir: str = "runs/cube"
    checkpoint_every: int = 1
    logger: str = "csv"  # csv: metrics.csv / metrics.jsonl; tensorboard: those and TensorBoard event files
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
            name = f"config key {f.name!r}"
            if value is None:
                if not optional:
                    raise TypeError(f"{name} must not be empty")
                continue
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
            if typing.get_origin(base) is tuple:
                setattr(self, f.name, check_ints(name, value, 3))
            elif base is float:
                setattr(self, f.name, check_number(name, value))
            elif base is int:
                setattr(self, f.name, check_int(name, value))
            elif base is str:
                check_str(name, value)
            elif base is bool:
                check_bool(name, value)

    def _check_values(self) -> None:
        choices = {"mode": MODES, "boundary": BOUNDARIES, "activation": ACTIVATIONS, "update": UPDATES,
                   "optimizer": OPTIMIZERS, "loss_function": LOSSES, "reshaping_method": STRATEGIES,
                   "precision": PRECISIONS, "backend": BACKENDS, "select_by": SELECT_BY, "logger": LOGGERS}
        for key, allowed in choices.items():
            check_choice(f"config key {key!r}", getattr(self, key), allowed)
        for key in ("state_size", "hidden_size", "steps", "epochs", "batch_size", "checkpoint_every", "patience"):
            check_int(f"config key {key!r}", getattr(self, key), minimum=1)
        check_ints("config key 'lattice_size'", self.lattice_size, 3, minimum=1)
        check_int("config key 'seed'", self.seed, minimum=0, maximum=MAX_SEED)
        for key in ("learning_rate", "step_size", "temperature"):
            check_number(f"config key {key!r}", getattr(self, key), minimum=0.0, strict_minimum=True)
        for key in ("weight_decay", "warmup_epochs", "grad_clip", "cosine_weight", "mse_weight", "infonce_weight",
                    "convergence_threshold"):
            check_number(f"config key {key!r}", getattr(self, key), minimum=0.0)
        if self.loss_function == "combined" and self.cosine_weight + self.mse_weight + self.infonce_weight == 0:
            raise ValueError("loss_function 'combined' needs a positive config key 'cosine_weight', 'mse_weight' or "
                             "'infonce_weight'")
        if self.uses_infonce and self.batch_size < 2:
            raise ValueError(f"InfoNCE compares each prediction with the other targets of its batch: config key "
                             f"'batch_size' must be >= 2 with it, got {self.batch_size}")
        if not 0.0 < self.validation_split < 1.0:
            raise ValueError(f"config key 'validation_split' must be in (0, 1), got {self.validation_split}")
        check_number("config key 'mixed_dialogue_fraction'", self.mixed_dialogue_fraction, 0.0, 1.0)
        if self.target_similarity is not None:
            check_number("config key 'target_similarity'", self.target_similarity, -1.0, 1.0)
        check_int("config key 'position_channels'", self.position_channels, minimum=0)
        check_int("config key 'global_channels'", self.global_channels, minimum=0)
        if self.max_samples is not None:
            check_int("config key 'max_samples'", self.max_samples, minimum=2)

    @property
    def uses_infonce(self) -> bool:
        return self.loss_function == "infonce" or (self.loss_function == "combined" and self.infonce_weight > 0)

    def check_fits(self, dim: int) -> None:
        """The lattice must hold the teacher's embedding exactly unless the reshaper projects."""
        cells = self.lattice_size[0] * self.lattice_size[1] * self.lattice_size[2]
        if self.reshaping_method != "projection" and dim % cells:
            from ..model.reshaper import fitting_lattices

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
        check_keys("config", values, (f.name for f in fields(cls)))
        return cls(**values)

    @classmethod
    def from_saved(cls, values: Dict[str, Any]) -> "TrainingConfig":
        """The config a run saved (in its checkpoint): a key it lacks was added later, so it takes the value that
        rebuilds the model the run trained, not today's default."""
        return cls.from_dict({**SAVED_BEFORE_KEY, **values})

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "TrainingConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = load_yaml(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]} {_yaml_where(exc)})") from None
        if data is None:
            raise ValueError(f"{path} is empty: write a '{SECTION}:' section with the keys to set (see "
                             f"config/cube_training.yaml), or leave out --config for all defaults")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with a '{SECTION}:' section")
        section = data.get(SECTION, data)
        if not isinstance(section, dict):
            raise ValueError(f"{path}: '{SECTION}' must be a mapping of config keys, got {section!r}")
        try:
            return cls.from_dict(section)
        except (KeyError, TypeError, ValueError) as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def save_yaml(self, path: Union[str, Path]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump({SECTION: self.to_dict()}, sort_keys=False))

    def override(self, **values: Any) -> "TrainingConfig":
        merged = self.to_dict()
        check_keys("config", values, merged)
        merged.update(values)
        return TrainingConfig.from_dict(merged)


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: ``1e-3``, ``3E5`` and ``.5`` are floats (YAML 1.1 reads the first two as
    strings, since it wants a dot and a signed exponent)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Config YAML (files and overrides) with the number rule of ``_Loader``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def parse_override(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
