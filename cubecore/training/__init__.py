"""The training layer: ``TrainingConfig``, ``CubeTrainer``, losses, metrics and floors, and what a run writes
(checkpoints, the run directory, reports, trackers)."""

from .config import TrainingConfig
from .metrics import EmbeddingMetrics
from .trainer import CubeTrainer

__all__ = ["CubeTrainer", "EmbeddingMetrics", "TrainingConfig"]
