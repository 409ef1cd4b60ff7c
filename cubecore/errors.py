"""The base of every error cubecore raises for a user's mistake, so that the commands can tell one from a bug.

Each error also derives from the built-in error of its kind (``ValueError``, ``TypeError``, ``KeyError``, ...),
so ``except ValueError`` in a user's code keeps working.  The commands print a ``CubecoreError`` (and an
``OSError``: a file that is not there, a full disk) as one ``error: ...`` line; anything else is a bug in
cubecore and keeps its traceback.
"""

from __future__ import annotations


class CubecoreError(Exception):
    """A user's mistake or an unusable input (a setting, a file, a checkpoint, a run folder)."""


class InvalidValueError(CubecoreError, ValueError):
    """A value of the right type that is out of range, not among the choices, or inconsistent with another."""


class InvalidTypeError(CubecoreError, TypeError):
    """A value of the wrong type."""


class UnknownKeyError(CubecoreError, KeyError):
    """A key that is not among the known ones (config files, overrides, keyword options, data fields)."""

    def __str__(self) -> str:  # a KeyError's message prints with quotes otherwise
        return str(self.args[0]) if self.args else ""


class NotFoundError(CubecoreError, FileNotFoundError):
    """A file, folder or hub model that is not where it was asked for."""


class UnavailableError(CubecoreError, RuntimeError):
    """Something asked for is not available here: a kernel for these tensors, a teacher's weights, a package."""


class NotReadyError(CubecoreError, RuntimeError):
    """An object used before the step it needs (a reshaper before ``fit``, a trainer before its model)."""


class TrainingDivergedError(CubecoreError, FloatingPointError):
    """The loss became NaN or infinite: a setting (above all the learning rate) makes training diverge."""


class PeerStoppedError(CubecoreError, RuntimeError):
    """Another process of a distributed run stopped, for the reason given: this one stops too."""
