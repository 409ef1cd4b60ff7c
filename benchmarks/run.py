"""Run the whole benchmark matrix on this machine: a Markdown table of ratios to `kernel`, JSON with the
machine's description, and a PNG of time and memory against lattice size.

    python -m benchmarks [--quick] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .contestants import all_contestants
from .harness import Size, describe_machine, machine_limits, measure

LATTICE_SERIES = ("original", "16^3", "32^3", "64^3")


def sizes_for(device: torch.device, quick: bool) -> List[Size]:
    original = Size("original", 32, 8, 8, 12)
    if quick:
        return [original]
    gpu = device.type == "cuda"
    return [
        original,
        Size("large-state", 32, 8, 8, 12, S=16, H=64),
        Size("16^3", 32 if gpu else 8, 16, 16, 16),
        Size("32^3", 8 if gpu else 2, 32, 32, 32),
        Size("64^3", 2 if gpu else 1, 64, 64, 64),
        Size("T=1", 32, 8, 8, 12, T=1),
        Size("T=50", 32, 8, 8, 12, T=50),
    ]


def _row(rows, size: str, contestant: str) -> Optional[Dict]:
    for r in rows:
        if r["size"] == size and r["contestant"] == contestant and r.get("status") == "ok":
            return r
    return None


def _fb(r: Optional[Dict]) -> Optional[float]:
    return r["forward_backward"]["median_s"] if r else None


def targets(rows: List[Dict], device: torch.device, limits: Dict[str, float]) -> List[Dict]:
    """The suite's goals, each with the measured ratio (None where a contestant could not be measured)."""
    out = []

    def ratio_target(name, size, others, goal, what="forward+backward time"):
        kern = _fb(_row(rows, size, "kernel"))
        times = [t for t in (_fb(_row(rows, size, o)) for o in others) if t]
        value = min(times) / kern if kern and times else None
        out.append({"target": name, "goal": goal, "measured": value, "met": value is not None and value >= goal,
                    "what": f"best of {', '.join(others)} / kernel, {what}, size {size}"})

    def smallest_over_sizes(name, goal, value_of, what):
        """The worst size's value of value_of(size) (None where a size lacks the rows it needs)."""
        values = {r["size"]: value_of(r["size"]) for r in rows if r["contestant"] == "kernel"}
        known = {k: v for k, v in values.items() if v is not None}
        worst = min(known, key=known.get) if known else None
        value = known[worst] if known and len(known) == len(values) else None
        out.append({"target": name, "goal": goal, "measured": value, "met": value is not None and value >= goal,
                    "what": f"{what}, the smallest over sizes ({worst})"})

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
        out.append({"target": "GPU 64^3: >= 0.5 of roofline", "goal": 0.5, "measured": frac,
                    "met": frac is not None and frac >= 0.5,
                    "what": "kernel executed FLOP/s / measured float32 matmul FLOP/s (TF32 off), size 64^3"})
    k, e = _row(rows, "original", "kernel"), _row(rows, "original", "eager")
    mem = e["peak_bytes"] / k["peak_bytes"] if k and e and k.get("peak_bytes") else None
    out.append({"target": "peak memory T=10: kernel <= 1/5 eager", "goal": 5.0, "measured": mem,
                "met": mem is not None and mem >= 5.0, "what": "eager / kernel peak memory, size original"})
    return out


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown(rows: List[Dict], goals: List[Dict], machine: Dict, limits: Dict) -> str:
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
            f"{mem_ratio} | {r['cell_updates_per_s']:.3g} | {r['first_call_s']:.1f} | ok |"
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
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r["contestant"] for r in rows}):
        pts = [r for r in rows if r["contestant"] == name and r["size"] in LATTICE_SERIES and r.get("status") == "ok"]
        if not pts:
            continue
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the original size only, few repeats (~1 minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="least timed runs per measure (default 10, quick 3)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed runs per measure, reached by running more than --repeats times "
                             "(at most 20x as many); default 2, quick 0.5")
    parser.add_argument("--contestants", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--sizes", default=None, help="comma-separated subset of size names (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, Markdown and PNG")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 2.0)
    names = list(all_contestants(device))
    if args.contestants:
        wanted = args.contestants.split(",")
        unknown = set(wanted) - set(names)
        if unknown:
            parser.error(f"unknown contestants {sorted(unknown)}; choose from {sorted(names)}")
        names = [n for n in names if n in wanted]
    sizes = sizes_for(device, args.quick)
    if args.sizes:
        sizes = [s for s in sizes if s.name in args.sizes.split(",")]

    machine = describe_machine(device)
    limits = machine_limits(device, quick=args.quick)
    rows = []
    for size in sizes:
        # Fresh contestants per size: torch.compile starts clean instead of reaching its recompile limit
        # (past which it silently runs eager).
        torch._dynamo.reset()
        contestants = all_contestants(device)
        for name in names:
            row = measure(name, contestants[name], size, device, repeats, min_time)
            rows.append(row)
            shown = _ms(row["forward_backward"]["median_s"]) if row.get("status") == "ok" else row.get("status")
            print(f"{size.name:>12} {name:>14}: fwd+bwd {shown} ms", file=sys.stderr, flush=True)
    goals = targets(rows, device, limits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = device.type + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "limits": limits, "rows": rows, "targets": goals}, indent=2, default=str))
    table = markdown(rows, goals, machine, limits)
    (out / f"{stem}.md").write_text(table)
    plotted = plot(rows, out / f"{stem}.png", f"cubecore on {machine.get('gpu', machine['cpu'])}")
    print(table)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {out / (stem + '.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
