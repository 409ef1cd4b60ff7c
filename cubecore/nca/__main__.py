"""`python -m cubecore.nca`: train a 3D neural cellular automaton to grow a voxel structure from one cell.

With no arguments: the shipped tree (a trunk and a crown, 55 voxels) in an 8x8x8 lattice, by the recipe of the
published 3D NCAs (Sudhakaran et al. 2021, real-itu/3d-artefacts-nca); a few minutes on a 2-core CPU.
--target FILE trains on your structure (.npy block types or RGBA, MagicaVoxel .vox, Minecraft .nbt) or on a
shipped one by name (plain_village_house, villages_light, caterpillar_short, desert_village_house, ball, tree,
tree_rgba).  The run's files (config.yaml, metrics, last.pt, report.md, results.json, curves.png, grown.png,
rollout.gif, train.log) go to --output-dir, with the same protections as python -m cubecore.train: a fresh run
refuses a folder that holds another run unless --overwrite (which replaces only a cubecore run, once the new run
has saved its first checkpoint), Ctrl-C or SIGTERM keep last.pt, and --resume continues from it exactly as if
never interrupted.
Settings: --config FILE (a YAML file with an 'nca_training:' section) and key=value overrides (nca.batch_size=8,
or batch_size=8 where the key names one field); see config/nca_training.yaml for every key.

Examples:
  python -m cubecore.nca
  python -m cubecore.nca --target plain_village_house --lattice 10x10x10 iterations=2000
  python -m cubecore.nca --target house.vox nca.damage=true     # learn to regenerate too
  python -m cubecore.nca --resume                               # continue runs/nca/last.pt
  python -m cubecore.nca --seeds 0,1,2                          # one run per seed, mean and spread
  python -m cubecore.nca model.backend=reference                # the plain-PyTorch rule instead of the kernel
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..atomic import atomic_write_text
from ..cli import CommandParser, log_to_file, run_command, seed_list, setup_logging
from ..errors import InvalidValueError
from ..ops.front import BACKENDS
from ..training.checkpoint import load_checkpoint_file
from ..training.config import parse_override
from ..training.report import write_metrics
from ..training.rundir import RunDirectory, RunDirectoryError, RunFiles, check_not_foreign
from ..training.tracking import TensorBoardTracker
from ..training.viz import rollout_gif
from .config import NcaTrainingConfig, small_run
from .report import METRIC_FIELDS, markdown_report, plot_curves, plot_voxels, results_table, shown
from .trainer import NcaTrainer

log = logging.getLogger("cubecore")

# Keys that may change when a run is resumed: where and how it runs and when it stops, not what it computes.
RESUMABLE_KEYS = ("iterations", "output_dir", "device", "model.backend", "checkpoint_every", "loss_threshold",
                  "logger")
STOP_KEYS = ("iterations", "loss_threshold")  # a finished run trains on only when one of these changes
STUDY_FREE_KEYS = ("output_dir", "device", "model.backend", "checkpoint_every", "logger")
OUTPUTS = ("curves", "rollout", "picture", "report", "results")  # what the report phase writes, results last
FLAG_KEYS = {"target": "nca.target", "lattice": "nca.lattice", "iterations": "iterations", "device": "device",
             "backend": "model.backend", "output_dir": "output_dir"}


def _lattice(text: str):
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"lattice must be XxYxZ (e.g. 10x10x10), got {text!r}")
    return [int(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m cubecore.nca", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with an 'nca_training:' section (default: config/nca_training.yaml's "
                                    "values, built in)")
    p.add_argument("--target", help="a structure file (.npy, .vox, .nbt) or a shipped structure's name "
                                    "(nca.target)")
    p.add_argument("--lattice", type=_lattice, help="XxYxZ: the lattice the structure is placed in (nca.lattice; "
                                                    "default the upstream's cube)")
    p.add_argument("--iterations", type=int, help="iterations to train (with --resume: the new total)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=BACKENDS, help="model.backend")
    p.add_argument("--output-dir", help="where the run's files go (default runs/nca; with --resume CHECKPOINT, the "
                                        "checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue a run: a checkpoint path, or nothing for OUTPUT_DIR/last.pt; with --seeds (no "
                        "path): go on with the study in OUTPUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the cubecore run already in --output-dir "
                                                            "(kept aside until this run's first checkpoint)")
    p.add_argument("--seeds", type=seed_list, help="comma-separated seeds, e.g. 0,1,2: one run per seed in "
                                                "OUTPUT_DIR/seed-N, then each metric's mean and spread (seeds.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-checkpoint lines on the "
                                                        "console (train.log keeps them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. nca.damage=true "
                                                                     "learning_rate=2e-3")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between flags
    setup_logging(quiet=args.quiet)
    return run_command(lambda: _main(args))


def _main(args) -> int:
    if args.resume is not None and args.overwrite:
        raise InvalidValueError("--overwrite and --resume exclude each other: resume continues the run, overwrite "
                                "replaces it")
    if args.seeds:
        return _main_seeds(args)
    if args.resume is not None:
        trainer, out, source, done = resumed_trainer(args)
        if done:
            log.info(done)
            return 0
        # into the checkpoint's own folder: that run goes on; into another: a copy, which replaces no run there
        mode = "resume" if source.parent.resolve() == out.resolve() else "fresh"
        return run(trainer, out, source, mode, args.quiet)
    trainer = NcaTrainer(config_from_args(args))
    return run(trainer, Path(trainer.config.output_dir), None, "overwrite" if args.overwrite else "fresh", args.quiet)


# -- settings -------------------------------------------------------------------------------------------------


def given_values(args) -> Dict[str, object]:
    """The settings given on the command line (flags and key=value overrides), by full config key; a key given as
    a flag and as an override with different values is an error (of repeated overrides, the last counts)."""
    values, given_as = {}, {}
    for flag, key in FLAG_KEYS.items():
        if getattr(args, flag) is not None:
            values[key], given_as[key] = getattr(args, flag), f"--{flag.replace('_', '-')}"
    for item in args.overrides:
        key, value = parse_override(item)
        full = NcaTrainingConfig.resolve_key(key)
        if full in given_as and given_as[full].startswith("--") and values[full] != value:
            raise InvalidValueError(f"{full} is given twice, as {given_as[full]} and as {item}: give it once")
        values[full], given_as[full] = value, item
    target = values.get("nca.target")
    if isinstance(target, str) and Path(target).is_file():  # a file by its absolute path: resumable anywhere
        values["nca.target"] = str(Path(target).resolve())
    return values


def config_from_args(args) -> NcaTrainingConfig:
    config = NcaTrainingConfig.from_yaml(args.config) if args.config else small_run()
    values = given_values(args)
    return config.override(**values) if values else config


def resumed_trainer(args) -> Tuple[NcaTrainer, Path, Path, Optional[str]]:
    """The trainer of the checkpoint --resume names, with the keys that may change applied; the folder to write
    to; the checkpoint; and a message where the run is finished and asked nothing new."""
    if args.config:
        raise InvalidValueError("--config cannot be combined with --resume: the run's settings come from its "
                                "checkpoint")
    values = given_values(args)
    default_dir = Path(values.get("output_dir") or NcaTrainingConfig().output_dir)
    checkpoint = Path(args.resume) if args.resume else RunFiles(default_dir).last
    out = Path(values["output_dir"]) if "output_dir" in values else (checkpoint.parent if args.resume
                                                                    else default_dir)
    trainer = NcaTrainer.from_checkpoint(checkpoint, device=values.get("device"))
    config = trainer.config
    values = {**values, "output_dir": str(out)}
    changed = sorted(k for k, v in values.items() if config.override(**{k: v}).get(k) != config.get(k))
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise InvalidValueError(f"cannot change {refused} when resuming {checkpoint} (the run's results depend on "
                                f"them); keys that may change on resume: {list(RESUMABLE_KEYS)}")
    trainer.config = config.override(**{k: v for k, v in values.items() if k in RESUMABLE_KEYS})
    if trainer.finished is not None and not any(k in STOP_KEYS for k in changed):
        if RunFiles(out).missing_outputs(OUTPUTS):  # stopped while reporting: report again
            return trainer, out, checkpoint, None
        return trainer, out, checkpoint, (
            f"{checkpoint} is a finished run ({trainer.finished}, after iteration {trainer.iteration}) and {out} "
            f"holds its report; nothing to do. To train it further, add --iterations N with N > "
            f"{trainer.iteration} (the new total), or change loss_threshold.")
    if trainer.config.iterations <= trainer.iteration:
        raise InvalidValueError(f"iterations {trainer.config.iterations} is not more than the {trainer.iteration} "
                                f"iterations {checkpoint} has trained; with --resume, --iterations is the new total")
    trainer.finished = None
    return trainer, out, checkpoint, None


# -- one run --------------------------------------------------------------------------------------------------


def _plan(trainer: NcaTrainer, out: Path, source: Optional[Path]) -> str:
    c, t = trainer.config, trainer.target
    what = (f"resuming {source} after iteration {trainer.iteration}" if source is not None and trainer.iteration
            else "training")
    kind = (f"{len(t.names) - 1} block types" if t.kind == "blocks" else "RGBA")
    return (f"{what}: {t.source} ({int(t.occupied.sum())} voxels, {kind}) in a "
            f"{'x'.join(map(str, c.model.lattice_size))} lattice, state {c.model.state_size}, "
            f"{c.nca.min_steps}-{c.nca.max_steps} steps, batch {c.nca.batch_size}; up to {c.iterations} iterations "
            f"on {trainer.device} ({trainer.core.active_backend()} backend); writing to {out}")


def interrupted_message(files: RunFiles, source: Optional[Path], hint: Optional[str], replaced: bool) -> str:
    if files.last.is_file():
        saved = load_checkpoint_file(files.last)["iteration"]
        return (f"interrupted; {files.last} holds iteration {saved} (what came after it is not saved): continue "
                f"with {hint or f'--resume {files.last}'}")
    if source is not None:
        return f"interrupted; nothing was saved in {files.root}: resume again from {source}, which is unchanged"
    kept = "the run it was to replace is kept there" if replaced else "it is left as it was before this run"
    return (f"interrupted before any checkpoint was saved in {files.root}: nothing to resume, and {kept}; start "
            f"again with {hint or 'the same command'}")


def run(trainer: NcaTrainer, out: Path, source: Optional[Path], mode: str, quiet: bool,
        hint: Optional[str] = None) -> int:
    """Train ``trainer`` into ``out`` (a ``RunDirectory`` mode) and report; ``hint``: how to continue after a
    Ctrl-C where that is not ``--resume`` of the run's checkpoint (a --seeds study)."""
    config, files = trainer.config, RunFiles(out)
    progress = not quiet and sys.stderr.isatty()
    plan = _plan(trainer, out, source)
    with RunDirectory(out, mode) as rundir, log_to_file(files.log, append=mode == "resume", first=plan):
        log.info(plan)
        config.save_yaml(files.config)
        write_metrics(files, trainer.history, METRIC_FIELDS)
        tracker = (TensorBoardTracker(files.tensorboard, resume_step=trainer.iteration)
                   if config.logger == "tensorboard" else None)

        def on_record(t: NcaTrainer, record: Dict[str, float]) -> None:
            write_metrics(files, t.history, METRIC_FIELDS)
            if tracker is not None:
                tracker.writer.add_scalar("train/lr", record["lr"], record["iteration"])
                tracker.epoch({**record, "step": record["iteration"]})
            t.save_checkpoint(files.last)
            rundir.commit()  # the folder's run is this one now

        try:
            try:
                trainer.fit(on_record, progress=progress)
            except KeyboardInterrupt:
                log.error("\n" + interrupted_message(files, source, hint, replaced=rundir.backup.is_dir()))
                return 130
            rundir.commit()
            try:
                return report(trainer, files, tracker)
            except KeyboardInterrupt:
                log.error(f"\ninterrupted while writing the report of the finished run; {files.last} holds it: "
                          f"{hint or f'--resume {files.last}'} writes what is missing")
                return 130
        finally:
            if tracker is not None:
                tracker.close()


def report(trainer: NcaTrainer, files: RunFiles, tracker: Optional[TensorBoardTracker] = None) -> int:
    """After training: the evaluation (growth, stability at 2x and 4x the steps, regeneration), curves, the
    voxel picture, the growth GIF, report.md and results.json (last)."""
    config, target = trainer.config, trainer.target
    results, states = trainer.evaluate(with_states=True)
    plot_curves(trainer.history, files.curves)
    steps = config.nca.max_steps
    plot_voxels(target, {f"grown, {steps} steps": shown(states["grown"], target),
                         f"{4 * steps} steps": shown(states["grown_4x"], target),
                         "damaged": shown(states["damaged"], target),
                         "regenerated": shown(states["regenerated"], target)}, files.picture)
    growth = trainer.growth()
    alive = target.alive_channel
    rollout_gif(growth[..., alive:alive + 1], files.rollout, title="living channel of one seed", axis="y")
    note = (f"Trained {trainer.iteration} iterations ({trainer.finished}) in {trainer.seconds:.0f} s, "
            f"{trainer.seconds / max(1, trainer.iteration):.3f} s an iteration.")
    atomic_write_text(files.report, markdown_report(results, trainer.get_info(), note=note))
    if tracker is not None:
        tracker.finish(config.flat(), {"cube": results["grown"]})
    finite = {k: {m: (v if math.isfinite(v) else None) for m, v in r.items()} for k, r in results.items()}
    atomic_write_text(files.results, json.dumps(finite, indent=2))
    log.info(results_table(results))
    log.info(note)
    log.info("wrote " + ", ".join(str(p) for p in files.written()))
    return 0


# -- a --seeds study ------------------------------------------------------------------------------------------


def _main_seeds(args) -> int:
    """One run per seed in OUTPUT_DIR/seed-N, then each metric's mean and spread; with --resume a study stopped
    part-way goes on (finished seeds kept, a seed with a checkpoint resumed, the others started)."""
    resume = args.resume is not None
    if args.resume:
        raise InvalidValueError(f"--seeds --resume continues the study in --output-dir and takes no checkpoint (got "
                                f"{args.resume})")
    if "seed" in given_values(args):
        raise InvalidValueError("give the seeds with --seeds alone, not also seed=...")
    base = config_from_args(args)
    study = RunFiles(base.output_dir)
    configs = {seed: base.override(seed=seed, output_dir=str(study.seed(seed).root)) for seed in args.seeds}
    check_not_foreign(study, "the --seeds study folder")
    for seed in args.seeds:
        check_not_foreign(study.seed(seed))
    states = {seed: _seed_state(study.seed(seed)) for seed in args.seeds}
    if not resume and not args.overwrite:
        used = [f"seed-{s}" for s in args.seeds if states[s] != "new"] + \
               [p.name for p in (study.seeds_json, study.seeds_md) if p.exists()]
        if used:
            raise RunDirectoryError(f"{study.root} already holds a --seeds study ({', '.join(used)}): continue it "
                                    f"with the same command and --resume, replace it with --overwrite, or choose "
                                    f"another --output-dir")
    hint = "the same --seeds command plus --resume"
    for seed in args.seeds:
        files, state = study.seed(seed), states[seed]
        if resume and state == "finished":
            log.info(f"== seed {seed}: finished in {files.root}, kept")
            continue
        log.info(f"== seed {seed}: {files.root}")
        if resume and state == "started":
            trainer = NcaTrainer.from_checkpoint(files.last, device=configs[seed].device)
            saved = trainer.config.flat()
            changed = sorted(k for k, v in configs[seed].for_target(
                trainer.target.types, trainer.target.alive_channel, trainer.target.shape).flat().items()
                if k not in STUDY_FREE_KEYS and saved.get(k) != v)
            if changed:
                raise InvalidValueError(f"{files.last} was trained with other {changed} than this command gives: "
                                        f"--seeds --resume continues a study with the settings it started with")
            trainer.config = trainer.config.override(**{k: configs[seed].get(k) for k in STUDY_FREE_KEYS})
            status = run(trainer, files.root, files.last, "resume", args.quiet, hint)
        else:
            mode = "overwrite" if args.overwrite or (resume and state == "unsaved") else "fresh"
            status = run(NcaTrainer(configs[seed]), files.root, None, mode, args.quiet, hint)
        if status != 0:
            return status
    runs = {seed: json.loads(study.seed(seed).results.read_text()) for seed in args.seeds}
    summary = seed_summary(runs)
    study.mark(kind="seeds", seeds=args.seeds)
    atomic_write_text(study.seeds_json, json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))
    atomic_write_text(study.seeds_md, seed_table(summary, args.seeds) + "\n")
    log.info(seed_table(summary, args.seeds))
    return 0


def _seed_state(files: RunFiles) -> str:
    if not files.present():
        return "new"
    if not files.last.is_file():
        return "unsaved"
    return "finished" if files.results.is_file() else "started"


def seed_summary(runs: Dict[int, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, List[float]]]:
    """{row: {metric: [mean, standard deviation over the seeds]}}."""
    first = next(iter(runs.values()))
    summary = {}
    for row, metrics in first.items():
        summary[row] = {}
        for metric in metrics:
            values = torch.tensor([runs[s][row][metric] for s in runs], dtype=torch.float64)
            summary[row][metric] = [values.mean().item(), values.std().item() if len(values) > 1 else 0.0]
    return summary


def seed_table(summary: Dict[str, Dict[str, List[float]]], seeds: List[int]) -> str:
    columns = ("accuracy", "iou", "voxel_accuracy")
    lines = [f"Mean and standard deviation over seeds {', '.join(map(str, seeds))}.", "",
             "| structure | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row, metrics in summary.items():
        lines.append(f"| {row} | " + " | ".join(f"{metrics[c][0]:.4f} ± {metrics[c][1]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
