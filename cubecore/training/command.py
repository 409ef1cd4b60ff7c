"""The run machinery that the training commands (``python -m cubecore.train``, ``python -m cubecore.nca``)
share: what a command line asks (a fresh run, ``--overwrite``, ``--resume``, a ``--seeds`` study), which
settings may change on resume, what a finished run still lacks, what a Ctrl-C left to resume from, and the
seeds' summary.  A command is data (``RunCommand``: its config and trainer classes, flags and keys) plus one
function that trains one trainer into its folder and reports (``RunFunction``); ``RunCommand.main`` drives the
rest, so that a rule of resume or overwrite holds for every command alike.

A trainer here is what both trainers are: ``Trainer(config)``, ``Trainer.from_checkpoint(path, device=...,
backend=...)`` (the build keys a resume may change), ``trainer.config``, ``trainer.finished`` (why training ended,
None while it goes on), ``trainer.reopen()`` (train a finished run on) and its count of ``unit``
(``trainer.epoch``, ``trainer.iteration``), saved in its checkpoint under the same name.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..atomic import atomic_write_text
from ..errors import InvalidValueError
from .checkpoint import load_checkpoint_file
from .config import parse_override
from .peers import rank
from .report import seed_summary, seed_table
from .rundir import FILE_NAMES, OUTPUTS, RunDirectory, RunDirectoryError, RunFiles, check_not_foreign

log = logging.getLogger("cubecore")

# run(trainer, out, source, mode, quiet, hint) -> exit status: train ``trainer`` into the folder ``out`` (opened as
# a RunDirectory ``mode``), from the checkpoint ``source`` (None: a new run), and report; ``hint``: how to continue
# after a Ctrl-C where that is not --resume of the run's own checkpoint (a --seeds study).
RunFunction = Callable[[Any, Path, Optional[Path], str, bool, Optional[str]], int]


@dataclass(frozen=True)
class RunCommand:
    """One training command, as data."""

    trainer: Any  # the trainer class
    config: Any  # its config class (resolve_key, from_yaml, from_saved)
    defaults: Callable[[Dict[str, Any]], Any]  # the config of a run without --config, given the command line's values
    flags: Dict[str, str]  # argparse dest -> the config key it sets
    resumable: Tuple[str, ...]  # keys that may change on resume: where and how it runs and when it stops
    stops: Tuple[str, ...]  # the resumable keys that end training: a finished run trains on when one changes
    study_free: Tuple[str, ...]  # keys in which the seeds of one --seeds study may differ
    unit: str = "epoch"  # what the trainer counts; the key of the total is unit + "s" (epochs, iterations)
    paths: Tuple[str, ...] = ()  # keys that may name a file, kept by its absolute path (resumable anywhere)
    folders: Tuple[str, ...] = ()  # those of them that may name a folder too (not a name a folder might shadow)
    outputs: Tuple[str, ...] = OUTPUTS  # the report phase's files (RunFiles roles), results last
    lacks: Callable[[Any], List[str]] = lambda trainer: []  # what else a finished trainer lacks (its floors)
    holds: str = "its report"  # what the folder of a finished run holds, when there is nothing to do
    stop_hint: str = ""  # how else to train a finished run on: the other stop keys, e.g. "loss_threshold=null"
    position: Optional[Callable[[Any], str]] = None  # where a trainer stands, for the plan (default "epoch 3")
    as_trained: Callable[[Any, Dict[str, Any]], Any] = lambda config, state: config  # a config as the saved
    # run (the checkpoint's ``state``) would have trained it, to compare with its saved config
    seed_metrics: Optional[Tuple[str, ...]] = None  # the metrics a --seeds summary holds (None: all)
    seed_columns: Tuple[str, ...] = field(default=())  # and those its table shows
    seed_label: str = "model"  # what a row of results.json is

    # -- the settings ------------------------------------------------------------------------------------------

    def given_values(self, args) -> Dict[str, Any]:
        """The settings given on the command line (flags and key=value overrides), by full config key.  A key given
        both as a flag and as an override (``--output-dir A output_dir=B``) with different values is an error: no
        spelling silently beats the other (of repeated overrides, the last counts)."""
        values, given_as = {}, {}
        for flag, key in self.flags.items():
            if getattr(args, flag) is not None:
                values[key] = getattr(args, flag)
                given_as[key] = f"--{flag.replace('_', '-')} {getattr(args, flag)}"
        for item in args.overrides:
            key, value = parse_override(item)
            full = self.config.resolve_key(key)
            if full in values and given_as[full].startswith("--") and values[full] != value:
                raise InvalidValueError(f"{full} is given twice, as {given_as[full]} and as {item}: give it once")
            values[full], given_as[full] = value, item
        return self._absolute(values)

    def _absolute(self, values: Dict[str, Any]) -> Dict[str, Any]:
        """``values`` with each file that a path key names (and each folder that a folder key names) by its
        absolute path: resumable from anywhere."""
        for key in self.paths:
            value = values.get(key)
            if isinstance(value, str) and (Path(value).is_file() or key in self.folders and Path(value).is_dir()):
                values = {**values, key: str(Path(value).resolve())}
        return values

    def config_from_args(self, args):
        """The config of a new run: --config FILE (or the command's defaults), then the command line's values."""
        values = self.given_values(args)
        config = self.config.from_yaml(args.config) if args.config else self.defaults(values)
        config = config.override(**values) if values else config
        files = self._absolute({key: config.get(key) for key in self.paths})
        changed = {key: value for key, value in files.items() if value != config.get(key)}
        return config.override(**changed) if changed else config

    def done(self, trainer) -> int:
        """How many of its units (epochs, iterations) ``trainer`` has trained."""
        return getattr(trainer, self.unit)

    def lacking(self, trainer, files: RunFiles) -> List[str]:
        """What a finished run lacks, which --resume writes: the report phase's outputs in its folder, and what
        the trainer itself lacks (``lacks``)."""
        return files.missing_outputs(self.outputs) + list(self.lacks(trainer))

    # -- resume ------------------------------------------------------------------------------------------------

    def resumed_trainer(self, args) -> Tuple[Any, Path, Path, Optional[str]]:
        """The trainer of the checkpoint that --resume names, with the settings that may change applied; the
        folder to write to (where the user points); the checkpoint; and a message if the run is finished and asked
        nothing new: resumed with its own settings (its command again, plus --resume), a finished run trains
        no unit and writes its report again where anything is lacking; it trains on when a key that ends training (``stops``)
        is given anew.  The keys that --config FILE sets count as given, as key=value overrides do (an override
        on the command line wins), so the command that started a run, plus --resume, resumes it."""
        values = self.given_values(args)
        if args.config:  # the command that ran it, plus --resume: the values the file sets count as given
            bare, in_file = self.config(), self.config.from_yaml(args.config).flat()
            values = {**self._absolute({k: v for k, v in in_file.items() if v != bare.get(k)}), **values}
        given_dir = values.get("output_dir")  # --output-dir or output_dir=, the same key
        default_dir = Path(given_dir or self.config().output_dir)
        checkpoint = Path(args.resume) if args.resume else RunFiles(default_dir).last
        out = Path(given_dir) if given_dir else (checkpoint.parent if args.resume else default_dir)
        trainer = self.trainer.from_checkpoint(checkpoint, device=values.get("device"),
                                               backend=values.get("model.backend"))
        values = {**values, "output_dir": str(out)}
        config = trainer.config
        config.override(**values)  # unknown keys and bad values are errors here, as on a fresh run
        changed = sorted(k for k, v in values.items() if config.override(**{k: v}).get(k) != config.get(k))
        refused = [k for k in changed if k not in self.resumable]
        if refused:
            raise InvalidValueError(f"cannot change {refused} when resuming {checkpoint} (the run's results depend "
                                    f"on them); keys that may change on resume: {list(self.resumable)}")
        trainer.config = config.override(**{k: v for k, v in values.items() if k in self.resumable})
        done, total = self.done(trainer), f"{self.unit}s"
        if trainer.finished is not None and not any(k in self.stops for k in changed):
            # The run's own settings (the command that ran it, plus --resume): nothing to train, only what it lacks.
            if self.lacking(trainer, RunFiles(out)):  # stopped while reporting: report again
                return trainer, out, checkpoint, None
            return trainer, out, checkpoint, (
                f"{checkpoint} is a finished run ({trainer.finished}, after {self.unit} {done}) and {out} holds "
                f"{self.holds}; nothing to do. To train it further on purpose, add --{total} N with N > {done} (the "
                f"new total), or change what stopped it ({self.stop_hint}).")
        if trainer.config.get(total) <= done:
            raise InvalidValueError(f"{total} {trainer.config.get(total)} is not more than the {done} {total} "
                                    f"{checkpoint} has trained; with --resume, --{total} is the new total")
        if trainer.finished is not None:
            trainer.reopen()
        return trainer, out, checkpoint, None

    # -- what a run says ---------------------------------------------------------------------------------------

    def plan(self, trainer, out: Path, source: Optional[Path], description: str) -> str:
        """The first line a run prints: what it will do (``description``: what it trains, the command's own)."""
        if source is not None and trainer.finished is not None:
            missing = ", ".join(self.lacking(trainer, RunFiles(out)))
            written = ", ".join(FILE_NAMES[role] for role in self.outputs)
            what = (f"finishing {source}, trained {self.done(trainer)} {self.unit}s ({trainer.finished}): it lacks "
                    f"{missing}; training no {self.unit}, writing its report again ({written})")
        elif source is not None:
            where = self.position(trainer) if self.position else f"{self.unit} {self.done(trainer)}"
            what = f"resuming {source} after {where}"
        else:
            what = "training"
        return f"{what}: {description}; writing to {out}"

    def interrupted_message(self, files: RunFiles, during: int, source: Optional[Path],
                            hint: Optional[str] = None, replaced: bool = False) -> str:
        """What a Ctrl-C during unit ``during`` left to resume from, read off the disk (``hint``: how to
        continue, where that is not ``--resume CHECKPOINT``; ``replaced``: an --overwrite run's predecessor comes
        back)."""
        head = f"interrupted during {self.unit} {during}"
        if files.last.is_file():
            saved = load_checkpoint_file(files.last)[self.unit]
            return (f"{head}; {files.last} holds {self.unit} {saved} (what came after it is not saved): continue "
                    f"with {hint or f'--resume {files.last}'}")
        if source is not None:
            return f"{head}; nothing was saved in {files.root}: resume again from {source}, which is unchanged"
        if files.best.is_file():
            return (f"{head}; {files.root} holds no last.pt yet, but {files.best} does ({self.unit} "
                    f"{load_checkpoint_file(files.best)[self.unit]}): continue with "
                    f"{hint or f'--resume {files.best}'}")
        kept = "the run it was to replace is kept there" if replaced else "it is left as it was before this run"
        return (f"{head}, before any checkpoint was saved in {files.root}: nothing to resume, and {kept}; start "
                f"again with {hint or 'the same command'}")

    def train_and_report(self, trainer, files: RunFiles, source: Optional[Path], rundir: Optional[RunDirectory],
                         fit: Callable[[], None], report: Callable[[], int], hint: Optional[str] = None,
                         check: Optional[Callable[[], int]] = None) -> int:
        """``fit()``, then, on rank 0, ``report()``, the run committed to its folder in between; a Ctrl-C in either
        says what it left and how to go on (status 130).  ``check()``: after training, a non-zero status stops
        before the report (processes that diverged).  ``rundir``: None on the ranks that do not write."""
        try:
            fit()
        except KeyboardInterrupt:
            if rundir is not None:
                log.error("\n" + self.interrupted_message(files, self.done(trainer) + 1, source, hint,
                                                          replaced=rundir.backup.is_dir()))
            return 130
        status = check() if check is not None else 0
        if status or rundir is None:  # (in_process_group keeps the other ranks until rank 0 has reported)
            return status
        try:
            rundir.commit()  # a run resumed after its last unit saved nothing yet; the report saves last.pt
            return report()
        except KeyboardInterrupt:
            log.error(f"\ninterrupted while writing the report of the finished run; {files.last} holds it: "
                      f"{hint or f'--resume {files.last}'} writes its report again "
                      f"(it lacks {', '.join(self.lacking(trainer, files))})")
            return 130

    # -- the command -------------------------------------------------------------------------------------------

    def main(self, args, run: RunFunction) -> int:
        """What the command line asks: a --seeds study, a resumed run or a new one (--overwrite: in place of the
        folder's run), each trained and reported by ``run``."""
        resume = args.resume is not None
        if resume and args.overwrite:
            what = "study" if args.seeds else "run"
            raise InvalidValueError(f"--overwrite and --resume exclude each other: resume continues the {what}, "
                                    f"overwrite replaces it")
        if args.seeds:
            return self.main_seeds(args, run)
        if resume:
            trainer, out, source, finished = self.resumed_trainer(args)
            if finished:
                log.info(finished)
                return 0
            # Resuming into the checkpoint's own folder continues that run; into another folder starts a copy
            # there, which must not replace a run already in it.
            mode = "resume" if source.parent.resolve() == out.resolve() else "fresh"
            return run(trainer, out, source, mode, args.quiet, None)
        trainer = self.trainer(self.config_from_args(args))
        return run(trainer, Path(trainer.config.output_dir), None, "overwrite" if args.overwrite else "fresh",
                   args.quiet, None)

    def main_seeds(self, args, run: RunFunction) -> int:
        """One run per seed, each in its own folder OUTPUT_DIR/seed-N, then the mean and spread of every metric
        over the seeds.  With --resume a study stopped part-way goes on: finished seeds are kept, a seed with a
        checkpoint resumes from it, the others start; the settings must be the ones the study started with."""
        resume = args.resume is not None
        if args.resume:
            raise InvalidValueError(f"--seeds --resume continues the study in --output-dir and takes no checkpoint "
                                    f"(got {args.resume}); to resume one seed's run alone, leave out --seeds")
        if "seed" in self.given_values(args):
            raise InvalidValueError("give the seeds with --seeds alone, not also seed=...")
        base = self.config_from_args(args)  # its output_dir (--output-dir or output_dir=) is the study's folder
        study = RunFiles(base.output_dir)
        # Every seed and every seed's folder is checked before the first run starts.
        configs = {seed: base.override(seed=seed, output_dir=str(study.seed(seed).root)) for seed in args.seeds}
        check_not_foreign(study, "the --seeds study folder")
        for seed in args.seeds:
            check_not_foreign(study.seed(seed))
        states = {seed: seed_state(study.seed(seed)) for seed in args.seeds}
        if not resume and not args.overwrite:
            used = [f"seed-{seed}" for seed in args.seeds if states[seed] != "new"]
            used += [path.name for path in (study.seeds_json, study.seeds_md) if path.exists()]
            if used:
                raise RunDirectoryError(f"{study.root} already holds a --seeds study ({', '.join(used)}): continue "
                                        f"it with the same command and --resume, replace it with --overwrite, or "
                                        f"choose another --output-dir")
        if resume:
            for seed in args.seeds:
                checkpoint = study.seed(seed).checkpoint()
                if checkpoint is not None:
                    self._check_same_study(checkpoint, configs[seed])
        for seed in args.seeds:
            files, state = study.seed(seed), states[seed]
            hint = (f"the same --seeds command plus --resume (finished seeds are kept, seed {seed} goes on from its "
                    f"checkpoint)")
            if resume and state == "finished":
                log.info(f"== seed {seed}: finished in {files.root}, kept")
                continue
            log.info(f"== seed {seed}: {files.root}")
            if resume and state == "started":
                checkpoint = files.checkpoint()
                trainer = self.trainer.from_checkpoint(checkpoint, device=configs[seed].device,
                                                       backend=configs[seed].get("model.backend"))
                trainer.config = trainer.config.override(**{k: configs[seed].get(k) for k in self.study_free})
                status = run(trainer, files.root, checkpoint, "resume", args.quiet, hint)
            else:  # a new seed; with --resume, one killed before its first checkpoint starts again
                mode = "overwrite" if args.overwrite or (resume and state == "unsaved") else "fresh"
                status = run(self.trainer(configs[seed]), files.root, None, mode, args.quiet, hint)
            if status != 0:
                return status
        if rank() == 0:
            runs = {seed: json.loads(study.seed(seed).results.read_text()) for seed in args.seeds}
            summary = seed_summary(runs, self.seed_metrics)
            study.mark(kind="seeds", seeds=args.seeds)
            atomic_write_text(study.seeds_json, json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))
            table = seed_table(summary, args.seeds, self.seed_columns, self.seed_label)
            atomic_write_text(study.seeds_md, table + "\n")
            log.info(table)
        return 0

    def _check_same_study(self, checkpoint: Path, config) -> None:
        """Refuse to go on with a seed's run whose settings differ from ``config`` outside ``study_free``."""
        state = load_checkpoint_file(checkpoint)
        saved = self.config.from_saved(state["config"]).flat()
        changed = sorted(k for k, v in self.as_trained(config, state).flat().items()
                         if k not in self.study_free and saved.get(k) != v)
        if changed:
            raise InvalidValueError(
                f"{checkpoint} was trained with other {changed} than this command gives: --seeds --resume "
                f"continues a study with the settings it started with (only {list(self.study_free)} may change)")


def seed_state(files: RunFiles) -> str:
    """Where one seed of a study stands: ``new`` (no run there), ``finished`` (its results written), ``started``
    (a checkpoint to resume from) or ``unsaved`` (files of a run killed before its first checkpoint)."""
    if not files.present():
        return "new"
    if files.checkpoint() is None:
        return "unsaved"
    return "finished" if files.results.is_file() else "started"


def write_results(files: RunFiles, results: Dict[str, Dict[str, float]]) -> None:
    """results.json: ``results`` (row -> metric -> value), a NaN or infinity as null (valid JSON)."""
    finite = {row: {k: (v if math.isfinite(v) else None) for k, v in r.items()} for row, r in results.items()}
    atomic_write_text(files.results, json.dumps(finite, indent=2))


def add_run_arguments(p, *, output_dir: str, seeds_example: str, console: str, overrides_example: str) -> None:
    """The flags of every training command, which RunCommand drives: the device and backend, the run's folder,
    --resume, --overwrite, --seeds, --quiet and the key=value overrides.  ``console``: what --quiet leaves off
    the console (e.g. "progress bars and no per-epoch lines")."""
    from ..cli import seed_list
    from ..ops.front import BACKENDS

    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=BACKENDS, help="model.backend")
    p.add_argument("--output-dir", help=f"where the run's files go (default {output_dir}; with --resume CHECKPOINT, "
                                        f"the checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue a run: a checkpoint path, or nothing for OUTPUT_DIR/last.pt; with --seeds "
                        "(no path): go on with the study in OUTPUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the cubecore run already in --output-dir "
                                                            "(kept aside until this run's first checkpoint)")
    p.add_argument("--seeds", type=seed_list, help=f"comma-separated seeds, e.g. {seeds_example}: one run per seed "
                                                   f"in OUTPUT_DIR/seed-N, then each metric's mean and spread "
                                                   f"(seeds.md)")
    p.add_argument("--quiet", action="store_true", help=f"no {console} on the console (train.log keeps them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"any config key, e.g. {overrides_example}")


def lattice_argument(what: str = "lattice size", example: str = "8x8x6") -> Callable[[str], List[int]]:
    """The type of an XxYxZ option (8x8x6, 8,8,6 or "8 8 6"): a list of three positive sizes, or argparse's error
    naming ``what`` with an ``example``."""
    import argparse

    def parse(text: str) -> List[int]:
        parts = text.lower().replace("x", " ").replace(",", " ").split()
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{what} must be XxYxZ (e.g. {example}), got {text!r}")
        return [int(p) for p in parts]

    return parse
