"""File readers: texts for the autoencoder, (question, answer) pairs or conversations for dialogue, or ready
embeddings.  Formats: .txt, .jsonl, .json, .csv, and .pt / .npy (embeddings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
EMBEDDING_SUFFIXES = (".pt", ".npy")
PathLike = Union[str, Path]


def _existing(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix.lower() not in TEXT_SUFFIXES + EMBEDDING_SUFFIXES:
        raise ValueError(f"unsupported data file {p}: use one of {TEXT_SUFFIXES + EMBEDDING_SUFFIXES}")
    return p


def _records(path: Path) -> List[object]:
    """The items of a .jsonl (one JSON value a line) or .json (a list) file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
    if isinstance(data, dict):
        for key in ("data", "conversations", "pairs", "texts"):
            if isinstance(data.get(key), list):
                return data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list (or an object with a 'data' list)")
    return data


def _field(record: object, field: str, path: Path, index: int) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise KeyError(f"{path}: item {index} has no field {field!r} (it has {keys})")
    return str(record[field])


def _csv_rows(path: Path, columns: Sequence[str]) -> List[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise KeyError(f"{path}: no column {missing[0]!r}; columns are {reader.fieldnames}")
        return list(reader)


def read_texts(path: PathLike, text_field: str = "text") -> List[str]:
    """Texts of a .txt (one a line), .jsonl/.json (field ``text_field``, or plain strings) or .csv (column)."""
    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix in EMBEDDING_SUFFIXES:
        raise ValueError(f"{p} holds embeddings, not texts: use read_embeddings")
    if suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        texts = [row[text_field] for row in _csv_rows(p, [text_field])]
    else:
        texts = [_field(r, text_field, p, i) for i, r in enumerate(_records(p))]
    if not texts:
        raise ValueError(f"{p} holds no texts")
    return texts


def read_embeddings(path: PathLike) -> torch.Tensor:
    """A [N, dim] float tensor from .pt (a tensor, or a dict with 'embeddings') or .npy."""
    p = _existing(path)
    if p.suffix.lower() == ".npy":
        import numpy as np

        emb = torch.from_numpy(np.load(p))
    elif p.suffix.lower() == ".pt":
        obj = torch.load(p, map_location="cpu", weights_only=True)
        emb = obj.get("embeddings") if isinstance(obj, dict) else obj
    else:
        raise ValueError(f"{p} is a text file, not embeddings: use read_texts")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] == 0:
        raise ValueError(f"{p}: expected a non-empty [N, dim] tensor of embeddings")
    return emb.float()


def read_dialogue(path: PathLike, question_field: str = "question", answer_field: str = "answer",
                  separator: str = "\t") -> Tuple[List[Tuple[str, str]], List[List[str]]]:
    """(pairs, conversations) from a dialogue file: .txt lines ``question<separator>answer``; .jsonl/.json
    items with question/answer fields, or lists of turns (conversations); .csv question/answer columns."""
    p = _existing(path)
    suffix = p.suffix.lower()
    pairs: List[Tuple[str, str]] = []
    conversations: List[List[str]] = []
    if suffix == ".txt":
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if separator not in line:
                raise ValueError(f"{p}:{number}: no separator {separator!r} between question and answer")
            q, a = line.split(separator, 1)
            pairs.append((q.strip(), a.strip()))
    elif suffix == ".csv":
        pairs = [(row[question_field], row[answer_field]) for row in _csv_rows(p, [question_field, answer_field])]
    elif suffix in (".json", ".jsonl"):
        for i, record in enumerate(_records(p)):
            if isinstance(record, list):
                conversations.append([str(t) for t in record])
            elif isinstance(record, dict) and isinstance(record.get("turns") or record.get("conversation"), list):
                conversations.append([str(t) for t in (record.get("turns") or record.get("conversation"))])
            else:
                pairs.append((_field(record, question_field, p, i), _field(record, answer_field, p, i)))
    else:
        raise ValueError(f"{p} holds embeddings: pass question and answer embeddings directly")
    if not pairs and not conversations:
        raise ValueError(f"{p} holds no dialogue")
    return pairs, conversations
