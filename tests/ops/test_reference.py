"""The reference rule against hand-computed cases and against PyTorch's own modules: neighbour slots, boundaries
(F.pad's modes), depthwise perception (Conv3d), the update net, fire and alive masks."""

import pytest
import torch
import torch.nn.functional as F

from cubecore.ops.reference import (alive_mask, neighbour_states, pad, propagate_reference, step_reference,
                                    trajectory_reference)
from cubecore.ops.rule import BOUNDARIES, SLOT_OFFSETS, Rule


def coords(X, Y, Z):
    """A state whose channels are each cell's (x, y, z) + 1, so a zero is recognisably outside."""
    g = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), torch.arange(Z), indexing="ij"), dim=-1)
    return (g + 1).double().unsqueeze(0)


def expected_coord(c, size, boundary):
    """Which cell a padded position c (-1 .. size) reads, by the definition of each boundary (None: zeros)."""
    if 0 <= c < size:
        return c
    return {"zeros": None, "circular": c % size, "replicate": min(max(c, 0), size - 1),
            "reflect": -c if c < 0 else 2 * size - 2 - c}[boundary]


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("neighbourhood", ["von_neumann", "moore"])
def test_slots_read_the_documented_cells(boundary, neighbourhood):
    X, Y, Z = 3, 4, 5
    slots = neighbour_states(coords(X, Y, Z), neighbourhood, boundary)
    assert len(slots) == len(SLOT_OFFSETS[neighbourhood]) == {"von_neumann": 7, "moore": 27}[neighbourhood]
    for slot, (dx, dy, dz) in enumerate(SLOT_OFFSETS[neighbourhood]):
        for x in range(X):
            for y in range(Y):
                for z in range(Z):
                    read = [expected_coord(c + d, n, boundary) for c, d, n in zip((x, y, z), (dx, dy, dz), (X, Y, Z))]
                    want = torch.zeros(3, dtype=torch.float64) if None in read else torch.tensor(read).double() + 1
                    assert torch.equal(slots[slot][0, x, y, z], want), (boundary, slot, x, y, z)


def test_von_neumann_slot_order_is_faces_then_self():
    assert SLOT_OFFSETS["von_neumann"] == ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1),
                                           (0, 0, 0))
    assert SLOT_OFFSETS["moore"][13] == (0, 0, 0) and SLOT_OFFSETS["moore"][0] == (-1, -1, -1)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_padding_is_pytorchs_padding_mode(boundary):
    s = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    mode = "constant" if boundary == "zeros" else boundary
    want = F.pad(s.permute(0, 4, 1, 2, 3), (1,) * 6, mode=mode).permute(0, 2, 3, 4, 1)
    assert torch.equal(pad(s, boundary), want)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_moore_depthwise_perception_is_a_grouped_conv3d(boundary):
    """A Conv3d(S, S*F, 3, groups=S, bias=False) weight reshapes straight into perception [S, F, 27]; the update
    net of 1x1x1 convs is the per-cell layers."""
    torch.manual_seed(0)
    S, F_, H = 4, 3, 6
    conv = torch.nn.Conv3d(S, S * F_, 3, padding=1, groups=S, bias=False, padding_mode=boundary).double()
    hidden = torch.nn.Conv3d(S * F_, H, 1).double()
    out = torch.nn.Conv3d(H, S, 1, bias=False).double()
    s = torch.randn(2, 5, 4, 3, S, dtype=torch.float64)
    x = s.permute(0, 4, 1, 2, 3)
    want = s + out(torch.relu(hidden(conv(x)))).permute(0, 2, 3, 4, 1)
    got = step_reference(s, None, hidden.weight[:, :, 0, 0, 0], hidden.bias, out.weight[:, :, 0, 0, 0], None,
                         perception=conv.weight.view(S, F_, 27), neighbourhood="moore", boundary=boundary,
                         activation="relu", output_activation="identity", update="residual")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_step_matches_explicit_formula_for_one_cell():
    torch.manual_seed(0)
    S, H, E = 2, 3, 1
    s = torch.randn(1, 1, 1, 1, S, dtype=torch.float64)
    u = torch.randn(1, 1, 1, 1, E, dtype=torch.float64)
    w1, b1 = torch.randn(H, 7 * S + E, dtype=torch.float64), torch.randn(H, dtype=torch.float64)
    w2, b2 = torch.randn(S, H, dtype=torch.float64), torch.randn(S, dtype=torch.float64)
    # A lone cell with zeros beyond: all six neighbours read zeros.
    x = torch.cat([torch.zeros(6 * S, dtype=torch.float64), s.flatten(), u.flatten()])
    c = torch.tanh(w2 @ torch.relu(w1 @ x + b1) + b2)
    out = step_reference(s, u, w1, b1, w2, b2, boundary="wall", activation="relu", update="residual", step_size=0.3)
    assert torch.allclose(out.flatten(), s.flatten() + 0.3 * c)
    out = step_reference(s, u, w1, b1, w2, b2, boundary="zeros", activation="relu", update="replace")
    assert torch.allclose(out.flatten(), c)


def test_two_hidden_layers_identity_output_and_no_bias():
    torch.manual_seed(1)
    S, H1, H2 = 2, 3, 4
    s = torch.randn(1, 1, 1, 1, S, dtype=torch.float64)
    w1, b1 = torch.randn(H1, 7 * S, dtype=torch.float64), torch.randn(H1, dtype=torch.float64)
    w2, b2 = torch.randn(H2, H1, dtype=torch.float64), torch.randn(H2, dtype=torch.float64)
    w3 = torch.randn(S, H2, dtype=torch.float64)
    x = torch.cat([torch.zeros(6 * S, dtype=torch.float64), s.flatten()])
    want = w3 @ torch.sigmoid(w2 @ torch.sigmoid(w1 @ x + b1) + b2)
    out = step_reference(s, None, w1, b1, w2, b2, w3, None, activation="sigmoid", output_activation="identity")
    torch.testing.assert_close(out.flatten(), want)


def test_fire_mask_decides_where_the_change_applies():
    torch.manual_seed(2)
    S, H = 3, 5
    s = torch.randn(1, 2, 3, 2, S, dtype=torch.float64)
    w = [torch.randn(H, 7 * S, dtype=torch.float64), torch.randn(H, dtype=torch.float64),
         torch.randn(S, H, dtype=torch.float64), torch.randn(S, dtype=torch.float64)]
    fire = torch.rand(1, 2, 3, 2) < 0.5
    for update in ("replace", "residual"):
        everywhere = step_reference(s, None, *w, update=update, step_size=0.5)
        masked = step_reference(s, None, *w, update=update, step_size=0.5, fire=fire)
        assert torch.equal(masked[fire], everywhere[fire])
        assert torch.equal(masked[~fire], s[~fire])


def test_alive_mask_is_a_max_pool_of_the_alive_channel_ignoring_the_outside():
    s = torch.zeros(1, 4, 3, 5, 2, dtype=torch.float64)
    s[0, 0, 0, 0, 1] = 0.5  # a corner: alive in its 2x2x2 block only, under every boundary
    s[0, 3, 2, 4, 1] = 0.05  # below the threshold
    life = alive_mask(s, 1, 0.1)
    want = torch.zeros(1, 4, 3, 5, dtype=torch.bool)
    want[0, :2, :2, :2] = True
    assert torch.equal(life, want)


def test_dead_cells_take_the_dead_state_and_masks_need_both_before_and_after():
    torch.manual_seed(3)
    S, H = 3, 4
    s = torch.zeros(1, 5, 5, 5, S, dtype=torch.float64)
    s[0, 2, 2, 2] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # one live cell in the middle
    w = [torch.randn(H, 7 * S, dtype=torch.float64), torch.randn(H, dtype=torch.float64),
         torch.randn(S, H, dtype=torch.float64), torch.randn(S, dtype=torch.float64)]
    dead = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    plain = step_reference(s, None, *w, update="residual")
    out = step_reference(s, None, *w, update="residual", alive_channel=1, dead_state=dead)
    life = alive_mask(s, 1, 0.1) & alive_mask(plain, 1, 0.1)
    assert life.any() and (~life).any()
    assert torch.equal(out[life], plain[life])
    assert torch.equal(out[~life], dead.expand_as(out[~life]))


def test_reflect_needs_a_mirror_cell():
    with pytest.raises(ValueError, match="reflect"):
        Rule(boundary="reflect").check_lattice((1, 3, 1, 4, 2))
    with pytest.raises(ValueError, match="boundary"):
        pad(torch.zeros(1, 2, 2, 2, 1), "mirror")


def test_propagate_reference_runs_steps_from_given_state():
    torch.manual_seed(1)
    s = torch.randn(2, 2, 3, 2, 2, dtype=torch.float64)
    w1, b1 = torch.randn(4, 14, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    w2, b2 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    fire = torch.rand(3, 2, 2, 3, 2) < 0.7
    manual = s
    for t in range(3):
        manual = step_reference(manual, s[..., :0], w1, b1, w2, b2, fire=fire[t])
    assert torch.equal(propagate_reference(s, None, w1, b1, w2, b2, steps=3, fire_mask=fire), manual)
    assert torch.equal(trajectory_reference(s, None, w1, b1, w2, b2, steps=3, fire_mask=fire)[-1], manual)
