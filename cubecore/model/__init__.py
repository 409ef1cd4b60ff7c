"""The model layer: ``ModelConfig``, the ``CubicCore`` module, the ``EmbeddingReshaper`` and the
``EmbeddingProcessor`` that joins them; the sentence-transformers adapter of a trained one (``adapter``)."""

from .core import CubicCore
from .processor import EmbeddingProcessor
from .reshaper import EmbeddingReshaper

__all__ = ["CubicCore", "EmbeddingProcessor", "EmbeddingReshaper"]
