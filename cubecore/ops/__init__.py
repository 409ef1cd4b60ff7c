"""The lattice op: the cell rule in plain PyTorch (``reference``, the oracle) and the fused kernels' front
(``front``: input checks, backend choice, registration with torch)."""

from .front import (BACKENDS, CUDA_MAX_STATE, info, kernel_limit_reason, kernel_unavailable_reason, propagate,
                    resolve_backend)
from .reference import ACTIVATIONS, BOUNDARIES, UPDATES, propagate_reference, step_reference, trajectory_reference

__all__ = ["ACTIVATIONS", "BACKENDS", "BOUNDARIES", "CUDA_MAX_STATE", "UPDATES", "info", "kernel_limit_reason",
           "kernel_unavailable_reason", "propagate", "propagate_reference", "resolve_backend", "step_reference",
           "trajectory_reference"]
