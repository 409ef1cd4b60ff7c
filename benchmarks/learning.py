"""The learning study: cube variants against every floor, over several seeds, in one table.

    python -m benchmarks.learning [--data chatterbot] [--seeds 42,1,2] [--out benchmarks/results/learning]
                                  [--variants default,infonce,...] [--set "max_samples=64000 epochs=10"]

Each variant is ``python -m cubecore.train --seeds ...`` with a few overrides (the defaults otherwise); the table
gives mean ± standard deviation over the seeds of cosine, R@1, R@10 and MRR, the parameter count and the seconds
per epoch, and below it the floors (identity, mean, offset, ridge, and the mlp matched to each variant's
parameters).  ``--set`` gives overrides that every variant shares (a larger data set's size and epochs); a key
that a variant sets itself is refused.  Writes ``<out>/<data>.md`` and ``.json``; each run's own files stay in
``<out>/<data>/<variant>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

from cubecore.train import main as train_main

# Every variant names readout_skip and global_channels, so that the table does not depend on the defaults of
# the day.
VARIANTS: Dict[str, List[str]] = {
    "plain": ["readout_skip=false", "global_channels=0"],
    "plain infonce": ["readout_skip=false", "global_channels=0", "loss_function=infonce", "select_by=val_mrr"],
    "plain cosine+infonce": ["readout_skip=false", "global_channels=0", "infonce_weight=0.3", "select_by=val_mrr"],
    "plain steps=1": ["readout_skip=false", "global_channels=0", "steps=1"],
    "plain steps=8": ["readout_skip=false", "global_channels=0", "steps=8"],
    "skip": ["readout_skip=true", "global_channels=0"],
    "skip+pos4": ["readout_skip=true", "global_channels=0", "position_channels=4"],
    "skip+cosine+infonce": ["readout_skip=true", "global_channels=0", "infonce_weight=0.3", "select_by=val_mrr"],
    "skip steps=1": ["readout_skip=true", "global_channels=0", "steps=1"],
    "skip steps=2": ["readout_skip=true", "global_channels=0", "steps=2"],
    "skip steps=8": ["readout_skip=true", "global_channels=0", "steps=8"],
    "skip steps=16": ["readout_skip=true", "global_channels=0", "steps=16"],
    "skip semantic": ["readout_skip=true", "global_channels=0", "reshaping_method=semantic"],
    "skip adaptive": ["readout_skip=true", "global_channels=0", "reshaping_method=adaptive"],
    "skip global8": ["readout_skip=true", "global_channels=8"],
    "skip global8 steps=1": ["readout_skip=true", "global_channels=8", "steps=1"],
    "skip global8 steps=2": ["readout_skip=true", "global_channels=8", "steps=2"],
    "skip global8 steps=8": ["readout_skip=true", "global_channels=8", "steps=8"],
    "skip global8 steps=16": ["readout_skip=true", "global_channels=8", "steps=16"],
    "skip global8 semantic": ["readout_skip=true", "global_channels=8", "reshaping_method=semantic"],
    "skip global8+cosine+infonce": ["readout_skip=true", "global_channels=8", "infonce_weight=0.3",
                                    "select_by=val_mrr"],
    "skip projection": ["readout_skip=true", "global_channels=0", "reshaping_method=projection"],
    "skip projection steps=1": ["readout_skip=true", "global_channels=0", "reshaping_method=projection", "steps=1"],
    "skip projection+cosine+infonce": ["readout_skip=true", "global_channels=0", "reshaping_method=projection",
                                       "infonce_weight=0.3", "select_by=val_mrr"],
}
METRICS = ("cosine", "r@1", "r@10", "mrr")


def run_variant(name: str, overrides: List[str], data: str, seeds: List[int], out: Path,
                shared: List[str]) -> Dict:
    folder = out / name
    start = time.perf_counter()
    status = train_main(["--data", data, "--output-dir", str(folder), "--seeds", ",".join(map(str, seeds)),
                         "--overwrite", "--quiet", *shared, *overrides])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"variant {name} failed with status {status}")
    summary = json.loads((folder / "seeds.json").read_text())["summary"]
    epochs = [len((folder / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()) for s in seeds]
    info = json.loads((folder / f"seed-{seeds[0]}" / "results.json").read_text())
    parameters = int(info["mlp"]["parameters"]) if "mlp" in info else None
    return {"overrides": overrides, "summary": summary, "seconds_per_epoch": seconds / sum(epochs),
            "epochs": epochs, "mlp_parameters": parameters}


def table(results: Dict[str, Dict], data: str, seeds: List[int], shared: List[str]) -> str:
    cells = lambda m: " | ".join(f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in METRICS)  # noqa: E731
    every = f" Every run: `{' '.join(shared)}`." if shared else ""
    lines = [f"Data `{data}`, seeds {', '.join(map(str, seeds))}: mean ± standard deviation over the seeds.{every}",
             "Seconds per epoch include the floors' fitting and the mlp floor's training.", "",
             "| model | overrides | " + " | ".join(METRICS) + " | s / epoch |", "|---|---|" + "---:|" * 5]
    for name, r in results.items():
        lines.append(f"| cube {name} | {' '.join(r['overrides']) or '(defaults)'} | {cells(r['summary']['cube'])} "
                     f"| {r['seconds_per_epoch']:.2f} |")
    first = next(iter(results.values()))["summary"]
    for floor in ("identity", "mean", "offset", "ridge"):
        lines.append(f"| {floor} | | {cells(first[floor])} | |")
    shown = []
    for name, r in results.items():  # one row per distinct mlp floor (its loss and parameter count)
        if r["summary"]["mlp"] in shown:
            continue
        shown.append(r["summary"]["mlp"])
        lines.append(f"| mlp (as trained for {name}) | {r['mlp_parameters']} parameters | {cells(r['summary']['mlp'])} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="chatterbot")
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--out", default="benchmarks/results/learning")
    p.add_argument("--set", default="", help="key=value overrides every variant shares, space-separated")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out)
    stem = Path(args.data).stem
    shared = args.set.split()
    keys = lambda overrides: {o.split("=", 1)[0] for o in overrides}  # noqa: E731
    clash = sorted(keys(shared) & set().union(*(keys(VARIANTS[n]) for n in names)))
    if clash:
        p.error(f"--set {clash}: the variants set these themselves (a variant's value would win)")
    results = {name: run_variant(name, VARIANTS[name], args.data, seeds, out / stem, shared) for name in names}
    text = table(results, args.data, seeds, shared)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
