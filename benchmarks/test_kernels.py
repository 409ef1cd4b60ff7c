"""pytest-benchmark view of the suite: `pytest benchmarks/ --benchmark-only`.

Every contestant at the original size (B=32, 8x8x12, S=8, H=16, E=1, T=10), forward+backward, checked
against the float64 reference first.  The full matrix with memory and plots is `python -m benchmarks`.
"""

import pytest
import torch

from benchmarks.contestants import all_contestants
from benchmarks.harness import Size, _forward_backward, check, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ORIGINAL = Size("original", 32, 8, 8, 12)
CONTESTANTS = all_contestants(DEVICE)


@pytest.mark.parametrize("name", list(CONTESTANTS))
def test_forward_backward_original(benchmark, name):
    fn = CONTESTANTS[name]
    ok, err = check(fn, ORIGINAL, DEVICE)
    assert ok, f"{name} disagrees with the float64 reference (relative error {err:.2e})"
    inputs = make_inputs(ORIGINAL, DEVICE, torch.float32)

    def step():
        out = _forward_backward(fn, inputs, ORIGINAL)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"fwd+bwd {ORIGINAL.name} on {DEVICE.type}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
