"""Checkpoint files that can be trusted: loading runs no code, and a damaged file is an error, never a model.

A checkpoint is a dict of tensors and plain data (numbers, strings, lists, dicts), so it loads with
``torch.load(weights_only=True)``, which refuses anything else: a pickle that would run code is rejected,
not executed.  The random-number states that training needs to resume exactly are stored as tensors for
that reason.  The payload is serialised once, its SHA-256 stored beside it, and checked on load, as the
embedding cache does, so a flipped bit is reported with the file's name.  Writes are atomic.
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

from .atomic import atomic_torch_save

CHECKPOINT_FORMAT = "cubecore-checkpoint-2"


class CheckpointError(ValueError):
    """A file that is not a loadable cubecore checkpoint: damaged, foreign, unsafe or of an older format."""


def save_checkpoint_file(state: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write ``state`` (tensors and plain data only) with its checksum, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapper = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return atomic_torch_save(wrapper, path)


def _load_weights_only(source, path: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data, which could run code when "
            f"loaded (or it is not a checkpoint at all). Only checkpoints written by cubecore load. "
            f"({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # truncated, or not a torch file at all
        raise CheckpointError(f"{path} is not a readable cubecore checkpoint (corrupt or truncated: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The state dict of a checkpoint written by ``save_checkpoint_file``, its checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    wrapper = _load_weights_only(path, path)
    if not isinstance(wrapper, dict) or not str(wrapper.get("format", "")).startswith("cubecore-checkpoint"):
        raise CheckpointError(f"{path} is not a cubecore checkpoint")
    if wrapper["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a cubecore checkpoint of another format ({wrapper['format']!r}; this "
                              f"version reads {CHECKPOINT_FORMAT!r})")
    payload = wrapper.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise CheckpointError(f"{path} is damaged: its payload is missing")
    data = payload.contiguous().numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != wrapper.get("sha256"):
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents (a changed or "
                              f"corrupt file); use another checkpoint (best.pt or an earlier copy)")
    state = _load_weights_only(io.BytesIO(data), path)
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
