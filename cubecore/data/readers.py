"""File readers: texts for the autoencoder, (question, answer) pairs or conversations for dialogue, or ready
embeddings.  Formats: .txt, .jsonl, .json, .csv, and .pt / .npy (embeddings).

Text files are UTF-8, with or without a byte-order mark; anything else is an error naming the file and the line.
So is JSON that Python's json cannot read: invalid, an integer over Python's digit limit (4300 by default), or
nested deeper than its recursion limit.  Embedding files are read without running code: ``.pt`` through
``torch.load(weights_only=True)``, ``.npy`` without pickle; a file that these refuse, or that holds no real
numbers (an object, string or complex array), is an error naming the file.
A missing value (a CSV row without the column's cell, a JSON ``null``) is an empty text, never the text "None":
the dialogue quality filter drops and counts such pairs (``empty``), ``read_texts`` skips such texts and warns.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_str
from ..errors import InvalidValueError, UnknownKeyError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
EMBEDDING_SUFFIXES = (".pt", ".npy")
PathLike = Union[str, Path]


def _existing(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix.lower() not in TEXT_SUFFIXES + EMBEDDING_SUFFIXES:
        raise InvalidValueError(f"unsupported data file {p}: use one of {TEXT_SUFFIXES + EMBEDDING_SUFFIXES}")
    return p


def read_text_file(path: Path) -> str:
    """The whole of a UTF-8 text file, without its byte-order mark if it has one, newlines as they are."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise InvalidValueError(f"{path}:{line}: not UTF-8 text (byte {data[start:start + 1]!r} at offset {start}: "
                         f"{exc.reason}); save the file as UTF-8") from None


def _lines(path: Path) -> List[str]:
    return read_text_file(path).splitlines()


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)


def _lone_surrogate(text: str) -> Optional[Tuple[int, str]]:
    """(offset, escape) of the first ``\\uD800``-``\\uDFFF`` escape in JSON text that is not half of a pair: Python's
    json reads it as a string no UTF-8 text can hold, which fails later without saying where."""
    pending = None  # (offset, escape, end) of a high surrogate waiting for its low half
    for m in _ESCAPE.finditer(text):
        code = int(m.group(1), 16) if m.group(1) else None
        if pending is not None:
            if code is not None and 0xDC00 <= code <= 0xDFFF and m.start() == pending[2]:
                pending = None
                continue
            return pending[:2]
        if code is not None and 0xD800 <= code <= 0xDBFF:
            pending = (m.start(), m.group(0), m.end())
        elif code is not None and 0xDC00 <= code <= 0xDFFF:
            return m.start(), m.group(0)
    return pending[:2] if pending is not None else None


def _check_surrogates(path: Path, text: str, first_line: int = 1) -> None:
    found = _lone_surrogate(text)
    if found is not None:
        offset, escape = found
        line = first_line + text.count("\n", 0, offset)
        raise InvalidValueError(f"{path}:{line}: the JSON escape {escape} is half of a surrogate pair, not a "
                                f"character (text cut inside an emoji or similar); fix or remove it")


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?', re.S)


def _parse_json(path: Path, text: str, first_line: int = 1) -> object:
    """``json.loads``, each way it can fail an error naming the file and the line: besides invalid JSON, an
    integer over Python's digit limit for int (a ValueError) and nesting past its recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidValueError(f"{path}:{first_line + exc.lineno - 1}: not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # json's own errors are JSONDecodeError: these come from Python
        found = _json_beyond_python(text, nesting=isinstance(exc, RecursionError))
        if found is None:
            raise
        offset, problem = found
        raise InvalidValueError(f"{path}:{first_line + text.count(chr(10), 0, offset)}: {problem}") from None


def _json_beyond_python(text: str, nesting: bool) -> Optional[Tuple[int, str]]:
    """(offset, what) of what Python cannot read in JSON text that is otherwise valid: the deepest nesting
    (``nesting``) or the first integer over the digit limit; None if there is none."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    depth, deepest = 0, (0, 0)
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            if depth > deepest[0]:
                deepest = (depth, m.start())
        elif token in ("]", "}"):
            depth -= 1
        elif not nesting and limit and len(token.lstrip("-")) > limit and token.lstrip("-").isdigit():
            digits = len(token.lstrip("-"))
            return m.start(), f"an integer of {digits} digits, more than Python reads ({limit}); write it as a string"
    if nesting and deepest[0]:
        return deepest[1], (f"JSON nested {deepest[0]} levels deep, deeper than Python's json reads; "
                            f"flatten the data")
    return None


def _records(path: Path) -> List[Tuple[str, object]]:
    """(where, item) for the items of a .jsonl (one JSON value a line) or .json (a list) file; ``where`` is
    ``path:line`` or ``path: item i`` for messages."""
    text = read_text_file(path)
    _check_surrogates(path, text)
    if path.suffix.lower() == ".jsonl":
        return [(f"{path}:{number}", _parse_json(path, line, number))
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _parse_json(path, text)
    if isinstance(data, dict):
        for key in ("data", "conversations", "pairs", "texts"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise InvalidValueError(f"{path}: expected a JSON list (or an object with a 'data' list)")
    return [(f"{path}: item {i}", item) for i, item in enumerate(data)]


def _value(value: object, where: str, what: str) -> str:
    """A JSON value as text: None (null) is missing, i.e. empty; numbers and booleans as written."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    raise InvalidValueError(f"{where}: {what} must be text, got a JSON {type(value).__name__}")


def _field(record: object, field: str, where: str) -> str:
    if record is None or isinstance(record, str):
        return _value(record, where, "an item")
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UnknownKeyError(f"{where} has no field {field!r} (it has {keys})")
    return _value(record[field], where, f"field {field!r}")


def _csv_rows(path: Path, columns: Sequence[str]) -> List[Tuple[str, dict]]:
    """(where, row) for the rows of a CSV file; a cell that a short row lacks is empty.  A cell may be as long as
    the file (csv's own limit of 131,072 characters is lifted while the file is read); a file csv cannot parse is
    an error naming the file and the line."""
    text = read_text_file(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restval="")
    rows = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(old_limit, min(len(text) + 1, sys.maxsize)))
    try:
        fields = reader.fieldnames or []
        missing = [c for c in columns if c not in fields]
        if missing:
            raise UnknownKeyError(f"{path}: no column {missing[0]!r}; columns are {reader.fieldnames}")
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", {k: ("" if v is None else v) for k, v in row.items()}))
    except csv.Error as exc:
        raise InvalidValueError(f"{path}:{reader.reader.line_num}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(old_limit)
    return rows


def read_texts(path: PathLike, text_field: str = "text") -> List[str]:
    """Texts of a .txt (one a line), .jsonl/.json (field ``text_field``, or plain strings) or .csv (column).
    Blank lines of a .txt are skipped; empty or missing texts of the other formats too, with a warning."""
    text_field = check_str("text_field", text_field)
    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix in EMBEDDING_SUFFIXES:
        raise InvalidValueError(f"{p} holds embeddings, not texts: use read_embeddings")
    if suffix == ".txt":
        return _nonempty(p, [line.strip() for line in _lines(p) if line.strip()])
    if suffix == ".csv":
        found = [(where, row[text_field]) for where, row in _csv_rows(p, [text_field])]
    else:
        found = [(where, _field(r, text_field, where)) for where, r in _records(p)]
    texts = [t for _, t in found if t.strip()]
    skipped = [where for where, t in found if not t.strip()]
    if skipped:
        warnings.warn(f"cubecore: {p}: skipped {len(skipped)} empty or missing text(s) (first at "
                      f"{skipped[0]})", RuntimeWarning, stacklevel=2)
    return _nonempty(p, texts)


def _nonempty(p: Path, texts: List[str]) -> List[str]:
    if not texts:
        raise InvalidValueError(f"{p} holds no texts")
    return texts


def read_embeddings(path: PathLike) -> torch.Tensor:
    """A [N, dim] float tensor from .pt (a tensor, or a dict with 'embeddings') or .npy of real numbers."""
    p = _existing(path)
    if p.suffix.lower() == ".npy":
        emb = _read_npy(p)
    elif p.suffix.lower() == ".pt":
        emb = _read_pt(p)
    else:
        raise InvalidValueError(f"{p} is a text file, not embeddings: use read_texts")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] == 0:
        raise InvalidValueError(f"{p}: expected a non-empty [N, dim] tensor of embeddings")
    if emb.is_complex() or emb.is_quantized:  # .float() would drop the imaginary part without a word
        raise InvalidValueError(f"{p}: holds {emb.dtype} values; embeddings are real numbers (e.g. float32)")
    return emb.float()


def _reason(exc: BaseException) -> str:
    """An exception as its type and first sentence: a message that must stay one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _nonempty_file(p: Path) -> None:
    if p.stat().st_size == 0:
        raise InvalidValueError(f"{p} is empty")


def _read_pt(p: Path) -> object:
    """A torch file's tensor (or its 'embeddings'), loaded with ``weights_only=True``: a pickle of other objects
    is refused, never run."""
    _nonempty_file(p)
    try:
        with warnings.catch_warnings():  # torch's note on a pickle's protocol would come before the one error line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as exc:  # what weights_only refuses, and bytes that are no pickle at all
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        raise InvalidValueError(f"{p} was refused: torch.load(weights_only=True) reads tensors and plain data "
                                f"only, and this is a pickle of other objects, which could run code when loaded"
                                f"{f' (here {found.group(1)})' if found else ', or no torch file'}; save "
                                f"embeddings with torch.save(tensor, path)") from None
    except Exception as exc:  # torch.load's errors for an empty, truncated or damaged file have no common type
        raise InvalidValueError(f"{p}: not a readable torch file ({_reason(exc)})") from None
    return obj.get("embeddings") if isinstance(obj, dict) else obj


def load_npy(p: Path, name: str, advice: str):
    """The one array of a .npy file, read without pickle (an object array is refused, never run), every bad file
    one cubecore error: ``name`` says the file as the message puts it, ``advice`` how to save it right."""
    import numpy as np

    try:
        array = np.load(p, allow_pickle=False)
    except OSError:
        raise
    except (ValueError, EOFError) as exc:
        if "Object arrays" in str(exc):
            raise InvalidValueError(f"{name} was refused: an array of Python objects (dtype object), which numpy "
                                    f"reads only by unpickling, which could run code; {advice}") from None
        raise InvalidValueError(f"{name}: not a readable .npy file ({_reason(exc)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise InvalidValueError(f"{name}: an .npz archive, not one .npy array; save it with np.save")
    return array


def _read_npy(p: Path) -> torch.Tensor:
    """A .npy array of real numbers as a tensor (load_npy)."""
    import numpy as np

    _nonempty_file(p)
    array = load_npy(p, str(p), "save the embeddings as numbers (e.g. float32)")
    if array.dtype.kind not in "biuf":  # strings, bytes, records, dates, complex numbers
        raise InvalidValueError(f"{p}: holds an array of dtype {array.dtype}; embeddings are real numbers "
                                f"(e.g. float32)")
    return torch.from_numpy(array.astype(np.float32))  # also into this machine's byte order


def read_dialogue(path: PathLike, question_field: str = "question", answer_field: str = "answer",
                  separator: str = "\t") -> Tuple[List[Tuple[str, str]], List[List[str]]]:
    """(pairs, conversations) from a dialogue file: .txt lines ``question<separator>answer``; .jsonl/.json
    items with question/answer fields, or lists of turns (conversations); .csv question/answer columns.
    A missing question, answer or turn is an empty text, which the quality filter drops and counts."""
    question_field = check_str("question_field", question_field)
    answer_field = check_str("answer_field", answer_field)
    separator = check_str("separator", separator)
    if not separator:
        raise InvalidValueError("separator must not be empty")
    p = _existing(path)
    suffix = p.suffix.lower()
    pairs: List[Tuple[str, str]] = []
    conversations: List[List[str]] = []
    if suffix == ".txt":
        for number, line in enumerate(_lines(p), 1):
            if not line.strip():
                continue
            if separator not in line:
                raise InvalidValueError(f"{p}:{number}: no separator {separator!r} between question and answer")
            q, a = line.split(separator, 1)
            pairs.append((q.strip(), a.strip()))
    elif suffix == ".csv":
        pairs = [(row[question_field], row[answer_field])
                 for _, row in _csv_rows(p, [question_field, answer_field])]
    elif suffix in (".json", ".jsonl"):
        for where, record in _records(p):
            turns = record if isinstance(record, list) else (
                record.get("turns") or record.get("conversation") if isinstance(record, dict) else None)
            if isinstance(turns, list):
                conversations.append([_value(t, where, "a turn") for t in turns])
            else:
                pairs.append((_field(record, question_field, where), _field(record, answer_field, where)))
    else:
        raise InvalidValueError(f"{p} holds embeddings: pass question and answer embeddings directly")
    if not pairs and not conversations:
        raise InvalidValueError(f"{p} holds no dialogue")
    return pairs, conversations
