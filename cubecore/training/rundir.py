"""The folder a training run writes into, owned by one run at a time.

A run takes an exclusive lock on ``RUN_DIR/.lock`` for as long as it lives (released by the OS if the process
dies), so a second run into the same folder stops at once instead of interleaving its epochs with the first.
A fresh run wants a folder without a previous run's files; ``overwrite`` removes those files once the run is
ready to write (``clear``, after its data loaded), and a resumed run keeps them.  Temporary files that a
killed write of a run file left behind are removed either way.  A folder that the run created and left
empty is removed again if the run fails before writing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Optional
from ..errors import CubecoreError, InvalidValueError

# Every file a run writes, by role: the one place their names are written.
FILE_NAMES = {"config": "config.yaml", "metrics_csv": "metrics.csv", "metrics_jsonl": "metrics.jsonl",
              "last": "last.pt", "best": "best.pt", "curves": "curves.png", "report": "report.md",
              "results": "results.json", "model": "model", "tensorboard": "tensorboard", "rollout": "rollout.gif",
              "log": "train.log", "seeds_json": "seeds.json", "seeds_md": "seeds.md"}
RUN_FILES = tuple(FILE_NAMES.values())


class RunFiles:
    """The paths of a run's files: ``RunFiles(folder).last`` is ``folder/last.pt``; ``seed(n)`` the folder of
    one seed of a ``--seeds`` study."""

    def __init__(self, root: os.PathLike) -> None:
        self.root = Path(root)
        for role, name in FILE_NAMES.items():
            setattr(self, role, self.root / name)

    def seed(self, seed: int) -> "RunFiles":
        return RunFiles(self.root / f"seed-{seed}")

    def written(self) -> list:
        """The run's files that exist, in the order of ``FILE_NAMES``."""
        return [self.root / name for name in FILE_NAMES.values() if (self.root / name).exists()]
OPEN_MODES = ("fresh", "overwrite", "resume")
LOCK_NAME = ".lock"


class RunDirectoryError(CubecoreError, RuntimeError):
    """The run directory is in use by another run, or holds a run that this one would silently replace."""


class RunDirectory:
    """``with RunDirectory(path, mode):`` holds the lock on ``path`` for the block."""

    def __init__(self, path: os.PathLike, mode: str = "fresh") -> None:
        if mode not in OPEN_MODES:
            raise InvalidValueError(f"mode must be one of {OPEN_MODES}, got {mode!r}")
        self.path = Path(path)
        self.files = RunFiles(self.path)
        self.mode = mode
        self._lock: Optional[int] = None
        self._created = False

    def __enter__(self) -> "RunDirectory":
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"output directory {self.path} is a file")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirectoryError(f"output directory {self.path} is in use by another run"
                                    f"{f' (process {holder})' if holder else ''}; wait for it to end, or choose "
                                    f"another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
        try:
            self._prepare()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        left = {p.name for p in self.path.iterdir()}
        if exc_type is not None and self._created and left <= {LOCK_NAME, FILE_NAMES["log"]}:
            for name in left:  # a folder this run made and could not use: its log said nothing the console did not
                (self.path / name).unlink(missing_ok=True)
            self.release()
            self.path.rmdir()
            return
        self.release()

    def clear(self) -> None:
        """With mode ``overwrite``: remove the previous run's files (call once the new run is ready to write)."""
        if self.mode == "overwrite":
            for name in RUN_FILES:
                path = self.path / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def _prepare(self) -> None:
        for name in RUN_FILES:  # a write killed between creating and renaming its file (cubecore.atomic)
            for stale in self.path.glob(f"{name}*.tmp"):
                stale.unlink(missing_ok=True)
        existing = sorted(name for name in RUN_FILES if (self.path / name).exists())
        if self.mode == "fresh" and existing:
            raise RunDirectoryError(
                f"output directory {self.path} already holds a run ({', '.join(existing)}): continue it with "
                f"--resume, replace it with --overwrite, or choose another --output-dir")
