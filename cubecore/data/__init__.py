"""The data layer: ``DataConfig``, the teacher encoder, the embedding cache, named sources, file readers, the
datasets with their builders, and the pairs a run's mode trains on (``prepare_data``)."""

from .assemble import TrainingData, prepare_data
from .cache import EmbeddingCache, default_cache_dir, encode_cached
from .config import MODES, DataConfig
from .datasets import (AutoencoderDataset, DialogueDataset, conversations_to_pairs, create_dialogue_dataset,
                       create_file_dataset, create_text_dataset, filter_pairs, split_indices)
from .readers import read_dialogue, read_embeddings, read_texts
from .sources import SOURCES, load_conversations
from .teacher import DEFAULT_TEACHER, TeacherEncoder

__all__ = [
    "AutoencoderDataset", "DEFAULT_TEACHER", "DataConfig", "DialogueDataset", "EmbeddingCache", "MODES", "SOURCES",
    "TeacherEncoder", "TrainingData", "conversations_to_pairs", "create_dialogue_dataset", "create_file_dataset",
    "create_text_dataset", "default_cache_dir", "encode_cached", "filter_pairs", "load_conversations",
    "prepare_data", "read_dialogue", "read_embeddings", "read_texts", "split_indices",
]
