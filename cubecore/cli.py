"""What the commands share: a user's mistake is one ``error: ...`` line and exit status 2, never a traceback.

Bad keys, files, data, settings and a busy run directory raise the package's ordinary errors (see
``cubecore.checks``); the commands run their body through ``run_command``, which turns those into the one
line.  ``CUBECORE_DEBUG=1`` lets them through with their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

USER_ERRORS = (KeyError, TypeError, ValueError, OSError, RuntimeError, ArithmeticError)
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


def add_weights_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--weights best|last: which of a run's weights a command takes (`what`: "checkpoint" or "run")."""
    parser.add_argument("--weights", choices=("best", "last"), default="best",
                        help=f"the {what}'s best epoch (by its select_by, the default) or its last one")
