"""What the commands share: a user's mistake is one ``error: ...`` line and exit status 2, never a traceback.

Bad keys, files, data, settings and a busy run directory raise the package's ordinary errors (see
``cubecore.checks``); the commands run their body through ``run_command``, which turns those into the one
line.  ``CUBECORE_DEBUG=1`` lets them through with their traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERRORS = (KeyError, TypeError, ValueError, OSError, RuntimeError, ArithmeticError)
USAGE_ERROR = 2


def run_command(body: Callable[[], int]) -> int:
    try:
        return body()
    except USER_ERRORS as exc:
        if os.environ.get("CUBECORE_DEBUG", "0") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
