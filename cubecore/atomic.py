"""Writing a file or a folder so that a killed process or a full disk never leaves a half-written one that a later
run would trust."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import torch

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError that names ``path`` (a full disk says which file it stopped), unless it names one."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> Path:
    """``write(file)`` into a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    readers see the old file or the whole new one.  The file gets the mode an ordinary ``open(path, "w")``
    would give it (0o666 less the umask), not the private 0o600 of the temporary file.  A failed write (a full
    disk) leaves the old file, no temporary one, and raises an OSError that names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def staging_prefix(path: Union[str, os.PathLike]) -> str:
    """The name of a folder that ``atomic_write_dir(path)`` writes in before renaming it, up to the writer's
    process id: hidden, beside ``path``."""
    return f".{Path(path).name}.staging-"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(path: Union[str, os.PathLike]) -> None:
    """Staging folders of writes to ``path`` whose process is gone (killed mid-write) are removed."""
    path = Path(path)
    prefix = staging_prefix(path)
    for folder in path.parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_dir(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a new hidden folder beside ``path``, flushed to disk, then renamed to ``path``
    (replacing the folder there, whole): readers see the old folder or the whole new one, never a part.  The
    folder and its files get the modes the umask gives.  A failed or interrupted write leaves ``path`` as it was
    and its staging folder removed (after a kill, by the next write to ``path``); an OSError (a full disk)
    names the file it stopped at, else ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    name = f"{staging_prefix(path)}{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=name, dir=path.parent))
    old = None
    try:
        try:
            staging.chmod(0o777 & ~current_umask())  # a folder like any other (mkdtemp makes it private)
            write(staging)
            _fsync_tree(staging)
            if path.exists() or path.is_symlink():
                if not path.is_dir() or path.is_symlink():
                    raise OSError(errno.ENOTDIR, "not a folder that may be replaced", str(path))
                old = Path(tempfile.mkdtemp(prefix=name, suffix="-old", dir=path.parent))
                os.replace(path, old)  # onto the empty folder: the old one is kept aside until the new is in place
            os.replace(staging, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the old folder back
            old = None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """UTF-8 ``text`` through ``atomic_write``."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` through ``atomic_write``."""
    return atomic_write(path, lambda f: torch.save(obj, f))
