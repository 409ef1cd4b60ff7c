"""Shared helpers: random problems of the cell rule at a given size."""

from typing import List

import pytest
import torch

import cubecore


def make_problem(B, X, Y, Z, S, H, E, dtype=torch.float64, device="cpu", seed=0, scale=0.5) -> List[torch.Tensor]:
    """Random (state, external, w1, b1, w2, b2) with weights large enough that every term matters."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    return [
        rnd(B, X, Y, Z, S, s=scale),
        rnd(B, X, Y, Z, E),
        rnd(H, 7 * S + E, s=0.4),
        rnd(H, s=0.2),
        rnd(S, H, s=0.4),
        rnd(S, s=0.2),
    ]


requires_kernel = pytest.mark.skipif(
    cubecore.kernel_unavailable_reason("cpu", torch.float32) is not None,
    reason=f"CPU kernel not built: {cubecore.kernel_unavailable_reason('cpu', torch.float32)}",
)

requires_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or cubecore.kernel_unavailable_reason("cuda", torch.float32) is not None,
    reason="needs a CUDA device and cubecore built with CUDA kernels",
)
