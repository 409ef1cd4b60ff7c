"""Checkpoint files that can be trusted: loading runs no code, and a damaged file is an error, never a model.

A checkpoint is a dict of tensors and plain data (numbers, strings, lists, dicts), serialised by ``torch.save``
and loaded with ``torch.load(weights_only=True)``, which refuses anything else: a pickle that would run code is
rejected, not executed.  The random-number states that training needs to resume exactly are stored as tensors
for that reason.  The file is an ordinary torch file (``torch.load(path, weights_only=True)`` reads it) whose
zip comment, at its very end, holds the SHA-256 of every byte before it, so that a flipped bit anywhere is
reported with the file's name (the embedding cache carries a checksum the same way).  Read one with
``load_checkpoint_file``, which checks the checksum; files of the previous format (a header line with the
checksum before the torch file, which ``torch.load`` cannot read) load too.  Writes are atomic.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import CubecoreError

MAGIC = b"CUBECORE-CHECKPOINT 2\n"  # the previous format's header line: MAGIC, the SHA-256, a newline, the file
DIGEST_HEX = 64
TRAILER = b"CUBECORE-CHECKPOINT 3 sha256="  # the zip comment: TRAILER and the SHA-256 of every byte before it
TRAILER_SIZE = len(TRAILER) + DIGEST_HEX
_END_OF_ZIP = b"PK\x05\x06"  # the zip's last record (22 bytes; its last two: the comment's length)


class CheckpointError(CubecoreError, ValueError):
    """A file that is not a loadable cubecore checkpoint: damaged, foreign, unsafe or of an older format."""


def save_checkpoint_file(state: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write ``state`` (tensors and plain data only) as a torch file whose zip comment is its checksum,
    atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    if data[-22:-18] != _END_OF_ZIP or data[-2:] != b"\x00\x00":  # torch writes no comment of its own
        raise RuntimeError("torch.save wrote a file that does not end in a zip record without a comment")
    head = data[:-2] + TRAILER_SIZE.to_bytes(2, "little")
    digest = hashlib.sha256(head).hexdigest().encode()
    return atomic_write(path, lambda f: f.write(head + TRAILER + digest))


def is_checkpoint_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` looks like a cubecore checkpoint (its checksum trailer or, in the previous format, its
    header line), without reading the whole file."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return True
            size = f.seek(0, os.SEEK_END)
            if size < TRAILER_SIZE:
                return False
            f.seek(size - TRAILER_SIZE)
            return f.read(len(TRAILER)) == TRAILER
    except OSError:
        return False


def _refused(path: Path, exc: BaseException) -> CheckpointError:
    found = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
    return CheckpointError(
        f"{path} was refused: it holds objects other than tensors and plain data, which could run code when "
        f"loaded; only checkpoints written by cubecore load{' (' + found[0] + ')' if found else ''}")


def _damaged(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: its checksum does not match its contents (a changed, corrupt or "
                           f"truncated file); use another checkpoint (best.pt or an earlier copy)")


def _payload(path: Path, data: bytes) -> bytes:
    """The torch file inside ``data``, its checksum verified."""
    if data.startswith(MAGIC):  # the previous format
        start = len(MAGIC) + DIGEST_HEX + 1
        digest, payload = data[len(MAGIC):start - 1], data[start:]
        if data[start - 1:start] != b"\n" or hashlib.sha256(payload).hexdigest().encode() != digest:
            raise _damaged(path)
        return payload
    if len(data) >= TRAILER_SIZE and data[-TRAILER_SIZE:].startswith(TRAILER):
        if hashlib.sha256(data[:-TRAILER_SIZE]).hexdigest().encode() != data[-DIGEST_HEX:]:
            raise _damaged(path)
        return data
    if data[:2] == b"PK" or data[:1] == b"\x80":  # a torch file or a pickle: say whether it would run code
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _refused(path, exc) from None
        except Exception:
            pass
    raise CheckpointError(f"{path} is not a cubecore checkpoint, or one whose checksum is damaged, corrupt or "
                          f"truncated (a cubecore checkpoint ends in its checksum)")


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The state dict of a checkpoint written by ``save_checkpoint_file``, its checksum verified."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "last.pt", path.parent / "last.pt") if p.is_file()]
        raise CheckpointError(f"{path} is a directory, not a checkpoint file"
                              f"{f' (the run checkpoint beside it is {found[0]})' if found else ''}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = _payload(path, path.read_bytes())
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except Exception as exc:  # a file whose checksum matches but that torch cannot read: not written by cubecore
        raise CheckpointError(f"{path} is not a loadable cubecore checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a cubecore checkpoint")
    return state


# -- random-number states as tensors ---------------------------------------------------------------------------


def rng_states() -> Dict[str, Any]:
    """torch's, numpy's and Python's global random states, as tensors and numbers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
