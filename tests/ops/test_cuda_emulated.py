"""The CUDA kernels (csrc/cubecore_cuda.cu), run on the CPU by the cuda-emu emulator, against the float64 reference.

Every CUDA thread runs as a fiber with real barrier and warp-shuffle semantics and H100 launch and
shared-memory limits; each case runs under two schedules (``round/forward`` and ``warp/reverse``), which
reorder threads, warps and blocks so that a missing barrier shows as a wrong result.  The emulator lives
beside the project (``../shared/cuda-emu``, or ``$CUDA_EMU_DIR``); without it, or without g++, this module
skips with the reason, unless ``CUBECORE_REQUIRE_CUDA_EMU=1`` (set by CI), which turns the skip into a failure.

The rule family has too many combinations of options to run them all here, so the cases cover every pair of
option values (pairwise), kernel paths included as options: the forward fused or per step, the scratch rows
in shared or global memory, the compile-time state size or the runtime one, the backward's blocks as many as
the tiles or two (so that a block takes several tiles).  Each path is forced through the kernels' test hook
(``cubecore_cuda_force_paths``) and checked by counting launches.
"""

import ctypes
import importlib.util
import itertools
import os
import random
import shutil
import sys

import pytest
import torch

from cubecore.ops.front import CUDA_MAX_STATE, kernel_limit_reason
from cubecore.ops.reference import rounded, trajectory_reference
from cubecore.ops.op_args import OpArgs
from cubecore.ops.rule import ACTIVATIONS, BOUNDARIES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, UPDATES, Rule, slots
from test_rule_family import DEPTHS, PERCEPTION_FILTERS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU_DIR = os.environ.get("CUDA_EMU_DIR", os.path.join(ROOT, "..", "shared", "cuda-emu"))
SCHEDULES = [("round", "forward"), ("warp", "reverse")]
H100_OPTIN = 232448  # opt-in shared memory per block
COMPILED_STATES = (8, 16, 20)  # with_cuda_state_length in the .cu: other sizes take the L = 0 kernels


def _emulator_missing():
    if not os.path.isfile(os.path.join(EMU_DIR, "cuda_emu.py")):
        return f"the CUDA emulator is not at {os.path.abspath(EMU_DIR)} (set CUDA_EMU_DIR)"
    if shutil.which("g++") is None:
        return "g++ is not installed (the emulator compiles the CUDA kernels with it)"
    return None


class Emulator:
    def __init__(self, cuda_emu, ops, so):
        self.cuda_emu, self.ops = cuda_emu, ops
        self._force = ctypes.CDLL(so).cubecore_cuda_force_paths
        self._force.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                ctypes.c_int]

    def force(self, runtime_sizes=False, global_rows=False, forward="auto", backward_blocks=0, tensor_cores="auto",
              tile=0, sm=0):
        """tensor_cores "off": the FMA path whatever the call's precision; tile: the tensor-core path's cells per
        tile (16, 32, 64; 0: the largest that fits); sm: the compute capability the precision check sees."""
        self._force(int(runtime_sizes), int(global_rows), {"auto": 0, "per-step": 1, "fused": 2}[forward],
                    backward_blocks, {"auto": 0, "off": 1}[tensor_cores], tile, sm)

    def launches(self, fn):
        before = self.cuda_emu.stats()["launches"]
        out = fn()
        return out, self.cuda_emu.stats()["launches"] - before


@pytest.fixture(scope="module")
def emu():
    missing = _emulator_missing()
    if missing:
        if os.environ.get("CUBECORE_REQUIRE_CUDA_EMU", "0") not in ("", "0"):
            pytest.fail(f"CUBECORE_REQUIRE_CUDA_EMU is set but {missing}")
        pytest.skip(f"emulated CUDA tests skipped: {missing}")
    sys.path.insert(0, os.path.abspath(EMU_DIR))
    import cuda_emu

    import cubecore._C  # noqa: F401  (defines torch.ops.cubecore, whose schemas load() copies)

    so = os.environ.get("CUDA_EMU_SO") or cuda_emu.build(os.path.join(ROOT, "csrc", "cubecore_cuda.cu"),
                                                          link_module="cubecore._C")
    emulator = Emulator(cuda_emu, cuda_emu.load(so, "cubecore"), so)
    # NaN-fill torch.empty, so that an output element no kernel writes shows up.
    saved = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    cuda_emu.set_optin_bytes(H100_OPTIN)
    yield emulator
    torch.use_deterministic_algorithms(saved[0])
    torch.utils.deterministic.fill_uninitialized_memory = saved[1]
    cuda_emu.set_schedule(None, None)
    emulator.force()


@pytest.fixture(params=SCHEDULES, ids="-".join)
def schedule(request, emu):
    emu.cuda_emu.set_schedule(*request.param)
    yield request.param
    emu.cuda_emu.set_schedule(None, None)
    emu.force()


# --- a problem of the rule family, the op's arguments, the reference --------------------------------------------

class Case(dict):
    """One combination of options (a dict, with attribute access)."""
    __getattr__ = dict.__getitem__


def problem(case, dtype=torch.float64, seed=0):
    """(state, external, perception, [w1, b1, (wh, bh,) wo, bo], fire_mask, dead_state) in float64, random
    values large enough that every term matters; with alive masks the alive channel (1) is sparse, so that
    cells die and are born."""
    B, X, Y, Z, S, E = case.shape
    gen = torch.Generator().manual_seed(seed)
    K = slots(case.neighbourhood)

    def rnd(*size, scale=0.5):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype)

    state = rnd(B, X, Y, Z, S)
    if case.alive:
        state[..., 1] = (torch.rand(B, X, Y, Z, generator=gen, dtype=torch.float64) * 0.25).to(dtype)
    external = rnd(B, X, Y, Z, E)
    perception = rnd(S, case.filters, K) if case.filters else None
    sizes = [(S * case.filters if case.filters else K * S) + E] + list(case.get("hidden", (7, 5)))[:case.depth] + [S]
    weights = []
    for i in range(len(sizes) - 1):
        weights += [rnd(sizes[i + 1], sizes[i], scale=1.5 / sizes[i] ** 0.5), rnd(sizes[i + 1])]
    if not case.bias:
        weights[-1] = None
    fire = torch.rand((case.steps, B, X, Y, Z), generator=gen) < 0.5 if case.fire else None
    dead = (torch.arange(S, dtype=torch.float64) / 4).to(dtype) if case.alive else None
    return state, external, perception, weights, fire, dead


def op_call(case, args):
    """The op's arguments (OpArgs) for a case's problem."""
    _, external, perception, weights, fire, dead = args
    rule = Rule(case.neighbourhood, case.boundary, case.activation, case.output, case["update"], case.step_size,
                1 if case.alive else None, 0.1)
    return OpArgs.of(external, weights, rule, case.steps, perception=perception, fire_mask=fire, dead_state=dead,
                     precision=case.get("precision", "ieee"))


def forward(ops, case, args, keep):
    return ops.propagate_forward(*op_call(case, args).forward_args(args[0], keep))


def backward(ops, case, args, upstream, traj, life):
    return ops.propagate_backward(*op_call(case, args).backward_args(upstream, traj, life))


def reference(case, args, seed=1):
    """Float64 trajectory [T+1, ...], the upstream gradient of the final state, and the gradients of (state,
    external, perception, w1, b1, wh, bh, wo, bo), None for the tensors the case lacks."""
    state, external, perception, weights, fire, dead = args
    leaves = [None if t is None else t.double().clone().requires_grad_() for t in
              (state, *op_call(case, args).tensors()[:8])]
    if not case.bias:
        leaves[8] = None
    layers = [leaves[i] for i in (3, 4, 5, 6, 7, 8) if i < 5 or leaves[5] is not None or i > 6]
    states = trajectory_reference(leaves[0], leaves[1], *layers, steps=case.steps, perception=leaves[2],
                                  fire_mask=fire, dead_state=None if dead is None else dead.double(),
                                  neighbourhood=case.neighbourhood, boundary=case.boundary,
                                  activation=case.activation, output_activation=case.output, update=case["update"],
                                  step_size=case.step_size, alive_channel=1 if case.alive else None,
                                  alive_threshold=0.1)
    upstream = torch.randn(states[-1].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(states[-1], present, upstream))
    return states.detach(), upstream, [None if t is None else next(grads) for t in leaves]


GRAD_NAMES = ("state", "external", "perception", "w1", "b1", "wh", "bh", "wo", "bo")


def assert_close(name, got, want, tol):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def check(emu, case):
    """The forward (trajectory kept and not) and all nine gradients on the paths `case` forces, launches
    counted, against the float64 reference."""
    dtype = case.dtype
    tol = 1e-10 if dtype == torch.float64 else 3e-4
    args64 = problem(case)
    args = problem(case, dtype)
    want_traj, upstream, want_grads = reference(case, args64)
    emu.force(runtime_sizes=case.sizes == "runtime", global_rows=case.rows == "global", forward=case.forward,
              backward_blocks=case.blocks)
    (final, traj, life), n = emu.launches(lambda: forward(emu.ops, case, args, True))
    per_step = 1 + (2 if case.alive else 0)  # the step, then the alive masks and the burial
    assert n == (1 if case.forward == "fused" else case.steps * per_step), f"expected the {case.forward} forward"
    assert_close("trajectory", traj, want_traj, tol)
    assert_close("final", final, want_traj[-1], tol)
    assert life.shape == ((case.steps, *case.shape[:4]) if case.alive else (0, *case.shape[:4]))
    final_only, _, _ = forward(emu.ops, case, args, False)
    assert_close("final without trajectory", final_only, want_traj[-1], tol)
    grads, n = emu.launches(lambda: backward(emu.ops, case, args, upstream.to(dtype), traj, life))
    assert n == 2 * case.steps + 1, "expected the tile and gather kernels per step, then the sum"
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        if want is None:
            continue
        assert got.dtype == dtype and got.shape == want.shape, name
        assert_close(f"grad {name}", got, want, tol)
    return grads


# --- the cases: every pair of option values ------------------------------------------------------------------------

# (B, X, Y, Z, S, E): odd lattices; S = 8 and 20 have compiled kernels, 3, 5 and 4 take the runtime ones; one
# lattice has a side of 1 (a cell is its own neighbour on that axis), one spans several blocks of the per-cell
# kernels (315 cells per sample: ten blocks of 32 threads on an emulated H100).
SHAPES = [(2, 3, 4, 5, 3, 2), (1, 5, 2, 3, 8, 0), (3, 2, 3, 2, 5, 1), (2, 1, 3, 4, 20, 1), (1, 7, 9, 5, 4, 1)]
OPTIONS = {
    "neighbourhood": NEIGHBOURHOODS,
    "filters": PERCEPTION_FILTERS,  # perception: 0 = concat, else depthwise with this many filters per channel
    "depth": DEPTHS,
    "output": OUTPUT_ACTIVATIONS,
    "bias": (True, False),
    "fire": (False, True),
    "alive": (False, True),
    "boundary": BOUNDARIES,
    "update": UPDATES,
    "activation": ACTIVATIONS,
    "dtype": (torch.float64, torch.float32),
    "shape": SHAPES,
    "forward": ("fused", "per-step"),
    "rows": ("shared", "global"),
    "sizes": ("compiled", "runtime"),
    "blocks": (0, 2),
}


def allowed(row):
    return not (row.get("boundary") == "reflect" and "shape" in row and min(row["shape"][1:4]) < 2)


def pairwise(options, seed=0, tries=60):
    """Rows (dicts) in which every pair of values of two options occurs at least once (greedy: each row the
    best of `tries` random ones, completed by the pairs still missing), fixed by `seed`."""
    names = list(options)
    missing = {((a, i), (b, j)) for a, b in itertools.combinations(names, 2)
               for i in range(len(options[a])) for j in range(len(options[b]))
               if allowed({a: options[a][i], b: options[b][j]})}
    rng = random.Random(seed)
    rows = []
    while missing:
        best, best_gain = None, -1
        for _ in range(tries):
            (a, i), (b, j) = rng.choice(sorted(missing))
            pick = {a: i, b: j}
            for name in names:
                if name not in pick:
                    pick[name] = rng.randrange(len(options[name]))
            row = {name: options[name][pick[name]] for name in names}
            if not allowed(row):
                continue
            gain = sum(((x, pick[x]), (y, pick[y])) in missing for x, y in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = pick, gain
        rows.append(best)
        missing -= {((x, best[x]), (y, best[y])) for x, y in itertools.combinations(names, 2)}
    return [Case({name: options[name][row[name]] for name in names}, steps=3, step_size=0.7) for row in rows]


CASES = pairwise(OPTIONS)


def case_id(case):
    B, X, Y, Z, S, E = case.shape
    return (f"{case.neighbourhood}-F{case.filters}-d{case.depth}-{case.output}{'' if case.bias else '-nobias'}"
            f"{'-fire' if case.fire else ''}{'-alive' if case.alive else ''}-{case.boundary}-{case['update']}-"
            f"{case.activation}-{str(case.dtype)[6:]}-{B}x{X}x{Y}x{Z}x{S}x{E}-{case.forward}-{case.rows}-"
            f"{case.sizes}-b{case.blocks}")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_emulated_kernels_match_reference(emu, schedule, case):
    check(emu, case)


def assert_every_allowed_pair_covered(cases, options):
    for a, b in itertools.combinations(list(options), 2):
        seen = {(repr(c[a]), repr(c[b])) for c in cases}
        for x in options[a]:
            for y in options[b]:
                if allowed({a: x, b: y}):
                    assert (repr(x), repr(y)) in seen, (a, x, b, y)


def test_the_cases_cover_every_pair_of_option_values():
    assert_every_allowed_pair_covered(CASES, OPTIONS)
    assert len(CASES) <= 40  # the suite stays small: each case runs under two schedules
    # Both compiled state sizes among the shapes meet the compiled kernels (pairwise: shape x sizes).
    assert {c.shape[4] for c in CASES if c.sizes == "compiled"} & set(COMPILED_STATES) == {8, 20}


# The configuration users run: the 3D artefacts NCA's (Moore, depthwise F = 3, [64, 64] ReLU, identity output
# without bias, fire 0.5, alive masks), at S = 20 (a compiled size) and at a runtime size, on the paths the sizes
# choose and with the rows in global memory.
NCA = dict(neighbourhood="moore", filters=3, depth=2, hidden=(64, 64), output="identity", bias=False, fire=True,
           alive=True, boundary="zeros", update="residual", activation="relu", steps=3, step_size=1.0, blocks=0)


@pytest.mark.parametrize("shape,dtype,paths", [
    ((2, 4, 3, 5, 20, 0), torch.float32, dict(forward="fused", rows="shared", sizes="compiled")),
    ((1, 5, 4, 3, 20, 0), torch.float64, dict(forward="per-step", rows="global", sizes="compiled")),
    ((2, 3, 3, 4, 6, 0), torch.float32, dict(forward="per-step", rows="shared", sizes="runtime")),
], ids=["fused-f32", "per-step-global-f64", "runtime-f32"])
def test_the_nca_configuration(emu, schedule, shape, dtype, paths):
    check(emu, Case(NCA, shape=shape, dtype=dtype, **paths))


def test_the_choices_the_sizes_make(emu):
    """Unforced: many samples of a small lattice go fused (one launch); two samples of 16x16x8 per step (two
    blocks would leave 130 of 132 SMs idle); and a lattice whose states exceed the shared memory per block per
    step even where the fused forward is asked for."""
    for shape, forced, fused in (((3, 3, 4, 5, 3, 1), "auto", True), ((2, 16, 16, 8, 2, 1), "auto", False),
                                 ((1, 16, 16, 16, 8, 0), "fused", False)):
        case = Case(NCA, hidden=(4, 3), shape=shape, dtype=torch.float32, steps=2)
        args = problem(case, torch.float32)
        emu.force(forward=forced)
        try:
            _, n = emu.launches(lambda: forward(emu.ops, case, args, True))
        finally:
            emu.force()
        assert n == (1 if fused else 2 * 3), shape


@pytest.mark.parametrize("filters,depth", [(3, 2), (0, 1)], ids=["depthwise-two-layers", "concat-one-layer"])
def test_weight_gradients_are_the_same_bits_under_every_schedule(emu, filters, depth):
    """No atomics: the weight gradients are summed in a fixed order, whatever order threads, warps and blocks
    run in (the emulator's schedules reorder all three), so torch.use_deterministic_algorithms holds."""
    case = Case(NCA, filters=filters, depth=depth, shape=(3, 5, 6, 7, 5, 2), dtype=torch.float32, steps=3,
                boundary="reflect")
    args = problem(case, torch.float32, seed=5)
    emu.force(backward_blocks=2)  # 630 cells: tiles of 32 cells, several per block
    _, traj, life = forward(emu.ops, case, args, True)
    upstream = torch.randn(traj[-1].shape, generator=torch.Generator().manual_seed(2))
    results = []
    try:
        for sched in emu.cuda_emu.schedules():
            emu.cuda_emu.set_schedule(*sched)
            results.append(backward(emu.ops, case, args, upstream, traj, life))
    finally:
        emu.cuda_emu.set_schedule(None, None)
        emu.force()
    for other in results[1:]:
        for name, a, b in zip(GRAD_NAMES, results[0], other):
            assert torch.equal(a, b), f"grad {name} differs between schedules"


def test_a_large_state_and_wide_layers(emu, schedule):
    """S = 64 (the largest) with wide hidden layers: rows of hundreds of values, fewer threads per block; in
    float64 with [400, 400] not even 32 rows fit in a block's shared memory, so they go to global memory."""
    for dtype, hidden in ((torch.float32, (120, 90)), (torch.float64, (400, 400))):
        check(emu, Case(NCA, hidden=hidden, shape=(1, 2, 1, 3, CUDA_MAX_STATE, 1), dtype=dtype, steps=2,
                        forward="per-step", rows="auto", sizes="auto"))


def test_state_size_over_the_limit_is_refused_with_the_reason(emu):
    S = CUDA_MAX_STATE + 1
    case = Case(NCA, shape=(1, 1, 1, 2, S, 0), dtype=torch.float32, steps=1)
    with pytest.raises(RuntimeError, match=f"S <= {CUDA_MAX_STATE}"):
        forward(emu.ops, case, problem(case, torch.float32), True)
    assert f"<= {CUDA_MAX_STATE}" in (kernel_limit_reason("cuda", torch.float32, S) or "")


# --- the published 3D artefacts NCA ---------------------------------------------------------------------------------

def test_the_converted_artefacts_model_rolls_out_identically(emu):
    """examples/artefacts_nca.py's PlainVillageHouse model, converted to a CubicCore, rolls out under the
    emulated CUDA kernels as under the reference: the same states at every step in float64 (1e-9), from the
    upstream's seed under the same fire masks."""
    spec = importlib.util.spec_from_file_location("artefacts_nca", os.path.join(ROOT, "examples", "artefacts_nca.py"))
    A = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(A)
    state_dict = torch.load(A.HOUSE_MODEL, map_location="cpu", weights_only=True)
    steps, batch = 20, 2
    core = A.artefacts.core_from_artefact_nca(state_dict, 10, A.HOUSE_LATTICE, steps, backend="reference").double()
    seed = A.artefact_seed(core, batch)
    masks = torch.rand((steps, batch, *A.HOUSE_LATTICE), generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        want = core(state=seed, fire_mask=masks, return_trajectory=True)
    call = OpArgs.of(seed.new_zeros((*seed.shape[:4], 0)), [None if w is None else w.detach() for w in core.layers()],
                     core.rule, steps, perception=core.perception.detach(), fire_mask=masks,
                     dead_state=core.dead_state)
    # 1000 cells of 21 float64 values do not fit twice in a block's shared memory: the forward goes per step
    # (the fused path runs this configuration in test_the_nca_configuration).
    emu.force()
    (_, traj, _), n = emu.launches(lambda: emu.ops.propagate_forward(*call.forward_args(seed, True)))
    assert n == 3 * steps
    diff = (traj - want).abs().flatten(1).amax(1)
    assert diff.max() < 1e-9, diff
    emu.force()
    assert (want[-1][..., :10].argmax(-1) > 0).any()  # the house grows: blocks other than air are placed


# --- the tensor-core path (precision tf32, bfloat16, float16 on float32 inputs) -------------------------------------
#
# The update net's products on WMMA fragments: each multiplicand rounded to the precision (tf32 and float16: 10
# stored mantissa bits, unit roundoff u = 2^-11; bfloat16: 7 bits, u = 2^-8), the products summed in float32.
# Two references, both float64:
# - the plain one: the forward within TC_TOL_UNITS * u of it.  A dot product of rounded operands is off by at most
#   2u times the sum of its terms' magnitudes; the cases' weights (scale 1.5 / sqrt(fan-in)) keep those sums within
#   a few times the results, and three steps compound it (measured: at most ~5u).  The gradients are not held to
#   it: a ReLU pre-activation or an alive channel within u of its kink flips a derivative, which moves a gradient
#   by O(1) (measured up to ~650u at tf32 in these cases);
# - the tensor cores' arithmetic: the same reference with every product's operands rounded to the precision as the
#   kernel rounds them (forward: X and W; backward: dY and W for dX, dY and X for dW; the concat state gradient,
#   which the gather takes in float32 from W1 and dh1, unrounded).  What remains is float32 accumulation and
#   intermediates (about 1e-7 relative) and the rare float32 value that rounds to the neighbouring multiplicand
#   (one operand off by u): the forward and all nine gradients within TC_EXACT_UNITS * u of it (measured: below
#   0.01u in most cases, at most ~1.3u, in a float16 case).
# Both relative to the largest reference value (as assert_close scales).
UNIT_ROUNDOFF = {"tf32": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
TC_TOL_UNITS = 16
TC_EXACT_UNITS = 4


class _TensorCoreLinear(torch.autograd.Function):
    """F.linear with the tensor cores' operand rounding, forward and backward; the input gradient's first
    `exact` columns unrounded (the concat state gradient, which the gather takes in float32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision, exact):
        xr, wr = rounded(x, precision), rounded(weight, precision)
        ctx.save_for_backward(xr, wr, weight)
        ctx.precision, ctx.exact, ctx.bias = precision, exact, bias is not None
        y = xr @ wr.T
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, dy):
        xr, wr, weight = ctx.saved_tensors
        dyr = rounded(dy, ctx.precision)
        dx = dyr @ wr
        if ctx.exact:
            dx[..., :ctx.exact] = (dy @ weight)[..., :ctx.exact]
        dw = dyr.reshape(-1, dy.shape[-1]).T @ xr.reshape(-1, xr.shape[-1])
        return dx, dw, dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.bias else None, None, None


def tensor_core_reference(case, args, seed=1):
    """reference() with the update net's products rounded as the tensor-core path rounds them."""
    from cubecore.ops import reference as ref
    B, X, Y, Z, S, E = case.shape
    exact = 0 if case.filters else slots(case.neighbourhood) * S

    def update_net(inputs, layers, activation, output_activation, precision="ieee"):
        x = inputs
        for i, (weight, bias) in enumerate(layers):
            x = _TensorCoreLinear.apply(x, weight, bias, case.precision, exact if i == 0 else 0)
            x = ref.activate(x, activation if i < len(layers) - 1 else output_activation)
        return x

    saved, ref.update_net = ref.update_net, update_net
    try:
        return reference(case, args, seed)
    finally:
        ref.update_net = saved


# Tile-boundary shapes (B, X, Y, Z, S, E) for tiles of 16, 32 and 64 cells: 64 cells (one full tile of 64, two of
# 32), 65 (one cell past), 63 (one short), 16 and 17 (the smallest tile, and one past it), 96 over two samples.
TC_SHAPES = [(1, 4, 4, 4, 5, 1), (1, 5, 13, 1, 8, 0), (3, 3, 7, 1, 4, 2), (1, 2, 2, 4, 20, 1), (1, 1, 1, 17, 3, 1),
             (2, 4, 3, 4, 6, 0)]
TC_OPTIONS = {
    "neighbourhood": NEIGHBOURHOODS,
    "filters": PERCEPTION_FILTERS,
    "depth": DEPTHS,
    "output": OUTPUT_ACTIVATIONS,
    "bias": (True, False),
    "fire": (False, True),
    "alive": (False, True),
    "boundary": BOUNDARIES,
    "update": UPDATES,
    "activation": ACTIVATIONS,
    "precision": ("tf32", "bfloat16", "float16"),
    "shape": TC_SHAPES,
    "tile": (16, 32, 64),
    "blocks": (0, 2),
    "layout": (1, 2),  # the emulator's WMMA lane-to-element layout seed
}
TC_CASES = [Case(c, dtype=torch.float32) for c in pairwise(TC_OPTIONS, seed=1)]


def tc_case_id(case):
    B, X, Y, Z, S, E = case.shape
    return (f"{case.precision}-{case.neighbourhood}-F{case.filters}-d{case.depth}-{case.output}"
            f"{'' if case.bias else '-nobias'}{'-fire' if case.fire else ''}{'-alive' if case.alive else ''}-"
            f"{case.boundary}-{case['update']}-{case.activation}-{B}x{X}x{Y}x{Z}x{S}x{E}-M{case.tile}-b{case.blocks}-"
            f"L{case.layout}")


def check_tc(emu, case):
    """The forward (trajectory kept and not) and all nine gradients of the tensor-core path against the two
    references above; returns the gradients and the largest errors seen, in units of u, against each."""
    u = UNIT_ROUNDOFF[case.precision]
    args64 = problem(case)
    args = problem(case, torch.float32)
    want_traj, _, _ = reference(case, args64)
    tc_traj, upstream, tc_grads = tensor_core_reference(case, args64)
    emu.force(tile=case.tile, backward_blocks=case.blocks)
    emu.cuda_emu.set_wmma_layout(case.layout)
    worst = {}

    def close(name, got, want, units):
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        worst[name] = (got.double() - want).abs().max().item() / scale / u if want.numel() else 0.0
        assert_close(name, got, want, units * u)

    try:
        (final, traj, life), n = emu.launches(lambda: forward(emu.ops, case, args, True))
        assert n == case.steps * (3 if case.alive else 1), "expected one launch per step (and the alive masks')"
        close("trajectory", traj, want_traj, TC_TOL_UNITS)
        close("trajectory (tensor cores' arithmetic)", traj, tc_traj, TC_EXACT_UNITS)
        close("final (tensor cores' arithmetic)", final, tc_traj[-1], TC_EXACT_UNITS)
        # The products were rounded: the tensor-core path ran (the FMA path is float32-exact, ~1e-7); unless every
        # cell died at the first step (some alive cases: then the trajectory is the dead state, exactly).
        if not case.alive or life.any():
            assert (traj.double() - want_traj).abs().max() > u / 64 * max(1.0, want_traj.abs().max().item())
        final_only, _, _ = forward(emu.ops, case, args, False)
        assert torch.equal(final_only, final), "the final state with and without the trajectory kept"
        grads, n = emu.launches(lambda: backward(emu.ops, case, args, upstream.float(), traj, life))
        assert n == 2 * case.steps + 1, "expected the tile and gather kernels per step, then the sum"
        for name, got, want in zip(GRAD_NAMES, grads, tc_grads):
            if want is None:
                continue
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            close(f"grad {name} (tensor cores' arithmetic)", got, want, TC_EXACT_UNITS)
    finally:
        emu.cuda_emu.set_wmma_layout(None)
        emu.force()
    return grads, worst


@pytest.mark.parametrize("case", TC_CASES, ids=[tc_case_id(c) for c in TC_CASES])
def test_tensor_core_path_matches_reference(emu, schedule, case):
    check_tc(emu, case)


def test_the_tensor_core_cases_cover_every_pair_of_option_values():
    assert_every_allowed_pair_covered(TC_CASES, TC_OPTIONS)
    assert len(TC_CASES) <= 30


def test_tensor_core_weight_gradients_are_the_same_bits_under_every_schedule_and_layout(emu):
    """The per-block weight-gradient products and the table's sum in block order: the same bits whatever order
    threads, warps and blocks run in and whatever the fragments' element layout."""
    case = Case(NCA, hidden=(20, 12), shape=(2, 3, 5, 7, 5, 2), dtype=torch.float32, steps=2, boundary="reflect",
                precision="tf32")
    args = problem(case, torch.float32, seed=5)
    emu.force(tile=32, backward_blocks=2)  # 210 cells: 7 tiles of 32, several per block
    try:
        _, traj, life = forward(emu.ops, case, args, True)
        upstream = torch.randn(traj[-1].shape, generator=torch.Generator().manual_seed(2))
        results = []
        for sched, layout in [(s, 1) for s in emu.cuda_emu.schedules()] + [(("warp", "reverse"), 2)]:
            emu.cuda_emu.set_schedule(*sched)
            emu.cuda_emu.set_wmma_layout(layout)
            results.append(backward(emu.ops, case, args, upstream, traj, life))
    finally:
        emu.cuda_emu.set_schedule(None, None)
        emu.cuda_emu.set_wmma_layout(None)
        emu.force()
    for other in results[1:]:
        for name, a, b in zip(GRAD_NAMES, results[0], other):
            assert torch.equal(a, b), f"grad {name} differs between schedules or layouts"


def test_precisions_the_kernels_refuse(emu):
    """tf32 / bfloat16 / float16 products: float32 inputs on compute capability 8.0 or later only."""
    case = Case(NCA, hidden=(4, 3), shape=(1, 2, 2, 2, 3, 0), dtype=torch.float64, steps=1, precision="tf32")
    with pytest.raises(RuntimeError, match="float32 inputs only"):
        forward(emu.ops, case, problem(case), True)
    case = Case(case, dtype=torch.float32, precision="bfloat16")
    emu.force(sm=75)
    try:
        with pytest.raises(RuntimeError, match="compute capability 8.0 or later; this device is sm_75"):
            forward(emu.ops, case, problem(case, torch.float32), True)
    finally:
        emu.force()


def test_where_no_tile_fits_the_fma_path_runs(emu):
    """Layers too wide for a tile of 16 cells and the weights in a block's shared memory: the FMA path, exact in
    float32 whatever the precision asked (the same bits as precision ieee)."""
    case = Case(NCA, filters=0, depth=1, hidden=(200,), shape=(1, 2, 1, 3, CUDA_MAX_STATE, 1), dtype=torch.float32,
                steps=1, forward="per-step", precision="bfloat16")
    args = problem(case, torch.float32)
    emu.force(forward="per-step")
    try:
        got = forward(emu.ops, case, args, True)
        want = forward(emu.ops, Case(case, precision="ieee"), args, True)
    finally:
        emu.force()
    assert torch.equal(got[1], want[1])


def test_a_missing_barrier_before_the_first_product_fails_the_tensor_core_tests(emu):
    """The mutant built with -DCUBECORE_PLANT_MISSING_BARRIER (the first GEMM reads the staged inputs without the
    barrier after staging) fails the tensor-core cases under the warp/reverse schedule wherever a warp other than
    the last to stage takes an output tile (measured: 19 of 30; none under round/forward, as the emulator's README
    says), with wrong values, not a crash.  A separate process: one emulator library per process."""
    import re
    import subprocess
    so = emu.cuda_emu.build(os.path.join(ROOT, "csrc", "cubecore_cuda.cu"), link_module="cubecore._C",
                            extra_cflags="-DCUBECORE_PLANT_MISSING_BARRIER", quiet=True)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_tensor_core_path_matches_reference and warp-reverse"],
                         env={**os.environ, "CUDA_EMU_SO": so, "CUBECORE_REQUIRE_CUDA_EMU": "1"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    failed = re.search(r"(\d+) failed", run.stdout)
    assert run.returncode == 1 and failed and int(failed.group(1)) >= len(TC_CASES) // 3, run.stdout[-3000:]
    assert "AssertionError" in run.stdout and "not close" in run.stdout, run.stdout[-3000:]


def test_product_precision_follows_pytorchs_switches(monkeypatch):
    """The front's choice on CUDA: TF32 where the matmul switch allows it, autocast's bfloat16 / float16, else the
    inputs' dtype; float64 and GPUs below compute capability 8.0 always the inputs' dtype."""
    from cubecore.ops.front import product_precision
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability[0])
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert product_precision("cuda", torch.float32) == "ieee"
        assert product_precision("cuda", torch.float32, torch.bfloat16) == "bfloat16"
        assert product_precision("cuda", torch.float32, torch.float16) == "float16"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert product_precision("cuda", torch.float32) == "tf32"
        assert product_precision("cuda", torch.float32, torch.float16) == "float16"
        assert product_precision("cuda", torch.float64) == "ieee"
        assert product_precision("cuda", torch.float64, torch.bfloat16) == "ieee"
        capability[0] = (7, 5)
        assert product_precision("cuda", torch.float32) == "ieee"
        assert product_precision("cuda", torch.float32, torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
