"""The two datasets of embedding pairs and their builders.

``AutoencoderDataset`` yields ``(embedding, embedding)``; ``DialogueDataset`` yields ``(question_embedding,
answer_embedding)`` and keeps the texts so that evaluation can show them.  Both split into train and validation
with a fixed seed (the same split every time); the dialogue split never puts one question text on both sides.
Indexing and ``len`` cover the training split; ``get_dataloader(validation=True)`` gives the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..checks import check_int, check_number, check_tensor
from .teacher import DEFAULT_TEACHER, TeacherEncoder, check_texts
from .cache import encode_cached
from .config import DataConfig
from .readers import EMBEDDING_SUFFIXES, read_dialogue, read_embeddings, read_texts
from .sources import is_named_source, load_conversations
from ..errors import InvalidTypeError, InvalidValueError

Pair = Tuple[str, str]
log = logging.getLogger("cubecore.data")  # what the data filters did, in a run's output


def check_validation_split(value: object) -> float:
    """A fraction in [0, 1)."""
    value = check_number("validation_split", value, minimum=0.0)
    if value >= 1.0:
        raise InvalidValueError(f"validation_split must be < 1, got {value!r}")
    return value


def split_indices(n: int, validation_split: float, shuffle: bool, seed: int,
                  groups: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices; with ``groups``, all items of one group land on the same side."""
    n = check_int("n", n, minimum=0)
    validation_split = check_validation_split(validation_split)
    seed = check_int("seed", seed)
    if groups is not None and len(groups) != n:
        raise InvalidValueError(f"groups must have n={n} items, got {len(groups)}")
    keys = list(groups) if groups is not None else list(range(n))
    unique = list(dict.fromkeys(keys))
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(unique))
    n_val = int(round(len(unique) * validation_split))
    if validation_split > 0 and n_val == 0 and len(unique) > 1:
        n_val = 1
    val_keys = {unique[i] for i in order[:n_val].tolist()}
    val = [i for i, k in enumerate(keys) if k in val_keys]
    train = [i for i, k in enumerate(keys) if k not in val_keys]
    if not train:
        raise InvalidValueError(f"validation_split={validation_split} leaves no training data out of {n} items")
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def check_embedding_pairs(inputs: torch.Tensor, targets: torch.Tensor, name: str = "embeddings") -> None:
    """Inputs and targets are matching [N, dim] tensors of finite values."""
    check_tensor(f"{name} inputs", inputs, "[N, dim]")
    check_tensor(f"{name} targets", targets, "[N, dim]")
    if inputs.dim() != 2 or inputs.shape != targets.shape:
        raise InvalidValueError(f"{name}: inputs and targets must be matching [N, dim] tensors, got {tuple(inputs.shape)} "
                         f"and {tuple(targets.shape)}")
    if not torch.isfinite(inputs).all() or not torch.isfinite(targets).all():
        raise InvalidValueError(f"{name}: NaN or inf values")


class _Pairs(Dataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


class _EmbeddingPairs(Dataset):
    """Shared machinery: processing (centre, normalise), the split, loaders, statistics."""

    def _build(self, inputs: torch.Tensor, targets: torch.Tensor, config: DataConfig, seed: int,
               groups: Optional[Sequence[str]] = None) -> None:
        check_embedding_pairs(inputs, targets)
        self.config, self.seed = config, check_int("seed", seed, minimum=0)
        self.train_indices, self.val_indices = split_indices(
            inputs.shape[0], config.validation_split, config.shuffle_data, seed, groups)
        inputs, targets = inputs.float(), targets.float()
        self.mean = None
        if config.center_embeddings:  # the training split's mean, applied to both splits
            train = torch.cat([inputs[self.train_indices], targets[self.train_indices]])
            self.mean = train.mean(0)
            inputs, targets = inputs - self.mean, targets - self.mean
        if config.normalize_embeddings:
            inputs, targets = F.normalize(inputs, dim=-1), F.normalize(targets, dim=-1)
        self.inputs, self.targets = inputs, targets
        self.dim = inputs.shape[1]
        self._train = _Pairs(inputs[self.train_indices], targets[self.train_indices])
        self._val = _Pairs(inputs[self.val_indices], targets[self.val_indices])

    def __len__(self) -> int:
        return len(self._train)

    def __getitem__(self, i):
        return self._train[i]

    @property
    def validation(self) -> Dataset:
        return self._val

    def split_tensors(self, validation: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        part = self._val if validation else self._train
        return part.inputs, part.targets

    def fingerprint(self) -> Dict[str, object]:
        """What the pairs of each split are, as a SHA-256 (with the splits' sizes): of their texts where the data
        has texts (the teacher's embeddings of the same texts may differ in their last bits between devices),
        else of their embeddings.  A run stores it, and a resume on other data is refused."""
        digest = hashlib.sha256()
        for name, indices in (("train", self.train_indices), ("validation", self.val_indices)):
            digest.update(f"{name} {len(indices)}\n".encode())
            for item in self._items(indices.tolist()):
                digest.update(item)
        return {"sha256": digest.hexdigest(), "train": len(self.train_indices),
                "validation": len(self.val_indices)}

    def _items(self, indices: List[int]) -> Iterable[bytes]:
        """The bytes that say what each pair is (``fingerprint``): here its embeddings."""
        for i in indices:
            yield self.inputs[i].numpy().tobytes() + self.targets[i].numpy().tobytes()

    def get_dataloader(self, batch_size: int = 32, validation: bool = False, shuffle: Optional[bool] = None,
                       **kwargs) -> DataLoader:
        """Batches of ``(input_emb, target_emb)``; the training side is shuffled unless told otherwise."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        part = self._val if validation else self._train
        if len(part) == 0:
            raise InvalidValueError("the validation split is empty (validation_split=0)" if validation else "no data")
        shuffle = (not validation) if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(part, batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)

    def get_statistics(self) -> Dict[str, object]:
        def cos(a, b):
            return F.cosine_similarity(a, b, dim=-1).mean().item() if a.shape[0] else float("nan")

        x, y = self.split_tensors()
        return {"train_size": len(self._train), "validation_size": len(self._val), "dim": self.dim,
                "input_norm_mean": x.norm(dim=-1).mean().item(), "target_norm_mean": y.norm(dim=-1).mean().item(),
                "input_target_cosine_mean": cos(x, y),
                "normalized": self.config.normalize_embeddings, "centered": self.config.center_embeddings}


def _teacher(config: DataConfig, encoder: Optional[TeacherEncoder]) -> TeacherEncoder:
    return encoder if encoder is not None else TeacherEncoder(config.teacher)


def _encode(texts: List[str], config: DataConfig, encoder: Optional[TeacherEncoder]):
    """Embeddings of ``texts`` (each distinct text encoded once), through the cache; and the encoder used."""
    encoder = _teacher(config, encoder)
    unique = list(dict.fromkeys(texts))
    emb = encode_cached(encoder, unique, use_cache=config.use_cache, cache_dir=config.cache_dir)
    index = {t: i for i, t in enumerate(unique)}
    return emb[torch.tensor([index[t] for t in texts], dtype=torch.long)], encoder


class AutoencoderDataset(_EmbeddingPairs):
    """Embeddings paired with themselves: the cube learns to reconstruct its input."""

    def __init__(self, texts: Optional[Sequence[str]] = None, embeddings: Optional[torch.Tensor] = None,
                 config: Optional[DataConfig] = None, encoder: Optional[TeacherEncoder] = None, seed: int = 42) -> None:
        config = config or DataConfig()
        if (texts is None) == (embeddings is None):
            raise InvalidValueError("give exactly one of texts or embeddings")
        self.texts: Optional[List[str]] = None
        self.encoder = encoder
        if texts is not None:
            texts = check_texts(texts)
            total = len(texts)
            if config.max_samples:
                texts = texts[: config.max_samples]
            log.info(f"autoencoder data: {total} text(s), {len(texts)} used"
                     + (f"; {total - len(texts)} left out by data.max_samples={config.max_samples}"
                        if total > len(texts) else ""))
            embeddings, self.encoder = _encode(texts, config, encoder)
            self.texts = texts
        else:
            check_tensor("embeddings", embeddings, "[N, dim]", ndim=2)
            if embeddings.shape[0] == 0:
                raise InvalidValueError("embeddings must be a non-empty [N, dim] tensor, got 0 rows")
            if config.max_samples:
                embeddings = embeddings[: config.max_samples]
        self._build(embeddings, embeddings, config, seed)

    def _items(self, indices: List[int]) -> Iterable[bytes]:
        if self.texts is None:
            yield from super()._items(indices)
            return
        for i in indices:
            yield json.dumps(self.texts[i]).encode() + b"\n"

    @classmethod
    def from_files(cls, file_paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
                   config: Optional[DataConfig] = None, encoder: Optional[TeacherEncoder] = None, seed: int = 42):
        config = config or DataConfig()
        paths = [file_paths] if isinstance(file_paths, (str, os.PathLike)) else list(file_paths)
        if not paths:
            raise InvalidValueError("file_paths is empty")
        if any(is_named_source(p) for p in paths):  # a named source's turns serve as texts
            texts = []
            for p in paths:
                if is_named_source(p):
                    texts += [t for conv in load_conversations(str(p)) for t in conv]
                else:
                    texts += read_texts(p, config.text_field)
            return cls(texts=list(dict.fromkeys(texts)), config=config, encoder=encoder, seed=seed)
        if all(Path(p).suffix.lower() in EMBEDDING_SUFFIXES for p in paths):
            return cls(embeddings=torch.cat([read_embeddings(p) for p in paths]), config=config, seed=seed)
        if any(Path(p).suffix.lower() in EMBEDDING_SUFFIXES for p in paths):
            raise InvalidValueError("mix of embedding files and text files: give one kind")
        texts = [t for p in paths for t in read_texts(p, config.text_field)]
        return cls(texts=texts, config=config, encoder=encoder, seed=seed)


def conversations_to_pairs(conversations: Iterable[Sequence[str]], context_window: int = 1) -> List[Pair]:
    """Consecutive turns become (question, answer); the question joins up to ``context_window`` turns (empty or
    missing ones left out).  A missing answer stays empty, for the quality filter to drop and count."""
    context_window = check_int("context_window", context_window, minimum=1)
    pairs = []
    for turns in conversations:
        turns = [_text(t) for t in turns]
        for i in range(1, len(turns)):
            question = " ".join(t for t in turns[max(0, i - context_window):i] if t)
            pairs.append((question, turns[i]))
    return pairs


def _text(value: object) -> str:
    """A question or answer as stripped text; a missing one (None) is empty, never the text "None"."""
    return "" if value is None else str(value).strip()


FILTER_COUNTS = ("empty", "too_short", "too_long", "duplicate", "truncated")


def filter_pairs(pairs: Iterable[Pair], config: DataConfig) -> Tuple[List[Pair], Dict[str, int]]:
    """The quality filter: drops empty or missing (``empty``), too short (``too_short``, under ``min_length``
    characters) and duplicate (``duplicate``) pairs; a question or answer over ``max_length`` characters is cut
    to it (``truncated``, kept) or, with ``long_pairs="drop"``, its pair dropped (``too_long``).  Returns the
    kept pairs and every count."""
    kept: List[Pair] = []
    counts = Counter()
    seen = set()
    limit = config.max_length
    for q, a in pairs:
        q, a = _text(q), _text(a)
        if not q or not a:
            counts["empty"] += 1
            continue
        if min(len(q), len(a)) < config.min_length:
            counts["too_short"] += 1
            continue
        if limit is not None and max(len(q), len(a)) > limit:
            if config.long_pairs == "drop":
                counts["too_long"] += 1
                continue
            q, a = q[:limit], a[:limit]
            counts["truncated"] += 1
        if config.remove_duplicates and (q, a) in seen:
            counts["duplicate"] += 1
            continue
        seen.add((q, a))
        kept.append((q, a))
    return kept, {key: counts[key] for key in FILTER_COUNTS}


def describe_filter(total: int, kept: int, report: Dict[str, int], config: DataConfig, used: int) -> str:
    """One line of what the quality filter and ``max_samples`` did to ``total`` pairs, every count named with the
    key that sets it."""
    limit = "no limit" if config.max_length is None else f"{config.max_length} characters"
    text = (f"dialogue data: {total} pair(s), {used} used; dropped {report['empty']} empty, "
            f"{report['too_short']} shorter than data.min_length ({config.min_length} characters), "
            f"{report['too_long']} longer than data.max_length ({limit}; data.long_pairs={config.long_pairs}), "
            f"{report['duplicate']} duplicate(s) (data.remove_duplicates={config.remove_duplicates}); "
            f"{report['truncated']} truncated to data.max_length")
    if kept > used:
        text += f"; {kept - used} left out by data.max_samples={config.max_samples}"
    return text


class DialogueDataset(_EmbeddingPairs):
    """(question embedding, answer embedding) pairs distilled from the teacher, with their texts."""

    def __init__(self, pairs: Optional[Sequence[Pair]] = None, conversations: Optional[Sequence[Sequence[str]]] = None,
                 question_embeddings: Optional[torch.Tensor] = None, answer_embeddings: Optional[torch.Tensor] = None,
                 config: Optional[DataConfig] = None, encoder: Optional[TeacherEncoder] = None, seed: int = 42) -> None:
        config = config or DataConfig()
        self.encoder = encoder
        self.filter_report: Dict[str, int] = {}
        if question_embeddings is not None or answer_embeddings is not None:
            if pairs is not None or conversations is not None:
                raise InvalidValueError("give texts (pairs/conversations) or embeddings, not both")
            if question_embeddings is None or answer_embeddings is None:
                raise InvalidValueError("give both question_embeddings and answer_embeddings")
            q = check_tensor("question_embeddings", question_embeddings, "[N, dim]", ndim=2)
            a = check_tensor("answer_embeddings", answer_embeddings, "[N, dim]", ndim=2)
            if config.max_samples:
                q, a = q[: config.max_samples], a[: config.max_samples]
            self.questions = self.answers = None
            self._build(q, a, config, seed)
            return
        if isinstance(pairs, (str, bytes)) or any(isinstance(p, (str, bytes)) for p in (pairs or [])):
            raise InvalidTypeError("pairs must be a list of (question, answer) tuples, not strings")
        all_pairs = [tuple(p) for p in (pairs or [])]
        if any(len(p) != 2 for p in all_pairs):
            raise InvalidValueError("pairs must be (question, answer) tuples")
        if conversations is not None:
            all_pairs += conversations_to_pairs(conversations, config.context_window)
        if not all_pairs:
            raise InvalidValueError("no dialogue given: pairs and conversations are empty")
        filtered, self.filter_report = filter_pairs(all_pairs, config)
        kept = filtered[: config.max_samples] if config.max_samples else filtered
        summary = describe_filter(len(all_pairs), len(filtered), self.filter_report, config, len(kept))
        if not kept:
            raise InvalidValueError(f"every pair was filtered out ({summary})")
        log.info(summary)
        self.questions = [q for q, _ in kept]
        self.answers = [a for _, a in kept]
        emb, self.encoder = _encode(self.questions + self.answers, config, encoder)
        n = len(kept)
        self._build(emb[:n], emb[n:], config, seed, groups=self.questions)

    @classmethod
    def from_source(cls, source: Union[str, os.PathLike], config: Optional[DataConfig] = None,
                    encoder: Optional[TeacherEncoder] = None, seed: int = 42) -> "DialogueDataset":
        """From a named source ("chatterbot", "chitchat") or a dialogue file."""
        config = config or DataConfig()
        if is_named_source(source):
            return cls(conversations=load_conversations(str(source)), config=config, encoder=encoder, seed=seed)
        pairs, conversations = read_dialogue(source, config.question_field, config.answer_field, config.separator)
        return cls(pairs=pairs, conversations=conversations or None, config=config, encoder=encoder, seed=seed)

    def _items(self, indices: List[int]) -> Iterable[bytes]:
        if self.questions is None:
            yield from super()._items(indices)
            return
        for i in indices:
            yield json.dumps([self.questions[i], self.answers[i]]).encode() + b"\n"

    def texts(self, validation: bool = False) -> Tuple[List[str], List[str]]:
        """(questions, answers) of one split, in the order of its tensors."""
        if self.questions is None:
            raise InvalidValueError("this dataset was built from embeddings and has no texts")
        idx = (self.val_indices if validation else self.train_indices).tolist()
        return [self.questions[i] for i in idx], [self.answers[i] for i in idx]

    def get_statistics(self) -> Dict[str, object]:
        stats = super().get_statistics()
        stats["dropped"] = {k: v for k, v in self.filter_report.items() if k != "truncated"}
        stats["truncated"] = self.filter_report.get("truncated", 0)
        return stats


def _config(teacher: str, validation_split: float, use_cache: bool, normalize_embeddings: bool,
            options: Dict[str, object]) -> DataConfig:
    return DataConfig().replace(teacher=teacher, validation_split=validation_split, use_cache=use_cache,
                                normalize_embeddings=normalize_embeddings, **options)


def create_text_dataset(texts: Sequence[str], teacher: str = DEFAULT_TEACHER, validation_split: float = 0.2,
                        use_cache: bool = True, normalize_embeddings: bool = True,
                        encoder: Optional[TeacherEncoder] = None, seed: int = 42, **options) -> AutoencoderDataset:
    """Texts paired with themselves; ``options`` are further ``DataConfig`` fields."""
    cfg = _config(teacher, validation_split, use_cache, normalize_embeddings, options)
    return AutoencoderDataset(texts=texts, config=cfg, encoder=encoder, seed=seed)


def create_file_dataset(file_paths, teacher: str = DEFAULT_TEACHER, validation_split: float = 0.2,
                        use_cache: bool = True, normalize_embeddings: bool = True,
                        encoder: Optional[TeacherEncoder] = None, seed: int = 42, **options) -> AutoencoderDataset:
    """The texts (or embeddings) of files or named sources, each paired with itself."""
    cfg = _config(teacher, validation_split, use_cache, normalize_embeddings, options)
    return AutoencoderDataset.from_files(file_paths, config=cfg, encoder=encoder, seed=seed)


def create_dialogue_dataset(source: Union[str, os.PathLike, Sequence[Pair]] = "chatterbot",
                            teacher: str = DEFAULT_TEACHER, validation_split: float = 0.2, use_cache: bool = True,
                            normalize_embeddings: bool = True, encoder: Optional[TeacherEncoder] = None,
                            seed: int = 42, **options) -> DialogueDataset:
    """A dialogue dataset from a named source ("chatterbot", "chitchat"), a file, or (question, answer) pairs."""
    cfg = _config(teacher, validation_split, use_cache, normalize_embeddings, options)
    if isinstance(source, (str, os.PathLike)):
        return DialogueDataset.from_source(source, config=cfg, encoder=encoder, seed=seed)
    return DialogueDataset(pairs=list(source), config=cfg, encoder=encoder, seed=seed)
