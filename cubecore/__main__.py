"""`python -m cubecore`: report which backends this install has and check the kernel on the default core.

Runs in a few seconds: the default CubicCore (8x8x12 lattice, S=8, H=16, T=10) on a batch of 32, forward and
backward with the fused kernel and with the pure-PyTorch reference, their largest difference and their times.
"""

import argparse
import json
import sys
import time

import torch

from . import CubicCore, info
from .cli import CommandParser, device_argument, positive_int


def _timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m cubecore", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs; the best is shown")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)

    report = info()
    print(json.dumps(report, indent=2))
    torch.manual_seed(0)
    core = CubicCore().to(args.device)
    external = torch.randn(args.batch_size, *core.lattice_size, core.input_size, device=args.device)
    outputs, grads, times = {}, {}, {}
    backends = ["reference"] + (["kernel"] if core.active_backend() == "kernel" else [])
    for backend in backends:
        core.backend = backend

        def step():
            out = core(external)
            return out, torch.autograd.grad(out.square().sum(), list(core.parameters()))

        outputs[backend], grads[backend] = step()
        times[backend] = _timed(step, args.repeats)
        print(f"{backend:>9}: forward+backward {times[backend] * 1e3:8.2f} ms  (B={args.batch_size}, "
              f"lattice {core.lattice_size}, T={core.steps}, best of {args.repeats})")
    if "kernel" not in outputs:
        print("kernel backend unavailable:", report["cpu_kernel_reason"] if args.device.type == "cpu"
              else report["cuda_kernel_reason"])
        return 0
    diff = (outputs["kernel"] - outputs["reference"]).abs().max().item()
    gdiff = max((a - b).abs().max().item() / max(1.0, b.abs().max().item())
                for a, b in zip(grads["kernel"], grads["reference"]))
    print(f"kernel vs reference: max |output diff| {diff:.2e}, max relative gradient diff {gdiff:.2e}; "
          f"kernel speed-up {times['reference'] / times['kernel']:.2f}x")
    if diff > 1e-4 or gdiff > 1e-4:
        print("ERROR: the kernel disagrees with the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
