"""The on-disk embedding cache: a second run with the same texts and teacher never runs the encoder.

One file per (teacher fingerprint, list of texts).  The key covers everything that changes an embedding (model
and its weights, pooling, normalisation, max length, encoder code version) and the texts themselves, so one
model never gets another's embeddings.  Files are written to a temporary name and renamed into place, and carry
a checksum: a killed run leaves nothing a later run would trust, and a corrupt or truncated file is reported,
deleted and rebuilt.  A cache directory that cannot be read or written is reported and the run goes on without
the cache; files get the usual mode (0o666 less the umask).

Why not joblib's ``Memory`` or diskcache.  Measured with joblib 1.6 (installed here, but not a dependency) on
62,800 texts and 384-dim embeddings, chitchat's size: no faster (store 0.51 s against 0.65 s, a hit 0.26 s
against 0.30 s), and it trusts what it reads: with 64 bytes of its ``output.pkl`` flipped it returned the changed
embeddings without a word, where the checksum here reports the file and rebuilds it; a truncated file prints a
traceback that dumps the texts.  Both joblib and diskcache read values back with pickle, which runs code, where
``torch.load(weights_only=True)`` here loads tensors only; and either lays out other files (joblib
``<dir>/joblib/<module>/<function>/<hash>/output.pkl``, diskcache an SQLite ``cache.db``), so every cache built so
far would be embedded again.  diskcache is not installed: a new dependency too.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from ..atomic import atomic_torch_save

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$CUBECORE_CACHE_DIR, else $XDG_CACHE_HOME/cubecore/embeddings, else ~/.cache/cubecore/embeddings."""
    if os.environ.get("CUBECORE_CACHE_DIR"):
        return Path(os.environ["CUBECORE_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cubecore" / "embeddings"


def _texts_digest(texts: List[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _tensor_checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class EmbeddingCache:
    """Maps (encoder fingerprint, texts) to an embedding tensor stored under ``cache_dir``."""

    def __init__(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def path_for(self, fingerprint: Dict[str, object], texts: List[str]) -> Path:
        key = hashlib.sha256(
            (json.dumps(fingerprint, sort_keys=True) + _texts_digest(texts)).encode()
        ).hexdigest()[:32]
        return self.cache_dir / f"{key}.pt"

    def _warn_unusable(self, action: str, exc: BaseException) -> None:
        warnings.warn(f"cubecore: cannot {action} the embedding cache directory {self.cache_dir} ({_reason(exc)}); "
                      f"continuing without the cache", RuntimeWarning, stacklevel=4)

    def load(self, fingerprint: Dict[str, object], texts: List[str]) -> Optional[torch.Tensor]:
        """The cached embeddings, or None when absent; a damaged or mismatched file is reported and removed.
        A file or directory that cannot be read raises OSError (``get_or_compute`` warns and goes on)."""
        path = self.path_for(fingerprint, texts)
        if not path.is_file():
            return None
        with path.open("rb") as f:
            return self._read(f, path, fingerprint, texts)

    def _read(self, f, path: Path, fingerprint: Dict[str, object], texts: List[str]) -> Optional[torch.Tensor]:
        try:
            entry = torch.load(f, map_location="cpu", weights_only=True)
            emb = entry["embeddings"]
            problem = None
            if entry.get("format") != CACHE_FORMAT:
                problem = "an older cache format"
            elif entry.get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
                problem = "another encoder's fingerprint"
            elif entry.get("texts") != _texts_digest(texts) or emb.shape[0] != len(texts):
                problem = "other texts"
            elif entry.get("checksum") != _tensor_checksum(emb):
                problem = "a checksum mismatch (corrupt data)"
        except Exception as exc:  # truncated or not a torch file at all
            problem = f"an unreadable file ({type(exc).__name__}: {exc})"
        if problem is not None:
            warnings.warn(f"cubecore: embedding cache file {path} holds {problem}; rebuilding it", RuntimeWarning,
                          stacklevel=5)
            try:
                path.unlink(missing_ok=True)
            except OSError:  # the rebuilt file replaces it, or writing it fails and says why
                pass
            return None
        return emb

    def store(self, fingerprint: Dict[str, object], texts: List[str], embeddings: torch.Tensor) -> Path:
        embeddings = embeddings.detach().cpu().contiguous()
        entry = {"format": CACHE_FORMAT, "fingerprint": json.dumps(fingerprint, sort_keys=True),
                 "texts": _texts_digest(texts), "checksum": _tensor_checksum(embeddings), "embeddings": embeddings}
        return atomic_torch_save(entry, self.path_for(fingerprint, texts))

    def get_or_compute(self, fingerprint: Dict[str, object], texts: List[str],
                       compute: Callable[[List[str]], torch.Tensor]) -> torch.Tensor:
        """The cached embeddings, else ``compute(texts)``, stored for next time.  A cache that cannot be read or
        written costs a warning naming the directory and the reason, never the run."""
        try:
            cached = self.load(fingerprint, texts)
        except OSError as exc:
            self._warn_unusable("read", exc)
            return compute(texts)  # a file this process cannot read back is not worth writing
        if cached is not None:
            return cached
        embeddings = compute(texts)
        try:
            self.store(fingerprint, texts, embeddings)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (a full disk) as RuntimeError
            self._warn_unusable("write to", exc)
        return embeddings


def encode_cached(encoder, texts: List[str], use_cache: bool = True,
                  cache_dir: Optional[Union[str, os.PathLike]] = None) -> torch.Tensor:
    """``encoder.encode(texts)``, served from the cache when the same teacher already embedded these texts."""
    if not use_cache:
        return encoder.encode(texts)
    return EmbeddingCache(cache_dir).get_or_compute(encoder.fingerprint(), list(texts), encoder.encode)
