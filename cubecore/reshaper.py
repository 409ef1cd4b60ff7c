"""``EmbeddingReshaper``: lays an embedding [B, dim] onto the lattice [B, X, Y, Z, E] and reads it back.

The lattice only mixes neighbours, so where each dimension sits matters.  Strategies:

- ``simple``: a plain reshape (dim == X*Y*Z*E); the round trip is exact.
- ``adaptive``: a permutation fit on data: dimensions by variance, the most variable at the lattice centre and
  the least at the faces.
- ``semantic``: a permutation fit on data that puts correlated dimensions next to each other: dimensions are
  ordered along the leading eigenvector of their |correlation| graph's Laplacian (spectral ordering) and laid
  along a path through the lattice whose consecutive cells are face-neighbours.
- ``projection``: learned linear maps in and out, so any lattice serves any embedding size.

Permutations are buffers, saved in ``state_dict`` and exactly invertible.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

STRATEGIES = ("simple", "adaptive", "semantic", "projection")


def fitting_lattices(dim: int, limit: int = 6, near: Optional[Sequence[int]] = None) -> List[Tuple[int, int, int, int]]:
    """(X, Y, Z, E) with X*Y*Z*E == dim, for an error message: first those that keep two sides of the lattice
    ``near`` (with E = 1), then the most cube-like."""
    found = []
    if near is not None:
        X, Y, Z = near
        for a, b, slot in ((X, Y, 2), (X, Z, 1), (Y, Z, 0)):
            if dim % (a * b) == 0:
                sides = [X, Y, Z]
                sides[slot] = dim // (a * b)
                if tuple(sides) != tuple(near) and (*sides, 1) not in found:
                    found.append((*sides, 1))
    cube_like = []
    for E in range(1, dim + 1):
        if dim % E:
            continue
        cells = dim // E
        for X in range(1, int(round(cells ** (1 / 3))) + 2):
            if cells % X:
                continue
            for Y in range(X, int((cells // X) ** 0.5) + 1):
                if (cells // X) % Y == 0:
                    Z = cells // X // Y
                    if Z >= Y:
                        cube_like.append((X, Y, Z, E))
    cubes = sorted((s for s in cube_like if s not in found), key=lambda s: (s[3], max(s[:3]) / max(1, min(s[:3]))))
    return (found + cubes)[:limit]


def _snake_order(X: int, Y: int, Z: int) -> torch.Tensor:
    """Cell indices along a boustrophedon path: consecutive cells are face-neighbours."""
    order = []
    for x in range(X):
        ys = range(Y) if x % 2 == 0 else range(Y - 1, -1, -1)
        for yi, y in enumerate(ys):
            forward = (x * Y + yi) % 2 == 0
            zs = range(Z) if forward else range(Z - 1, -1, -1)
            order.extend((x * Y + y) * Z + z for z in zs)
    return torch.tensor(order, dtype=torch.long)


def _centre_order(X: int, Y: int, Z: int) -> torch.Tensor:
    """Cell indices from the lattice centre outwards (ties broken by index, so the order is deterministic)."""
    g = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"), -1).double()
    centre = torch.tensor([(X - 1) / 2, (Y - 1) / 2, (Z - 1) / 2], dtype=torch.float64)
    dist = (g - centre).square().sum(-1).flatten()
    return torch.tensor(sorted(range(dist.numel()), key=lambda i: (dist[i].item(), i)), dtype=torch.long)


class EmbeddingReshaper(nn.Module):
    """``to_lattice(emb [B, dim]) -> [B, X, Y, Z, E]`` and ``from_lattice([B, X, Y, Z, E_out]) -> [B, dim]``."""

    def __init__(self, input_dim: int, lattice_size: Sequence[int] = (8, 8, 6), strategy: str = "simple",
                 channels: Optional[int] = None, output_channels: Optional[int] = None) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an int >= 1, got {input_dim!r}")
        lattice = tuple(lattice_size)
        if len(lattice) != 3 or any(not isinstance(v, int) or v < 1 for v in lattice):
            raise ValueError(f"lattice_size must be three ints >= 1, got {lattice_size!r}")
        self.input_dim, self.lattice_size, self.strategy = input_dim, lattice, strategy
        cells = lattice[0] * lattice[1] * lattice[2]
        if strategy == "projection":
            self.channels = channels or 1
            self.output_channels = output_channels or self.channels
            self.project_in = nn.Linear(input_dim, cells * self.channels)
            self.project_out = nn.Linear(cells * self.output_channels, input_dim)
        else:
            if input_dim % cells:
                fits = ", ".join(f"{x}x{y}x{z} (E={e})" for x, y, z, e in fitting_lattices(input_dim, near=lattice))
                raise ValueError(
                    f"an embedding of dim {input_dim} does not fit a {lattice[0]}x{lattice[1]}x{lattice[2]} "
                    f"lattice with strategy={strategy!r} (dim must be X*Y*Z*E); lattices that fit: {fits}; "
                    f"or use strategy='projection' for any lattice"
                )
            self.channels = input_dim // cells
            if channels not in (None, self.channels):
                raise ValueError(f"channels must be {self.channels} (= dim / cells) with strategy={strategy!r}")
            self.output_channels = self.channels
            if output_channels not in (None, self.channels):
                raise ValueError(f"output_channels must be {self.channels} with strategy={strategy!r}")
        self.register_buffer("permutation", torch.arange(input_dim))
        self.register_buffer("inverse", torch.arange(input_dim))
        self.fitted = strategy in ("simple", "projection")

    # -- placement ------------------------------------------------------------------------------------------

    def _slots(self, cell_order: torch.Tensor) -> torch.Tensor:
        """Flat (cell, channel) positions, cell by cell in the given order."""
        E = self.channels
        return (cell_order[:, None] * E + torch.arange(E)[None, :]).flatten()

    def fit(self, embeddings: torch.Tensor) -> "EmbeddingReshaper":
        """Learn the placement of dimensions from data (``adaptive`` and ``semantic``; a no-op otherwise)."""
        emb = self._check_embeddings(embeddings).detach().double().cpu()
        if emb.shape[0] < 2:
            raise ValueError("fit needs at least 2 embeddings")
        X, Y, Z = self.lattice_size
        if self.strategy == "adaptive":
            dims = torch.argsort(emb.var(0), descending=True, stable=True)
            slots = self._slots(_centre_order(X, Y, Z))
        elif self.strategy == "semantic":
            corr = torch.nan_to_num(torch.corrcoef(emb.T)).abs()
            laplacian = torch.diag(corr.sum(1)) - corr
            _, vectors = torch.linalg.eigh(laplacian)
            dims = torch.argsort(vectors[:, 1], stable=True)  # the Fiedler vector orders dimensions
            slots = self._slots(_snake_order(X, Y, Z))
        else:
            return self
        permutation = torch.empty(self.input_dim, dtype=torch.long)
        permutation[slots] = dims  # lattice position slots[i] holds dimension dims[i]
        self.permutation.copy_(permutation)
        self.inverse.copy_(torch.argsort(permutation))
        self.fitted = True
        return self

    # -- the maps -------------------------------------------------------------------------------------------

    def _check_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[1] != self.input_dim:
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"embeddings must have shape [B, {self.input_dim}], got {got}")
        return emb

    def to_lattice(self, emb: torch.Tensor) -> torch.Tensor:
        emb = self._check_embeddings(emb)
        X, Y, Z = self.lattice_size
        if self.strategy == "projection":
            return self.project_in(emb).view(emb.shape[0], X, Y, Z, self.channels)
        return emb[:, self.permutation].reshape(emb.shape[0], X, Y, Z, self.channels)

    def from_lattice(self, lattice: torch.Tensor) -> torch.Tensor:
        expected = (*self.lattice_size, self.output_channels)
        if not isinstance(lattice, torch.Tensor) or lattice.dim() != 5 or tuple(lattice.shape[1:]) != expected:
            got = tuple(lattice.shape) if isinstance(lattice, torch.Tensor) else type(lattice).__name__
            raise ValueError(f"lattice must have shape [B, {', '.join(map(str, expected))}], got {got}")
        flat = lattice.reshape(lattice.shape[0], -1)
        if self.strategy == "projection":
            return self.project_out(flat)
        return flat[:, self.inverse]

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, lattice_size={self.lattice_size}, strategy={self.strategy!r}, "
                f"channels={self.channels}")
