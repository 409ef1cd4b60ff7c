"""The reference rule against hand-computed cases: neighbour slots, boundaries, updates."""

import pytest
import torch

from cubecore.ops.reference import neighbours, propagate_reference, shift, step_reference


def coords(X, Y, Z):
    """A state whose channels are each cell's (x, y, z) + 1, so a zero is recognisably a wall."""
    g = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"), dim=-1)
    return (g + 1).double().unsqueeze(0)


@pytest.mark.parametrize("boundary", ["wall", "periodic", "reflect"])
def test_neighbour_slots_follow_the_documented_order(boundary):
    X, Y, Z = 3, 4, 5
    s = coords(X, Y, Z)
    slots = neighbours(s, boundary)
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                for slot, (axis, offset) in enumerate([(0, -1), (0, 1), (1, -1), (1, 1), (2, -1), (2, 1)]):
                    c = [x, y, z]
                    size = (X, Y, Z)[axis]
                    v = c[axis] + offset
                    if 0 <= v < size:
                        c[axis] = v
                        expected = torch.tensor(c, dtype=torch.float64) + 1
                    elif boundary == "wall":
                        expected = torch.zeros(3, dtype=torch.float64)
                    elif boundary == "periodic":
                        c[axis] = v % size
                        expected = torch.tensor(c, dtype=torch.float64) + 1
                    else:
                        expected = torch.tensor(c, dtype=torch.float64) + 1
                    assert torch.equal(slots[slot][0, x, y, z], expected), (boundary, slot, x, y, z)


def test_shift_rejects_unknown_boundary():
    with pytest.raises(ValueError, match="boundary"):
        shift(torch.zeros(1, 2, 2, 2, 1), 1, 1, "mirror")


def test_step_matches_explicit_formula_for_one_cell():
    torch.manual_seed(0)
    S, H, E = 2, 3, 1
    s = torch.randn(1, 1, 1, 1, S, dtype=torch.float64)
    u = torch.randn(1, 1, 1, 1, E, dtype=torch.float64)
    w1, b1 = torch.randn(H, 7 * S + E, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    w2, b2 = torch.randn(S, H, dtype=torch.float64), torch.randn(S, dtype=torch.float64)
    # A lone cell with walls: all six neighbours read zeros.
    x = torch.cat([torch.zeros(6 * S, dtype=torch.float64), s.flatten(), u.flatten()])
    c = torch.tanh(w2 @ torch.relu(w1 @ x + b1) + b2)
    out = step_reference(s, u, w1, b1, w2, b2, boundary="wall", activation="relu", update="residual", step_size=0.3)
    assert torch.allclose(out.flatten(), s.flatten() + 0.3 * c)
    out = step_reference(s, u, w1, b1, w2, b2, boundary="wall", activation="relu", update="replace")
    assert torch.allclose(out.flatten(), c)


def test_propagate_reference_runs_steps_from_given_state():
    torch.manual_seed(1)
    s = torch.randn(2, 2, 3, 2, 2, dtype=torch.float64)
    w1, b1 = torch.randn(4, 14, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w2, b2 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    manual = s
    for _ in range(3):
        manual = step_reference(manual, s[..., :0], w1, b1, w2, b2)
    assert torch.equal(propagate_reference(s, None, w1, b1, w2, b2, steps=3), manual)
