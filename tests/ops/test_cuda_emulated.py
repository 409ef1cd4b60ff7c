"""The CUDA kernels (csrc/cubecore_cuda.cu), run on the CPU by the cuda-emu emulator, against the float64 reference.

Every CUDA thread runs as a fiber with real barrier and warp-shuffle semantics and H100 launch and
shared-memory limits; each case runs under two schedules (``round/forward`` and ``warp/reverse``), which
reorder threads, warps and blocks so that a missing barrier shows as a wrong result.  The emulator lives
beside the project (``../shared/cuda-emu``, or ``$CUDA_EMU_DIR``); without it, or without g++, this module
skips with the reason, unless ``CUBECORE_REQUIRE_CUDA_EMU=1`` (set by CI), which turns the skip into a failure.
"""

import contextlib
import math
import os
import shutil
import sys

import pytest
import torch

from conftest import RULES, SHAPES, make_problem
from cubecore.ops.front import CUDA_MAX_STATE, kernel_limit_reason
from cubecore.ops.reference import trajectory_reference
from cubecore.ops.rule import ACTIVATIONS, BOUNDARIES, UPDATES, canonical_boundary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU_DIR = os.environ.get("CUDA_EMU_DIR", os.path.join(ROOT, "..", "shared", "cuda-emu"))
SCHEDULES = [("round", "forward"), ("warp", "reverse")]
H100_OPTIN = 232448  # opt-in shared memory per block; 0 sends every lattice down the per-step forward
H100_SMS = 132  # the emulator reports an H100
THREADS = 256  # threads per block of the per-cell kernels (kThreads in the .cu)
# (S, H) compiled into the fast kernels (with_fast_sizes in the .cu); other sizes take the general kernels.
FAST_SIZES = {(8, 16), (8, 32), (16, 64)}
# The CPU kernel tests' shapes (with S, H = 8, 16 among them), plus a lattice spanning three blocks per launch
# (the last one partial), the largest state the CUDA kernels take, with E > 0, and the other two fast sizes.
EMU_SHAPES = SHAPES + [(2, 7, 9, 5, 3, 4, 2), (1, 2, 1, 3, CUDA_MAX_STATE, 8, 2), (2, 7, 9, 5, 8, 32, 1),
                       (1, 2, 3, 3, 16, 64, 1)]


def _emulator_missing():
    if not os.path.isfile(os.path.join(EMU_DIR, "cuda_emu.py")):
        return f"the CUDA emulator is not at {os.path.abspath(EMU_DIR)} (set CUDA_EMU_DIR)"
    if shutil.which("g++") is None:
        return "g++ is not installed (the emulator compiles the CUDA kernels with it)"
    return None


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
    ops = cuda_emu.load(so, "cubecore")
    # NaN-fill torch.empty, so that an output element no kernel writes shows up.
    saved = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield cuda_emu, ops
    torch.use_deterministic_algorithms(saved[0])
    torch.utils.deterministic.fill_uninitialized_memory = saved[1]
    cuda_emu.set_schedule(None, None)
    cuda_emu.set_optin_bytes(H100_OPTIN)


# The CUDA kernels run the rule family's original member (von Neumann, concat, one hidden layer, tanh output, no
# masks) with the zeros, circular and replicate boundaries.
CUDA_RULES = [rule for rule in RULES if canonical_boundary(rule[0]) != "reflect"]


def codes(boundary, activation, update):
    return BOUNDARIES.index(canonical_boundary(boundary)), ACTIVATIONS.index(activation), UPDATES.index(update)


def forward(ops, args, steps, c, step_size, keep):
    """(final, trajectory) of the op for (state, external, w1, b1, w2, b2) and (boundary, activation, update)
    codes: von Neumann, concat, one hidden layer, tanh output, no masks."""
    state, external, w1, b1, w2, b2 = args
    boundary, activation, update = c
    final, traj, _ = ops.propagate_forward(state, external, None, w1, b1, None, None, w2, b2, None, None, steps, 0,
                                           boundary, activation, 0, update, step_size, -1, 0.1, keep)
    return final, traj


def backward(ops, upstream, traj, args, steps, c, step_size):
    """The gradients of (state, external, w1, b1, w2, b2) from the op's backward."""
    _, external, w1, b1, w2, b2 = args
    boundary, activation, update = c
    life = torch.empty((0, *traj.shape[1:5]), dtype=torch.uint8)
    grads = ops.propagate_backward(upstream, traj, life, external, None, w1, b1, None, None, w2, b2, None, None,
                                   steps, 0, boundary, activation, 0, update, step_size, -1)
    return [grads[i] for i in (0, 1, 3, 4, 7, 8)]


def reference(args, rule, steps, step_size, seed=1):
    """Float64 trajectory [T+1, ...], the upstream gradient of the final state, and the six gradients."""
    boundary, activation, update = rule
    leaves = [a.double().clone().requires_grad_() for a in args]
    states = trajectory_reference(*leaves, steps=steps, boundary=boundary, activation=activation, update=update,
                                  step_size=step_size)
    upstream = torch.randn(states[-1].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(states[-1], leaves, upstream)
    return states.detach(), upstream, grads


def assert_close(name, got, want, tol):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def is_fast(shape):
    return shape[4:6] in FAST_SIZES and os.environ.get("CUBECORE_CUDA_KERNELS") != "general"


def fused_expected(shape, dtype):
    """Whether the forward should take the fused one-block-per-sample path on an emulated H100 (the fast
    kernel keeps the weights in shared memory beside the states)."""
    B, X, Y, Z, S, H, E = shape
    cells = X * Y * Z
    weights = H * math.ceil((7 * S + E) / 4) * 4 + H + S * H + S if is_fast(shape) else 0  # W1 rows padded
    fits = (2 * cells * S + cells * E + weights) * dtype.itemsize <= H100_OPTIN
    return fits and B >= min(H100_SMS, math.ceil(B * cells / THREADS))


@contextlib.contextmanager
def kernels(which):
    """CUBECORE_CUDA_KERNELS=which ("general" forces the general kernels; "auto" the default choice)."""
    saved = os.environ.get("CUBECORE_CUDA_KERNELS")
    os.environ["CUBECORE_CUDA_KERNELS"] = which
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUBECORE_CUDA_KERNELS"]
        else:
            os.environ["CUBECORE_CUDA_KERNELS"] = saved


def launches(cuda_emu, fn):
    before = cuda_emu.stats()["launches"]
    out = fn()
    return out, cuda_emu.stats()["launches"] - before


def check_case(emu, shape, rule, dtype, steps=3, step_size=0.7, seed=0):
    """The kernels the sizes choose; for the fast sizes also the general ones, forced."""
    for which in (("auto", "general") if shape[4:6] in FAST_SIZES else ("auto",)):
        with kernels(which):
            grads = check_kernels(emu, shape, rule, dtype, steps, step_size, seed)
    return grads


def check_kernels(emu, shape, rule, dtype, steps, step_size, seed):
    cuda_emu, ops = emu
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    args64 = make_problem(*shape, seed=seed)
    args = [a.to(dtype) for a in args64]
    want_traj, upstream, want_grads = reference(args64, rule, steps, step_size)
    c = codes(*rule)
    # The path the sizes choose (checked by its launch count), then the per-step path forced.
    for optin, fused in ((H100_OPTIN, fused_expected(shape, dtype)), (0, False)):
        cuda_emu.set_optin_bytes(optin)
        try:
            (final, traj), n = launches(cuda_emu, lambda: forward(ops, args, steps, c, step_size, True))
            assert n == (1 if fused else steps), f"expected the {'fused' if fused else 'per-step'} forward"
            assert_close(f"trajectory (opt-in {optin})", traj, want_traj, tol)
            assert_close(f"final (opt-in {optin})", final, want_traj[-1], tol)
            final, _ = forward(ops, args, steps, c, step_size, False)
            assert_close(f"final without trajectory (opt-in {optin})", final, want_traj[-1], tol)
        finally:
            cuda_emu.set_optin_bytes(H100_OPTIN)
    grads, n = launches(cuda_emu, lambda: backward(ops, upstream.to(dtype), want_traj.to(dtype), args, steps, c,
                                                   step_size))
    # fast: the cell-and-weights kernel and the gather per step; general: cell, gather and weights; then the sum
    assert n == (2 if is_fast(shape) else 3) * steps + 1, f"expected the {'fast' if is_fast(shape) else 'general'} backward"
    for name, got, want in zip(["state", "external", "w1", "b1", "w2", "b2"], grads, want_grads):
        assert got.dtype == dtype
        assert_close(f"grad {name}", got, want, tol)
    return grads


@pytest.fixture(params=SCHEDULES, ids="-".join)
def schedule(request, emu):
    emu[0].set_schedule(*request.param)
    yield request.param
    emu[0].set_schedule(None, None)


# Every rule, each on two of the shapes (in turn, so that every shape meets several rules), in float64 and
# float32; the forward on the path its sizes choose and on the per-step path, and the backward.
CASES = [(rule, EMU_SHAPES[(2 * i + k) % len(EMU_SHAPES)], dtype)
         for i, rule in enumerate(CUDA_RULES) for k in range(2) for dtype in (torch.float64, torch.float32)]


@pytest.mark.parametrize("rule,shape,dtype", CASES,
                         ids=[f"{'-'.join(r)}-{'x'.join(map(str, s))}-{str(d)[6:]}" for r, s, d in CASES])
def test_emulated_kernels_match_reference(emu, schedule, rule, shape, dtype):
    check_case(emu, shape, rule, dtype, seed=hash((rule, shape)) % 1000)


def test_every_shape_and_every_path_is_covered():
    """The case list above reaches every shape, the fused forward as well as the chosen per-step one, each
    with the fast and the general kernels, and every fast size in both dtypes."""
    assert {s for _, s, _ in CASES} == set(EMU_SHAPES)
    chosen = {(fused_expected(s, d), is_fast(s)) for _, s, d in CASES}
    assert chosen == {(True, True), (True, False), (False, True), (False, False)}
    assert {(s[4:6], d) for _, s, d in CASES if s[4:6] in FAST_SIZES} == {
        (size, d) for size in FAST_SIZES for d in (torch.float32, torch.float64)}


def test_few_samples_of_a_larger_lattice_run_per_step(emu, schedule):
    """Two samples of 16x16x8 fit in shared memory, but two blocks would leave 130 of 132 SMs idle: the
    forward goes per step (launches over 16 blocks each).  One sample per SM of the same lattice goes fused."""
    shape = (2, 16, 16, 8, 2, 3, 1)
    assert not fused_expected(shape, torch.float32)
    check_case(emu, shape, ("periodic", "tanh", "residual"), torch.float32, steps=2)
    assert fused_expected((H100_SMS, 16, 16, 8, 2, 3, 1), torch.float32)


@pytest.mark.parametrize("dtype,hidden", [(torch.float64, 64), (torch.float32, 120)])
def test_backward_has_no_shared_memory_limit(emu, schedule, dtype, hidden):
    """S = 64 with a wide hidden layer: once too many weight gradients for a block's shared memory, which
    made the backward fail after the forward had run.  The kernel takes every S <= 64, so the backend check
    promises no more than that."""
    assert kernel_limit_reason("cuda", dtype, CUDA_MAX_STATE) is None
    check_case(emu, (1, 1, 2, 1, CUDA_MAX_STATE, hidden, 0), ("wall", "tanh", "replace"), dtype, steps=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_fast_backward_block_takes_several_tiles(emu, schedule, dtype, monkeypatch):
    """Large lattices give each block of the fast backward many tiles in turn (at most four blocks per SM);
    two blocks over the five tiles of this lattice reach that on the emulator."""
    monkeypatch.setenv("CUBECORE_CUDA_BACKWARD_BLOCKS", "2")
    check_case(emu, (2, 7, 9, 7, 8, 16, 1), ("periodic", "sigmoid", "residual"), dtype, steps=2)


@pytest.mark.parametrize("state,hidden", [(4, 12), (8, 16)], ids=["general", "fast"])
def test_weight_gradients_are_the_same_bits_under_every_schedule(emu, state, hidden):
    """No atomics: the weight gradients are summed in a fixed order, whatever order threads, warps and blocks
    run in (the emulator's schedules reorder all three), so torch.use_deterministic_algorithms holds."""
    cuda_emu, ops = emu
    args = make_problem(3, 5, 6, 7, state, hidden, 2, dtype=torch.float32, seed=5)  # 630 cells: three blocks
    _, traj = forward(ops, args, 3, codes("replicate", "tanh", "residual"), 0.5, True)
    upstream = torch.randn(traj[-1].shape, generator=torch.Generator().manual_seed(2))
    results = []
    try:
        for sched in cuda_emu.schedules():
            cuda_emu.set_schedule(*sched)
            results.append(backward(ops, upstream, traj, args, 3, codes("replicate", "tanh", "residual"), 0.5))
    finally:
        cuda_emu.set_schedule(None, None)
    for other in results[1:]:
        for name, a, b in zip(["state", "external", "w1", "b1", "w2", "b2"], results[0], other):
            assert torch.equal(a, b), f"grad {name} differs between schedules"


def test_state_size_over_the_limit_is_refused_with_the_reason(emu):
    _, ops = emu
    S = CUDA_MAX_STATE + 1
    args = make_problem(1, 1, 1, 2, S, 2, 0, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"S <= {CUDA_MAX_STATE}"):
        forward(ops, args, 1, (0, 0, 0), 1.0, True)
    assert f"<= {CUDA_MAX_STATE}" in (kernel_limit_reason("cuda", torch.float32, S) or "")
