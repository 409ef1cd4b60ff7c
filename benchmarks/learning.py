"""The learning study: cube variants against every floor, over several seeds, in one table.

    python -m benchmarks.learning [--group readout|rules] [--data chatterbot] [--seeds 42,1,2]
                                  [--out benchmarks/results/learning] [--variants a,b,...]
                                  [--set "max_samples=64000 epochs=10"]

Each variant is ``python -m cubecore.train --seeds ...`` with a few overrides (the defaults otherwise).  Two
groups: ``readout`` (the readout, global channels, placement, steps and losses) and ``rules`` (the levers of the
NCA rule family: neighbourhood, depthwise perception, depth, fire rate, state size, steps, with and without global
channels, and the retrieval losses).  The table gives mean ± standard deviation over the seeds of cosine, R@1, R@10
and MRR, the cube's seconds per epoch and the variant's minutes in all (every seed, its floors included), and below
it the floors (identity, mean, offset, ridge, and the mlp and linear floors trained with each variant's loss);
then, seed by seed, the paired differences of each variant against every floor and against its base variant (the
same split: the seed also draws the validation split, so the floors move with it).  ``--set`` gives overrides
that every variant shares (a larger data set's size and epochs); a key that a variant sets itself is refused.
Writes ``<out>/<data>.md`` and ``.json`` (group ``readout``) or ``<out>/<data>-<group>.md`` and ``.json``, with
the machine named; each run's own files stay in ``<out>/<data>/<variant>``.  The ``.json``'s ``notes`` (a list of
strings) hold what its figures do not say: how and where each part was measured, what was rerun, what shared the
machine.  The study writes none itself, and keeps those of a file it adds variants to; docs/learning.md, the
results page, leaves that history to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

from cubecore.atomic import atomic_write_text
from cubecore.cli import CommandParser, seed_list
from cubecore.errors import CubecoreError
from cubecore.train import main as train_main
from cubecore.training.config import TrainingConfig, parse_override
from cubecore.training.metrics import RETRIEVAL_RULE
from cubecore.training.rundir import LockHeld, take_lock

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

# The NCA rule family's levers (docs/rules.md), each against the default rule (von Neumann, concat, one hidden
# layer of 32, fire rate 1, state 8, 4 steps), with global channels (the default, g8) and without (g0).  Every
# variant names its rule keys that differ from the base, and every key that the readout depends on.
LEVERS: Dict[str, List[str]] = {
    "": [],
    " moore": ["neighbourhood=moore"],
    " depthwise F=1": ["perception=depthwise", "perception_filters=1"],
    " depthwise F=3": ["perception=depthwise", "perception_filters=3"],
    " 2 hidden": ["hidden_layers=2"],
    " fire 0.5": ["fire_rate=0.5"],
    " state 16": ["state_size=16"],
    " state 32": ["state_size=32"],
}
GLOBALS = {"g8": ["readout_skip=true", "global_channels=8"], "g0": ["readout_skip=true", "global_channels=0"]}
COSINE_INFONCE = ["infonce_weight=0.3", "select_by=val_mrr"]
RULE_VARIANTS: Dict[str, List[str]] = {f"{g}{lever}": [*GLOBALS[g], *keys] for g in GLOBALS for lever, keys in
                                       LEVERS.items()}
# Steps 1, 8 and 16 (4 is the default), with and without global channels, for the rule closest to the floors on
# each data set (docs/learning.md): on chatterbot no lever beat the default rule, so the default rule's; on chitchat
# 16 state channels were ahead of it in every seed, so theirs too.
for _base in ("g8", "g0", "g8 state 16", "g0 state 16"):
    for _steps in (1, 8, 16):
        RULE_VARIANTS[f"{_base} steps={_steps}"] = [*RULE_VARIANTS[_base], f"steps={_steps}"]
# Retrieval: cosine + InfoNCE, each against the linear and mlp floors trained with that loss.
for _base in ("g8", "g0"):
    RULE_VARIANTS[f"{_base} cosine+infonce"] = [*RULE_VARIANTS[_base], *COSINE_INFONCE]

GROUPS = {"readout": VARIANTS, "rules": RULE_VARIANTS}
METRICS = ("cosine", "r@1", "r@10", "mrr")
FLOORS = ("identity", "mean", "offset", "ridge", "mlp", "linear")


def base_of(name: str, variants: Dict[str, List[str]]) -> Optional[str]:
    """The variant that ``name`` is compared with seed by seed: the same without its last lever (the rules group:
    ``g8 moore steps=8`` against ``g8 moore``, ``g8 moore`` against ``g8``, ``g8 moore cosine+infonce`` against
    ``g8 cosine+infonce``); None for a base itself or a variant of the readout group."""
    if variants is not RULE_VARIANTS or name in GLOBALS:
        return None
    g, rest = name.split(" ", 1)
    for loss in (" cosine+infonce", " infonce"):
        if name.endswith(loss):
            if rest == loss.strip():
                return None
            return g + loss
    if " steps=" in name:
        return name.rsplit(" steps=", 1)[0]
    return g


def machine() -> str:
    """The CPU's model name, its cores and the vector extensions the build uses, as this machine reports them."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {vector}"


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
    per_seed = {str(s): json.loads((folder / f"seed-{s}" / "results.json").read_text()) for s in seeds}
    info = per_seed[str(seeds[0])]
    parameters = int(info["mlp"]["parameters"]) if "mlp" in info else None
    cube_seconds = [cube_seconds_per_epoch(folder / f"seed-{s}" / "train.log") for s in seeds]
    known = [t for t in cube_seconds if t is not None]
    return {"overrides": overrides, "summary": summary, "seconds_per_epoch": seconds / sum(epochs),
            "cube_seconds_per_epoch": sum(known) / len(known) if known else None, "seconds": seconds,
            "epochs": epochs, "mlp_parameters": parameters,
            "per_seed": {s: {m: {k: r[m][k] for k in (*METRICS, "parameters", "epoch") if k in r[m]} for m in r}
                         for s, r in per_seed.items()}}


def cube_seconds_per_epoch(log: Path) -> Optional[float]:
    """The cube's own seconds per epoch (its validation included, the floors not): from the time of the run's
    line that counts the pairs to that of its last epoch line, over the epochs, by the run's train.log."""
    if not log.is_file():
        return None
    stamp = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    start, last, count = None, None, 0
    for line in log.read_text().splitlines():
        if "training pairs" in line and " INFO " in line:
            start, last, count = stamp(line), None, 0  # a resumed run's log holds the earlier start too
        elif " INFO epoch " in line and start is not None:
            last, count = stamp(line), count + 1
    if start is None or last is None:
        return None
    return (last - start).total_seconds() / count


def table(results: Dict[str, Dict], data: str, seeds: List[int], shared: List[str],
          where: Optional[str] = None, variants: Optional[Dict[str, List[str]]] = None) -> str:
    cells = lambda m: " | ".join(f"{m[k][0]:.4f} ± {m[k][1]:.4f}" for k in METRICS)  # noqa: E731
    every = f" Every run: `{' '.join(shared)}`." if shared else ""
    measured = f" Measured on {where}." if where else ""
    lines = [f"Data `{data}`, seeds {', '.join(map(str, seeds))}: mean ± standard deviation over the seeds.{every}"
             f"{measured}",
             "The cube's seconds per epoch (its validation included; where not recorded, the whole variant's time "
             "over its epochs, the floors' training included), and the variant's minutes in all (every seed, the "
             "floors included). R@1, R@10 and MRR rank each prediction's answer among the distinct validation "
             "answers (docs/training.md).", "",
             "| model | overrides | " + " | ".join(METRICS) + " | s / epoch | min |", "|---|---|" + "---:|" * 6]
    for name, r in results.items():
        per_epoch = r.get("cube_seconds_per_epoch") or r["seconds_per_epoch"]
        minutes = f"{r['seconds'] / 60:.1f}" if "seconds" in r else ""
        lines.append(f"| cube {name} | {' '.join(r['overrides']) or '(defaults)'} | {cells(r['summary']['cube'])} "
                     f"| {per_epoch:.2f} | {minutes} |")
    first = next(iter(results.values()))["summary"]
    for floor in ("identity", "mean", "offset", "ridge"):
        lines.append(f"| {floor} | | {cells(first[floor])} | | |")
    for floor in ("mlp", "linear"):
        shown = []
        for name, r in results.items():  # one row per distinct trained floor (its loss and parameter count)
            if floor not in r["summary"] or r["summary"][floor] in shown:
                continue
            shown.append(r["summary"][floor])
            size = (f"{r['mlp_parameters']} parameters" if floor == "mlp" else
                    f"{_parameters(r, 'linear')} parameters")
            lines.append(f"| {floor} (as trained for {name}) | {size} | {cells(r['summary'][floor])} | | |")
    if any("per_seed" in r for r in results.values()):
        lines += ["", paired_tables(results, seeds, variants or {})]
    return "\n".join(lines)


def _parameters(result: Dict, model: str) -> str:
    per_seed = result.get("per_seed")
    if not per_seed:
        return "?"
    value = next(iter(per_seed.values())).get(model, {}).get("parameters")
    return "?" if value is None else str(int(value))


def paired(result: Dict, other: Dict, seeds: List[int], metric: str, model: str = "cube",
           other_model: str = "cube") -> List[float]:
    """Seed by seed, ``model``'s metric in ``result`` minus ``other_model``'s in ``other`` (the same split)."""
    return [result["per_seed"][str(s)][model][metric] - other["per_seed"][str(s)][other_model][metric] for s in seeds]


def _cell(diffs: List[float]) -> str:
    ahead = sum(d > 0 for d in diffs)
    return " / ".join(f"{d:+.4f}" for d in diffs) + f" ({ahead}/{len(diffs)})"


def paired_tables(results: Dict[str, Dict], seeds: List[int], variants: Dict[str, List[str]]) -> str:
    """The cube minus each floor, and minus its base variant, seed by seed, on each metric."""
    seeds_text = " / ".join(map(str, seeds))
    lines = [f"Paired differences, seed by seed ({seeds_text}): the cube minus the floor on the same split, and "
             "in brackets the seeds where the cube is ahead. The mlp and linear floors are those trained with the "
             "variant's own loss."]
    for metric in ("cosine", "mrr", "r@1", "r@10"):
        lines += ["", f"**{metric}**, cube minus floor:", "", "| variant | " + " | ".join(FLOORS) + " |",
                  "|---|" + "---|" * len(FLOORS)]
        for name, r in results.items():
            if "per_seed" not in r:
                continue
            row = [_cell(paired(r, r, seeds, metric, other_model=f)) if f in r["per_seed"][str(seeds[0])] else ""
                   for f in FLOORS]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    based = [(name, base_of(name, variants)) for name in results]
    based = [(name, base) for name, base in based if base is not None and base in results
             and "per_seed" in results[base]]
    if based:
        lines += ["", "The variant minus its base variant (the same settings without the variant's last lever), "
                  "seed by seed:", "", "| variant | base | " + " | ".join(METRICS) + " | s / epoch, ratio |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]
        for name, base in based:
            r, b = results[name], results[base]
            ratio = ((r.get("cube_seconds_per_epoch") or r["seconds_per_epoch"])
                     / (b.get("cube_seconds_per_epoch") or b["seconds_per_epoch"]))
            lines.append(f"| {name} | {base} | " + " | ".join(_cell(paired(r, b, seeds, m)) for m in METRICS)
                         + f" | {ratio:.2f} |")
    return "\n".join(lines)


def step_costs(names: List[str], variants: Dict[str, List[str]], rounds: int = 7, steps: int = 10,
               batch: int = 32, dim: int = 384) -> Dict[str, float]:
    """Milliseconds per training step (forward, backward and AdamW update of a batch of ``batch`` random
    embeddings) of each variant's model, the median over ``rounds`` rounds that take the variants in turn, so that
    the ratios hold on a machine that other work slows down unevenly.  Each turn begins with one untimed step: the
    first step after another model's pays for caches that training never empties."""
    import torch
    import torch.nn.functional as F

    from cubecore import EmbeddingProcessor

    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    y = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    models = {}
    for name in names:
        config = TrainingConfig().override(**dict(parse_override(o) for o in variants[name]))
        torch.manual_seed(0)
        model = EmbeddingProcessor(dim, config.model)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    def step(model, optimizer):
        loss = 1 - F.cosine_similarity(model(x), y, dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            step(model, optimizer)
            start = time.perf_counter()
            for _ in range(steps):
                step(model, optimizer)
            times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def cost_table(costs: Dict[str, float], variants: Dict[str, List[str]], where: str) -> str:
    first = next(iter(costs))
    lines = [f"Cost of a training step (batch 32, forward, backward and update; the median of rounds that take the "
             f"variants in turn), measured on {where}. The ratio is against `{first}`.", "",
             "| variant | overrides | ms / step | ratio |", "|---|---|---:|---:|"]
    for name, ms in costs.items():
        lines.append(f"| {name} | {' '.join(variants[name])} | {ms:.1f} | {ms / costs[first]:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = CommandParser(prog="python -m benchmarks.learning", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default="readout", choices=sorted(GROUPS), help="which study (default: readout)")
    p.add_argument("--data", default="chatterbot")
    p.add_argument("--seeds", type=seed_list, default="42,1,2", help="comma-separated ints (default 42,1,2)")
    p.add_argument("--variants", default="", help="a subset of the group's variants, comma-separated (default: all)")
    p.add_argument("--out", default="benchmarks/results/learning")
    p.add_argument("--set", default="", help="key=value overrides every variant shares, space-separated")
    p.add_argument("--cost", action="store_true", help="only time a training step of each variant's model, "
                   "interleaved, and write <out>/<data>[-<group>]-cost.md")
    args = p.parse_args(argv)
    seeds = args.seeds
    variants = GROUPS[args.group]
    names = [v for v in args.variants.split(",") if v] or list(variants)
    unknown = [v for v in names if v not in variants]
    if unknown:
        p.error(f"unknown variants {unknown} in group {args.group}; known: {list(variants)}")
    out = Path(args.out)
    data_stem = Path(args.data).stem
    stem = data_stem if args.group == "readout" else f"{data_stem}-{args.group}"
    shared = args.set.split()
    keys = lambda overrides: {o.split("=", 1)[0] for o in overrides}  # noqa: E731
    clash = sorted(keys(shared) & set().union(*(keys(variants[n]) for n in names)))
    if clash:
        p.error(f"--set {clash}: the variants set these themselves (a variant's value would win)")
    try:  # each variant's configuration, through the run's own parsing and checks, before anything trains
        for name in names:
            TrainingConfig().override(**dict(parse_override(o) for o in [*variants[name], *shared]))
    except CubecoreError as e:
        p.error(f"--set: {e}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {out}: cannot make that folder ({e.strerror})")
    if args.cost:
        text = cost_table(step_costs(names, variants), variants, machine())
        atomic_write_text(out / f"{stem}-cost.md", text + "\n")
        print(text)
        return 0
    with contextlib.ExitStack() as held:
        # One study at a time writes a results file (each reads it at its start and writes it after each variant,
        # so two at once would drop each other's variants); the lock goes with the process.
        lock = out / f"{stem}.lock"
        existed = lock.exists()
        try:
            held.callback(os.close, take_lock(lock))
        except LockHeld as holder:
            p.error(f"{out / stem}.json is being written by another study{holder.by}; wait for it to end, or "
                    f"choose another --out")
        except OSError as e:
            p.error(f"--out {out}: cannot write there ({e.strerror})")
        if not existed:  # callbacks run last first: the file goes while the lock is still held
            held.callback(lock.unlink, missing_ok=True)
        # Variants measured before (the same seeds, shared overrides, machine and retrieval rule) stay in the
        # table: a study can run in parts.  A file measured another way is never replaced by a part of a new study.
        results, notes, where = {}, [], machine()
        saved = out / f"{stem}.json"
        if saved.is_file():
            before = json.loads(saved.read_text())
            now = {"seeds": seeds, "shared": shared, "machine": where, "retrieval": RETRIEVAL_RULE}
            differ = [key for key, value in now.items() if not isinstance(before, dict) or before.get(key) != value]
            if differ:
                p.error(f"{saved} holds a study measured with other {', '.join(differ)}; a study in parts must be "
                        f"measured one way: move that file (and its .md) away, or choose another --out")
            results, notes = before["results"], before.get("notes", [])
        for name in names:
            results[name] = run_variant(name, variants[name], args.data, seeds, out / data_stem, shared)
            print(f"{name}: {results[name]['seconds'] / 60:.1f} min", flush=True)
            results = {n: results[n] for n in variants if n in results}  # in the group's order
            text = table(results, args.data, seeds, shared, where=where, variants=variants)
            atomic_write_text(out / f"{stem}.md", text + "\n")  # a Ctrl-C or kill mid-write leaves the last pair
            atomic_write_text(saved, json.dumps({"machine": where, "seeds": seeds, "shared": shared,
                                                 "retrieval": RETRIEVAL_RULE, "notes": notes, "results": results},
                                                indent=2))
    print(text)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
