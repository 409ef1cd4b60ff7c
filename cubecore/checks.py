"""The package's one set of argument checks, so that the same mistake raises the same error everywhere.

A value of the wrong type raises ``InvalidTypeError`` (a ``TypeError``), a value of the right type that is out of
range or not among the choices ``InvalidValueError`` (a ``ValueError``), an unknown key (config files, keyword
options) ``UnknownKeyError`` (a ``KeyError``); all three are ``cubecore.errors.CubecoreError``.
Every message names the argument.  Numpy scalars count as the Python numbers they hold.  (Why these and not
pydantic's or OmegaConf's validation: ``cubecore/sections.py``.)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import torch
from .errors import InvalidTypeError, InvalidValueError, UnknownKeyError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (Python or numpy), not a bool, within [minimum, maximum]; returned as a Python int."""
    if not _is_int(value):
        raise InvalidTypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidValueError(f"{name} must be an int <= {maximum}, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 strict_minimum: bool = False) -> float:
    """A finite real number (int, float or numpy scalar, not a bool) within the bounds; returned as a float.
    ``strict_minimum``: the value must be greater than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise InvalidValueError(f"{name} must be {'>' if strict_minimum else '>='} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (the single tuple of names that the rest of the package uses too)."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be a string, got {value!r}")
    return value


def check_ints(name: str, value: Any, count: int, minimum: Optional[int] = None) -> Tuple[int, ...]:
    """A sequence of exactly ``count`` ints, each >= minimum."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidTypeError(f"{name} must be {count} ints, got {value!r}")
    items = tuple(value)
    if len(items) != count:
        raise InvalidValueError(f"{name} must be {count} ints, got {value!r}")
    if not all(_is_int(v) for v in items):
        raise InvalidTypeError(f"{name} must be {count} ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in items):
        raise InvalidValueError(f"{name} must be {count} ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def check_tensor(name: str, value: Any, shape_doc: str = "", ndim: Optional[int] = None) -> torch.Tensor:
    """A torch.Tensor (TypeError otherwise), of ``ndim`` dimensions if given (ValueError otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor{' of shape ' + shape_doc if shape_doc else ''}, "
                        f"got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise InvalidValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(value.shape)}")
    return value


def check_keys(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Every key of ``given`` must be in ``known``; otherwise UnknownKeyError naming them and the known ones."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UnknownKeyError(f"unknown {where} key(s) {unknown}; known keys: {known}")


def check_device(device: Optional[Union[str, int, torch.device]], name: str = "device") -> torch.device:
    """A torch device that exists here (None: the CPU); otherwise an error now rather than deep in torch."""
    if device is None:
        return torch.device("cpu")
    is_index = isinstance(device, numbers.Integral) and not isinstance(device, bool)
    if not (is_index or isinstance(device, (str, torch.device))):
        raise InvalidTypeError(f"{name} must be a string such as 'cpu' or 'cuda:0', a torch.device or None, got {device!r}")
    try:
        dev = torch.device(check_int(name, device, minimum=0) if is_index else device)
    except RuntimeError as exc:
        raise InvalidValueError(f"{name}={device!r} is not a device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"{name}={device!r}, but CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidValueError(f"{name}={device!r}, but there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InvalidValueError(f"{name}={device!r}, but MPS is not available here; use device='cpu'")
    elif dev.type == "meta":
        raise InvalidValueError(f"{name}={device!r}: the meta device holds no data; use device='cpu'")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise InvalidValueError(f"{name}={device!r} is not usable here ({exc})") from None
    return dev
