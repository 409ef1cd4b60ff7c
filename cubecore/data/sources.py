"""Named real data that ships as packages and loads offline: ``"chatterbot"`` and ``"chitchat"``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Tuple

from ..checks import check_str
from ..errors import InvalidValueError, UnavailableError

Pair = Tuple[str, str]


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise UnavailableError(f"the {module!r} data needs the package {package!r}: pip install {package}") from exc


def chatterbot_conversations(language: str = "english") -> List[List[str]]:
    """chatterbot-corpus (BSD): short English Q->A conversations in YAML, one list of turns each."""
    _require("chatterbot_corpus", "chatterbot-corpus")
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    folder = Path(DATA_DIRECTORY) / language
    if not folder.is_dir():
        raise FileNotFoundError(f"chatterbot-corpus has no language {language!r} under {DATA_DIRECTORY}")
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        for conv in data.get("conversations", []):
            if not isinstance(conv, list):  # a few files hold stray strings among the conversations
                continue
            turns = [str(t).strip() for t in conv if t is not None]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def chitchat_conversations() -> List[List[str]]:
    """chitchat-dataset (MIT): about 7k open-domain multi-turn conversations; a speaker's consecutive messages
    are joined into one turn."""
    _require("chitchat_dataset", "chitchat-dataset")
    import chitchat_dataset

    return [[t.strip() for t in conv if t.strip()] for conv in chitchat_dataset.ConversationDataset()]


SOURCES: Dict[str, Callable[[], List[List[str]]]] = {
    "chatterbot": chatterbot_conversations,
    "chitchat": chitchat_conversations,
}


def is_named_source(name: object) -> bool:
    return isinstance(name, str) and name.lower() in SOURCES


def load_conversations(name: str) -> List[List[str]]:
    check_str("name", name)
    if not is_named_source(name):
        raise InvalidValueError(f"unknown data source {name!r}; named sources: {sorted(SOURCES)}")
    return SOURCES[name.lower()]()
