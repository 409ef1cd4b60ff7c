"""The rule family on the CPU kernel against the float64 reference: every combination of neighbourhood,
perception, depth, output activation, fire, alive, boundary and update, forward and every gradient, on odd
lattices, with 1, 2 and 3 threads; float32; the op's registration (opcheck, torch.compile) for the family."""

import itertools
import warnings

import pytest
import torch

import cubecore
from conftest import requires_cuda_kernel, requires_kernel
from cubecore import propagate
from cubecore.ops.reference import propagate_reference
from cubecore.ops.op_args import OpArgs
from cubecore.ops.rule import (ACTIVATIONS, BOUNDARIES, BOUNDARY_ALIASES, MAX_HIDDEN_LAYERS, NEIGHBOURHOODS,
                                OUTPUT_ACTIVATIONS, PERCEPTIONS, UPDATES, Rule, slots)

# The choices of the rule family are cubecore/ops/rule.py's, so that a choice added there is tested here (and in
# test_cpu_engines.py and test_cuda_emulated.py, which take these too).  A perception as these tests give it: its
# filters per channel, 0 for concat (no perception weight).
FILTERS = {"concat": 0, "depthwise": 3}
assert set(FILTERS) == set(PERCEPTIONS), f"give each perception of cubecore/ops/rule.py its filters: {PERCEPTIONS}"
PERCEPTION_FILTERS = tuple(FILTERS[perception] for perception in PERCEPTIONS)
DEPTHS = tuple(range(1, MAX_HIDDEN_LAYERS + 1))  # hidden layers
FIRES = (False, True)
ALIVES = (False, True)
COMBINATIONS = list(itertools.product(NEIGHBOURHOODS, PERCEPTION_FILTERS, DEPTHS, OUTPUT_ACTIVATIONS, FIRES, ALIVES,
                                      BOUNDARIES, UPDATES))
# (B, X, Y, Z, S, E): odd lattices; B = 1 with X >= 4 (slabs), B = 2 (samples per thread), a thin X = 2 lattice that
# one thread takes whole; S = 8 and 16 take the kernels' compile-time paths, the others the general one.
SHAPES = [(2, 3, 4, 5, 3, 2), (1, 5, 2, 3, 8, 0), (3, 2, 3, 2, 5, 1), (1, 4, 3, 3, 16, 1), (2, 2, 2, 3, 2, 0)]


def family_problem(shape, neighbourhood, filters, depth, output_bias=True, alive=False, seed=0,
                   dtype=torch.float64):
    """(state, external, perception, weights) with random values large enough that every term matters; with
    ``alive`` the alive channel (1) is sparse, so that cells die and are born."""
    B, X, Y, Z, S, E = shape
    gen = torch.Generator().manual_seed(seed)
    K = slots(neighbourhood)

    def rnd(*size, scale=0.5):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype)

    state = rnd(B, X, Y, Z, S)
    if alive:
        state[..., 1] = torch.rand(B, X, Y, Z, generator=gen, dtype=torch.float64).to(dtype) * 0.25
    external = rnd(B, X, Y, Z, E) if E else None
    perception = rnd(S, filters, K) if filters else None
    reads = (S * filters if filters else K * S) + E
    sizes = [reads] + [6, 5][:depth] + [S]
    weights = []
    for i in range(len(sizes) - 1):
        weights += [rnd(sizes[i + 1], sizes[i], scale=1.0 / sizes[i] ** 0.5 * 1.5), rnd(sizes[i + 1])]
    if not output_bias:
        weights[-1] = None
    return state, external, perception, weights


def run(backend, problem, autocast=None, precision="ieee", **kw):
    """Final state and the gradients of every tensor, for a fixed random upstream gradient; the forward under
    autocast to the dtype ``autocast``, or (the reference) with the products' operands in ``precision``."""
    state, external, perception, weights = [
        (x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x) for x in problem[:3]] + [
        [w.detach().clone().requires_grad_() if w is not None else None for w in problem[3]]]
    leaves = [t for t in [state, external, perception, *weights] if t is not None]
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        if precision != "ieee":
            out = propagate_reference(state, external, *weights, perception=perception, precision=precision, **kw)
        else:
            out = propagate(state, external, *weights, perception=perception, backend=backend, **kw)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream.to(device=out.device, dtype=out.dtype))
    return [out.detach()] + list(grads)


def assert_same(got, want, atol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w.double(), atol=atol * scale, rtol=0,
                                   msg=lambda m, i=i: f"{'output' if i == 0 else f'gradient {i}'}: {m}")


def options(neighbourhood, output, fire, alive, boundary, update, steps, shape, seed, activation="tanh"):
    kw = dict(steps=steps, neighbourhood=neighbourhood, boundary=boundary, activation=activation,
              output_activation=output, update=update, step_size=0.7)
    if fire:
        gen = torch.Generator().manual_seed(seed)
        kw["fire_mask"] = torch.rand((steps, *shape[:4]), generator=gen) < 0.5
    if alive:
        kw.update(alive_channel=1, alive_threshold=0.1, dead_state=torch.arange(shape[4], dtype=torch.float64) / 4)
    return kw


@requires_kernel
@pytest.mark.parametrize("combination", COMBINATIONS, ids=lambda c: "-".join(map(str, c)))
def test_every_combination_matches_the_float64_reference(combination):
    neighbourhood, filters, depth, output, fire, alive, boundary, update = combination
    i = COMBINATIONS.index(combination)
    shape = SHAPES[i % len(SHAPES)]
    if boundary == "reflect" and min(shape[1:4]) < 2:
        shape = SHAPES[0]
    problem = family_problem(shape, neighbourhood, filters, depth, output_bias=i % 3 != 0, alive=alive, seed=i)
    kw = options(neighbourhood, output, fire, alive, boundary, update, 3, shape, i, ACTIVATIONS[i % len(ACTIVATIONS)])
    if alive:
        kw["dead_state"] = kw["dead_state"].to(problem[0].dtype)
    with torch_threads(1 + i % 3):
        got = run("kernel", problem, **kw)
    assert_same(got, run("reference", problem, **kw), atol=1e-10)


@requires_kernel
@pytest.mark.parametrize("neighbourhood,filters,depth", [("moore", 3, 2), ("von_neumann", 1, 1), ("moore", 0, 2)])
def test_float32_kernel_matches_the_float64_reference(neighbourhood, filters, depth):
    shape = (2, 4, 3, 5, 8, 1)
    problem = family_problem(shape, neighbourhood, filters, depth, alive=True, seed=3)
    kw = options(neighbourhood, "identity", True, True, "reflect", "residual", 4, shape, 3, "relu")
    want = run("reference", problem, **kw)
    problem32 = family_problem(shape, neighbourhood, filters, depth, alive=True, seed=3, dtype=torch.float32)
    kw["dead_state"] = kw["dead_state"].float()
    assert_same(run("kernel", problem32, **kw), want, atol=2e-4)


@requires_cuda_kernel
@pytest.mark.parametrize("combination", COMBINATIONS[::37], ids=lambda c: "-".join(map(str, c)))
def test_cuda_kernel_runs_the_family(combination):
    """On a GPU: a spread of the combinations (every 37th) in float32 against the float64 reference; the
    emulated tests (tests/ops/test_cuda_emulated.py) cover every pair of option values on the CPU."""
    neighbourhood, filters, depth, output, fire, alive, boundary, update = combination
    i = COMBINATIONS.index(combination)
    shape = SHAPES[i % len(SHAPES)]
    if boundary == "reflect" and min(shape[1:4]) < 2:
        shape = SHAPES[0]
    problem = family_problem(shape, neighbourhood, filters, depth, output_bias=i % 3 != 0, alive=alive, seed=i)
    kw = options(neighbourhood, output, fire, alive, boundary, update, 3, shape, i, ACTIVATIONS[i % len(ACTIVATIONS)])
    want = run("reference", problem, **kw)
    cuda = family_problem(shape, neighbourhood, filters, depth, output_bias=i % 3 != 0, alive=alive, seed=i,
                          dtype=torch.float32)
    cuda = [x.cuda() if isinstance(x, torch.Tensor) else x for x in cuda[:3]] + [
        [w.cuda() if w is not None else None for w in cuda[3]]]
    kw = {k: v.cuda().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else
          v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    assert_same([t.cpu() for t in run("kernel", cuda, **kw)], want, atol=3e-4)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("S", [3, 5, 11, 16, 21, 37])
def test_depthwise_perception_at_every_state_width(S, dtype):
    """The depthwise perception runs on whole vectors, 4 at a time, with the last one overlapping the one before
    it where S is no multiple of the width (4 doubles or 8 floats), and per slot where S is narrower than one:
    widths that take each of these paths, on the zeros boundary (where slots are skipped)."""
    shape = (2, 3, 4, 3, S, 1)
    kw = options("moore", "identity", False, False, "zeros", "residual", 3, shape, S)
    want = run("reference", family_problem(shape, "moore", 3, 1, seed=S), **kw)
    got = run("kernel", family_problem(shape, "moore", 3, 1, seed=S, dtype=dtype), **kw)
    assert_same(got, want, atol=1e-10 if dtype == torch.float64 else 2e-4)


@requires_kernel
def test_gradcheck_of_the_whole_family():
    shape = (1, 3, 2, 3, 2, 1)
    state, external, perception, weights = family_problem(shape, "moore", 2, 2, seed=5)
    fire = torch.rand(2, 1, 3, 2, 3, generator=torch.Generator().manual_seed(0)) < 0.6
    leaves = [t.requires_grad_() for t in (state, external, perception, *weights)]

    def fn(s, u, p, *w):
        return propagate(s, u, *w, perception=p, steps=2, neighbourhood="moore", boundary="reflect",
                         output_activation="identity", update="residual", fire_mask=fire, backend="kernel")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@requires_kernel
def test_fire_rate_draws_the_same_masks_on_both_backends():
    shape = (2, 4, 3, 3, 4, 0)
    state, _, perception, weights = family_problem(shape, "moore", 3, 1, seed=2)
    results = []
    for backend in ("reference", "kernel"):
        torch.manual_seed(123)
        results.append(propagate(state, None, *weights, perception=perception, steps=5, neighbourhood="moore",
                                 update="residual", fire_rate=0.5, backend=backend))
    torch.testing.assert_close(results[0], results[1], atol=1e-12, rtol=0)
    torch.manual_seed(124)
    other = propagate(state, None, *weights, perception=perception, steps=5, neighbourhood="moore",
                      update="residual", fire_rate=0.5, backend="kernel")
    assert not torch.allclose(other, results[1])  # another seed, other masks


@requires_kernel
def test_opcheck_of_the_family():
    shape = (2, 3, 2, 4, 3, 1)
    state, external, perception, weights = family_problem(shape, "moore", 2, 2, alive=True, seed=4)
    fire = torch.rand(3, *shape[:4], generator=torch.Generator().manual_seed(1)) < 0.5
    dead = torch.ones(3, dtype=torch.float64)
    rule = Rule("moore", "reflect", "relu", "identity", "residual", 0.5, 1, 0.1)
    for keep, grad in ((True, True), (False, False)):
        s, u, p, *net = [t.detach().clone().requires_grad_(grad) for t in (state, external, perception, *weights)]
        call = OpArgs.of(u, net, rule, 3, perception=p, fire_mask=fire, dead_state=dead)
        torch.library.opcheck(torch.ops.cubecore.propagate_forward.default, call.forward_args(s, keep))
    final, traj, life = torch.ops.cubecore.propagate_forward(*call.forward_args(s, True))
    assert life.shape == (3, *shape[:4]) and life.dtype == torch.uint8
    torch.library.opcheck(torch.ops.cubecore.propagate_backward.default,
                          call.backward_args(torch.randn_like(final), traj, life))


@requires_kernel
def test_torch_compile_fullgraph_runs_the_family():
    torch.manual_seed(0)
    core = cubecore.CubicCore((4, 3, 5), state_size=6, hidden_size=[8, 8], input_size=0, steps=3,
                              neighbourhood="moore", perception="depthwise", output_activation="identity",
                              output_bias=False, update="residual", alive_channel=0, backend="kernel")
    state = torch.rand(2, 4, 3, 5, 6)
    fire = torch.rand(3, 2, 4, 3, 5) < 0.5
    compiled = torch.compile(core, fullgraph=True)
    torch.testing.assert_close(compiled(state=state, fire_mask=fire), core(state=state, fire_mask=fire))


def test_the_reference_backend_takes_deeper_nets_and_the_kernel_says_why_not():
    shape = (1, 2, 2, 2, 2, 0)
    state, _, _, weights = family_problem(shape, "von_neumann", 0, 2, seed=1)
    deeper = weights[:4] + [torch.randn(5, 5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)] + weights[4:]
    deeper[-2] = torch.randn(2, 5, dtype=torch.float64)
    propagate_reference(state, None, *deeper, steps=2)
    with pytest.raises(cubecore.errors.UnavailableError, match="at most 2 hidden layers"):
        propagate(state, None, *deeper, steps=2, backend="kernel")


@pytest.mark.parametrize("kw,error,match", [
    (dict(neighbourhood="hex"), ValueError, "neighbourhood"),
    (dict(output_activation="relu"), ValueError, "output_activation"),
    (dict(fire_rate=0.0), ValueError, "fire_rate"),
    (dict(fire_rate=1.5), ValueError, "fire_rate"),
    (dict(fire_rate=0.5, fire_mask=torch.ones(2, 1, 2, 3, 4, dtype=torch.bool)), ValueError, "not both"),
    (dict(fire_mask=torch.ones(2, 1, 2, 3, 4)), TypeError, "fire_mask must be a bool"),
    (dict(fire_mask=torch.ones(3, 1, 2, 3, 4, dtype=torch.bool)), ValueError, "fire_mask must have shape"),
    (dict(alive_channel=2), ValueError, "alive_channel"),
    (dict(alive_channel=-1), ValueError, "alive_channel"),
    (dict(dead_state=torch.zeros(2, dtype=torch.float64)), ValueError, "alive_channel too"),
    (dict(alive_channel=0, dead_state=torch.zeros(3, dtype=torch.float64)), ValueError, "dead_state"),
    (dict(perception=torch.zeros(2, 3, 27, dtype=torch.float64)), ValueError, "perception must have shape"),
    (dict(boundary="reflect"), ValueError, "reflect"),
])
def test_bad_rule_options_raise_naming_the_argument(kw, error, match):
    state = torch.zeros(1, 2, 3, 1, 2, dtype=torch.float64) if kw.get("boundary") == "reflect" else \
        torch.zeros(1, 2, 3, 4, 2, dtype=torch.float64)
    w = [torch.zeros(3, 14, dtype=torch.float64), None, torch.zeros(2, 3, dtype=torch.float64), None]
    with pytest.raises(error, match=match):
        propagate(state, None, *w, steps=2, backend="reference", **kw)


def test_old_boundary_names_keep_their_meaning():
    state = torch.randn(1, 3, 2, 4, 2, dtype=torch.float64)
    w = [torch.randn(3, 14, dtype=torch.float64), None, torch.randn(2, 3, dtype=torch.float64), None]
    promised = {"wall": "zeros", "periodic": "circular"}  # a compatibility promise: written out, not read back
    assert BOUNDARY_ALIASES == promised
    for old, new in promised.items():
        assert torch.equal(propagate_reference(state, None, *w, steps=2, boundary=old),
                           propagate_reference(state, None, *w, steps=2, boundary=new))


class torch_threads:
    """torch's intra-op thread count set to n inside the block (the CPU kernels split their work by it)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@requires_kernel
def test_torch_compile_dynamic_traces_a_core_with_symbolic_sizes():
    """dynamic=True makes the core's plain numbers symbolic: the options are checked when the core is built,
    not again in the traced forward (a math.isfinite on a symbolic step_size failed there)."""
    torch.manual_seed(0)
    core = cubecore.CubicCore((3, 4, 5), state_size=4, hidden_size=8, input_size=2, steps=3, update="residual",
                              step_size=0.5, fire_rate=0.5, backend="kernel")
    compiled = torch.compile(core, dynamic=True, fullgraph=True)
    for batch in (2, 3):
        u = torch.randn(batch, 3, 4, 5, 2)
        mask = torch.rand(3, batch, 3, 4, 5) < 0.5
        torch.testing.assert_close(compiled(u, fire_mask=mask), core(u, fire_mask=mask))


@requires_kernel
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_differentiation_gives_the_references_tangents(transform):
    """The kernel has no forward-mode rule: under torch.func.jvp its tangents were zeros. backend='auto' now
    computes them with the reference (saying so once), backend='kernel' refuses."""
    import warnings

    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    core = cubecore.CubicCore((2, 3, 2), state_size=2, hidden_size=3, input_size=1, steps=2).double()
    u = torch.randn(1, 2, 3, 2, 1, dtype=torch.float64)
    t = torch.randn_like(u)
    eps = 1e-6
    finite = (core(u + eps * t) - core(u - eps * t)) / (2 * eps)

    def tangent(module):
        if transform == "jvp":
            return torch.func.jvp(module, (u,), (t,))[1]
        if transform == "jacfwd":
            jac = torch.func.jacfwd(module)(u)
            return (jac.reshape(finite.numel(), u.numel()) @ t.flatten()).reshape(finite.shape)
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(module(forward_ad.make_dual(u, t))).tangent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = tangent(core)
    torch.testing.assert_close(got, finite, atol=1e-7, rtol=1e-6)
    assert got.abs().max() > 1e-3
    core.backend = "kernel"
    with pytest.raises(cubecore.errors.UnavailableError, match="forward-mode"):
        tangent(core)


def _functorch_cases(core, u):
    """Every torch.func transform a user applies to a core, each a function of nothing returning tensors."""
    func = torch.func
    batch = torch.stack([u, 2 * u, -u])
    params = None if core is None else dict(core.named_parameters())
    return {
        "grad": lambda: func.grad(lambda x: core(x).square().sum())(u),
        "jacrev": lambda: func.jacrev(core)(u),
        "hessian": lambda: func.hessian(lambda x: core(x).square().sum())(u),
        "vmap(grad)": lambda: func.vmap(func.grad(lambda x: core(x).square().sum()))(batch),
        "grad of parameters": lambda: tuple(func.grad(
            lambda p: func.functional_call(core, p, (u,)).square().sum())(params).values()),
        "vjp": lambda: func.vjp(core, u)[1](torch.ones_like(u[..., :1].expand(*u.shape[:-1], 2)))[0],
        "jvp(vmap)": lambda: func.jvp(func.vmap(core), (batch,), (torch.ones_like(batch),))[1],
        "vmap(jvp)": lambda: func.vmap(lambda x, t: func.jvp(core, (x,), (t,))[1])(batch, torch.ones_like(batch)),
        "vmap": lambda: func.vmap(core)(batch),
    }


@requires_kernel
@pytest.mark.parametrize("transform", list(_functorch_cases(None, torch.zeros(1))))
def test_every_torch_func_transform_runs_through_a_core(transform):
    """torch.func transforms through a core on the default backend give the reference's results: the kernel runs
    under vmap; under a gradient transform (torch runs no custom op's autograd formula there) and under
    forward-mode (the kernel has none) the reference computes them, saying so once; backend='kernel' refuses
    those with the reason instead of ending in torch's internal errors."""
    torch.manual_seed(0)
    core = cubecore.CubicCore((2, 3, 2), state_size=2, hidden_size=3, input_size=1, steps=2).double()
    u = torch.randn(1, 2, 3, 2, 1, dtype=torch.float64)
    core.backend = "reference"
    want = _functorch_cases(core, u)[transform]()
    core.backend = "auto"
    cubecore.ops.front._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _functorch_cases(core, u)[transform]()
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves) >= 1 and all(w.numel() for w in want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    said = [str(w.message) for w in caught if "reference" in str(w.message)]
    core.backend = "kernel"
    if transform == "vmap":
        assert not said
        torch.testing.assert_close(_functorch_cases(core, u)[transform](), want, atol=1e-10, rtol=1e-10)
    else:
        assert len(said) == 1 and ("torch.func" in said[0] or "forward-mode" in said[0]), said
        with pytest.raises(cubecore.errors.UnavailableError, match="torch.func|forward-mode"):
            _functorch_cases(core, u)[transform]()


@requires_kernel
@pytest.mark.parametrize("lattice,batch", [((8, 8, 6), 32), ((1, 1, 1), 1)])
def test_ctrl_c_stops_a_long_rollout_within_a_chunk(lattice, batch):
    """A kernel call does not return until its steps are done: a rollout of a million steps ignored Ctrl-C for
    minutes.  propagate runs long rollouts as calls of a few seconds' work, and Python sees the signal between;
    on a lattice of one cell a call's steps are capped too (bounded work alone made it millions of steps, each
    with its fixed cost)."""
    import signal
    import subprocess
    import sys
    import time

    # The child takes Ctrl-C as from a terminal, whatever this test process inherited: a shell without job control
    # starts a background command (`bash .ci/run &`) with SIGINT ignored, and every child inherits that.
    code = ("import signal\n"
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import torch, cubecore\n"
            f"core = cubecore.CubicCore({lattice}, state_size=8, hidden_size=32, input_size=1, steps=10**8)\n"
            "print('started', flush=True)\n"
            "with torch.no_grad():\n"
            f"    core(torch.randn({batch}, *{lattice}, 1))\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        time.sleep(2.0)
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            _, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            err = "still running 60 s after SIGINT; its stderr: " + child.communicate()[1]
        waited = time.monotonic() - sent
    finally:
        child.kill()
    assert "KeyboardInterrupt" in err, err
    assert waited < 10, f"the rollout took {waited:.1f} s to stop after Ctrl-C"


@requires_kernel
def test_a_rollout_in_several_calls_is_the_rollout_in_one(monkeypatch):
    shape = (2, 4, 3, 3, 5, 1)
    problem = family_problem(shape, "moore", 2, 2, alive=True, seed=8)
    kw = options("moore", "identity", True, True, "circular", "residual", 7, shape, 8, "relu")
    whole = run("kernel", problem, **kw)
    traj_whole = propagate(problem[0], problem[1], *problem[3], perception=problem[2], backend="kernel",
                           return_trajectory=True, **kw)
    monkeypatch.setattr(cubecore.ops.front, "MAX_STEPS_PER_CALL", 3)  # calls of 3, 3 and 1 steps
    # (the gradients of tensors every step reads are summed over the calls in another order)
    assert_same(run("kernel", problem, **kw), whole, atol=1e-12)
    traj = propagate(problem[0], problem[1], *problem[3], perception=problem[2], backend="kernel",
                     return_trajectory=True, **kw)
    assert traj.shape == traj_whole.shape == (8, *problem[0].shape)
    torch.testing.assert_close(traj, traj_whole, atol=0, rtol=0)


# --- NaN: the same rule on every backend -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=requires_kernel)])
def test_a_nan_in_the_alive_channel_exceeds_nothing(backend):
    """A NaN neither keeps a block alive nor kills it: a diverged cell's living neighbour stays alive and keeps the
    NaN it read (a max-pool that propagated NaN reset the whole block to the dead state, hiding the NaN), and the
    diverged cell itself, with no living value in its block, dies."""
    shape = (1, 5, 5, 6, 3, 0)
    state, _, perception, weights = family_problem(shape, "moore", 2, 1, seed=3)
    state[..., 1] = 0.0
    state[0, 2, 2, 2, 1] = float("nan")
    state[0, 2, 2, 4, 1] = 1.0  # alive before and after (residual change < 1), two cells from the NaN
    dead = torch.full((3,), 0.25, dtype=torch.float64)
    out = propagate(state, None, *weights, perception=perception, steps=1, neighbourhood="moore", update="residual",
                    step_size=0.7, alive_channel=1, alive_threshold=0.1, dead_state=dead, backend=backend)
    assert torch.isnan(out[0, 2, 2, 3]).all()  # alive (its block holds the living cell), its state read the NaN
    torch.testing.assert_close(out[0, 2, 2, 2], dead)  # dead (no value of its block exceeds the threshold)
    assert torch.isfinite(out[0, 2, 2, 4]).all() and out[0, 2, 2, 4, 1] > 0.1
    if backend == "kernel":
        want = propagate(state, None, *weights, perception=perception, steps=1, neighbourhood="moore",
                         update="residual", step_size=0.7, alive_channel=1, alive_threshold=0.1, dead_state=dead,
                         backend="reference")
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernel", marks=requires_kernel)])
@pytest.mark.parametrize("update", UPDATES)
def test_a_cell_that_does_not_fire_keeps_its_state_whatever_its_change(backend, update):
    """The fire mask selects: a cell whose change is NaN (a NaN in its external input) but that never fires keeps
    its state exactly, and no NaN reaches the rest of the lattice (a change multiplied by the mask was NaN)."""
    shape = (2, 3, 4, 3, 4, 2)
    state, external, perception, weights = family_problem(shape, "von_neumann", 0, 1, seed=5)
    external[0, 1, 2, 1, 0] = float("nan")
    fire = torch.rand((3, *shape[:4]), generator=torch.Generator().manual_seed(6)) < 0.5
    fire[:, 0, 1, 2, 1] = False
    out = propagate(state, external, *weights, steps=3, update=update, step_size=0.7, fire_mask=fire,
                    backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1, 2, 1], state[0, 1, 2, 1])
    if backend == "kernel":
        want = propagate(state, external, *weights, steps=3, update=update, step_size=0.7, fire_mask=fire,
                         backend="reference")
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
