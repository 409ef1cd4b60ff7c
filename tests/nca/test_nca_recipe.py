"""The recipe's pieces against hand-computed cases: seed, pool, damage, loss, gradient normalisation, metrics,
and the config that sets the model from the target."""

import math

import pytest
import torch

from cubecore.errors import InvalidValueError
from cubecore.nca import recipe as R
from cubecore.nca.config import NcaTrainingConfig
from cubecore.nca.targets import VoxelTarget


def blocks_target(voxels):
    voxels = torch.tensor(voxels)
    names = ("air",) + tuple(f"block {i}" for i in range(1, int(voxels.max()) + 1))
    return VoxelTarget(voxels, "blocks", names)


def test_seed_is_one_living_cell_in_the_middle_or_on_the_floor_or_the_given_state():
    seed = R.seed_states(2, (5, 4, 3), 6, alive_channel=3)
    assert seed.shape == (2, 5, 4, 3, 6) and seed.sum() == 2 * 3
    assert seed[:, 2, 2, 1, 3:].eq(1).all() and seed[:, 2, 2, 1, :3].eq(0).all()
    floor = R.seed_states(1, (5, 4, 3), 6, alive_channel=3, spawn_at_bottom=True)
    assert floor[0, 2, 0, 1, 3:].eq(1).all() and floor.sum() == 3
    given = torch.arange(5 * 4 * 3 * 6, dtype=torch.float32).reshape(5, 4, 3, 6)
    assert torch.equal(R.seed_states(3, (5, 4, 3), 6, 3, given=given)[2], given)


def test_sample_losses_cross_entropy_per_sample():
    target = blocks_target([[[0, 1]]])  # two cells: air, block 1
    states = torch.zeros(2, 1, 1, 2, 3)
    states[1, 0, 0, 0, 0] = 5.0  # sample 1 says air in the first cell
    got = R.sample_losses(states, target)
    # sample 0: uniform logits over 2 types in both cells: log 2; sample 1: cell 0 ln(1 + e^-5), cell 1 ln 2
    assert torch.allclose(got, torch.tensor([math.log(2), (math.log1p(math.exp(-5)) + math.log(2)) / 2]))


def test_pool_batch_puts_the_worst_first_replaces_it_by_the_seed_and_update_writes_back():
    target = blocks_target([[[0, 1]]])
    pool_states = torch.zeros(4, 1, 1, 2, 3)
    for i, good in enumerate([0.0, 3.0, 1.0, 2.0]):  # sample i's logit for the right type in each cell
        pool_states[i, 0, 0, 0, 0] = good
        pool_states[i, 0, 0, 1, 1] = good
    pool = R.SamplePool(pool_states)
    seed = torch.full((1, 1, 2, 3), 7.0)
    torch.manual_seed(0)
    indices, states = pool.batch(3, target, seed)
    drawn = torch.randperm(4, generator=torch.Generator().manual_seed(0))[:3]  # the same draw
    assert sorted(indices.tolist()) == sorted(drawn.tolist())
    goods = pool_states[indices, 0, 0, 0, 0]
    assert goods[1:].tolist() == sorted(goods[1:].tolist())  # worst (lowest logit) first
    assert goods[0] == min(pool_states[drawn, 0, 0, 0, 0])  # the one replaced was the worst drawn
    assert torch.equal(states[0], seed) and torch.equal(states[1:], pool_states[indices[1:]])
    pool.update(indices, states + 1)
    assert torch.equal(pool.states[indices], states + 1)


def test_damage_zeroes_a_ball_of_the_best_samples_and_marks_it_air():
    states = torch.ones(3, 5, 5, 5, 2)
    R.damage(states, 2, radius=1, air=True, centres=torch.tensor([[2, 2, 2], [0, 0, 0]]))
    assert states[0].eq(1).all()  # the worst sample is not damaged
    last = states[2]  # the first centre goes to the last (best) sample
    hit = [(2, 2, 2), (1, 2, 2), (3, 2, 2), (2, 1, 2), (2, 3, 2), (2, 2, 1), (2, 2, 3)]  # distance <= 1
    for x, y, z in hit:
        assert last[x, y, z].tolist() == [1.0, 0.0]  # zeros, then air (channel 0) = 1
    assert (last[..., 1] == 0).sum() == len(hit)
    assert (states[1][..., 1] == 0).sum() == 4  # a corner: (0,0,0) and its three neighbours
    plain = torch.ones(1, 3, 3, 3, 2)
    R.damage(plain, 1, radius=0, air=False, centres=torch.tensor([[1, 1, 1]]))
    assert plain[0, 1, 1, 1].tolist() == [0.0, 0.0] and plain.sum() == 27 * 2 - 2


def test_loss_air_is_the_upstreams_formula():
    target = blocks_target([[[0, 1, 2]]])  # air, block 1, block 2; living channel 3
    out = torch.zeros(1, 1, 1, 3, 5)
    out[0, 0, 0, 0, :3] = torch.tensor([2.0, 0.0, 0.0])  # air right
    out[0, 0, 0, 1, :3] = torch.tensor([0.0, 1.0, 0.0])  # block 1 right
    out[0, 0, 0, 2, :3] = torch.tensor([0.0, 3.0, 0.0])  # block 1, but block 2 wanted
    ce = lambda logits, k: -torch.log_softmax(torch.tensor(logits), 0)[k].item()  # noqa: E731
    blocks = (ce([0.0, 1.0, 0.0], 1) + ce([0.0, 3.0, 0.0], 2)) / 2  # air cells ignored
    air = ce([2.0, 0.0, 0.0], 0)  # the air cells only
    miss = 1 - 2 / 2  # grown non-air: cells 1 and 2, target's: 1 and 2
    loss, got_miss = R.nca_loss(out, target)
    assert got_miss == pytest.approx(miss)
    assert loss.item() == pytest.approx((0.5 * blocks + 0.5 * air + miss) / 3, rel=1e-6)


def test_loss_mse_alive_and_no_iou_and_rgba():
    target = blocks_target([[[0, 1]]])
    out = torch.zeros(2, 1, 1, 2, 4)
    out[:, 0, 0, 0, 2] = 2.0  # living channel (index 2): clipped to 1 where the target is air
    out[:, 0, 0, 1, 2] = 0.5
    out[:, 0, 0, 1, 1] = 1.0  # block 1 where wanted
    blocks = -torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1].item()
    alive = (1.0 ** 2 + 0.5 ** 2) / 2
    loss, miss = R.nca_loss(out, target, alive_loss="mse", iou_loss=False)
    assert miss.item() == 0.0 and loss.item() == pytest.approx((0.5 * blocks + 0.5 * alive) / 3, rel=1e-6)
    rgba = VoxelTarget(torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]]), "rgba")
    loss, _ = R.nca_loss(torch.full((1, 1, 1, 1, 6), 0.5), rgba)
    assert loss.item() == pytest.approx(0.25)
    with pytest.raises(InvalidValueError, match="alive_loss must be one of"):
        R.nca_loss(out, target, alive_loss="bce")


def test_normalize_gradients_divides_each_by_its_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 2.0])
    R.normalize_gradients([a, b])
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8])) and torch.allclose(b.grad, torch.tensor([0.0, 0.0, 1.0]))


def test_metrics_accuracy_iou_and_voxel_accuracy():
    target = blocks_target([[[0, 1, 2, 0]]])
    out = torch.zeros(1, 1, 1, 4, 3)
    out[0, 0, 0, 1, 1] = 1.0  # right
    out[0, 0, 0, 2, 1] = 1.0  # wrong type
    out[0, 0, 0, 3, 2] = 1.0  # a block where air is wanted
    m = R.structure_metrics(out, target)
    assert m == {"accuracy": 0.5, "iou": pytest.approx(2 / 3), "voxel_accuracy": 0.5}


def test_upstream_init_normal_weights_zero_biases():
    from cubecore import CubicCore

    torch.manual_seed(0)
    core = CubicCore((4, 4, 4), 8, [16, 16], input_size=0, neighbourhood="moore", perception="depthwise",
                     output_bias=False)
    R.upstream_init(core, 0.1)
    assert core.b1.eq(0).all() and core.b2.eq(0).all() and core.b3 is None
    assert 0.08 < core.w1.std().item() < 0.12 and 0.08 < core.perception.std().item() < 0.12


def test_the_config_sets_the_model_from_the_target_and_refuses_other_values():
    config = NcaTrainingConfig(**{"nca.hidden_channels": 5, "nca.max_steps": 70})
    got = config.for_target(types=4, alive_channel=4, lattice=(6, 7, 8)).model
    assert (got.state_size, got.alive_channel, got.lattice_size, got.steps) == (10, 4, (6, 7, 8), 70)
    rgba = config.for_target(types=4, alive_channel=3, lattice=(6, 6, 6)).model
    assert (rgba.state_size, rgba.alive_channel) == (9, 3)
    assert (got.neighbourhood, got.perception, got.hidden_sizes, got.fire_rate) == ("moore", "depthwise", (32, 32),
                                                                                     0.5)
    with pytest.raises(InvalidValueError, match="'model.state_size' is set by the target and nca.hidden_channels"):
        NcaTrainingConfig(**{"model.state_size": 7}).for_target(types=4, alive_channel=4, lattice=(6, 6, 6))
    with pytest.raises(InvalidValueError, match="'model.global_channels' belongs to the embedding model"):
        NcaTrainingConfig(**{"model.global_channels": 8})
    with pytest.raises(InvalidValueError, match=r"'nca.max_steps' \(3\) must be >= config key 'nca.min_steps'"):
        NcaTrainingConfig(**{"nca.min_steps": 4, "nca.max_steps": 3})
