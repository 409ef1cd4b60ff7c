"""cubecore: a 3D lattice of cells sharing one small neural network, with fused C++/CUDA kernels.

This module only re-exports; importing it compiles nothing and loads no model.
"""

from .core import CubicCore
from .ops import BACKENDS, info, kernel_unavailable_reason, propagate, resolve_backend
from .reference import ACTIVATIONS, BOUNDARIES, UPDATES, propagate_reference, step_reference

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BOUNDARIES",
    "CubicCore",
    "UPDATES",
    "__version__",
    "info",
    "kernel_unavailable_reason",
    "propagate",
    "propagate_reference",
    "resolve_backend",
    "step_reference",
]
