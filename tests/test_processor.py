"""EmbeddingProcessor: embedding -> lattice -> core -> per-cell readout -> embedding, for both reshapers."""

import pytest
import torch

from cubecore import EmbeddingProcessor


@pytest.mark.parametrize("method,lattice", [("simple", (2, 2, 3)), ("projection", (3, 3, 3))])
def test_shapes_and_gradients(method, lattice):
    torch.manual_seed(0)
    proc = EmbeddingProcessor(12, lattice, state_size=4, hidden_size=6, steps=2, reshaping_method=method)
    x = torch.randn(5, 12)
    y = proc(x)
    assert y.shape == (5, 12)
    y.square().sum().backward()
    for name, p in proc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert proc.core.w1.grad.abs().sum() > 0
    info = proc.get_info()
    assert info["parameters"] == sum(p.numel() for p in proc.parameters())
    assert info["reshaping_method"] == method


def test_readout_is_per_cell():
    proc = EmbeddingProcessor(12, (2, 2, 3), state_size=4, hidden_size=6, steps=1)
    with torch.no_grad():
        proc.readout_bias.zero_()
        proc.readout_bias[0, 0, 0, 0] = 5.0
    out = proc(torch.zeros(1, 12))
    others = out[0, 1:]
    assert out[0, 0] - others.mean() > 4.0, "one cell's bias moves only its own dimension"


def test_bad_input_raises():
    proc = EmbeddingProcessor(12, (2, 2, 3), state_size=4, hidden_size=6, steps=1)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        proc(torch.randn(3, 11))
    with pytest.raises(ValueError, match="does not fit"):
        EmbeddingProcessor(12, (2, 2, 2))
