"""The CPU kernel's two engines (csrc/cpu_engine.h): the tile-GEMM engine against the float64 reference for every
pair of option values of the rule family and for the rule 3D NCAs run, at tile-boundary lattices and 1, 2 and 3
threads; reproducible results; which engine a call takes, and that it is reported."""

import itertools
import os

import pytest
import torch

import cubecore
from conftest import requires_kernel
from cubecore.ops import front
from cubecore.ops.rule import ACTIVATIONS, BOUNDARIES, NEIGHBOURHOODS, OUTPUT_ACTIVATIONS, UPDATES
from test_rule_family import DEPTHS, PERCEPTION_FILTERS, assert_same, family_problem, options, run, torch_threads

# (B, X, Y, Z, S, E) around the tile-GEMM engine's tile of 64 cells (kGemmTile in csrc/cpu_engine.h): 63, 64, 65,
# 127, 128 and 129 cells a sample (65 and 129: a last tile of one cell); B = 3 with 43 cells, so that a step split
# over tiles of the whole batch (N = 129) ends in a one-cell tile too; odd S; one cell.
SHAPES = [(1, 127, 1, 1, 5, 1), (2, 4, 4, 8, 8, 0), (1, 3, 43, 1, 3, 2), (3, 43, 1, 1, 20, 0), (2, 3, 5, 7, 16, 1),
          (1, 1, 1, 1, 6, 0), (1, 63, 1, 1, 7, 1), (2, 4, 4, 4, 4, 0), (1, 5, 13, 1, 9, 0)]

# Every option of the rule family with its values; the cases below cover every pair of values (and SHAPES,
# thread counts and depths cycle through them).
OPTIONS = {
    "neighbourhood": NEIGHBOURHOODS,
    "filters": tuple(sorted({*PERCEPTION_FILTERS, 1})),  # each perception, and depthwise with one filter too
    "output": OUTPUT_ACTIVATIONS,
    "fire": (False, True),
    "alive": (False, True),
    "boundary": BOUNDARIES,
    "update": UPDATES,
    "activation": ACTIVATIONS,
    "depth": DEPTHS,
}


def pairwise(options):
    """A list of cases (dicts) in which every pair of values of two options occurs: greedy, deterministic."""
    names = list(options)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in options[a] for vb in options[b]}
    cases = []
    while uncovered:
        best, best_new = None, -1
        for values in itertools.product(*(options[n] for n in names)):
            case = dict(zip(names, values))
            new = sum((a, case[a], b, case[b]) in uncovered for a, b in itertools.combinations(names, 2))
            if new > best_new:
                best, best_new = case, new
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


CASES = pairwise(OPTIONS)
GEMM_AVAILABLE = front.EXTENSION_ERROR is None and front._C.tile_gemm_available()
requires_tile_gemm = pytest.mark.skipif(not GEMM_AVAILABLE, reason="the tile-GEMM engine does not run on this CPU")


@pytest.fixture
def engine(monkeypatch):
    """Force an engine for the calls of a test (CUBECORE_CPU_ENGINE, read by the kernels at each call)."""
    def force(name):
        monkeypatch.setenv("CUBECORE_CPU_ENGINE", name)
    return force


def case_problem(i, case, dtype):
    shape = SHAPES[i % len(SHAPES)]
    if case["boundary"] == "reflect" and min(shape[1:4]) < 2:
        shape = SHAPES[1]
    problem = family_problem(shape, case["neighbourhood"], case["filters"], case["depth"], output_bias=i % 2 == 0,
                             alive=case["alive"], seed=100 + i, dtype=dtype)
    kw = options(case["neighbourhood"], case["output"], case["fire"], case["alive"], case["boundary"], case["update"],
                 3, shape, i, case["activation"])
    if case["alive"]:
        kw["dead_state"] = kw["dead_state"].to(dtype)
    return problem, kw


def test_the_cases_cover_every_pair_of_option_values():
    for a, b in itertools.combinations(OPTIONS, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(OPTIONS[a], OPTIONS[b])), (a, b)


@requires_kernel
@requires_tile_gemm
@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i].values())))
def test_tile_gemms_match_the_float64_reference(i, engine):
    case = CASES[i]
    problem64, kw = case_problem(i, case, torch.float64)
    want = run("reference", problem64, **kw)
    problem32, kw32 = case_problem(i, case, torch.float32)
    engine("tile_gemm")
    with torch_threads(1 + i % 3):
        assert_same(run("kernel", problem32, **kw32), want, atol=2e-4)


@requires_kernel
@requires_tile_gemm
@pytest.mark.parametrize("shape", [(1, 127, 1, 1, 20, 0), (2, 4, 4, 8, 20, 0), (1, 3, 43, 1, 20, 0),
                                   (3, 43, 1, 1, 20, 0), (1, 5, 13, 1, 5, 0)], ids=str)
def test_the_nca_rule_picks_tile_gemms_and_matches_the_reference(shape):
    """The rule of the published 3D NCAs (Moore, three depthwise filters, 64 -> 64 hidden, relu, residual, fire
    and alive masks), unforced: the sizes alone choose the tile GEMMs, and get_info says so."""
    B, X, Y, Z, S, _ = shape
    core = cubecore.CubicCore(lattice_size=(X, Y, Z), state_size=S, hidden_size=[64, 64], input_size=0, steps=3,
                              neighbourhood="moore", perception="depthwise", perception_filters=3, activation="relu",
                              output_activation="identity", output_bias=False, update="residual", fire_rate=0.5,
                              alive_channel=1)
    assert "CUBECORE_CPU_ENGINE" not in os.environ
    assert core.get_info()["cpu_engine"] == "tile_gemm"
    assert core.double().get_info()["cpu_engine"] == "cells"
    problem64 = family_problem(shape, "moore", 3, 2, alive=True, seed=5)
    kw = options("moore", "identity", True, True, "zeros", "residual", 4, shape, 5, "relu")
    weights = [torch.randn(64, S * 3, dtype=torch.float64) * 0.2, torch.randn(64, dtype=torch.float64) * 0.1,
               torch.randn(64, 64, dtype=torch.float64) * 0.15, torch.randn(64, dtype=torch.float64) * 0.1,
               torch.randn(S, 64, dtype=torch.float64) * 0.15, None]
    problem64 = (problem64[0], None, problem64[2], weights)
    want = run("reference", problem64, **kw)
    problem32 = tuple(x.float() if isinstance(x, torch.Tensor) else x for x in problem64[:3]) + (
        [w.float() if w is not None else None for w in weights],)
    kw["dead_state"] = kw["dead_state"].float()
    for threads in (1, 2, 3):
        with torch_threads(threads):
            assert_same(run("kernel", problem32, **kw), want, atol=2e-4)


@requires_kernel
@requires_tile_gemm
def test_tile_gemms_are_reproducible_and_agree_across_thread_counts(engine):
    """Bitwise the same for a fixed thread count; within float rounding across thread counts (the per-thread
    weight-gradient sums are added in a fixed order)."""
    engine("tile_gemm")
    shape = (3, 43, 1, 3, 20, 0)
    problem = family_problem(shape, "moore", 3, 2, alive=True, seed=9, dtype=torch.float32)
    kw = options("moore", "identity", True, True, "zeros", "residual", 3, shape, 9, "relu")
    kw["dead_state"] = kw["dead_state"].float()
    results = {}
    for threads in (1, 2, 3):
        with torch_threads(threads):
            results[threads] = run("kernel", problem, **kw)
            again = run("kernel", problem, **kw)
        for a, b in zip(results[threads], again):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for threads in (2, 3):
        assert_same(results[threads], results[1], atol=1e-5)


@requires_kernel
def test_the_engine_follows_dtype_and_sizes_and_can_be_forced(monkeypatch):
    gemm = "tile_gemm" if GEMM_AVAILABLE else "cells"
    # the first hidden layer's width decides: 64 or more values (the 3D artefacts NCA's 64 -> 64 among them)
    assert front.cpu_engine(torch.float32, [64, 64]) == gemm
    assert front.cpu_engine(torch.float32, [64]) == gemm  # the benchmarks' large-state size
    assert front.cpu_engine(torch.float32, [63, 128]) == "cells"
    assert front.cpu_engine(torch.float32, [32]) == "cells"
    assert front.cpu_engine(torch.float32, [16]) == "cells"  # the original rule: per-cell loops are faster
    assert front.cpu_engine(torch.float64, [64, 64]) == "cells"  # float64 stays on the exact loops
    assert front.cpu_engine(torch.float16, [64]) is None  # no CPU kernel for float16
    info = cubecore.info()
    assert info["cpu_tile_gemm"] is GEMM_AVAILABLE and "tile GEMMs" in info["cpu_engines"]
    monkeypatch.setenv("CUBECORE_CPU_ENGINE", "cells")
    assert front.cpu_engine(torch.float32, [64, 64]) == "cells"
    monkeypatch.setenv("CUBECORE_CPU_ENGINE", "tile_gemm")
    assert front.cpu_engine(torch.float32, [16]) == gemm
    assert front.cpu_engine(torch.float64, [16]) == "cells"
    monkeypatch.setenv("CUBECORE_CPU_ENGINE", "fastest")
    with pytest.raises(ValueError, match="CUBECORE_CPU_ENGINE must be 'cells' or 'tile_gemm'"):
        front.cpu_engine(torch.float32, [16])


@requires_kernel
def test_get_info_names_no_engine_where_the_cpu_kernel_does_not_run():
    core = cubecore.CubicCore(lattice_size=(2, 2, 2), state_size=4, hidden_size=64, input_size=0, steps=1,
                              backend="reference")
    assert core.get_info()["cpu_engine"] is None
    assert cubecore.CubicCore(lattice_size=(2, 2, 2), state_size=4, hidden_size=8, input_size=0,
                              steps=1).get_info()["cpu_engine"] == "cells"


# --- bfloat16 products under autocast -----------------------------------------------------------------------------

BF16_AVAILABLE = front.EXTENSION_ERROR is None and front._C.bf16_gemm_available()
requires_bf16 = pytest.mark.skipif(not BF16_AVAILABLE, reason="this CPU runs no bfloat16 products (no AVX512-BF16): "
                                                              "autocast keeps the float32 products there")
# The reference twins the kernel's bfloat16 products (propagate_reference(precision="bfloat16") rounds their
# operands, the gradient passing straight through), so that both take the same alive and relu decisions.  The
# forward is then float32 against float64 accumulation of the same operands (measured: within 3e-7 of the
# largest value; allowed 1e-5).  The gradients differ by the backward's products, whose upstream gradients the
# kernel rounds to bfloat16 too (8 significant bits, a relative rounding of at most 2^-9 each, over the rule's 3
# steps; measured: within 8e-3): each within 2% of its largest value (float32 products: 2e-4).
BF16_FORWARD_ATOL, BF16_ATOL = 1e-5, 2e-2


@requires_kernel
@requires_bf16
@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i].values())))
def test_bfloat16_products_under_autocast_match_the_float64_reference(i, engine):
    case = CASES[i]
    problem32, kw32 = case_problem(i, case, torch.float32)
    problem64 = [x.double() if isinstance(x, torch.Tensor) else x for x in problem32[:3]] + [
        [w.double() if w is not None else None for w in problem32[3]]]  # the float32 problem's values
    kw = {k: v.double() if k == "dead_state" else v for k, v in kw32.items()}
    want = run("reference", problem64, precision="bfloat16", **kw)
    engine("tile_gemm")
    assert front.product_precision("cpu", torch.float32, torch.bfloat16, [problem32[3][0].shape[0]]) == "bfloat16"
    with torch_threads(1 + i % 3):
        got = run("kernel", problem32, autocast=torch.bfloat16, **kw32)
    assert got[0].dtype == torch.float32  # the states stay float32
    assert_same(got[:1], want[:1], atol=BF16_FORWARD_ATOL)
    assert_same(got, want, atol=BF16_ATOL)


@requires_kernel
@requires_bf16
def test_the_nca_rule_under_autocast_runs_bfloat16_products_reproducibly():
    """Unforced, the published 3D NCAs' rule under autocast takes bfloat16 products; its results are the same
    bits for a fixed thread count, within bfloat16 rounding across thread counts."""
    shape = (2, 43, 1, 3, 20, 0)
    assert front.product_precision("cpu", torch.float32, torch.bfloat16, [64, 64]) == "bfloat16"
    problem = family_problem(shape, "moore", 3, 2, alive=True, seed=9, dtype=torch.float32)
    weights = [torch.randn(64, 60) * 0.2, torch.randn(64) * 0.1, torch.randn(64, 64) * 0.15, torch.randn(64) * 0.1,
               torch.randn(20, 64) * 0.15, None]
    problem = (problem[0], None, problem[2], weights)
    kw = options("moore", "identity", True, True, "zeros", "residual", 3, shape, 9, "relu")
    kw["dead_state"] = kw["dead_state"].float()
    want = run("reference", tuple(x.double() if isinstance(x, torch.Tensor) else x for x in problem[:3]) + (
        [w.double() if w is not None else None for w in weights],), precision="bfloat16",
        **{**kw, "dead_state": kw["dead_state"].double()})
    results = {}
    for threads in (1, 2):
        with torch_threads(threads):
            results[threads] = run("kernel", problem, autocast=torch.bfloat16, **kw)
            again = run("kernel", problem, autocast=torch.bfloat16, **kw)
        for a, b in zip(results[threads], again):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert_same(results[threads], want, atol=BF16_ATOL)
    # the products did run in bfloat16: further from the float32 products than those are from each other
    exact = run("kernel", problem, **kw)
    assert max((g - e).abs().max().item() for g, e in zip(results[1], exact)) > 1e-3


@requires_kernel
def test_bfloat16_products_only_where_autocast_asks_and_the_engine_runs_them():
    bf16 = "bfloat16" if BF16_AVAILABLE and GEMM_AVAILABLE else "ieee"
    assert front.product_precision("cpu", torch.float32, torch.bfloat16, [64]) == bf16
    assert front.product_precision("cpu", torch.float32, None, [64]) == "ieee"  # no autocast
    assert front.product_precision("cpu", torch.float32, torch.float16, [64]) == "ieee"  # no float16 kernel
    assert front.product_precision("cpu", torch.float32, torch.bfloat16, [16]) == "ieee"  # per-cell engine
    assert front.product_precision("cpu", torch.float64, torch.bfloat16, [64]) == "ieee"  # float64 stays exact
    assert cubecore.info()["cpu_bfloat16"] is BF16_AVAILABLE


@requires_kernel
def test_a_core_says_the_precision_of_its_products():
    """get_info() and precision() say which precision a call's products take (and info() the rule): float32
    without autocast, bfloat16 under autocast on the tile-GEMM engine where the CPU runs it; none off the kernel."""
    nca = cubecore.CubicCore(lattice_size=(2, 2, 2), state_size=4, hidden_size=64, input_size=0, steps=1)
    assert nca.get_info()["precision"] == nca.precision() == "ieee"
    assert nca.precision(torch.bfloat16) == ("bfloat16" if BF16_AVAILABLE and GEMM_AVAILABLE else "ieee")
    assert nca.double().precision(torch.bfloat16) == "ieee"
    small = cubecore.CubicCore(lattice_size=(2, 2, 2), state_size=4, hidden_size=8, input_size=0, steps=1)
    assert small.precision(torch.bfloat16) == "ieee"  # the per-cell engine
    small.backend = "reference"
    assert small.get_info()["precision"] is None
    assert "bfloat16" in cubecore.info()["precisions"] and "TF32" in cubecore.info()["precisions"]
