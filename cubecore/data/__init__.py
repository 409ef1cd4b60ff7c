"""The data layer: embedding cache, named sources, file readers, and the datasets with their builders."""

from .cache import EmbeddingCache, default_cache_dir, encode_cached
from .datasets import (AutoencoderDataset, DatasetConfig, DialogueConfig, DialogueDataset, conversations_to_pairs,
                       create_dialogue_dataset, create_file_dataset, create_text_dataset, filter_pairs,
                       split_indices)
from .readers import read_dialogue, read_embeddings, read_texts
from .sources import SOURCES, load_conversations

__all__ = [
    "AutoencoderDataset", "DatasetConfig", "DialogueConfig", "DialogueDataset", "EmbeddingCache", "SOURCES",
    "conversations_to_pairs", "create_dialogue_dataset", "create_file_dataset", "create_text_dataset",
    "default_cache_dir", "encode_cached", "filter_pairs", "load_conversations", "read_dialogue",
    "read_embeddings", "read_texts", "split_indices",
]
