"""``TrainingConfig``: the optimisation and run settings of a training run, with the ``model`` (``ModelConfig``)
and ``data`` (``DataConfig``) sections it holds; loaded from and saved to YAML, checked on the way in.

Keys are addressed as ``learning_rate``, ``model.steps`` or ``data.validation_split``; a flat key that names
exactly one field of one section (``steps``, ``validation_split``) means that field, so flat config files and
checkpoints written before the sections load as they did (``data: FILE`` means ``data.source``).

Why the ``key=value`` merge is not OmegaConf's (``OmegaConf.from_dotlist`` and ``merge``; for the checks, see
``cubecore/sections.py``): a dotlist knows dotted keys only, so the flat (``steps=6``) and legacy
(``data=FILE``) keys, the "did you mean" of a mistyped key and the refusal of a key two sections share would stay
here as ``resolve_key``; what it would replace is ``parse_override`` and ``override``, some twenty lines.  Its
values go through OmegaConf's own grammar instead of ``_Loader``, the YAML rules that config files follow, so a
value could read one way on the command line and another in a file (a string holding ``${...}`` becomes an
interpolation).  And OmegaConf is not installed: a new dependency for no change a user would see.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Union

import yaml

from ..checks import check_choice, check_int, check_keys, check_number
from ..data.config import DataConfig
from ..errors import CubecoreError, InvalidValueError, UnknownKeyError
from ..model.config import ModelConfig
from ..sections import ConfigSection
from .tracking import LOGGERS

OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("cosine", "mse", "infonce", "combined")
SELECT_BY = ("val_loss", "val_cosine", "val_mrr")  # how the best epoch is chosen (lowest loss, highest others)
PRECISIONS = ("fp32", "bf16")
SECTION = "cube_training"
MAX_SEED = 2**32 - 1  # numpy's limit; torch takes any of these
SECTIONS = {"model": ModelConfig, "data": DataConfig}
LEGACY_KEYS = {"data": "data.source"}  # a flat key of configs written before the sections, whose name is now a section


class RunConfig(ConfigSection):
    """The settings of one kind of run: its own keys and the sections it holds (``sections``), addressed as
    ``key``, ``section.key`` or, where the name is in one section only, ``key``; loaded from and saved to the
    YAML section ``yaml_section``.  ``TrainingConfig`` (``python -m cubecore.train``) and ``NcaTrainingConfig``
    (``python -m cubecore.nca``) are two; each is a ``@dataclass(init=False)`` whose section fields have a
    ``default_factory``."""

    sections: ClassVar[Dict[str, type]] = {}
    legacy_keys: ClassVar[Dict[str, str]] = {}  # flat keys of older configs whose name is now a section
    yaml_section: ClassVar[str] = ""
    defaults_file: ClassVar[str] = ""  # where a user reads every key, for messages

    # -- keys: flat, dotted and sectioned ----------------------------------------------------------------------

    @classmethod
    def resolve_key(cls, key: str) -> str:
        """The full name of a key: ``steps`` -> ``model.steps``; an unknown or ambiguous key is an error."""
        if key in cls.legacy_keys:
            return cls.legacy_keys[key]
        own = [f.name for f in dataclasses.fields(cls) if f.name not in cls.sections]
        if key in own:
            return key
        section, _, name = key.partition(".")
        if name and section in cls.sections:
            if name not in cls.sections[section].field_names():
                raise UnknownKeyError(f"unknown config key {key!r}; section {section!r} has "
                                      f"{sorted(cls.sections[section].field_names())}")
            return key
        owners = [s for s, c in cls.sections.items() if key in c.field_names()]
        if len(owners) == 1:
            return f"{owners[0]}.{key}"
        if len(owners) > 1:
            raise UnknownKeyError(f"config key {key!r} is in sections {owners}: write it as "
                                  f"{' or '.join(o + '.' + key for o in owners)}")
        import difflib

        known = own + [f"{s}.{n}" for s, c in cls.sections.items() for n in c.field_names()]
        near = difflib.get_close_matches(key, known + [k.partition(".")[2] for k in known if "." in k], n=3)
        raise UnknownKeyError(f"unknown config key {key!r}{f'; did you mean {near}?' if near else ''} (see "
                              f"{cls.defaults_file} for every key)")

    @classmethod
    def _nest(cls, values: Mapping[str, Any]) -> Dict[str, Any]:
        """Flat, dotted and nested keys as one nested mapping (a section given whole and key by key merges)."""
        nested: Dict[str, Any] = {}
        for key, value in values.items():
            if key in cls.sections and isinstance(value, ConfigSection):
                value = value.to_dict()
            if key in cls.sections and isinstance(value, Mapping):
                for name, inner in value.items():
                    nested.setdefault(key, {})[name] = inner
                continue
            full = cls.resolve_key(key)
            section, _, name = full.partition(".")
            if name:
                nested.setdefault(section, {})[name] = value
            else:
                nested[full] = value
        return nested

    @classmethod
    def _section_defaults(cls, name: str) -> Dict[str, Any]:
        """The keys of section ``name`` as this config's default holds them (a section's defaults may differ
        from its class's: the NCA's ``model:`` is the upstream's rule)."""
        default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory()
        return default.to_dict()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], saved: bool = False):
        """From a mapping with sections, dotted keys or flat keys (a config written before the sections).
        ``saved``: the config a run saved, whose missing model keys take their ``saved_before`` values."""
        if not isinstance(values, Mapping):
            raise InvalidValueError(f"a config must be a mapping of keys, got {values!r}")
        nested = cls._nest(values)
        sections = {name: c.from_saved(nested.pop(name, {})) if saved
                    else c.from_dict({**cls._section_defaults(name), **nested.pop(name, {})})
                    for name, c in cls.sections.items()}
        return cls(**nested, **sections)

    def __init__(self, **values: Any) -> None:
        """Keyword settings by any key ``from_dict`` takes: ``TrainingConfig(learning_rate=1e-3, steps=6)``, or
        sections given whole (``model=ModelConfig(...)``)."""
        nested = self._nest(values)
        sections = {name: c.from_dict({**self._section_defaults(name), **nested.pop(name, {})})
                    for name, c in self.sections.items()}
        own = {f.name: f for f in dataclasses.fields(self) if f.name not in self.sections}
        check_keys("config", nested, own)
        for name, f in own.items():
            setattr(self, name, nested.get(name, f.default))
        for name, section in sections.items():
            setattr(self, name, section)
        self.__post_init__()

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]):
        """The config a run saved (in its checkpoint): a key it lacks was added later, so it takes the value that
        rebuilds the model the run trained, not today's default."""
        return cls.from_dict(values, saved=True)

    def get(self, key: str) -> Any:
        """The value of a flat, dotted or legacy key."""
        section, _, name = self.resolve_key(key).partition(".")
        return getattr(getattr(self, section), name) if name else getattr(self, section)

    def flat(self) -> Dict[str, Any]:
        """Every setting by its full key (``model.steps``), as plain data."""
        out = {}
        for key, value in self.to_dict().items():
            if key in self.sections:
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    # -- YAML and overrides -----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: Union[str, Path]):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = load_yaml(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise InvalidValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise InvalidValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]} {_yaml_where(exc)})") from None
        if data is None:
            raise InvalidValueError(f"{path} is empty: write a '{cls.yaml_section}:' section with the keys to set (see "
                                    f"{cls.defaults_file}), or leave out --config for all defaults")
        if not isinstance(data, dict):
            raise InvalidValueError(f"{path}: expected a mapping with a '{cls.yaml_section}:' section")
        section = data.get(cls.yaml_section, data)
        if not isinstance(section, dict):
            raise InvalidValueError(f"{path}: '{cls.yaml_section}' must be a mapping of config keys, got {section!r}")
        try:
            return cls.from_dict(section)
        except CubecoreError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def save_yaml(self, path: Union[str, Path]) -> None:
        from ..atomic import atomic_write

        text = yaml.safe_dump({self.yaml_section: self.to_dict()}, sort_keys=False)
        atomic_write(path, lambda f: f.write(text.encode()))

    def override(self, **values: Any):
        """A copy with some keys changed (flat, dotted or legacy keys), checked like a new config."""
        merged = self.to_dict()
        for section, inner in self._nest(values).items():
            if section in self.sections:
                merged[section].update(inner)
            else:
                merged[section] = inner
        return type(self).from_dict(merged)

    def built_for(self, device: Optional[str] = None, backend: Optional[str] = None):
        """A copy on ``device`` with ``model.backend`` ``backend`` where given: the keys a resumed run's trainer
        is built with (``from_checkpoint``)."""
        given = {k: v for k, v in (("device", device), ("model.backend", backend)) if v is not None}
        return self.override(**given) if given else self


@dataclass(init=False)
class TrainingConfig(RunConfig):
    sections = SECTIONS
    legacy_keys = LEGACY_KEYS
    yaml_section = SECTION
    defaults_file = "config/cube_training.yaml"

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
    seed: int = 42  # the model's initialisation, the data split and the shuffling
    device: str = "auto"
    precision: str = "fp32"
    output_dir: str = "runs/cube"
    checkpoint_every: int = 1
    logger: str = "csv"  # csv: metrics.csv / metrics.jsonl; tensorboard: those and TensorBoard event files
    # the sections
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def check(self) -> None:
        choices = {"optimizer": OPTIMIZERS, "loss_function": LOSSES, "precision": PRECISIONS, "select_by": SELECT_BY,
                   "logger": LOGGERS}
        for key, allowed in choices.items():
            check_choice(self.key(key), getattr(self, key), allowed)
        for key in ("epochs", "batch_size", "checkpoint_every", "patience"):
            check_int(self.key(key), getattr(self, key), minimum=1)
        check_int(self.key("seed"), self.seed, minimum=0, maximum=MAX_SEED)
        for key in ("learning_rate", "temperature"):
            check_number(self.key(key), getattr(self, key), minimum=0.0, strict_minimum=True)
        for key in ("weight_decay", "warmup_epochs", "grad_clip", "cosine_weight", "mse_weight", "infonce_weight",
                    "convergence_threshold"):
            check_number(self.key(key), getattr(self, key), minimum=0.0)
        if self.loss_function == "combined" and self.cosine_weight + self.mse_weight + self.infonce_weight == 0:
            raise InvalidValueError("loss_function 'combined' needs a positive config key 'cosine_weight', "
                                    "'mse_weight' or 'infonce_weight'")
        if self.uses_infonce and self.batch_size < 2:
            raise InvalidValueError(f"InfoNCE compares each prediction with the other targets of its batch: config "
                                    f"key 'batch_size' must be >= 2 with it, got {self.batch_size}")
        if self.target_similarity is not None:
            check_number(self.key("target_similarity"), self.target_similarity, -1.0, 1.0)
        if self.data.validation_split == 0:
            raise InvalidValueError("config key 'data.validation_split' must be in (0, 1) for training: the best epoch "
                                    "and early stopping are chosen on the validation split")

    @property
    def uses_infonce(self) -> bool:
        return self.loss_function == "infonce" or (self.loss_function == "combined" and self.infonce_weight > 0)

class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: ``1e-3``, ``3E5`` and ``.5`` are floats (YAML 1.1 reads the first two as
    strings, since it wants a dot and a signed exponent).  A key given twice in one mapping is an error (YAML
    would keep the last silently), and so is an alias (``*name``): a config needs none, and nested aliases
    ("billion laughs") expand a few lines into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found an alias (*{event.anchor}); config files take no anchors and aliases: write "
                            f"the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: Dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    mark = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader says so
                    continue
                if mark is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key!r} twice in one mapping (first at line {mark.line + 1}); "
                                    f"give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


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
        raise InvalidValueError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw)
    except yaml.YAMLError as exc:
        raise InvalidValueError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
