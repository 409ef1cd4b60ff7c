"""``EmbeddingReshaper``: lays an embedding [B, dim] onto the lattice [B, X, Y, Z, E] and reads it back.

The lattice only mixes neighbours, so where each dimension sits matters.  Strategies:

- ``simple``: a plain reshape (dim == X*Y*Z*E); the round trip is exact.
- ``adaptive``: a permutation fit on data: dimensions by variance, the most variable at the lattice centre and
  the least at the faces.
- ``semantic``: a permutation fit on data that puts correlated dimensions next to each other: dimensions are
  ordered along the leading eigenvector of their |correlation| graph's Laplacian (spectral ordering) and laid
  along a path through the lattice whose consecutive cells are face-neighbours.
- ``projection``: learned linear maps in and out, so any lattice serves any embedding size.

``adaptive`` and ``semantic`` must be fit (``fit(embeddings)``, on training inputs) before use: an unfitted one
raises instead of silently acting as the identity.  ``needs_fit`` says whether a strategy fits, ``is_fitted``
whether this reshaper is ready.  The permutation and the ``fitted`` flag are buffers, saved in ``state_dict``, so
a reshaper loaded from a fitted one's state is fitted too; the permutations are exactly invertible.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checks import check_choice, check_int, check_ints, check_tensor
from ..errors import InvalidValueError, NotReadyError

# The one list of strategy names (the training config takes its choices from here).
STRATEGIES = ("simple", "adaptive", "semantic", "projection")
# Strategies whose placement is learnt from data by ``fit``.
FITTING_STRATEGIES = ("adaptive", "semantic")


# Trial division stops here: beyond it an error message's suggestions need no more divisors.
DIVISOR_SEARCH = 10**6


def _divisors(n: int) -> List[int]:
    """The divisors of n in increasing order, in O(sqrt(n)) steps; for an n beyond DIVISOR_SEARCH^2 (n may be as
    large as a user types) only those up to DIVISOR_SEARCH and their cofactors, in at most a million steps."""
    small, large = [], []
    d = 1
    while d * d <= n and d <= DIVISOR_SEARCH:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


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
    divisors = _divisors(dim)
    cube_like = []
    for E in divisors:  # in increasing order: the sort below puts a smaller E first, so stop once enough are found
        if len([s for s in cube_like if s not in found]) >= limit:
            break
        cells = dim // E
        for X in divisors:
            if X ** 3 > cells:
                break
            if cells % X:
                continue
            for Y in divisors:
                if Y * Y > cells // X:
                    break
                if Y >= X and (cells // X) % Y == 0:
                    cube_like.append((X, Y, cells // X // Y, E))
    cubes = sorted((s for s in cube_like if s not in found), key=lambda s: (s[3], max(s[:3]) / max(1, min(s[:3]))))
    return (found + cubes)[:limit]


def check_fits(dim: int, lattice_size: Sequence[int], strategy: str, *, lattice_name: str = "lattice_size",
               strategy_name: str = "strategy", what: str = "an embedding") -> None:
    """The one check that an embedding of ``dim`` fits a lattice under a strategy (every other place asks this):
    dim = X*Y*Z*E unless the strategy projects.  The error names the lattices that fit; ``lattice_name``,
    ``strategy_name`` and ``what`` say it in the caller's words (``ModelConfig.check_fits``: its config keys)."""
    X, Y, Z = lattice_size
    if strategy == "projection" or dim % (X * Y * Z) == 0:
        return
    fits = ", ".join(f"{x}x{y}x{z} (E={e})" for x, y, z, e in fitting_lattices(dim, near=lattice_size))
    raise InvalidValueError(
        f"{lattice_name} {X}x{Y}x{Z} does not fit {what} of dim {dim} with {strategy_name}={strategy!r} (dim must "
        f"be X*Y*Z*E, E values per cell); lattices that fit: {fits}; or use {strategy_name}='projection', which "
        f"serves any lattice")


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
        strategy = check_choice("strategy", strategy, STRATEGIES)
        input_dim = check_int("input_dim", input_dim, minimum=1)
        lattice = check_ints("lattice_size", lattice_size, 3, minimum=1)
        if channels is not None:
            channels = check_int("channels", channels, minimum=1)
        if output_channels is not None:
            output_channels = check_int("output_channels", output_channels, minimum=1)
        self.input_dim, self.lattice_size, self.strategy = input_dim, lattice, strategy
        cells = lattice[0] * lattice[1] * lattice[2]
        if strategy == "projection":
            self.channels = channels or 1
            self.output_channels = output_channels or self.channels
            self.project_in = nn.Linear(input_dim, cells * self.channels)
            self.project_out = nn.Linear(cells * self.output_channels, input_dim)
        else:
            check_fits(input_dim, lattice, strategy)
            self.channels = input_dim // cells
            if channels not in (None, self.channels):
                raise InvalidValueError(f"channels must be {self.channels} (= dim / cells) with strategy={strategy!r}")
            self.output_channels = self.channels
            if output_channels not in (None, self.channels):
                raise InvalidValueError(f"output_channels must be {self.channels} with strategy={strategy!r}")
        self.register_buffer("permutation", torch.arange(input_dim))
        self.register_buffer("inverse", torch.arange(input_dim))
        # The flag is a buffer so that it travels in state_dict; ``_fitted`` mirrors it on the host, so that
        # checking it costs no device synchronisation.
        self.register_buffer("fitted", torch.tensor(not self.needs_fit))
        self._fitted = not self.needs_fit

    @property
    def needs_fit(self) -> bool:
        """Whether this strategy learns its placement from data (``adaptive``, ``semantic``)."""
        return self.strategy in FITTING_STRATEGIES

    @property
    def is_fitted(self) -> bool:
        """Ready to use: a strategy that needs no fit, or one fit here or loaded from a fitted one's state."""
        return self._fitted

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state saved before the ``fitted`` flag existed: its permutation is the one the model was trained
        # with, so it counts as fitted.
        key = prefix + "fitted"
        if key not in state_dict and prefix + "permutation" in state_dict:
            state_dict[key] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._fitted = bool(self.fitted.item())

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotReadyError(
                f"EmbeddingReshaper(strategy={self.strategy!r}) is not fitted: call fit(embeddings) with the training "
                f"inputs first (or load the state_dict of a fitted reshaper)")

    # -- placement ------------------------------------------------------------------------------------------

    def _slots(self, cell_order: torch.Tensor) -> torch.Tensor:
        """Flat (cell, channel) positions, cell by cell in the given order."""
        E = self.channels
        return (cell_order[:, None] * E + torch.arange(E)[None, :]).flatten()

    def fit(self, embeddings: torch.Tensor) -> "EmbeddingReshaper":
        """Learn the placement of dimensions from ``embeddings`` [N, dim] (N >= 2, finite values) for ``adaptive``
        and ``semantic``; a no-op for the others.  Deterministic: the same data gives the same placement.  Fitting
        again replaces the placement (a model trained with the old one no longer matches it)."""
        emb = self._check_embeddings(embeddings, "embeddings")
        if not self.needs_fit:
            return self
        if emb.shape[0] < 2:
            raise InvalidValueError(f"fit needs at least 2 embeddings, got {emb.shape[0]}")
        emb = emb.detach().to("cpu", torch.float64)
        if not torch.isfinite(emb).all():
            raise InvalidValueError("fit: embeddings hold NaN or inf values")
        X, Y, Z = self.lattice_size
        if self.strategy == "adaptive":
            dims = torch.argsort(emb.var(0), descending=True, stable=True)
            slots = self._slots(_centre_order(X, Y, Z))
        else:  # semantic
            if self.input_dim < 3:  # every order of one or two dimensions puts them next to each other
                dims = torch.arange(self.input_dim)
            else:
                # Constant dimensions have no correlation (NaN): they correlate with nothing.
                corr = torch.nan_to_num(torch.corrcoef(emb.T), nan=0.0).abs()
                laplacian = torch.diag(corr.sum(1)) - corr
                _, vectors = torch.linalg.eigh(laplacian)
                fiedler = vectors[:, 1]
                # An eigenvector's sign is arbitrary: fix it so that the placement does not depend on it.
                if fiedler[torch.argmax(fiedler.abs())] < 0:
                    fiedler = -fiedler
                dims = torch.argsort(fiedler, stable=True)  # the Fiedler vector orders dimensions
            slots = self._slots(_snake_order(X, Y, Z))
        permutation = torch.empty(self.input_dim, dtype=torch.long)
        permutation[slots] = dims  # lattice position slots[i] holds dimension dims[i]
        self.permutation.copy_(permutation)
        self.inverse.copy_(torch.argsort(permutation))
        self.fitted.fill_(True)
        self._fitted = True
        return self

    # -- the maps -------------------------------------------------------------------------------------------

    def _check_embeddings(self, emb: torch.Tensor, name: str = "emb") -> torch.Tensor:
        shape = f"[B, {self.input_dim}]"
        check_tensor(name, emb, shape, ndim=2)
        if emb.shape[1] != self.input_dim:
            raise InvalidValueError(f"{name} must have shape {shape}, got {tuple(emb.shape)}")
        return emb

    def to_lattice(self, emb: torch.Tensor) -> torch.Tensor:
        emb = self._check_embeddings(emb)
        self._require_fitted()
        X, Y, Z = self.lattice_size
        if self.strategy == "projection":
            return self.project_in(emb).view(emb.shape[0], X, Y, Z, self.channels)
        return emb[:, self.permutation].reshape(emb.shape[0], X, Y, Z, self.channels)

    def from_lattice(self, lattice: torch.Tensor) -> torch.Tensor:
        expected = (*self.lattice_size, self.output_channels)
        shape = f"[B, {', '.join(map(str, expected))}]"
        check_tensor("lattice", lattice, shape, ndim=5)
        if tuple(lattice.shape[1:]) != expected:
            raise InvalidValueError(f"lattice must have shape {shape}, got {tuple(lattice.shape)}")
        self._require_fitted()
        flat = lattice.reshape(lattice.shape[0], -1)
        if self.strategy == "projection":
            return self.project_out(flat)
        return flat[:, self.inverse]

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, lattice_size={self.lattice_size}, strategy={self.strategy!r}, "
                f"channels={self.channels}" + (f", fitted={self.is_fitted}" if self.needs_fit else ""))
