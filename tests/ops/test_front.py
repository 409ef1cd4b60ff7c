"""The fused kernels against the float64 reference: forward, all six gradients, opcheck, compile, errors."""

import contextlib
import itertools
import warnings

import pytest
import torch

import cubecore
from cubecore.ops import front as ops, propagate, propagate_reference
from cubecore.ops.op_args import OpArgs
from cubecore.ops.rule import Rule
from conftest import RULES, SHAPES, make_problem, requires_cuda_kernel, requires_kernel, skip_unless_fits

def rule_kwargs(boundary, activation, update, steps):
    return dict(steps=steps, boundary=boundary, activation=activation, update=update, step_size=0.7)


def _op_call(external, w1, b1, w2, b2, steps, **rule):
    """The op's arguments (OpArgs) for the original rule with these options (von Neumann, concat, one hidden
    layer, tanh output, no masks unless given)."""
    return OpArgs.of(external, [w1, b1, w2, b2], Rule(**rule), steps)


def _op_args(state, external, w1, b1, w2, b2, steps, keep=False, **rule):
    return _op_call(external, w1, b1, w2, b2, steps, **rule).forward_args(state, keep)


def _op_forward(*args, **kw):
    return torch.ops.cubecore.propagate_forward(*_op_args(*args, **kw))


def _op_backward_args(grad, traj, external, w1, b1, w2, b2, steps, **rule):
    life = torch.empty((0, *traj.shape[1:5]), dtype=torch.uint8)
    return _op_call(external, w1, b1, w2, b2, steps, **rule).backward_args(grad, traj, life)


def _op_backward(*args, **kw):
    return torch.ops.cubecore.propagate_backward(*_op_backward_args(*args, **kw))


def forward_and_grads(args, backend, seed=0, **kw):
    args = [a.detach().clone().requires_grad_() for a in args]
    if backend == "reference":
        out = propagate_reference(*args, **kw)
    else:
        out = propagate(*args, backend=backend, **kw)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upstream = upstream.to(dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, args, upstream)
    return out.detach(), grads


def assert_close_all(got, want, atol, rtol=0.0):
    """Forward and the six gradients agree; atol is relative to each tensor's largest magnitude (at least 1)."""
    names = ["output", "grad state", "grad external", "grad w1", "grad b1", "grad w2", "grad b2"]
    for name, g, w in zip(names, [got[0], *got[1]], [want[0], *want[1]]):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double().cpu(), w, atol=atol * scale, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op thread count set to n inside the block (the CPU kernels split their work by it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@requires_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("state_size", [8, 5])
@pytest.mark.parametrize("boundary,update", list(itertools.product(["wall", "periodic", "replicate"],
                                                                    ["replace", "residual"])))
def test_cpu_kernel_any_thread_split_matches_reference(threads, batch, state_size, boundary, update):
    """The CPU kernels give each thread whole samples where the batch divides well (the backward then adds
    each state's gradient straight into it: from registers where a state is whole vectors, S = 8, else value
    by value, S = 5), and otherwise split every step across threads (X = 3: over tiles, then gathered); every
    split, with any thread count, must give the reference's result."""
    args = make_problem(batch, 3, 4, 5, state_size, 16, 2, seed=batch * 10 + threads)
    activation = ["tanh", "relu", "sigmoid"][(batch + threads) % 3]
    kw = rule_kwargs(boundary, activation, update, 3)
    with torch_threads(threads):
        got = forward_and_grads(args, "kernel", **kw)
    assert_close_all(got, forward_and_grads(args, "reference", **kw), atol=1e-11)


@requires_kernel
@pytest.mark.parametrize("shape", [(2, 2, 3, 2, 32, 20, 1), (1, 2, 2, 3, 64, 8, 0), (3, 1, 2, 2, 48, 5, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("boundary,update", list(itertools.product(["wall", "periodic", "replicate"],
                                                                    ["replace", "residual"])))
def test_cpu_kernel_states_of_whole_wide_vectors_match_reference(shape, boundary, update):
    """S a multiple of 16 takes the kernels built for 64-byte vectors where the machine has AVX-512 (S = 16
    is in the shapes above); these larger ones have no compiled length of their own."""
    args = make_problem(*shape, seed=shape[4])
    kw = rule_kwargs(boundary, "sigmoid", update, 2)
    assert_close_all(forward_and_grads(args, "kernel", **kw), forward_and_grads(args, "reference", **kw), atol=1e-11)


@requires_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("state_hidden", [(8, 16), (5, 12), (8, 24), (3, 40), (6, 70), (24, 20), (8, 4), (16, 9)],
                         ids=lambda sh: "S%dH%d" % sh)
@pytest.mark.parametrize("update", ["replace", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_every_vector_width_matches_reference(threads, batch, state_hidden, update, dtype):
    """The CPU kernels are built for three pairs of vector widths (hidden / state: 32/32, and with AVX-512
    64/32 and 64/64; without AVX-512 every case here takes the 32-byte build) and a call takes the widest its
    sizes fill: H > 8 with S not a multiple of 16 runs the hidden layer on 64-byte vectors (in float32 one,
    two, three and five of them above, the last in two chunks; twice as many in float64) while states stay
    32-byte vectors, whole (S = 8, and S = 24 without a loop compiled for its length) or padded (S = 3, 5, 6);
    H = 4 the narrow build; S = 16 the wide one.  Each under every thread split: threads get whole samples
    (B = 1 on 1 thread, B = 2 on 1 or 2), else the backward cuts the 5 x-planes into slabs."""
    S, H = state_hidden
    args = make_problem(batch, 5, 3, 4, S, H, 2, seed=S * 100 + H + threads)
    kw = rule_kwargs(["wall", "periodic", "replicate"][(S + threads + batch) % 3], ["tanh", "relu", "sigmoid"][H % 3],
                     update, 3)
    with torch_threads(threads):
        got = forward_and_grads([a.to(dtype) for a in args], "kernel", **kw)
    assert_close_all(got, forward_and_grads(args, "reference", **kw), atol=1e-11 if dtype == torch.float64 else 1e-4)


@requires_kernel
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lattice", [(1, 5, 3, 4), (1, 13, 2, 2), (5, 6, 2, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("state_hidden", [(8, 16), (16, 9), (5, 12)], ids=lambda sh: "S%dH%d" % sh)
@pytest.mark.parametrize("boundary,update", list(itertools.product(["wall", "periodic", "replicate"],
                                                                    ["replace", "residual"])))
def test_cpu_kernel_slab_scatter_matches_reference(threads, lattice, state_hidden, boundary, update):
    """Too few samples for whole ones per thread: the backward cuts each sample's x-planes into slabs (2 of
    2-3 planes at X = 5, 4 or 6 at X = 13, 2 of 3 planes at X = 6 in each of five samples, one sample after
    another) and adds gradients straight into the states read, even slabs then odd ones.  With the 64-byte
    builds (S = 8, H = 16 mixed; S = 16 wide) and a state of padded vectors (S = 5), every boundary and
    update, float64 and float32, an odd and an even number of steps."""
    S, H = state_hidden
    args = make_problem(*lattice, S, H, 1, seed=lattice[1] * 10 + threads + S)
    for dtype, steps in ((torch.float64, 2), (torch.float64, 3), (torch.float32, 2), (torch.float32, 3)):
        kw = rule_kwargs(boundary, ["tanh", "relu", "sigmoid"][(steps + threads) % 3], update, steps)
        with torch_threads(threads):
            got = forward_and_grads([a.to(dtype) for a in args], "kernel", **kw)
        assert_close_all(got, forward_and_grads(args, "reference", **kw),
                         atol=1e-11 if dtype == torch.float64 else 1e-4)


@requires_kernel
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lattice", [(1, 7, 3, 4), (1, 1, 5, 6), (2, 2, 3, 3), (3, 5, 2, 33), (1, 4, 2, 3),
                                     (1, 13, 2, 2), (3, 9, 1, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("boundary,update", list(itertools.product(["wall", "periodic", "replicate"],
                                                                    ["replace", "residual"])))
def test_cpu_kernel_few_samples_of_odd_lattices_match_reference(threads, lattice, boundary, update):
    """Too few samples to give each thread whole ones: every step is split across threads.  Where X >= 4,
    each sample's planes are cut into slabs, the even ones run beside each other, then the odd ones (2 slabs
    of 2 planes at X = 4, 4 or 6 slabs of 2-4 planes at X = 13, a periodic wrap between the first and the
    last), else (X = 1, 2) the step is split over tiles, then gathered.  Lattices whose cells
    and x-planes do not divide by the thread count, a single plane (X = 1), periodic X = 2, and planes of 66
    cells that tiles of 32 straddle."""
    B, X, Y, Z = lattice
    # the narrow build in float64 (whole and padded states), the mixed and wide ones in float32
    for state_size, hidden, dtype in ((8, 6, torch.float64), (5, 6, torch.float64), (8, 16, torch.float32),
                                      (16, 9, torch.float32)):
        args = make_problem(B, X, Y, Z, state_size, hidden, 1, seed=X * 7 + threads)
        kw = rule_kwargs(boundary, "tanh", update, 3)
        with torch_threads(threads):
            got = forward_and_grads([a.to(dtype) for a in args], "kernel", **kw)
        assert_close_all(got, forward_and_grads(args, "reference", **kw),
                         atol=1e-11 if dtype == torch.float64 else 1e-4)


@requires_kernel
@pytest.mark.parametrize("boundary,activation,update", RULES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("steps", [1, 4])
def test_cpu_kernel_float64_matches_reference(boundary, activation, update, shape, steps):
    skip_unless_fits(boundary, shape)
    args = make_problem(*shape, seed=hash((boundary, activation, update, shape, steps)) % 1000)
    kw = rule_kwargs(boundary, activation, update, steps)
    assert_close_all(forward_and_grads(args, "kernel", **kw), forward_and_grads(args, "reference", **kw), atol=1e-11)


@requires_kernel
@pytest.mark.parametrize("boundary,activation,update", RULES)
@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 8, 16, 1), (3, 3, 2, 4, 16, 24, 2), (1, 5, 2, 3, 3, 5, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_float32_matches_float64_reference(boundary, activation, update, shape):
    args = make_problem(*shape, seed=7)
    kw = rule_kwargs(boundary, activation, update, 6)
    got = forward_and_grads([a.float() for a in args], "kernel", **kw)
    # (six steps amplify float32 rounding: the float32 reference itself is off by up to 4e-5 here)
    assert_close_all(got, forward_and_grads(args, "reference", **kw), atol=3e-4)


@requires_kernel
@pytest.mark.parametrize("boundary,activation,update", RULES)
def test_gradcheck_kernel(boundary, activation, update):
    args = [a.requires_grad_() for a in make_problem(2, 2, 3, 2, 2, 3, 1, seed=3)]

    def fn(*a):
        return propagate(*a, backend="kernel", **rule_kwargs(boundary, activation, update, 3))

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@requires_kernel
def test_many_steps_and_larger_batch():
    args = make_problem(5, 4, 4, 4, 3, 7, 2, seed=11)
    kw = rule_kwargs("periodic", "tanh", "residual", 25)
    assert_close_all(forward_and_grads(args, "kernel", **kw), forward_and_grads(args, "reference", **kw), atol=1e-10)


@requires_kernel
def test_a_wrong_weight_is_detected():
    """The comparison above can fail: a small change to one weight moves the output past its tolerance."""
    args = make_problem(2, 3, 3, 3, 4, 6, 1, seed=5)
    kw = rule_kwargs("wall", "tanh", "replace", 3)
    good = propagate(*args, backend="kernel", **kw)
    bad_w1 = args[2].clone()
    bad_w1[0, 3] += 1e-3
    bad = propagate(args[0], args[1], bad_w1, *args[3:], backend="kernel", **kw)
    assert (bad - good).abs().max() > 1e-8
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad, propagate_reference(*args, **kw), atol=1e-11, rtol=0)


@requires_kernel
def test_non_contiguous_inputs():
    args = make_problem(2, 3, 4, 5, 3, 4, 2, seed=2)
    kw = rule_kwargs("replicate", "sigmoid", "residual", 3)
    # Same values, other memory layouts: a transposed-then-back state, strided external, transposed weights.
    state = args[0].transpose(1, 3).contiguous().transpose(1, 3)
    external = torch.stack([args[1], args[1]], dim=-1)[..., 0]
    w1 = args[2].t().contiguous().t()
    assert not state.is_contiguous() and not external.is_contiguous() and not w1.is_contiguous()
    want = forward_and_grads(args, "reference", **kw)
    got = forward_and_grads([state, external, w1, *args[3:]], "kernel", **kw)
    assert_close_all(got, want, atol=1e-11)


@requires_kernel
def test_no_grad_forward_keeps_no_trajectory_and_matches():
    args = make_problem(2, 3, 3, 3, 2, 3, 1, seed=4)
    with torch.no_grad():
        out = propagate(*args, steps=5, backend="kernel")
    assert out.shape == args[0].shape
    torch.testing.assert_close(out, propagate_reference(*args, steps=5), atol=1e-12, rtol=0)
    final, traj, _ = _op_forward(*args, 5)
    assert traj.shape == (0, *args[0].shape)
    torch.testing.assert_close(final, out, atol=0, rtol=0)
    final, traj, _ = _op_forward(*args, 5, keep=True)
    assert traj.shape == (6, *args[0].shape)
    torch.testing.assert_close(traj[0], args[0], atol=0, rtol=0)
    torch.testing.assert_close(traj[-1], final, atol=0, rtol=0)


@requires_kernel
def test_opcheck():
    for keep, grad in ((True, True), (False, False)):
        args = [a.requires_grad_(grad) for a in make_problem(2, 2, 3, 2, 2, 3, 1, seed=9)]
        torch.library.opcheck(torch.ops.cubecore.propagate_forward.default,
                              _op_args(*args, 3, boundary="circular", activation="sigmoid", update="residual",
                                       step_size=0.5, keep=keep))
    # The backward reads the final state's gradient in place: opcheck's schema test fails if any path writes to
    # it (a thin lattice that one thread takes whole, S = 2; the scatter where threads own samples, B = 2, and
    # over slabs of planes, B = 1, X = 4; one step and two).
    for shape, steps in (((1, 3, 1, 2, 2, 3, 0), 2), ((2, 2, 3, 2, 8, 16, 1), 1), ((1, 4, 2, 3, 8, 16, 1), 2)):
        args = make_problem(*shape, seed=1)
        final, traj, _ = _op_forward(*args, steps, boundary="replicate", keep=True)
        with torch_threads(2):
            torch.library.opcheck(torch.ops.cubecore.propagate_backward.default,
                                  _op_backward_args(torch.randn_like(final), traj, *args[1:], steps,
                                                    boundary="replicate"))


@requires_kernel
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    core = cubecore.CubicCore(lattice_size=(3, 4, 5), state_size=4, hidden_size=8, input_size=2, steps=3,
                              boundary="periodic", backend="kernel")
    u = torch.randn(2, 3, 4, 5, 2)
    compiled = torch.compile(core, fullgraph=True)
    out_c = compiled(u)
    out_e = core(u)
    torch.testing.assert_close(out_c, out_e)
    gc = torch.autograd.grad(out_c.square().sum(), list(core.parameters()))
    ge = torch.autograd.grad(core(u).square().sum(), list(core.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_auto_backend_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_WARNED", set())
    args = [a.to(torch.bfloat16) for a in make_problem(1, 2, 2, 2, 2, 3, 1)]
    with pytest.warns(RuntimeWarning, match="reference"):
        out = propagate(*args, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        propagate(*args, steps=2)  # second call: no second warning
    assert out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="backend='kernel'"):
        propagate(*args, steps=2, backend="kernel")


def test_info_reports_backends():
    info = cubecore.info()
    assert set(info) >= {"extension_loaded", "cpu_kernel", "cuda_kernel", "cpu_kernel_reason", "cuda_kernel_reason"}
    assert info["cpu_kernel"] == (info["cpu_kernel_reason"] is None)
    if not info["cuda_kernel"]:
        assert isinstance(info["cuda_kernel_reason"], str) and info["cuda_kernel_reason"]
    assert "state_size <= 64" in info["kernel_limits"]["cuda"]


def test_limit_reasons_name_the_limit():
    assert ops.kernel_limit_reason("cuda", torch.float32, 64) is None
    assert "state_size <= 64" in ops.kernel_limit_reason("cuda", torch.float32, 65)
    assert "bfloat16" in ops.kernel_limit_reason("cuda", torch.bfloat16, 8)
    assert ops.kernel_limit_reason("cpu", torch.float64, 1000) is None
    for device_type in ("cpu", "cuda"):  # depth is the one option of the rule family with a kernel limit
        assert ops.kernel_limit_reason(device_type, torch.float32, 8, hidden_layers=2) is None
        assert "at most 2 hidden layers" in ops.kernel_limit_reason(device_type, torch.float32, 8, hidden_layers=3)
    with pytest.raises(TypeError, match="hidden_layers"):
        ops.kernel_limit_reason("cpu", torch.float32, 8, hidden_layers=2.5)
    with pytest.raises(TypeError, match="positional"):  # the rule does not limit a kernel: it is not an argument
        ops.kernel_limit_reason("cpu", torch.float32, 8, ops.Rule())


# --- bad input: every error names the argument ----------------------------------------------------------------


def _good():
    return make_problem(1, 2, 3, 4, 2, 3, 1)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "state"),
        (lambda a: a.__setitem__(1, a[1][:, :, :2]), ValueError, "external"),
        (lambda a: a.__setitem__(1, torch.randn(1, 2, 3, 4, 3, dtype=torch.float64)), ValueError, "w1"),
        (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, "w1"),
        (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "b1"),
        (lambda a: a.__setitem__(4, a[4].t()), ValueError, "w2"),
        (lambda a: a.__setitem__(5, a[5][:1]), ValueError, "b2"),
        (lambda a: a.__setitem__(2, a[2].float()), TypeError, "w1 has dtype"),
        (lambda a: a.__setitem__(1, a[1].float()), TypeError, "external has dtype"),
        (lambda a: a.__setitem__(0, a[0].long()), TypeError, "state must be a floating"),
        (lambda a: a.__setitem__(0, a[0].meta if hasattr(a[0], "meta") else a[0].to("meta")), ValueError, "on meta"),
        (lambda a: a.__setitem__(3, [0.0, 0.0, 0.0]), TypeError, "b1 must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise_naming_the_argument(mutate, error, match):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=match):
        propagate(*args, steps=2, backend="reference")


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(steps=2, boundary="mirror"), ValueError, "boundary"),
        (dict(steps=2, activation="gelu"), ValueError, "activation"),
        (dict(steps=2, update="add"), ValueError, "update"),
        (dict(steps=2, step_size=float("nan")), ValueError, "step_size"),
        (dict(steps=2, step_size="1"), TypeError, "step_size"),
        (dict(steps=2, backend="triton"), ValueError, "backend"),
    ],
)
def test_bad_options_raise_naming_the_argument(kw, error, match):
    """A wrong type is a TypeError, a wrong value a ValueError, as everywhere in the package (cubecore.checks)."""
    with pytest.raises(error, match=match):
        propagate(*_good(), **kw)


def test_numpy_integer_steps_are_ints():
    np = pytest.importorskip("numpy")
    want = propagate(*_good(), steps=2, backend="reference")
    torch.testing.assert_close(propagate(*_good(), steps=np.int64(2), backend="reference"), want)


@requires_kernel
def test_kernel_rejects_bad_direct_calls():
    args = _good()
    with pytest.raises(RuntimeError, match="w1"):
        _op_forward(args[0], args[1], args[2][:, :-1], *args[3:], 2)
    bad_codes = list(_op_args(*args, 2))
    bad_codes[-3] = [0, 7, 0, 0, 0, -1, 0]  # the rule's codes, a boundary beyond the list
    with pytest.raises(RuntimeError, match="boundary"):
        torch.ops.cubecore.propagate_forward(*bad_codes)
    bad_codes[-3] = [0, 0, 0, 0, 0, -1, 9]  # a precision beyond the list
    with pytest.raises(RuntimeError, match="precision"):
        torch.ops.cubecore.propagate_forward(*bad_codes)
    bad_codes[-3] = [0, 0, 0, 0, 0, -1]  # one code short
    with pytest.raises(RuntimeError, match="rule must hold"):
        torch.ops.cubecore.propagate_forward(*bad_codes)
    final, traj, _ = _op_forward(*args, 2)
    with pytest.raises(RuntimeError, match="trajectory"):
        _op_backward(final, traj, *args[1:], 2)
    final, traj, _ = _op_forward(*args, 2, keep=True)
    with pytest.raises(RuntimeError, match="grad_final"):
        _op_backward(traj, traj, *args[1:], 2)


# --- CUDA: the same comparisons on a GPU ------------------------------------------------------------------------


@requires_cuda_kernel
@pytest.mark.parametrize("boundary,activation,update", RULES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 8, 8, 12, 8, 16, 1), (2, 20, 20, 20, 8, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_matches_reference(boundary, activation, update, shape):
    args = make_problem(*shape, seed=13)
    kw = rule_kwargs(boundary, activation, update, 5)
    got = forward_and_grads([a.float().cuda() for a in args], "kernel", **kw)
    want = forward_and_grads(args, "reference", **kw)
    assert_close_all(got, want, atol=1e-4)


@requires_cuda_kernel
def test_cuda_opcheck_and_compile():
    args = [a.float().cuda().requires_grad_() for a in make_problem(2, 3, 4, 5, 4, 8, 1, seed=9)]
    torch.library.opcheck(torch.ops.cubecore.propagate_forward.default,
                          _op_args(*args, 3, boundary="circular", update="residual", step_size=0.5, keep=True))
    core = cubecore.CubicCore(lattice_size=(3, 4, 5), state_size=4, hidden_size=8, input_size=1, steps=3,
                              backend="kernel").cuda()
    u = torch.randn(2, 3, 4, 5, 1, device="cuda")
    torch.testing.assert_close(torch.compile(core, fullgraph=True)(u), core(u))


@requires_cuda_kernel
def test_cuda_gradients_are_deterministic_and_unlimited_by_shared_memory():
    """Two backward runs give the same bits (no atomics), and S = 64 with a wide hidden layer in float64, once
    past the backward's shared memory, matches the reference."""
    args = [a.float().cuda() for a in make_problem(8, 9, 10, 11, 8, 16, 1, seed=3)]
    kw = rule_kwargs("periodic", "tanh", "residual", 4)
    first, second = forward_and_grads(args, "kernel", **kw), forward_and_grads(args, "kernel", **kw)
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    args = make_problem(2, 2, 3, 2, 64, 64, 0, seed=4)
    kw = rule_kwargs("wall", "sigmoid", "replace", 2)
    assert_close_all(forward_and_grads([a.cuda() for a in args], "auto", **kw),
                     forward_and_grads(args, "reference", **kw), atol=1e-10)


def test_extension_is_built():
    """The compiled kernels are part of the package: a missing build fails here instead of skipping quietly."""
    report = cubecore.info()
    assert report["extension_loaded"] and report["cpu_kernel"], report["cpu_kernel_reason"]


# --- double backward and autocast ------------------------------------------------------------------------------


@requires_kernel
@pytest.mark.parametrize("steps_per_call", [None, 1, 2])
def test_double_backward_through_the_kernel_matches_the_reference(steps_per_call, monkeypatch):
    """backward(create_graph=True) through the kernel gives a differentiable gradient (from the reference rule),
    so a gradient penalty trains the same on either backend; also where propagate runs the rollout as several
    calls of the op (each call's gradient is its own part only, none counted twice)."""
    args = make_problem(2, 3, 2, 4, 3, 5, 1, seed=21)
    kw = rule_kwargs("replicate", "tanh", "residual", 5)
    if steps_per_call is not None:
        monkeypatch.setattr(ops, "MAX_STEPS_PER_CALL", steps_per_call)
        assert ops.steps_per_call(args[0], args[2:], None, 5) == steps_per_call

    def penalty_grads(backend):
        leaves = [a.clone().requires_grad_() for a in args]
        out = propagate(*leaves, backend=backend, **kw)
        first = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return [g.detach() for g in first], torch.autograd.grad(penalty, leaves)

    got, want = penalty_grads("kernel"), penalty_grads("reference")
    for g, w in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@requires_kernel
def test_autocast_computes_in_float32_on_both_backends():
    """Under autocast (CPU here, CUDA in training with precision: bf16) inputs of mixed precision, such as a bf16
    external input from a projection layer, meet as float32: the op and propagate return float32 and pass
    gradients back to each input in its own dtype."""
    args = make_problem(2, 3, 4, 2, 4, 6, 2, dtype=torch.float32, seed=4)
    external = args[1].bfloat16().requires_grad_()
    w1 = args[2].clone().requires_grad_()
    kw = rule_kwargs("periodic", "relu", "replace", 3)
    want = propagate(args[0], external.detach().float(), w1.detach(), *args[3:], backend="reference", **kw)
    for backend in ("kernel", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = propagate(args[0], external, w1, *args[3:], backend=backend, **kw)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        g_external, g_w1 = torch.autograd.grad(out.sum(), [external, w1])
        assert g_external.dtype == torch.bfloat16 and g_w1.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op's own autocast rule, called directly
        final, _, _ = _op_forward(*[a.bfloat16() for a in args], 3, boundary="circular", activation="relu")
    assert final.dtype == torch.float32


def test_an_extension_built_for_another_torch_is_said_in_words():
    exc = ImportError("/x/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
    said = ops.extension_error(exc, {"torch": "2.11.0+cu130"}, "2.13.0+cpu")
    assert "built against torch 2.11.0+cu130" in said and "2.13.0+cpu" in said and "--no-build-isolation" in said
    said = ops.extension_error(exc, {}, "2.13.0+cpu")
    assert "does not match the installed torch 2.13.0+cpu" in said and "--no-build-isolation" in said
    said = ops.extension_error(ImportError("No module named 'cubecore._C'"), {}, "2.13.0+cpu")
    assert "could not be loaded" in said and "--no-build-isolation" in said


def test_an_extension_built_from_older_sources_is_said_in_words():
    """An extension that loads but lacks a constant these sources read (built before a `git pull`) was an
    AttributeError traceback at `import cubecore`; it is the reason the kernel is unavailable, saying rebuild."""
    import subprocess
    import sys

    code = ("import sys, types\n"
            "sys.modules['cubecore._C'] = types.ModuleType('cubecore._C')  # an extension without the constants\n"
            "import cubecore\n"
            "print(cubecore.info()['cpu_kernel_reason'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "built from older sources" in done.stdout and "--no-build-isolation" in done.stdout


def test_info_says_which_torch_the_extension_was_built_against():
    assert cubecore.info()["built_with_torch"] == torch.__version__


# --- the trajectory: every step's state ------------------------------------------------------------------------


def _stepwise(args, **kw):
    """The float64 reference's state after t steps, for every t: an oracle independent of return_trajectory."""
    steps = kw.pop("steps")
    return torch.stack([args[0]] + [propagate_reference(*args, steps=t, **kw) for t in range(1, steps + 1)])


@pytest.mark.parametrize("backend,dtype,atol", [("kernel", torch.float64, 1e-12), ("kernel", torch.float32, 1e-5),
                                                ("reference", torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[5]], ids=lambda s: "x".join(map(str, s)))
def test_trajectory_matches_the_float64_reference_step_by_step(backend, dtype, atol, shape):
    if backend == "kernel" and cubecore.kernel_unavailable_reason("cpu", dtype) is not None:
        pytest.skip("CPU kernel not built")
    args = make_problem(*shape, seed=17)
    kw = rule_kwargs("replicate", "tanh", "residual", 4)
    traj = propagate(*[a.to(dtype) for a in args], backend=backend, return_trajectory=True, **kw)
    assert traj.shape == (5, *args[0].shape) and traj.dtype == dtype
    torch.testing.assert_close(traj.double(), _stepwise(args, **kw), atol=atol, rtol=0)
    torch.testing.assert_close(traj[0], args[0].to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(traj[-1], propagate(*[a.to(dtype) for a in args], backend=backend, **kw), atol=0, rtol=0)


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=requires_kernel), "reference"])
def test_gradient_through_the_last_trajectory_entry_is_the_final_states_gradient(backend):
    args = make_problem(2, 3, 2, 5, 3, 5, 2, seed=23)
    kw = rule_kwargs("periodic", "sigmoid", "replace", 3)
    up = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [a.clone().requires_grad_() for a in args]
    traj = propagate(*leaves, backend=backend, return_trajectory=True, **kw)
    got = torch.autograd.grad(traj[-1], leaves, up, retain_graph=True)
    for g, w in zip(got, torch.autograd.grad(propagate_reference(*leaves, **kw), leaves, up)):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=0)
    # The earlier entries: differentiable on the reference backend, detached (zero gradient) on the kernel's.
    middle = torch.autograd.grad(traj[1], leaves[2], up)[0]
    assert (middle.abs().max() == 0) == (backend == "kernel")


@requires_kernel
def test_trajectory_without_gradients_and_under_autocast():
    args = make_problem(1, 3, 3, 1, 2, 3, 1, seed=2)
    kw = rule_kwargs("wall", "relu", "replace", 2)
    with torch.no_grad():  # the op keeps the trajectory when asked, not only when gradients are needed
        traj = propagate(*args, backend="kernel", return_trajectory=True, **kw)
    torch.testing.assert_close(traj, _stepwise(args, **kw), atol=1e-12, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj = propagate(*[a.float() for a in args], backend="kernel", return_trajectory=True, **kw)
    assert traj.dtype == torch.float32 and traj.shape == (3, *args[0].shape)
    torch.testing.assert_close(traj.double(), _stepwise(args, **kw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("value,error", [(1, TypeError), ("yes", TypeError), (None, TypeError)])
def test_return_trajectory_must_be_a_bool(value, error):
    with pytest.raises(error, match="return_trajectory"):
        propagate(*_good(), steps=2, backend="reference", return_trajectory=value)


@requires_kernel
def test_torch_compile_fullgraph_with_the_trajectory():
    torch.manual_seed(0)
    core = cubecore.CubicCore(lattice_size=(3, 4, 5), state_size=4, hidden_size=8, input_size=2, steps=3,
                              backend="kernel")
    u = torch.randn(2, 3, 4, 5, 2)
    traj = torch.compile(lambda x: core(x, return_trajectory=True), fullgraph=True)(u)
    torch.testing.assert_close(traj, core(u, return_trajectory=True))
    gc = torch.autograd.grad(traj[-1].square().sum(), list(core.parameters()))
    ge = torch.autograd.grad(core(u).square().sum(), list(core.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_op_args_are_read_back_as_written_for_every_rule_option():
    """OpArgs writes the op's positional arguments and reads them back (the fakes and the autograd formula
    read them so): every option of the rule and every tensor survive the round trip."""
    import itertools

    from cubecore.ops.rule import ACTIVATIONS, BOUNDARIES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, UPDATES

    state, external, w1, b1, w2, b2 = make_problem(1, 2, 2, 2, 3, 4, 1)
    wh, bh = torch.randn(5, 4), torch.randn(5)
    for *choices, alive in itertools.product(NEIGHBOURHOODS, BOUNDARIES, ACTIVATIONS, OUTPUT_ACTIVATIONS, UPDATES,
                                             (None, 2)):
        rule = Rule(*choices, step_size=0.7, alive_channel=alive, alive_threshold=0.25)
        call = OpArgs.of(external, [w1, b1, wh, bh, w2[:, :5], None], rule, 3, dead_state=torch.zeros(3))
        got_state, back, keep = OpArgs.from_forward(call.forward_args(state, True))
        assert got_state is state and keep is True and back.rule == rule and back.steps == 3
        assert all(a is b for a, b in zip(back.tensors(), call.tensors()))
        grad, traj, life, back = OpArgs.from_backward(call.backward_args(state, state, state))
        assert back.rule == rule and all(a is b for a, b in zip(back.tensors(), call.tensors()))
    assert torch.equal(call.bo, torch.zeros(3))  # a missing bias is zeros, a constant
