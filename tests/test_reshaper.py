"""EmbeddingReshaper: exact round trips, fitted placements, projection, clear size errors."""

import pytest
import torch

from cubecore import EmbeddingReshaper
from cubecore.reshaper import _snake_order, fitting_lattices


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
