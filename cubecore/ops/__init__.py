"""The lattice op: the rule's choices (``rule``), the cell rule in plain PyTorch (``reference``, the oracle) and
the fused kernels' front (``front``: input checks, backend choice, registration with torch)."""

from .front import (BACKENDS, CUDA_MAX_STATE, fire_masks, info, kernel_limit_reason, kernel_unavailable_reason,
                    propagate, resolve_backend)
from .reference import propagate_reference, step_reference, trajectory_reference
from .rule import (ACTIVATIONS, BOUNDARIES, BOUNDARY_ALIASES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, PERCEPTIONS,
                   SLOT_OFFSETS, UPDATES, Rule)

__all__ = ["ACTIVATIONS", "BACKENDS", "BOUNDARIES", "BOUNDARY_ALIASES", "CUDA_MAX_STATE", "NEIGHBOURHOODS",
           "OUTPUT_ACTIVATIONS", "PERCEPTIONS", "Rule", "SLOT_OFFSETS", "UPDATES", "fire_masks", "info",
           "kernel_limit_reason", "kernel_unavailable_reason", "propagate", "propagate_reference", "resolve_backend",
           "step_reference", "trajectory_reference"]
