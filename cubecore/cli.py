"""What the commands share: a user's mistake is one ``error: ...`` line and exit status 2; a bug keeps its
traceback.

Bad keys, files, data, settings, checkpoints and a busy run directory raise ``cubecore.errors.CubecoreError``;
a file that is not there or a full disk raise ``OSError``.  The commands run their body through
``run_command``, which prints those as the one line (``CUBECORE_DEBUG=1`` shows their traceback too) and lets
every other exception, a bug in cubecore, through with its traceback.  SIGTERM (what job schedulers and ``docker
stop`` send) stops a command as Ctrl-C does, so that it cleans up the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, List, Sequence

from .errors import CubecoreError

USER_ERRORS = (CubecoreError, OSError)
USAGE_ERROR = 2


INTERRUPTED = 130


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line too (with a pointer to --help)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


# Argument types for the commands (``type=`` of ``add_argument``): the package's checks, whose message becomes
# the usage error's, so that a bad option is refused before anything runs or is written.


def _as_argument(check: Callable, text: str):
    try:
        return check(text)
    except CubecoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (a batch size, a number of repeats)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return number


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a time in seconds)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (number >= 0 and number != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return number


def positive_float(text: str) -> float:
    """A finite number > 0 (a limit in GiB)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (number > 0 and number != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return number


def seed_list(text: str) -> List[int]:
    """Distinct comma-separated ints, at least one: ``42,1,2``."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated ints (e.g. 42,1,2), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):  # (a seed's range is the config's to check, as seed=)
        raise argparse.ArgumentTypeError(f"seeds must be distinct comma-separated ints, got {text!r}")
    return seeds


def name_list(choices: Sequence[str], what: str = "names") -> Callable[[str], List[str]]:
    """A type for comma-separated names among ``choices``, at least one, each once."""
    def parse(text: str) -> List[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(choices)}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given; choose from {list(choices)}")
        return list(dict.fromkeys(names))

    return parse


def device_argument(text: str):
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    from .checks import check_device

    return _as_argument(lambda value: check_device(value, "--device"), text)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stop:
    """Where the command stands with the signals that stop it (``stop_signals``)."""
    stopping = False
    cause = None  # what the next stop raises instead of KeyboardInterrupt (``stop_main``)
    lock = threading.Lock()  # for stop_main and stopping_now; the handler takes none (it runs between lines)


def _on_stop_signal(signum, frame) -> None:
    if signum == signal.SIGTERM and _Stop.stopping:
        return  # stopping already (a scheduler's second SIGTERM): the cleanup goes on
    _Stop.stopping = True
    cause, _Stop.cause = _Stop.cause, None
    raise cause if cause is not None else KeyboardInterrupt


def stop_main(cause: BaseException) -> bool:
    """From another thread: stop the main thread with ``cause`` as a SIGTERM would, at once (a signal also cuts
    short a sleep or a read); False, and nothing done, where the command is stopping already or no
    ``stop_signals`` block is in force."""
    with _Stop.lock:
        if _Stop.stopping or signal.getsignal(signal.SIGTERM) is not _on_stop_signal:
            return False
        _Stop.cause = cause
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        return True


def stopping_now() -> None:
    """The command is stopping (or done) by itself: from now on ``stop_main`` does nothing, and a further SIGTERM
    lets it finish."""
    with _Stop.lock:
        _Stop.stopping = True
        _Stop.cause = None


@contextmanager
def stop_signals():
    """Inside the block SIGTERM is handled as SIGINT (Ctrl-C): a KeyboardInterrupt in the main thread, so that
    every cleanup written for Ctrl-C (a run keeps its last checkpoint, puts back the run --overwrite set aside,
    removes its temporary files) runs for SIGTERM too, which schedulers, ``docker stop`` and torchrun send.  Only
    in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _Stop.stopping, _Stop.cause = False, None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def run_command(body: Callable[[], int]) -> int:
    try:
        with stop_signals():
            return body()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside training (which says what it saved), e.g. while encoding
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
