"""What the commands share: a user's mistake is one ``error: ...`` line and exit status 2; a bug keeps its
traceback.

Bad keys, files, data, settings, checkpoints and a busy run directory raise ``cubecore.errors.CubecoreError``;
a file that is not there or a full disk raise ``OSError``.  The commands run their body through
``run_command``, which prints those as the one line (``CUBECORE_DEBUG=1`` shows their traceback too) and lets
every other exception, a bug in cubecore, through with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable

from .errors import CubecoreError

USER_ERRORS = (CubecoreError, OSError)
USAGE_ERROR = 2


INTERRUPTED = 130


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line too (with a pointer to --help)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def run_command(body: Callable[[], int]) -> int:
    try:
        return body()
    except KeyboardInterrupt:  # outside training (which says what it saved), e.g. while encoding
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as exc:
        if os.environ.get("CUBECORE_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(quiet: bool = False, silent: bool = False) -> logging.Logger:
    """The commands' console output through the ``cubecore`` logger: information on stdout, warnings and errors
    on stderr.  ``quiet`` leaves out the per-epoch lines (logger ``cubecore.epochs``; a run's log file keeps
    them); ``silent`` (the other processes of a distributed run) all but warnings and errors.  Called again, it
    replaces the handlers it added before."""
    logger = logging.getLogger("cubecore")
    for handler in [h for h in logger.handlers if getattr(h, "_cubecore_console", False)]:
        logger.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.WARNING if silent else logging.INFO)
    out.addFilter(_Below(logging.WARNING))
    if quiet:
        out.addFilter(lambda record: not record.name.startswith("cubecore.epochs"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler._cubecore_console = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


@contextmanager
def log_to_file(path: os.PathLike, append: bool = False, first: str = ""):
    """Everything the ``cubecore`` logger says inside the block, also written to ``path`` with timestamps
    (appended with ``append``), starting with the line ``first``."""
    logger = logging.getLogger("cubecore")
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if first:
        handler.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, first, None, None))
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()


def add_weights_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--weights best|last: which of a run's weights a command takes (`what`: "checkpoint" or "run")."""
    parser.add_argument("--weights", choices=("best", "last"), default="best",
                        help=f"the {what}'s best epoch (by its select_by, the default) or its last one")
