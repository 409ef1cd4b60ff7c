"""``DataConfig``: what a run learns from and how texts become split, processed embedding pairs; owned by the
data layer (``cubecore.data``).  The run's ``seed`` (``TrainingConfig``) also fixes the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..checks import check_choice, check_int, check_number
from ..errors import InvalidValueError
from ..sections import ConfigSection
from .teacher import DEFAULT_TEACHER

MODES = ("autoencoder", "dialogue", "mixed")
LONG_PAIRS = ("truncate", "drop")  # a question or answer over max_length characters: cut to it, or drop the pair


@dataclass
class DataConfig(ConfigSection):
    section = "data"

    source: str = "chatterbot"  # a named source (chatterbot, chitchat) or a data file
    mode: str = "dialogue"  # autoencoder: each text to itself; dialogue: question -> answer; mixed: both
    teacher: str = DEFAULT_TEACHER  # the teacher encoder: short name, Hugging Face id or local directory
    mixed_dialogue_fraction: float = 0.5  # mixed mode: share of dialogue pairs among all training pairs
    max_samples: Optional[int] = None
    validation_split: float = 0.2
    shuffle_data: bool = True  # which items go to validation: a seeded shuffle, or the last ones
    normalize_embeddings: bool = True
    center_embeddings: bool = False  # subtract the training split's mean embedding
    use_cache: bool = True  # the embedding cache (cubecore.data.cache)
    cache_dir: Optional[str] = None
    text_field: str = "text"  # the field of a JSON/CSV text file
    # dialogue: how conversations become pairs, and which pairs are kept
    context_window: int = 1  # turns joined into the question when pairs come from conversations
    min_length: int = 1  # characters, both sides; a shorter pair is dropped
    max_length: Optional[int] = 1000  # characters, both sides; null: no limit (the teacher cuts at its tokens)
    # a longer question or answer: "truncate" cuts it to max_length and keeps the pair, "drop" drops the pair
    # (runs saved before this key dropped them)
    long_pairs: str = field(default="truncate", metadata={"saved_before": "drop"})
    remove_duplicates: bool = True
    question_field: str = "question"
    answer_field: str = "answer"
    separator: str = "\t"

    def check(self) -> None:
        check_choice(self.key("mode"), self.mode, MODES)
        if not 0.0 <= self.validation_split < 1.0:
            raise InvalidValueError(f"{self.key('validation_split')} must be in [0, 1), got {self.validation_split}")
        check_number(self.key("mixed_dialogue_fraction"), self.mixed_dialogue_fraction, 0.0, 1.0)
        if self.max_samples is not None:
            check_int(self.key("max_samples"), self.max_samples, minimum=1)
        self.context_window = check_int(self.key("context_window"), self.context_window, minimum=1)
        check_int(self.key("min_length"), self.min_length, minimum=0)
        check_choice(self.key("long_pairs"), self.long_pairs, LONG_PAIRS)
        if self.max_length is not None:
            check_int(self.key("max_length"), self.max_length, minimum=1)
            if self.min_length > self.max_length:
                raise InvalidValueError(f"{self.key('min_length')} must be <= max_length, got {self.min_length} > "
                                        f"{self.max_length}")
        for key in ("source", "teacher", "separator"):
            if not getattr(self, key):
                raise InvalidValueError(f"{self.key(key)} must not be empty")
