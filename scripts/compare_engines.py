"""Time the CPU kernel's two engines (per-cell loops and tile GEMMs, csrc/cpu_engine.h) against each other on one
build, in one process, the engines taking turns round after round: which is faster at which size, and at which
tile size the tile GEMMs run best.  This is the measurement behind the engine choice (kGemmMinMacs) and the tile
(kGemmTile).

    python scripts/compare_engines.py [--sizes original,large-state,nca-24] [--rounds 5] [--tiles 128]

Prints, per size, the update net's multiply-adds per cell, the engine the kernel picks, and the median
forward+backward time of each engine (and tile size): below 1 in the last column means the tile GEMMs are faster.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import cubecore  # noqa: E402
from benchmarks.nca import NcaSize, kernel as nca_kernel  # noqa: E402
from cubecore.ops.front import cpu_engine  # noqa: E402

# (B, X, Y, Z, S, H, E, T) of the lattice rule (von Neumann, concat, one tanh layer): the suite's `original` and
# `large-state` sizes and wider nets; `nca-N`: the 3D artefacts NCA's rule (benchmarks/nca.py) at N^3, B = 5.
CONCAT = {"original": (32, 8, 8, 12, 8, 16, 1, 10), "h32": (32, 8, 8, 12, 8, 32, 1, 10), "s16-h32": (32, 8, 8, 12, 16, 32, 1, 10),
          "s8-h64": (32, 8, 8, 12, 8, 64, 1, 10), "large-state": (32, 8, 8, 12, 16, 64, 1, 10), "h128": (32, 8, 8, 12, 16, 128, 1, 10),
          "s32-h96": (8, 12, 12, 12, 32, 96, 0, 10)}
NCA = {"nca-16": (16, 24), "nca-24": (24, 24), "nca": (32, 48)}


def problem(name: str):
    """(run once: forward+backward, multiply-adds per cell, the engine the kernel picks) for a size."""
    if name in NCA:
        side, steps = NCA[name]
        size = replace(NcaSize(name, 5, side, side, side), T=steps)
        inputs = size.make_inputs("cpu", torch.float32)

        def once():
            size.loss(nca_kernel(*inputs, **size.rule())).backward()

        In = size.S * size.F
        macs = In * size.H + size.H * size.H2 + size.H2 * size.S
        return once, macs, cpu_engine(torch.float32, [size.H, size.H2])
    B, X, Y, Z, S, H, E, T = CONCAT[name]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)

    In = 7 * S + E
    args = [rnd(B, X, Y, Z, S, scale=0.5, grad=False), rnd(B, X, Y, Z, E), rnd(H, In, scale=(2.0 / (H + In)) ** 0.5),
            rnd(H, scale=0.1), rnd(S, H, scale=(2.0 / (S + H)) ** 0.5), rnd(S, scale=0.1)]

    def once():
        cubecore.propagate(*args, steps=T, backend="kernel").square().mean().backward()

    return once, In * H + H * S, cpu_engine(torch.float32, [H])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/compare_engines.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="original,h32,large-state,h128,s32-h96,nca-24",
                        help=f"comma-separated, from {', '.join([*CONCAT, *NCA])}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiles", default="", help="tile sizes (cells) of the tile GEMMs to time, comma-separated "
                        "(default: the built-in tile only)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of runs per measurement")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in CONCAT and s not in NCA]
    if unknown or not sizes or args.rounds < 1:
        parser.error(f"unknown sizes {unknown}" if unknown else "--sizes and --rounds need at least one")
    try:
        tiles = [int(t) for t in args.tiles.split(",") if t] or [None]
    except ValueError:
        parser.error(f"--tiles must be whole numbers, got {args.tiles!r}")
    variants = [("cells", None)] + [("tile_gemm", t) for t in tiles]  # tile None: the built-in one
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| size | MACs/cell | picked | " + " | ".join(f"{e}{'' if t is None else f' {t}'} ms" for e, t in variants)
          + " | tile_gemm / cells |")
    print("|---|---:|---|" + "---:|" * (len(variants) + 1))
    for name in sizes:
        once, macs, picked = problem(name)
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for engine, tile in variants:
                os.environ["CUBECORE_CPU_ENGINE"] = engine
                os.environ["CUBECORE_GEMM_TILE"] = "" if tile is None else str(tile)
                once()
                start, n = time.perf_counter(), 0
                while n == 0 or time.perf_counter() - start < args.min_time:
                    once()
                    n += 1
                times[(engine, tile)].append((time.perf_counter() - start) / n * 1e3)
        os.environ.pop("CUBECORE_CPU_ENGINE")
        os.environ.pop("CUBECORE_GEMM_TILE")
        medians = [statistics.median(times[v]) for v in variants]
        print(f"| {name} | {macs} | {picked} | " + " | ".join(f"{m:.1f}" for m in medians)
              + f" | {min(medians[1:]) / medians[0]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
