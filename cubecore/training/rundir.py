"""The folder a training run writes into, owned by one run at a time.

A run takes an exclusive lock on ``RUN_DIR/.lock`` for as long as it lives (released by the OS if the process
dies), so a second run into the same folder stops at once instead of interleaving its epochs with the first.
(``filelock`` takes the same ``flock`` on Unix, but its 3.x releases, which torch accepts, truncate the lock file
on every try and so erase the holder's process id that the refusal names; the build is Unix-only anyway.)
A run marks its folder as a cubecore run (``cubecore_run.json``); a folder whose files are named like a run's
but that is neither marked nor holds a cubecore checkpoint belongs to something else and is never replaced.

A fresh run wants a folder without a previous run's files.  ``overwrite`` sets the previous run's files aside
(in ``RUN_DIR/.replaced``) and drops them only once the new run has saved its first checkpoint (``commit``);
a run that ends before that, by an error, Ctrl-C, SIGTERM or a kill -9, leaves the folder as it found it: its
own files are removed and the previous run's come back (after a kill -9, on the next run into the folder).  A
resumed run keeps the files.  Temporary files and folders that a killed write of a run file left behind are
removed either way, and a folder that the run created and left empty is removed again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from ..atomic import atomic_write_text, remove_stale_staging
from ..errors import CubecoreError, InvalidValueError
from .checkpoint import is_checkpoint_file

# Every file a run writes, by role: the one place their names are written.
FILE_NAMES = {"config": "config.yaml", "metrics_csv": "metrics.csv", "metrics_jsonl": "metrics.jsonl",
              "last": "last.pt", "best": "best.pt", "curves": "curves.png", "report": "report.md",
              "results": "results.json", "model": "model", "tensorboard": "tensorboard", "rollout": "rollout.gif",
              "picture": "grown.png",
              "log": "train.log", "seeds_json": "seeds.json", "seeds_md": "seeds.md", "marker": "cubecore_run.json"}
RUN_FILES = tuple(FILE_NAMES.values())
# What a run writes after its last epoch (the report phase), results.json last: a finished run whose folder
# lacks one of them was stopped while reporting, and --resume writes them.
OUTPUTS = ("curves", "rollout", "report", "model", "results")
MARKER = FILE_NAMES["marker"]
CHECKPOINTS = (FILE_NAMES["last"], FILE_NAMES["best"])
log = logging.getLogger("cubecore")


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
        """The run's files that exist, in the order of ``FILE_NAMES`` (the marker left out)."""
        return [self.root / name for name in FILE_NAMES.values() if name != MARKER and (self.root / name).exists()]

    def present(self) -> List[str]:
        """The names of the run files in the folder, sorted."""
        return sorted(name for name in RUN_FILES if (self.root / name).exists())

    def missing_outputs(self, roles: Sequence[str] = OUTPUTS) -> List[str]:
        """The names of the report phase's outputs (``roles``: a ``cubecore.nca`` run's differ) that are not in
        the folder."""
        return [FILE_NAMES[role] for role in roles if not (self.root / FILE_NAMES[role]).exists()]

    def checkpoint(self) -> Optional[Path]:
        """The checkpoint a run in this folder continues from: last.pt, else best.pt, else None."""
        return next((self.root / name for name in CHECKPOINTS if (self.root / name).is_file()), None)

    def is_cubecore_run(self) -> bool:
        """Whether the folder is marked as a cubecore run, or (a run from before the marker) holds a cubecore
        checkpoint, or (a --seeds study from before the marker) a seed folder that is one."""
        if self.marker.is_file():
            return True
        if any(RunFiles(folder).is_cubecore_run() for folder in self.root.glob("seed-*") if folder.is_dir()):
            return True
        return any(is_checkpoint_file(self.root / name) for name in CHECKPOINTS)

    def mark(self, **info) -> None:
        """Mark the folder as a cubecore run (``info``: what else the marker says)."""
        atomic_write_text(self.marker, json.dumps({"cubecore": "run", **info}, indent=2) + "\n")


def check_not_foreign(files: RunFiles, what: str = "output directory") -> None:
    """Refuse a folder that holds files named like a run's but is no cubecore run: they belong to another
    project, and neither a fresh run nor --overwrite may mix with them or remove them."""
    present = files.present()
    if present and not files.is_cubecore_run():
        raise RunDirectoryError(
            f"{what} {files.root} holds {', '.join(present)} but is not a cubecore run (it has no {MARKER} and no "
            f"cubecore checkpoint), so cubecore neither writes into it nor replaces it, even with --overwrite: "
            f"choose another --output-dir")


OPEN_MODES = ("fresh", "overwrite", "resume")
LOCK_NAME = ".lock"
BACKUP_NAME = ".replaced"  # an --overwrite run's predecessor, until the new run's first checkpoint
SET_ASIDE = ".complete"  # in BACKUP_NAME once every file of the predecessor is in it


class LockHeld(Exception):
    """Another process holds the lock; ``by`` names it for a message (`` (process 1234)``, or empty)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.by = f" (process {holder})" if holder else ""


def take_lock(path: os.PathLike) -> int:
    """Take the exclusive lock on ``path`` (created if missing) without waiting, and write this process's id in
    it; returns the descriptor, whose closing (or the process's end) drops the lock.  Raises ``LockHeld``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise LockHeld(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class RunDirectoryError(CubecoreError, RuntimeError):
    """The run directory is in use by another run, or holds a run that this one would silently replace."""


class RunDirectory:
    """``with RunDirectory(path, mode):`` holds the lock on ``path`` for the block; call ``commit()`` once the
    run has saved a checkpoint, which makes it the folder's run (until then, leaving the block undoes it)."""

    def __init__(self, path: os.PathLike, mode: str = "fresh") -> None:
        if mode not in OPEN_MODES:
            raise InvalidValueError(f"mode must be one of {OPEN_MODES}, got {mode!r}")
        self.path = Path(path)
        self.files = RunFiles(self.path)
        self.mode = mode
        self.backup = self.path / BACKUP_NAME
        self.committed = mode == "resume"  # a resumed run replaces nothing, and keeps what it wrote
        self._lock: Optional[int] = None
        self._created = False
        self._lock_existed = False
        self._taken = False  # the folder checked and taken for this run: from then on, what is in it is its

    def __enter__(self) -> "RunDirectory":
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"output directory {self.path} is a file")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_existed = (self.path / LOCK_NAME).exists()
        try:
            self._lock = take_lock(self.path / LOCK_NAME)
        except LockHeld as held:
            raise RunDirectoryError(f"output directory {self.path} is in use by another run{held.by}; wait for "
                                    f"it to end, or choose another --output-dir") from None
        try:
            self._prepare()
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._leave()

    def commit(self) -> None:
        """The run has saved a checkpoint: it is the folder's run now, and the one it replaces goes."""
        if not self.committed:
            self.committed = True
            shutil.rmtree(self.backup, ignore_errors=True)

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def _leave(self) -> None:
        """Undo a run that saved no checkpoint (its files go, the replaced run's come back), then unlock; a
        folder this run made and left empty goes too."""
        try:
            if self._taken and not self.committed:
                self._undo()
        finally:
            if not self.committed and not self._lock_existed:  # the folder as this run found it, lock file too
                (self.path / LOCK_NAME).unlink(missing_ok=True)
            if self._created and not any(self.path.iterdir()):
                self.release()
                self.path.rmdir()
            self.release()

    def _undo(self) -> None:
        for name in self.files.present():  # all written by this run: a fresh one starts without any
            _remove(self.path / name)
        self._put_back()

    def _put_back(self) -> None:
        if self.backup.is_dir():
            (self.backup / SET_ASIDE).unlink(missing_ok=True)
            for item in self.backup.iterdir():
                os.replace(item, self.path / item.name)
            self.backup.rmdir()

    def _prepare(self) -> None:
        for name in RUN_FILES:  # a write killed between creating and renaming its file or folder (cubecore.atomic)
            for stale in self.path.glob(f"{name}*.tmp"):
                _remove(stale)
            remove_stale_staging(self.path / name)
        if self.backup.is_dir():  # an --overwrite run was stopped by a kill: had it saved a checkpoint, it stays
            if (self.backup / SET_ASIDE).is_file() and self.files.checkpoint() is not None:
                shutil.rmtree(self.backup)
            else:  # killed while setting the previous run aside, or before the new run's first checkpoint
                self._undo() if (self.backup / SET_ASIDE).is_file() else self._put_back()
                log.warning(f"{self.path}: put back the previous run, which an --overwrite run stopped before its "
                            f"first checkpoint had set aside in {self.backup}")
        check_not_foreign(self.files)
        existing = self.files.present()
        if self.mode == "fresh" and existing:
            resume = "continue it with --resume, " if self.files.checkpoint() is not None else ""
            raise RunDirectoryError(
                f"output directory {self.path} already holds a run ({', '.join(existing)}): {resume}replace it "
                f"with --overwrite, or choose another --output-dir")
        if self.mode == "overwrite" and existing:
            self.backup.mkdir()
            for name in existing:  # renames within the folder: nothing is copied, nothing is lost
                os.replace(self.path / name, self.backup / name)
            (self.backup / SET_ASIDE).touch()
        self._taken = True
        if not self.files.marker.is_file():
            self.files.mark()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
