"""Time the CPU kernel of this checkout against another build of cubecore, in one run, on the benchmark suite's
sizes of the original rule (von Neumann, concat, one tanh layer) and of the 3D artefacts NCA's rule (`nca-16`,
`nca-24`, `nca`: benchmarks/nca.py at 16^3, 24^3 and 32^3): did a change make any size slower?

    python scripts/compare_builds.py /path/to/other/checkout [--rounds 5] [--sizes original,16^3]

The other checkout needs its extension built in place (``python setup.py build_ext --inplace``).  Each
measurement runs in a fresh subprocess with that checkout first on ``sys.path``; the two builds take turns,
round after round, so that the machine's drift hits both alike.  Prints the median forward+backward time of
each and their ratio (this / other: above 1 means this checkout is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, B, X, Y, Z, S, H, E, T): the suite's CPU sizes (benchmarks/run.py).
SIZES = [("original", 32, 8, 8, 12, 8, 16, 1, 10), ("large-state", 32, 8, 8, 12, 16, 64, 1, 10),
         ("16^3", 8, 16, 16, 16, 8, 16, 1, 10), ("32^3", 2, 32, 32, 32, 8, 16, 1, 10),
         ("64^3", 1, 64, 64, 64, 8, 16, 1, 10), ("T=1", 32, 8, 8, 12, 8, 16, 1, 1),
         ("T=50", 32, 8, 8, 12, 8, 16, 1, 50)]
# (name, side, T) of the 3D artefacts NCA's rule, B = 5 (benchmarks/nca.py, taken from each checkout).
NCA_SIZES = [("nca-16", 16, 24), ("nca-24", 24, 24), ("nca", 32, 48)]

# Both children end so: a warm-up call, then `repeats` timed calls, printed with where cubecore came from.
TIMING = r"""
once()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    once()
    times.append(time.perf_counter() - start)
print(json.dumps({"file": cubecore.__file__, "times": times}))
"""

NCA_CHILD = r"""
import json, sys, time, torch
from dataclasses import replace
sys.path.insert(0, sys.argv[1])
import cubecore
from benchmarks.nca import NcaSize, kernel
side, T, repeats = map(int, sys.argv[2:5])
size = replace(NcaSize("nca", 5, side, side, side), T=T)
inputs = size.make_inputs("cpu", torch.float32)
def once():
    size.loss(kernel(*inputs, **size.rule())).backward()
""" + TIMING

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import cubecore
B, X, Y, Z, S, H, E, T, repeats = map(int, sys.argv[2:11])
gen = torch.Generator().manual_seed(0)
def rnd(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)
K = 7 * S + E
args = [rnd(B, X, Y, Z, S, scale=0.5, grad=False), rnd(B, X, Y, Z, E), rnd(H, K, scale=(2.0 / (H + K)) ** 0.5),
        rnd(H, scale=0.1), rnd(S, H, scale=(2.0 / (S + H)) ** 0.5), rnd(S, scale=0.1)]
def once():
    out = cubecore.propagate(*args, steps=T, boundary="wall", backend="kernel")
    torch.autograd.grad(out.sum(), args[1:])
""" + TIMING


def measure(root: str, size, repeats: int) -> list:
    env = dict(os.environ, PYTHONPATH=root)
    child = NCA_CHILD if size in NCA_SIZES else CHILD
    out = subprocess.run([sys.executable, "-c", child, root, *map(str, size[1:]), str(repeats)], env=env,
                         capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise SystemExit(f"error: the measurement in {root} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not os.path.abspath(result["file"]).startswith(os.path.abspath(root)):
        raise SystemExit(f"error: {root} imported cubecore from {result['file']}")
    return result["times"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="another cubecore checkout with its extension built in place")
    parser.add_argument("--rounds", type=int, default=5, help="turns each build takes per size (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per turn (default 5)")
    parser.add_argument("--sizes", default=",".join(s[0] for s in SIZES),
                        help=f"comma-separated size names, from {', '.join(s[0] for s in SIZES + NCA_SIZES)}")
    args = parser.parse_args(argv)
    wanted = args.sizes.split(",")
    unknown = [w for w in wanted if w not in {s[0] for s in SIZES + NCA_SIZES}]
    if unknown or args.rounds < 1 or args.repeats < 1:
        parser.error(f"unknown sizes {unknown}" if unknown else "--rounds and --repeats must be >= 1")
    print(f"this: {HERE}\nother: {os.path.abspath(args.other)}")
    print(f"{'size':<12} {'this ms':>9} {'other ms':>9} {'this/other':>10}")
    for size in (s for s in SIZES + NCA_SIZES if s[0] in wanted):
        mine, theirs = [], []
        for _ in range(args.rounds):
            mine += measure(HERE, size, args.repeats)
            theirs += measure(args.other, size, args.repeats)
        a, b = statistics.median(mine) * 1e3, statistics.median(theirs) * 1e3
        print(f"{size[0]:<12} {a:9.2f} {b:9.2f} {a / b:10.3f}", flush=True)


if __name__ == "__main__":
    main()
