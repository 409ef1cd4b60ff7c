"""EmbeddingReshaper: exact round trips, fitted placements, projection, clear size errors."""

import time

import numpy as np
import pytest
import torch

from cubecore import EmbeddingReshaper, ModelConfig
from cubecore.model.reshaper import STRATEGIES, _snake_order, fitting_lattices


@pytest.mark.parametrize("dim,lattice", [(384, (8, 8, 6)), (768, (8, 8, 12)), (768, (4, 4, 4))])
def test_simple_round_trip_is_bit_exact(dim, lattice):
    r = EmbeddingReshaper(dim, lattice, strategy="simple")
    emb = torch.randn(5, dim)
    lat = r.to_lattice(emb)
    assert lat.shape == (5, *lattice, dim // (lattice[0] * lattice[1] * lattice[2]))
    assert torch.equal(r.from_lattice(lat), emb)
    assert torch.equal(lat.flatten(1), emb)  # a plain reshape


@pytest.mark.parametrize("strategy", ["adaptive", "semantic"])
def test_fitted_placements_are_exact_permutations_and_survive_state_dict(strategy):
    torch.manual_seed(0)
    dim, lattice = 96, (4, 4, 3)
    scales = torch.linspace(0.1, 3.0, dim)
    data = torch.randn(200, dim) * scales
    data[:, 1::2] += data[:, ::2]  # correlated neighbours in index space
    r = EmbeddingReshaper(dim, lattice, strategy=strategy).fit(data)
    assert sorted(r.permutation.tolist()) == list(range(dim))
    assert not torch.equal(r.permutation, torch.arange(dim))
    emb = torch.randn(7, dim)
    assert torch.equal(r.from_lattice(r.to_lattice(emb)), emb)
    other = EmbeddingReshaper(dim, lattice, strategy=strategy)
    other.load_state_dict(r.state_dict())
    assert torch.equal(other.to_lattice(emb), r.to_lattice(emb))


def test_adaptive_puts_the_most_variable_dimension_at_the_centre():
    dim, lattice = 27, (3, 3, 3)
    data = torch.randn(500, dim) * torch.linspace(0.1, 1.0, dim)
    data[:, 5] *= 50
    r = EmbeddingReshaper(dim, lattice, strategy="adaptive").fit(data)
    centre = (1 * 3 + 1) * 3 + 1
    assert r.permutation[centre].item() == 5


def test_semantic_places_correlated_dimensions_next_to_each_other():
    torch.manual_seed(1)
    dim, lattice = 32, (2, 4, 4)
    base = torch.randn(1000, 4)
    data = base.repeat_interleave(8, dim=1)[:, torch.randperm(dim)] + 0.05 * torch.randn(1000, dim)
    r = EmbeddingReshaper(dim, lattice, strategy="semantic").fit(data)
    corr = torch.corrcoef(data.T).abs()
    path = _snake_order(*lattice)
    placed = r.permutation[path]
    along_path = torch.stack([corr[placed[i], placed[i + 1]] for i in range(dim - 1)]).mean()
    shuffled = r.permutation[torch.randperm(dim)]
    random = torch.stack([corr[shuffled[i], shuffled[i + 1]] for i in range(dim - 1)]).mean()
    assert along_path > random + 0.3


def test_snake_order_steps_between_face_neighbours():
    X, Y, Z = 3, 4, 5
    order = _snake_order(X, Y, Z).tolist()
    assert sorted(order) == list(range(X * Y * Z))
    coords = [(i // (Y * Z), (i // Z) % Y, i % Z) for i in order]
    for a, b in zip(coords, coords[1:]):
        assert sum(abs(p - q) for p, q in zip(a, b)) == 1


def test_projection_serves_any_lattice_and_learns():
    r = EmbeddingReshaper(384, (16, 16, 16), strategy="projection")
    emb = torch.randn(3, 384)
    lat = r.to_lattice(emb)
    assert lat.shape == (3, 16, 16, 16, 1)
    assert r.from_lattice(lat).shape == (3, 384)
    assert sum(p.numel() for p in r.parameters()) > 0


def test_mismatch_error_names_sizes_that_fit():
    with pytest.raises(ValueError, match="8x8x6") as info:
        EmbeddingReshaper(384, (8, 8, 8))
    assert "projection" in str(info.value)
    assert fitting_lattices(384, near=(8, 8, 8))[0] == (8, 8, 6, 1)
    assert all(x * y * z * e == 384 for x, y, z, e in fitting_lattices(384, limit=50))
    r = EmbeddingReshaper(384, (8, 8, 6))
    with pytest.raises(ValueError, match="384"):
        r.to_lattice(torch.randn(2, 383))
    with pytest.raises(ValueError, match="lattice"):
        r.from_lattice(torch.randn(2, 8, 8, 6, 2))
    with pytest.raises(ValueError, match="strategy"):
        EmbeddingReshaper(384, (8, 8, 6), strategy="spiral")


def test_the_mismatch_error_comes_at_once_for_a_huge_dim():
    """The lattices that fit are found from the divisors (O(sqrt(dim))), not by a loop up to the dim: a prime dim
    of 10^9 + 7 took minutes before the error."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"1x1x1000000007 \(E=1\)"):
        EmbeddingReshaper(10**9 + 7, (8, 8, 6))
    with pytest.raises(ValueError, match="lattices that fit: 8x8x11486475"):
        ModelConfig(lattice_size=(8, 8, 6)).check_fits(735134400)  # 1,344 divisors
    with pytest.raises(ValueError, match=r"1x1x2305843009213693951 \(E=1\)"):
        EmbeddingReshaper(2**61 - 1, (8, 8, 6))  # a prime: O(sqrt(dim)) alone took hours
    assert time.perf_counter() - start < 10


# --- fitting strategies must be fit ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_needs_fit_and_is_fitted(strategy):
    r = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy)
    assert r.needs_fit == (strategy in ("adaptive", "semantic"))
    assert r.is_fitted == (not r.needs_fit)
    r.fit(torch.randn(10, 12))
    assert r.is_fitted


@pytest.mark.parametrize("strategy", ["adaptive", "semantic"])
def test_unfitted_fitting_strategy_is_an_error_not_the_identity(strategy):
    r = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy)
    with pytest.raises(RuntimeError, match=r"fit\(embeddings\)"):
        r.to_lattice(torch.randn(2, 12))
    with pytest.raises(RuntimeError, match=r"fit\(embeddings\)"):
        r.from_lattice(torch.randn(2, 2, 2, 3, 1))
    # A state saved before fitting is still unfitted once loaded.
    other = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy)
    other.load_state_dict(r.state_dict())
    assert not other.is_fitted


@pytest.mark.parametrize("strategy", ["adaptive", "semantic"])
def test_a_reshaper_loaded_from_a_fitted_state_is_fitted(strategy):
    data = torch.randn(50, 12) * torch.linspace(0.1, 2.0, 12)
    r = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy).fit(data)
    state = r.state_dict()
    assert bool(state["fitted"])
    other = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy)
    other.load_state_dict(state)
    assert other.is_fitted
    emb = torch.randn(3, 12)
    assert torch.equal(other.to_lattice(emb), r.to_lattice(emb))
    # A state saved before the flag existed holds the permutation the model was trained with: it loads
    # (strictly) and counts as fitted.
    old = {k: v for k, v in state.items() if k != "fitted"}
    legacy = EmbeddingReshaper(12, (2, 2, 3), strategy=strategy)
    legacy.load_state_dict(old)
    assert legacy.is_fitted and torch.equal(legacy.permutation, r.permutation)
    # The same inside a model (a prefixed key), as in a checkpoint of the whole processor.
    outer = torch.nn.Sequential(EmbeddingReshaper(12, (2, 2, 3), strategy=strategy))
    outer.load_state_dict({f"0.{k}": v for k, v in old.items()})
    assert outer[0].is_fitted


@pytest.mark.parametrize("strategy", ["adaptive", "semantic"])
def test_fit_is_robust(strategy):
    dim, lattice = 12, (2, 2, 3)
    data = torch.randn(40, dim)
    data[:, 3] = 1.0  # a constant dimension: no variance, no correlation
    r = EmbeddingReshaper(dim, lattice, strategy=strategy).fit(data)
    assert sorted(r.permutation.tolist()) == list(range(dim))
    assert torch.equal(r.inverse, torch.argsort(r.permutation))
    again = EmbeddingReshaper(dim, lattice, strategy=strategy).fit(data.clone().requires_grad_())
    assert torch.equal(again.permutation, r.permutation), "the same data gives the same placement"
    assert EmbeddingReshaper(dim, lattice, strategy=strategy).fit(data.to(torch.float16)).is_fitted
    tiny = EmbeddingReshaper(1, (1, 1, 1), strategy=strategy).fit(torch.randn(4, 1))
    assert tiny.is_fitted and tiny.permutation.tolist() == [0]
    fresh = EmbeddingReshaper(dim, lattice, strategy=strategy)
    with pytest.raises(ValueError, match="at least 2"):
        fresh.fit(torch.randn(1, dim))
    bad = torch.randn(10, dim)
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fresh.fit(bad)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        fresh.fit(torch.randn(10, 11))
    with pytest.raises(TypeError, match="embeddings"):
        fresh.fit(bad.tolist())
    assert not fresh.is_fitted, "a failed fit leaves the reshaper unfitted"


def test_argument_checks_use_the_package_conventions():
    assert EmbeddingReshaper(np.int64(12), (np.int64(2), 2, 3)).input_dim == 12
    with pytest.raises(TypeError, match="input_dim"):
        EmbeddingReshaper(12.0, (2, 2, 3))
    with pytest.raises(ValueError, match="input_dim"):
        EmbeddingReshaper(0, (2, 2, 3))
    with pytest.raises(TypeError, match="lattice_size"):
        EmbeddingReshaper(12, (2, 2, 3.0))
    with pytest.raises(ValueError, match="lattice_size"):
        EmbeddingReshaper(12, (2, 6))
    with pytest.raises(ValueError, match="channels"):
        EmbeddingReshaper(12, (3, 3, 3), strategy="projection", channels=0)
    r = EmbeddingReshaper(12, (2, 2, 3))
    with pytest.raises(TypeError, match="emb"):
        r.to_lattice([[0.0] * 12])
    with pytest.raises(TypeError, match="lattice"):
        r.from_lattice(np.zeros((1, 2, 2, 3, 1)))
