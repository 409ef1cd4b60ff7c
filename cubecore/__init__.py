"""cubecore: a 3D lattice of cells sharing one small neural network, with fused C++/CUDA kernels.

This module only re-exports; importing it compiles nothing and loads no model.
"""

from .model.core import CubicCore
from .data import (AutoencoderDataset, DataConfig, DialogueDataset, EmbeddingCache,
                   create_dialogue_dataset, create_file_dataset, create_text_dataset, load_conversations)
from .data.teacher import DEFAULT_TEACHER, TeacherEncoder
from .ops.front import BACKENDS, info, kernel_unavailable_reason, propagate, resolve_backend
from .ops.reference import propagate_reference, step_reference
from .ops.rule import ACTIVATIONS, BOUNDARIES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, PERCEPTIONS, UPDATES
from .model.reshaper import EmbeddingReshaper
from .model.config import ModelConfig
from .errors import CubecoreError
from .training.config import TrainingConfig
from .training.metrics import EmbeddingMetrics
from .model.processor import EmbeddingProcessor
from .training.trainer import CubeTrainer

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "NEIGHBOURHOODS",
    "OUTPUT_ACTIVATIONS",
    "PERCEPTIONS",
    "AutoencoderDataset",
    "BACKENDS",
    "BOUNDARIES",
    "CubeTrainer",
    "EmbeddingMetrics",
    "EmbeddingProcessor",
    "TrainingConfig",
    "CubicCore",
    "DEFAULT_TEACHER",
    "DataConfig",
    "ModelConfig",
    "CubecoreError",
    "DialogueDataset",
    "EmbeddingCache",
    "EmbeddingReshaper",
    "TeacherEncoder",
    "UPDATES",
    "__version__",
    "create_dialogue_dataset",
    "create_file_dataset",
    "create_text_dataset",
    "info",
    "kernel_unavailable_reason",
    "load_conversations",
    "propagate",
    "propagate_reference",
    "resolve_backend",
    "step_reference",
]
