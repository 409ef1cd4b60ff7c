"""Run the whole benchmark matrix on this machine: a Markdown table of ratios to `kernel`, JSON with the
machine's description, and a PNG of time and memory against lattice size.

    python -m benchmarks [--quick] [--device cpu|cuda] [--out benchmarks/results]
    python -m benchmarks --sizes nca --largest-lattice --out benchmarks/results/nca

The `nca` size is the published 3D artefacts NCA against the kernel (benchmarks.nca); ``--largest-lattice`` adds
the largest cubic lattice that trains one step of that rule within an address-space limit, per contestant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from cubecore.cli import CommandParser, device_argument, name_list, non_negative_float, positive_float, positive_int
from cubecore.ops.front import kernel_limit_reason

from .contestants import contestant_names, contestants_for
from .harness import Size, describe_machine, machine_limits, measure
from .nca import GIB, GPU_PRECISIONS, NcaSize, largest_lattice

LATTICE_SERIES = ("original", "16^3", "32^3", "64^3")


def nca_size() -> NcaSize:
    """The 3D artefacts NCA's setting: C = 20, F = 3, hidden [64, 64], 32^3, B = 5, T = 48 (benchmarks.nca)."""
    return NcaSize("nca", 5, 32, 32, 32)


def nca_sizes() -> List[NcaSize]:
    """`nca`, and its rule at a smaller lattice (24^3, B = 5, T = 24), where eager's intermediates stay closer to
    the caches and eager is relatively faster."""
    return [nca_size(), NcaSize("nca-24", 5, 24, 24, 24, T=24)]


# The goals of the `nca` family, forward+backward against the fastest pure PyTorch (other sizes of the family,
# such as the tests' tiny one, take the `nca` goal).
NCA_SPEED_GOALS = {"nca": 2.5, "nca-24": 2.0}
NCA_GPU_SPEED_GOAL = 5.0  # on a GPU, every size of the family and each precision (the kernel's tensor cores)
NCA_MATMUL_GOAL = 0.65


def _kernel_runs_nca(device: torch.device) -> bool:
    return kernel_limit_reason(device.type, torch.float32, nca_size().S, hidden_layers=2) is None


def sizes_for(device: torch.device, quick: bool) -> List[Size]:
    """The matrix: the lattice rule's sizes, then `nca` (on a GPU once the CUDA kernels run its rule)."""
    original = Size("original", 32, 8, 8, 12)
    if quick:
        return [original]
    gpu = device.type == "cuda"
    return [
        original,
        Size("large-state", 32, 8, 8, 12, S=16, H=64),
        Size("16^3", 32 if gpu else 8, 16, 16, 16),
        Size("32^3", 8 if gpu else 2, 32, 32, 32),
        Size("64^3", 8 if gpu else 1, 64, 64, 64),  # on a GPU, the size of its roofline target
        Size("T=1", 32, 8, 8, 12, T=1),
        Size("T=50", 32, 8, 8, 12, T=50),
    ] + (nca_sizes() if _kernel_runs_nca(device) else [])


def _row(rows, size: str, contestant: str) -> Optional[Dict]:
    for r in rows:
        if r["size"] == size and r["contestant"] == contestant and r.get("status") == "ok":
            return r
    return None


def _fb(r: Optional[Dict]) -> Optional[float]:
    return r["forward_backward"]["median_s"] if r else None


def targets(rows: List[Dict], device: torch.device, limits: Dict[str, float],
            largest: Optional[Dict] = None) -> List[Dict]:
    """The suite's goals, each with the measured ratio (None where a contestant could not be measured); the
    "every size" goals are over the lattice rule's sizes, the `nca` size has goals of its own, and the largest
    lattice (``largest``, when searched) one more.  A goal of a size that was not run (``--sizes``) is left
    out, not reported as missed."""
    out = []
    ran = {r["size"] for r in rows}

    def ratio_target(name, size, others, goal, what="forward+backward time", kernel="kernel"):
        if size not in ran:
            return
        kern = _fb(_row(rows, size, kernel))
        times = [t for t in (_fb(_row(rows, size, o)) for o in others) if t]
        value = min(times) / kern if kern and times else None
        out.append({"target": name, "goal": goal, "measured": value, "met": value is not None and value >= goal,
                    "what": f"best of {', '.join(others)} / {kernel}, {what}, size {size}"})

    def smallest_over_sizes(name, goal, value_of, what):
        """The worst size's value of value_of(size) (None where a size lacks the rows it needs)."""
        values = {r["size"]: value_of(r["size"]) for r in rows
                  if r["contestant"] == "kernel" and r.get("family", "lattice") == "lattice"}
        if not values:
            return
        known = {k: v for k, v in values.items() if v is not None}
        worst = min(known, key=known.get) if known else None
        value = known[worst] if known and len(known) == len(values) else None
        out.append({"target": name, "goal": goal, "measured": value, "met": value is not None and value >= goal,
                    "what": f"{what}, the smallest over the lattice sizes ({worst})"})

    def executed_fraction(size):
        k = _row(rows, size, "kernel")
        return k["executed_flops_per_s"] / limits["matmul_flops_per_s"] if k else None

    def pure_over_kernel(size, key):
        k = _row(rows, size, "kernel")
        others = [r for r in (_row(rows, size, o) for o in pure) if r]
        if not k or not others:
            return None
        if key == "time":
            return min(_fb(r) for r in others) / _fb(k)
        peaks = [r["peak_bytes"] for r in others if r.get("peak_bytes")]
        return min(peaks) / k["peak_bytes"] if peaks and k.get("peak_bytes") else None

    pure = ["eager", "conv3d", "compiled", "checkpointed"]
    if device.type == "cpu":
        smallest_over_sizes("CPU every size: >= 0.75 of the matmul limit", 0.75, executed_fraction,
                            "kernel executed FLOP/s / measured float32 matmul FLOP/s")
        smallest_over_sizes("CPU every size: the fastest contestant", 1.0, lambda s: pure_over_kernel(s, "time"),
                            "best pure-PyTorch / kernel forward+backward time")
        smallest_over_sizes("CPU every size: the leanest contestant", 1.0, lambda s: pure_over_kernel(s, "memory"),
                            "leanest pure-PyTorch / kernel peak memory")
        ratio_target("CPU original: >= 2x compiled", "original", ["compiled"], 2.0)
        ratio_target("CPU 32^3: >= 3x best pure PyTorch", "32^3", pure, 3.0)
    else:
        ratio_target("GPU original: >= 10x eager", "original", ["eager"], 10.0)
        ratio_target("GPU original: >= 3x compiled (reduce-overhead)", "original", ["compiled-ro"], 3.0)
        frac = executed_fraction("64^3")
        if "64^3" in ran:
            out.append({"target": "GPU 64^3: >= 0.5 of roofline", "goal": 0.5, "measured": frac,
                        "met": frac is not None and frac >= 0.5,
                        "what": "kernel executed FLOP/s / measured float32 matmul FLOP/s (TF32 off), size 64^3"})
    k, e = _row(rows, "original", "kernel"), _row(rows, "original", "eager")
    mem = e["peak_bytes"] / k["peak_bytes"] if k and e and k.get("peak_bytes") else None
    if "original" in ran:
        out.append({"target": "peak memory T=10: kernel <= 1/5 eager", "goal": 5.0, "measured": mem,
                    "met": mem is not None and mem >= 5.0, "what": "eager / kernel peak memory, size original"})
    ncas = list(dict.fromkeys(r["size"] for r in rows if r.get("family") == "nca"))
    for nca in ncas:  # a run with the `nca` sizes (not --quick)
        nca_pure = ["eager", "compiled", "checkpointed"] + (["compiled-ro"] if device.type == "cuda" else [])
        if device.type == "cuda":  # each precision against the pure PyTorch contestants at the same switches
            for precision, suffix in [("ieee", ""), *GPU_PRECISIONS.items()]:
                same = nca_pure if not suffix else [f"eager{suffix}", f"compiled{suffix}"]
                ratio_target(f"{nca} ({precision}): >= {NCA_GPU_SPEED_GOAL:g}x the fastest pure PyTorch at "
                             f"{precision}", nca, same, NCA_GPU_SPEED_GOAL, kernel=f"kernel{suffix}")
        else:
            goal = NCA_SPEED_GOALS.get(nca, NCA_SPEED_GOALS["nca"])
            ratio_target(f"{nca}: >= {goal:g}x the fastest pure PyTorch", nca, nca_pure, goal)
        frac = executed_fraction(nca)
        out.append({"target": f"{nca}: >= {NCA_MATMUL_GOAL:g} of the matmul limit", "goal": NCA_MATMUL_GOAL,
                    "measured": frac, "met": frac is not None and frac >= NCA_MATMUL_GOAL,
                    "what": f"kernel executed FLOP/s / measured float32 matmul FLOP/s, size {nca}"})
        k, e = _row(rows, nca, "kernel"), _row(rows, nca, "eager")
        mem = e["peak_bytes"] / k["peak_bytes"] if k and e and k.get("peak_bytes") else None
        out.append({"target": f"{nca} peak memory: kernel <= 1/10 eager", "goal": 10.0, "measured": mem,
                    "met": mem is not None and mem >= 10.0, "what": f"eager / kernel peak memory, size {nca}"})
    if largest is not None:
        found = {r["contestant"]: r for r in largest["results"]}
        k, e = found.get("kernel", {}).get("cells"), found.get("eager", {}).get("cells")
        value = k / e if k and e else None
        out.append({"target": "nca largest lattice: kernel >= 8x eager's cells", "goal": 8.0, "measured": value,
                    "met": value is not None and value >= 8.0,
                    "what": f"kernel / eager cells of the largest cubic lattice that trains one step (B = "
                            f"{largest['batch']}, T = {largest['steps']}) within {largest['limit_bytes'] / GIB:g} GiB "
                            f"of address space"})
    return out


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown(rows: List[Dict], goals: List[Dict], machine: Dict, limits: Dict, largest: Optional[Dict] = None) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + f"; device `{machine['device']}`.",
        f"Measured limits: float32 matmul {limits['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"copy {limits['copy_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        "| size | contestant | forward ms | fwd+bwd ms (IQR) | fwd+bwd / kernel | peak MB | peak / kernel "
        "| cell-updates/s | first call s | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        k = _row(rows, r["size"], "kernel")
        if r.get("status") != "ok":
            lines.append(f"| {r['size']} | {r['contestant']} | - | - | - | - | - | - | - | {r.get('status')} |")
            continue
        fb = r["forward_backward"]
        ratio = f"{fb['median_s'] / _fb(k):.2f}x" if k else "-"
        peak = r.get("peak_bytes")
        mem_ratio = f"{peak / k['peak_bytes']:.2f}x" if k and peak and k.get("peak_bytes") else "-"
        lines.append(
            f"| {r['size']} | {r['contestant']} | {_ms(r['forward']['median_s'])} | {_ms(fb['median_s'])} "
            f"({_ms(fb['iqr_s'])}) | {ratio} | {peak / 2**20 if peak is not None else float('nan'):.1f} | "
            f"{mem_ratio} | {r['cell_updates_per_s']:.3g} | {r['first_call_s']:.1f} | "
            f"{'ok' + (' (' + r['note'] + ')' if r.get('note') else '')} |"
        )
    lines += ["", "| target | goal | measured | met |", "|---|---:|---:|---|"]
    for g in goals:
        value = "-" if g["measured"] is None else f"{g['measured']:.2f}"
        lines.append(f"| {g['target']} ({g['what']}) | {g['goal']} | {value} | {'yes' if g['met'] else 'NO'} |")
    kernel_rows = [r for r in rows if r["contestant"] == "kernel" and r.get("status") == "ok"]
    if kernel_rows:
        limit = limits["matmul_flops_per_s"]
        lines += ["", "Kernel against the machine's measured float32 matmul limit, forward + backward, in two "
                      "conventions: `3 x forward` (the FLOPs any formulation must do, the suite's convention) and "
                      "`executed` (the FLOPs our kernel executes: the forward, and the backward with its "
                      "recomputation):", "",
                  "| size | 3 x forward GFLOP/s | of the limit | executed GFLOP/s | of the limit |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['size']} | {r['train_flops_per_s'] / 1e9:.2f} | {r['train_flops_per_s'] / limit:.1%} | "
                  f"{r['executed_flops_per_s'] / 1e9:.2f} | {r['executed_flops_per_s'] / limit:.1%} |"
                  for r in kernel_rows]
    mem_method = next((r["memory_method"] for r in rows if r.get("memory_method")), None)
    if mem_method:
        lines += ["", f"Peak memory: {mem_method}, one forward+backward."]
    if any(r.get("family") == "nca" for r in rows):
        lines += ["", "Size `nca`: the 3D artefacts NCA (Sudhakaran et al. 2021, real-itu/3d-artefacts-nca) against "
                      "the kernel: C = 20, 3 depthwise filters, update net [64, 64] ReLU, Moore, zeros boundary, "
                      "fire rate 0.5, alive masks, 32^3, B = 5, T = 48 (`nca-24`: the same rule at 24^3, T = 24); "
                      "`eager` is the upstream's own formulation (benchmarks/nca.py). "
                      "Its check is in float64 (and float32 against it) at a reduced lattice; `first call s` is "
                      "that check, not the full size's compile."]
    if largest is not None:
        eager_cells = next((r["cells"] for r in largest["results"] if r["contestant"] == "eager" and r["cells"]), None)
        lines += ["", f"Largest cubic lattice that trains one step of the `nca` rule (forward + backward, B = "
                      f"{largest['batch']}, T = {largest['steps']}, float32) within {largest['limit_bytes'] / GIB:g} "
                      f"GiB of address space (RLIMIT_AS, a child process per try; the side doubles until a try "
                      f"fails, then bisects):", "",
                  "| contestant | side | cells | cells / eager | tries | search s | status |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in largest["results"]:
            ratio = f"{r['cells'] / eager_cells:.2f}x" if r["cells"] and eager_cells else "-"
            lines.append(f"| {r['contestant']} | {r['side'] or '-'} | {r['cells'] or '-'} | {ratio} | "
                         f"{len(r['tries'])} | {r['seconds']:.0f} | {r.get('error') or 'ok'} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    series = [r for r in rows if r["size"] in LATTICE_SERIES and r.get("status") == "ok"]
    if not series:  # e.g. a run of the `nca` size alone: nothing to draw
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r["contestant"] for r in series}):
        pts = [r for r in series if r["contestant"] == name]
        cells = [r["B"] * r["X"] * r["Y"] * r["Z"] for r in pts]
        ax_t.plot(cells, [r["forward_backward"]["median_s"] * 1e3 for r in pts], "o-", label=name)
        ax_m.plot(cells, [max(r.get("peak_bytes") or 0, 1) / 2**20 for r in pts], "o-", label=name)
    for ax, label in ((ax_t, "forward+backward (ms)"), (ax_m, "peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells in the batch (B x X x Y x Z), T=10")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _names(parser, option: str, text: str, choices: List[str], where: str = "") -> List[str]:
    """The comma-separated names of ``text``, each among ``choices`` and at least one; else a usage error."""
    try:
        return name_list(choices, option)(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{exc}{where}")


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m benchmarks", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the original size only, few repeats (~1 minute)")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="least timed runs per measure (default 10, quick 3)")
    parser.add_argument("--min-time", type=non_negative_float, default=None,
                        help="seconds of timed runs per measure, reached by running more than --repeats times "
                             "(at most 20x as many); default 2, quick 0.5")
    parser.add_argument("--contestants", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--sizes", default=None, help="comma-separated subset of size names (default: all; none: "
                                                      "no timed sizes, with --largest-lattice)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    search = parser.add_argument_group("largest lattice (the `nca` rule)")
    search.add_argument("--largest-lattice", action="store_true",
                        help="also search the largest cubic lattice that trains one step of the nca rule within "
                             "--lattice-limit-gib of address space, per contestant (a child process per try)")
    search.add_argument("--lattice-contestants", default="eager,kernel", help="comma-separated (default eager,kernel)")
    search.add_argument("--lattice-limit-gib", type=positive_float, default=16.0,
                        help="the address-space limit (default 16)")
    search.add_argument("--lattice-batch", type=positive_int, default=5, help="B (default 5)")
    search.add_argument("--lattice-steps", type=positive_int, default=64, help="T (default 64)")
    search.add_argument("--lattice-start", type=positive_int, default=16, help="the first side tried (default 16)")
    search.add_argument("--lattice-force", action="store_true",
                        help="search even if the machine has less memory available than the limit (a try may then "
                             "exhaust the machine's memory instead of its own limit)")
    args = parser.parse_args(argv)

    device = args.device
    repeats = args.repeats or (3 if args.quick else 10)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)
    names = contestant_names(device)
    if args.contestants is not None:
        wanted = _names(parser, "--contestants", args.contestants, names)
        names = [n for n in names if n in wanted]
    sizes = sizes_for(device, args.quick)
    if args.sizes is not None and args.sizes.strip() != "none":
        wanted = _names(parser, "--sizes", args.sizes, [s.name for s in sizes],
                        " with --quick" if args.quick else "")
        sizes = [s for s in sizes if s.name in wanted]
    elif args.sizes is not None:
        sizes = []
    if not sizes and not args.largest_lattice:
        parser.error("--sizes none times nothing: add --largest-lattice, or choose sizes")
    lattice_limit = int(args.lattice_limit_gib * GIB)
    if args.largest_lattice:
        known = set(contestant_names(torch.device("cpu")))
        args.lattice_contestants = ",".join(_names(parser, "--lattice-contestants", args.lattice_contestants,
                                                   sorted(known)))
        available = _available_memory()
        if available is not None and available < lattice_limit and not args.lattice_force:
            parser.error(f"the machine has {available / GIB:.1f} GiB of memory available, less than the "
                         f"{args.lattice_limit_gib:g} GiB limit: a try could exhaust the machine (and other "
                         f"processes) rather than its own limit; free memory, lower --lattice-limit-gib, or pass "
                         f"--lattice-force")

    machine = describe_machine(device)
    limits = machine_limits(device, quick=args.quick)
    rows = []
    for size in sizes:
        # Fresh contestants per size: torch.compile starts clean instead of reaching its recompile limit
        # (past which it silently runs eager).
        torch._dynamo.reset()
        contestants = contestants_for(size, device)
        for name in names:
            if name not in contestants:  # a contestant of another size's rule (conv3d has no `nca` form)
                continue
            row = measure(name, contestants[name], size, device, repeats, min_time)
            rows.append(row)
            shown = _ms(row["forward_backward"]["median_s"]) if row.get("status") == "ok" else row.get("status")
            print(f"{size.name:>12} {name:>14}: fwd+bwd {shown} ms", file=sys.stderr, flush=True)
    largest = None
    if args.largest_lattice:  # on the CPU, whatever --device: the limit is the process's address space
        began = time.perf_counter()
        largest = {"batch": args.lattice_batch, "steps": args.lattice_steps, "limit_bytes": lattice_limit,
                   "device": "cpu", "results": [
                       largest_lattice(name, batch=args.lattice_batch, steps=args.lattice_steps,
                                       limit_bytes=lattice_limit, start=args.lattice_start)
                       for name in args.lattice_contestants.split(",")]}
        largest["seconds"] = time.perf_counter() - began
    goals = targets(rows, device, limits, largest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = device.type + ("-quick" if args.quick else "")
    report = {"machine": machine, "limits": limits, "rows": rows, "targets": goals}
    if largest is not None:
        report["largest_lattice"] = largest
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(rows, goals, machine, limits, largest)
    (out / f"{stem}.md").write_text(table)
    plotted = plot(rows, out / f"{stem}.png", f"cubecore on {machine.get('gpu', machine['cpu'])}")
    print(table)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {out / (stem + '.png')}" if plotted else ""))
    return 0


def _available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
