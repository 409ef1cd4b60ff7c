"""CubicCore: shapes, parameters, info, backends agreeing, and clear errors."""

import pytest
import torch

import cubecore
from cubecore import CubicCore
from conftest import requires_kernel


def test_default_core_shapes_and_parameters():
    core = CubicCore()
    assert core.lattice_size == (8, 8, 12)
    assert core.w1.shape == (16, 7 * 8 + 1) and core.b1.shape == (16,)
    assert core.w2.shape == (8, 16) and core.b2.shape == (8,)
    out = core(torch.randn(2, 8, 8, 12, 1))
    assert out.shape == (2, 8, 8, 12, 8)
    info = core.get_info()
    assert info["parameters"] == 16 * 57 + 16 + 8 * 16 + 8
    assert info["active_backend"] in ("kernel", "reference")
    for key in ("lattice_size", "state_size", "hidden_size", "input_size", "steps", "boundary", "activation",
                "update", "backend"):
        assert key in info


def test_xavier_initialisation_bounds():
    torch.manual_seed(0)
    core = CubicCore(state_size=4, hidden_size=10, input_size=3)
    bound = (6.0 / (core.w1.shape[0] + core.w1.shape[1])) ** 0.5
    assert core.w1.abs().max() <= bound and core.w1.abs().max() > 0.5 * bound
    assert torch.count_nonzero(core.b1) == 0 and torch.count_nonzero(core.b2) == 0


@requires_kernel
@pytest.mark.parametrize("update", ["replace", "residual"])
def test_kernel_and_reference_backends_agree(update):
    torch.manual_seed(0)
    core = CubicCore(lattice_size=(3, 4, 5), state_size=3, hidden_size=5, input_size=2, steps=4, update=update,
                     step_size=0.5, boundary="reflect").double()
    u = torch.randn(2, 3, 4, 5, 2, dtype=torch.float64)
    s0 = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    core.backend = "kernel"
    a = core(u, s0)
    ga = torch.autograd.grad(a.sum(), list(core.parameters()))
    core.backend = "reference"
    b = core(u, s0)
    gb = torch.autograd.grad(b.sum(), list(core.parameters()))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-11, rtol=0)


def test_core_trains_a_little():
    """One optimiser step on a simple target lowers the loss: the gradients point the right way."""
    torch.manual_seed(0)
    core = CubicCore(lattice_size=(2, 3, 4), state_size=2, hidden_size=4, input_size=1, steps=3)
    u = torch.randn(4, 2, 3, 4, 1)
    target = torch.tanh(u).expand(-1, -1, -1, -1, 2)
    opt = torch.optim.Adam(core.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (core(u) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_input_size_zero_needs_a_state():
    core = CubicCore(lattice_size=(2, 2, 2), state_size=3, input_size=0, steps=2)
    assert core.w1.shape[1] == 21
    out = core(state=torch.randn(1, 2, 2, 2, 3))
    assert out.shape == (1, 2, 2, 2, 3)
    with pytest.raises(ValueError, match="state"):
        core()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lattice_size=(8, 8)), "lattice_size"),
        (dict(lattice_size=(8, 0, 8)), "lattice_size"),
        (dict(state_size=0), "state_size"),
        (dict(hidden_size=-1), "hidden_size"),
        (dict(input_size=-1), "input_size"),
        (dict(steps=0), "steps"),
        (dict(boundary="open"), "boundary"),
        (dict(activation="gelu"), "activation"),
        (dict(update="momentum"), "update"),
        (dict(backend="cuda"), "backend"),
        (dict(step_size=float("nan")), "step_size"),
        (dict(step_size=float("inf")), "step_size"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CubicCore(**kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(steps=2.0), "steps"), (dict(state_size="8"), "state_size"),
                                          (dict(step_size="0.5"), "step_size"), (dict(lattice_size=8), "lattice_size")])
def test_settings_of_the_wrong_type_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        CubicCore(**kwargs)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    core = CubicCore(lattice_size=np.array([2, 3, 4]), state_size=np.int64(2), hidden_size=np.int32(3), steps=np.int64(2))
    assert core.lattice_size == (2, 3, 4) and core.state_size == 2 and type(core.steps) is int


def test_bad_forward_inputs_raise():
    core = CubicCore(lattice_size=(2, 3, 4), state_size=2, hidden_size=3, input_size=1, steps=1)
    with pytest.raises(ValueError, match="external"):
        core(torch.randn(1, 2, 3, 4, 2))
    with pytest.raises(ValueError, match="external"):
        core(torch.randn(2, 3, 4, 1))
    with pytest.raises(ValueError, match="external"):
        core()
    with pytest.raises(TypeError, match="external"):
        core([[1.0]])
    with pytest.raises(ValueError, match="state"):
        core(torch.randn(1, 2, 3, 4, 1), torch.randn(1, 2, 3, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        core(torch.randn(1, 2, 3, 4, 1, dtype=torch.float64))


def test_top_level_exports_are_the_layers_public_names():
    """Every public name is importable from cubecore and is the object its layer defines."""
    from cubecore import data, model, ops, training

    for name in cubecore.__all__:
        assert hasattr(cubecore, name), name
    for layer in (ops, model, data, training):
        for name in layer.__all__:
            if name in cubecore.__all__:
                assert getattr(cubecore, name) is getattr(layer, name), name
    assert cubecore.ModelConfig is model.config.ModelConfig and cubecore.TrainingConfig is training.TrainingConfig


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=requires_kernel), "reference"])
@pytest.mark.parametrize("lattice,batch,given_state", [((3, 4, 5), 2, True), ((1, 5, 3), 1, False),
                                                       ((2, 1, 7), 3, True)])
def test_core_returns_the_trajectory(backend, lattice, batch, given_state):
    """[steps + 1, B, X, Y, Z, S]: entry 0 the initial state, each next entry one more step of the float64
    reference, the last entry core(external) and carrying the same gradient."""
    torch.manual_seed(1)
    core = CubicCore(lattice_size=lattice, state_size=3, hidden_size=5, input_size=2, steps=4, update="residual",
                     step_size=0.5, boundary="periodic", backend=backend).double()
    u = torch.randn(batch, *lattice, 2, dtype=torch.float64)
    s0 = torch.randn(batch, *lattice, 3, dtype=torch.float64) if given_state else None
    traj = core(u, s0, return_trajectory=True)
    assert traj.shape == (5, batch, *lattice, 3)
    torch.testing.assert_close(traj[0], s0 if given_state else torch.zeros_like(traj[0]), atol=0, rtol=0)
    start = traj[0]
    for t in range(1, 5):
        want = cubecore.propagate_reference(start, u, core.w1, core.b1, core.w2, core.b2, steps=t,
                                            boundary="periodic", update="residual", step_size=0.5)
        torch.testing.assert_close(traj[t], want, atol=1e-12, rtol=0)
    final = core(u, s0)
    torch.testing.assert_close(traj[-1], final, atol=0, rtol=0)
    up = torch.randn_like(final)
    got = torch.autograd.grad(traj[-1], list(core.parameters()), up)
    want = torch.autograd.grad(final, list(core.parameters()), up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_core_default_returns_the_final_state_only():
    core = CubicCore(lattice_size=(2, 3, 2), state_size=2, hidden_size=3, steps=3, backend="reference")
    u = torch.randn(1, 2, 3, 2, 1)
    assert core(u).shape == (1, 2, 3, 2, 2)
    assert core(u, return_trajectory=True).shape == (4, 1, 2, 3, 2, 2)
    with pytest.raises(TypeError, match="return_trajectory"):
        core(u, return_trajectory="yes")


# --- the rule family as module options ---------------------------------------------------------------------------


def test_family_options_shape_the_parameters():
    core = cubecore.CubicCore((3, 4, 5), state_size=6, hidden_size=[10, 12], input_size=2, steps=2,
                              neighbourhood="moore", perception="depthwise", perception_filters=2,
                              output_activation="identity", output_bias=False, fire_rate=0.5, alive_channel=1,
                              dead_state=[1, 0, 0, 0, 0, 0])
    shapes = {name: tuple(p.shape) for name, p in core.named_parameters()}
    assert shapes == {"perception": (6, 2, 27), "w1": (10, 6 * 2 + 2), "b1": (10,), "w2": (12, 10), "b2": (12,),
                      "w3": (6, 12)}
    assert core.b3 is None and core.layers()[-1] is None
    assert torch.equal(core.dead_state, torch.tensor([1.0, 0, 0, 0, 0, 0]))
    info = core.get_info()
    assert (info["neighbourhood"], info["perception"], info["hidden_size"], info["fire_rate"]) == (
        "moore", "depthwise", (10, 12), 0.5)
    assert "moore" in repr(core) and "alive_channel=1" in repr(core)
    # The original module is unchanged: w1, b1, w2 (output), b2.
    plain = cubecore.CubicCore((2, 2, 2), state_size=3, hidden_size=4, input_size=1)
    assert [n for n, _ in plain.named_parameters()] == ["w1", "b1", "w2", "b2"]


def test_each_default_and_the_rules_fields_have_one_owner():
    """CubicCore's rule options default to cubecore.ops.rule.Rule's (the original rule), and its info and repr
    name every field of the Rule; ModelConfig's core options default to CubicCore's but for the embedding model's
    own sizes and update; every core option is a ModelConfig field (but the input and the dead state), and
    core_options hands the core each of them."""
    import dataclasses
    import inspect

    from cubecore import ModelConfig
    from cubecore.ops.rule import Rule

    core_defaults = {name: p.default for name, p in inspect.signature(CubicCore).parameters.items()}
    rule_fields = [f.name for f in dataclasses.fields(Rule)]
    assert {name: core_defaults[name] for name in rule_fields} == dataclasses.asdict(Rule())
    core = CubicCore(lattice_size=(2, 2, 2), alive_channel=0, update="residual", step_size=0.5)
    info = core.get_info()
    assert {name: info[name] for name in rule_fields} == dataclasses.asdict(core.rule)
    assert all(f"{name}={getattr(core.rule, name)!r}" in repr(core) for name in rule_fields), repr(core)

    config, fields = ModelConfig(), {f.name for f in dataclasses.fields(ModelConfig)}
    shared = fields & set(core_defaults)
    assert set(core_defaults) - shared == {"input_size", "dead_state"}
    assert {name for name in shared if getattr(config, name) != core_defaults[name]} == {
        "lattice_size", "hidden_size", "steps", "update", "step_size"}
    assert set(config.core_options()) == shared - {"lattice_size", "state_size", "hidden_size"}
    # The values themselves are a promise to users (saved models and configs rely on them): written out here.
    assert dataclasses.asdict(Rule()) == dict(neighbourhood="von_neumann", boundary="zeros", activation="tanh",
                                              output_activation="tanh", update="replace", step_size=1.0,
                                              alive_channel=None, alive_threshold=0.1)
    assert (config.lattice_size, config.hidden_size, config.steps, config.update, config.step_size) == (
        (8, 8, 6), 32, 4, "residual", 0.5)


@requires_kernel
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_family_core_forward_replays_a_fire_mask_and_matches_the_functional_form(backend):
    torch.manual_seed(0)
    core = cubecore.CubicCore((4, 3, 5), state_size=5, hidden_size=[8, 6], input_size=0, steps=3,
                              neighbourhood="moore", perception="depthwise", update="residual", fire_rate=0.5,
                              alive_channel=0, boundary="reflect", backend=backend).double()
    state = torch.rand(2, 4, 3, 5, 5, dtype=torch.float64)
    mask = torch.rand(3, 2, 4, 3, 5) < 0.5
    out = core(state=state, fire_mask=mask)
    torch.testing.assert_close(core(state=state, fire_mask=mask), out, atol=0, rtol=0)  # replayed exactly
    want = cubecore.propagate_reference(state, None, *core.layers(), steps=3, perception=core.perception,
                                        neighbourhood="moore", boundary="reflect", update="residual",
                                        fire_mask=mask, alive_channel=0)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    traj = core(state=state, fire_mask=mask, return_trajectory=True)
    torch.testing.assert_close(traj[-1], out, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden_size=[4, 4, 4]), ValueError, "hidden_size"),
    (dict(hidden_size=[]), ValueError, "hidden_size"),
    (dict(hidden_size="8"), TypeError, "hidden_size"),
    (dict(perception="learned"), ValueError, "perception"),
    (dict(perception_filters=0), ValueError, "perception_filters"),
    (dict(fire_rate=0), ValueError, "fire_rate"),
    (dict(alive_channel=3), ValueError, "alive_channel"),
    (dict(dead_state=[0, 0, 0]), ValueError, "alive_channel too"),
    (dict(alive_channel=0, dead_state=[0, 0]), ValueError, "dead_state"),
    (dict(boundary="reflect", lattice_size=(1, 2, 2)), ValueError, "reflect"),
    (dict(output_bias=1), TypeError, "output_bias"),
])
def test_bad_family_settings_raise_naming_the_argument(kwargs, error, match):
    base = dict(lattice_size=(2, 2, 2), state_size=3, input_size=0)
    with pytest.raises(error, match=match):
        cubecore.CubicCore(**{**base, **kwargs})
