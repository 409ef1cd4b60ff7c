"""``ConfigSection``: a dataclass of settings owned by the layer that uses them (model, data, training).

A section checks the types of its fields from their hints and then its values (``check``), once, when it is
made; loads from a mapping (an unknown key is an error naming it and the section); saves to plain data; and
lists its fields for ``get_info``, reports and model cards.  A field may carry ``metadata={"saved_before": v}``:
the value that a config saved before the field existed meant, so that an old checkpoint rebuilds the model it
trained rather than today's default.

Why not pydantic or OmegaConf.  A config mistake is one line naming the key (``error: config key 'model.steps'
must be an int >= 1, got 0``), raised as ``InvalidTypeError``, ``InvalidValueError`` or ``UnknownKeyError`` (a
``TypeError``, ``ValueError`` or ``KeyError``); an unknown key lists the known ones.  Measured with pydantic 2.14
(installed here through transformers -> typer, so not a new dependency) on a model of the same fields: every
mistake, a wrong type included, is a ``ValidationError`` (a ``ValueError``) of four lines ("1 validation error
for ...", the key, "Input should be greater than or equal to 1 [type=greater_than_equal, input_value=0, ...]", a
URL), and an unknown key says "Extra inputs are not permitted" without the known ones.  Its default (lax) mode
accepts what users are told is wrong today: ``'3'``, ``3.0`` and ``True`` for an int, ``'1e-3'`` for a float;
its strict mode refuses the numpy integers that are accepted today.  Keeping today's messages would mean
mapping each pydantic error type back to the text of ``checks``, that is, these checks again behind a second
layer.  OmegaConf's structured configs (not installed: a new dependency) check types only, so the ranges and
cross-key checks of each ``check`` stay; they turn ``'3'`` into 3 for an int field, refuse numpy scalars ("could
not be converted to Integer", with ``full_key:`` and ``object_type=`` lines), and read ``${...}`` in any string
value (``output_dir``, ``data.source``) as an interpolation.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Dict, Mapping, Tuple

from .checks import check_bool, check_int, check_ints, check_keys, check_number, check_str
from .errors import InvalidTypeError


class ConfigSection:
    """Base of ``ModelConfig``, ``DataConfig`` and ``TrainingConfig`` (each a ``@dataclass``)."""

    section: ClassVar[str] = ""  # its name in YAML files and dotted overrides ("" for the top level)

    def __post_init__(self) -> None:
        self._check_types()
        self.check()

    def check(self) -> None:
        """The section's value checks (ranges, choices, consistency); types are checked before."""

    def key(self, name: str) -> str:
        """How a message names one of this section's fields: ``config key 'model.steps'``."""
        return f"config key {(self.section + '.' if self.section else '') + name!r}"

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint, name = getattr(self, f.name), hints[f.name], self.key(f.name)
            if isinstance(hint, type) and issubclass(hint, ConfigSection):
                if not isinstance(value, hint):
                    raise InvalidTypeError(f"{name} must be a {hint.__name__}, got {type(value).__name__}")
                continue
            optional = type(None) in typing.get_args(hint)
            if value is None:
                if not optional:
                    raise InvalidTypeError(f"{name} must not be empty")
                continue
            base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
            if typing.get_origin(base) is tuple:
                setattr(self, f.name, check_ints(name, value, len(typing.get_args(base))))
            elif base is float:
                setattr(self, f.name, check_number(name, value))
            elif base is int:
                setattr(self, f.name, check_int(name, value))
            elif base is str:
                check_str(name, value)
            elif base is bool:
                check_bool(name, value)

    # -- plain data ---------------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (tuples as lists, sections as nested mappings), as YAML and checkpoints hold it."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (value.to_dict() if isinstance(value, ConfigSection)
                           else list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        if not isinstance(values, Mapping):
            raise InvalidTypeError(f"config section {cls.section or 'top level'!r} must be a mapping of keys, "
                                   f"got {values!r}")
        check_keys(f"config{' section ' + repr(cls.section) if cls.section else ''}", values, cls.field_names())
        return cls(**values)

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]):
        """A section as a run saved it: a field it lacks was added later and takes its ``saved_before`` value."""
        before = {f.name: f.metadata["saved_before"] for f in dataclasses.fields(cls) if "saved_before" in f.metadata}
        return cls.from_dict({**before, **values})

    def replace(self, **values: Any):
        """A copy with some fields changed (checked like a new section)."""
        check_keys(f"config{' section ' + repr(self.section) if self.section else ''}", values, self.field_names())
        return dataclasses.replace(self, **values)

    def info(self) -> Dict[str, Any]:
        """Every field and its value, for ``get_info``, report headers and model cards."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), ConfigSection)}
