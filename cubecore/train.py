"""`python -m cubecore.train`: train the cubic core on teacher embeddings.

With no arguments: dialogue mode on the shipped chatterbot Q->A data, the shipped default teacher
(all-MiniLM-L6-v2), an 8x8x6 lattice; offline, under a minute on a 2-core CPU.  The run's files (config.yaml,
metrics, last.pt, best.pt, model/, report.md, results.json, curves.png, rollout.gif, train.log) go to
--output-dir (or output_dir=), which the run owns while it lives; a fresh run refuses a folder that holds
another run unless --overwrite, which replaces only a cubecore run and only once the new run has saved its
first checkpoint (until then the old run is kept aside and comes back if the new one ends).  Interrupt with
Ctrl-C or SIGTERM: last.pt keeps the last saved epoch, and --resume continues from it exactly as if never
interrupted.
Settings: --config FILE and key=value overrides (model.steps=6, or steps=6 where the key names one field); see
config/cube_training.yaml for every key.

Examples:
  python -m cubecore.train
  python -m cubecore.train --mode autoencoder --epochs 60
  python -m cubecore.train --config config/cube_training.yaml learning_rate=0.001 model.steps=6
  python -m cubecore.train --resume                 # continue runs/cube/last.pt
  python -m cubecore.train --resume --epochs 60     # train a finished run on, on purpose
  python -m cubecore.train --seeds 42,1,2 --resume  # go on with a --seeds study stopped part-way
  torchrun --nproc_per_node=2 -m cubecore.train      # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Under torchrun each process trains on its share of every epoch (batch_size is per process); only rank 0
writes checkpoints, metrics and reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .atomic import atomic_write_dir, atomic_write_text
from .cli import CommandParser, log_to_file, run_command, seed_list, setup_logging
from .data import MODES, prepare_data
from .errors import InvalidValueError
from .model.processor import EmbeddingProcessor
from .ops.front import BACKENDS
from .training.checkpoint import load_checkpoint_file
from .training.config import TrainingConfig, parse_override
from .training.peers import PeerWatch
from .training.report import (example_predictions, markdown_report, plot_curves, results_table, seed_summary,
                              seed_table, write_metrics)
from .training.rundir import RunDirectory, RunDirectoryError, RunFiles, check_not_foreign
from .training.tracking import TensorBoardTracker
from .training.trainer import CubeTrainer
from .training.viz import rollout_gif

log = logging.getLogger("cubecore")

# Keys that may change when a run is resumed: where and how it runs and when it stops, not what it computes.
RESUMABLE_KEYS = ("epochs", "output_dir", "device", "model.backend", "data.cache_dir", "checkpoint_every",
                  "patience", "convergence_threshold", "target_similarity", "logger")
# The resumable keys that decide when training ends: a finished run trains on only when one of them changes.
STOP_KEYS = ("epochs", "patience", "convergence_threshold", "target_similarity")
# Keys in which the seeds of one --seeds study may differ: where and how each ran, not what or how long it trained.
STUDY_FREE_KEYS = ("output_dir", "device", "model.backend", "data.cache_dir", "checkpoint_every", "logger")


def _lattice(text: str):
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"lattice size must be XxYxZ (e.g. 8x8x6), got {text!r}")
    return [int(p) for p in parts]


# The flags, by the config key each one sets.
FLAG_KEYS = {"mode": "data.mode", "data": "data.source", "teacher": "data.teacher", "epochs": "epochs",
             "batch_size": "batch_size", "lattice_size": "model.lattice_size", "device": "device",
             "backend": "model.backend", "output_dir": "output_dir"}


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m cubecore.train", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with a 'cube_training:' section (default: built-in defaults, "
                                    "the same as config/cube_training.yaml)")
    p.add_argument("--mode", choices=MODES, help="what to learn (data.mode)")
    p.add_argument("--data", help="named source (chatterbot, chitchat) or a data file (data.source)")
    p.add_argument("--teacher", help="teacher encoder: short name, Hugging Face id or local directory (data.teacher)")
    p.add_argument("--epochs", type=int, help="epochs to train (with --resume: the new total)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lattice-size", type=_lattice, help="XxYxZ, e.g. 8x8x6 (model.lattice_size; must fit the "
                                                        "teacher's dim unless model.reshaping_method=projection)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=BACKENDS, help="model.backend")
    p.add_argument("--output-dir", help="where the run's files go (default runs/cube; with --resume CHECKPOINT, "
                                        "the checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue a run: a checkpoint path, or nothing for OUTPUT_DIR/last.pt; with --seeds "
                        "(no path): go on with the study in OUTPUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the cubecore run already in --output-dir "
                                                            "(kept aside until this run's first checkpoint)")
    p.add_argument("--seeds", type=seed_list, help="comma-separated seeds, e.g. 42,1,2: one run per seed in "
                                                "OUTPUT_DIR/seed-N, then each metric's mean and spread (seeds.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines on the console "
                                                        "(train.log keeps them)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config key, e.g. learning_rate=1e-3 model.steps=6 (or steps=6)")
    return p


def given_values(args) -> dict:
    """The settings given on the command line (flags and key=value overrides), by full config key.  A key given
    both as a flag and as an override (``--output-dir A output_dir=B``) with different values is an error: no
    spelling silently beats the other (of repeated overrides, the last counts)."""
    values, given_as = {}, {}
    for flag in FLAG_KEYS:
        if getattr(args, flag) is not None:
            values[FLAG_KEYS[flag]] = getattr(args, flag)
            given_as[FLAG_KEYS[flag]] = f"--{flag.replace('_', '-')} {getattr(args, flag)}"
    for item in args.overrides:
        key, value = parse_override(item)
        full = TrainingConfig.resolve_key(key)
        if full in values and given_as[full].startswith("--") and values[full] != value:
            raise InvalidValueError(f"{full} is given twice, as {given_as[full]} and as {item}: give it once")
        values[full], given_as[full] = value, item
    source = values.get("data.source")
    if isinstance(source, str) and Path(source).is_file():  # a data file by its absolute path: resumable anywhere
        values["data.source"] = str(Path(source).resolve())
    return values


def config_from_args(args) -> TrainingConfig:
    config = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig()
    values = given_values(args)
    config = config.override(**values) if values else config
    if Path(config.data.source).is_file():  # a data file by its absolute path: resumable from anywhere
        config = config.override(**{"data.source": str(Path(config.data.source).resolve())})
    return config


def in_process_group(body: Callable[[], int]) -> int:
    """``body()`` in a process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA.  A
    rank that stops (an error anywhere, Ctrl-C, SIGTERM) stops every other rank at once with its reason
    (``PeerWatch``); on success all ranks leave together."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return body()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    peers = PeerWatch(dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size())
    try:
        try:
            status = body()
            if status == 0:
                dist.barrier()  # every rank leaves together, or learns why one did not
        except BaseException as exc:
            cause = peers.end(exc)
            if cause is exc:
                raise
            raise cause from None  # another rank stopped first: this rank's end follows from it
        peers.end(status=status)  # (an interruption it has reported itself, as such)
        return status
    finally:
        peers.close()
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between flags

    def body() -> int:
        setup_logging(quiet=args.quiet, silent=_rank() != 0)
        return _main(args)

    return run_command(lambda: in_process_group(body))


def resumed_trainer(args) -> Tuple[CubeTrainer, Path, Optional[str]]:
    """The trainer of the checkpoint that --resume names, with the settings that may change applied, the
    folder to write to (where the user points), and a message if the run is finished and asked nothing new:
    resumed with its own settings (its command again, plus --resume), a finished run trains nothing and writes
    only what its folder lacks; it trains on when a key that ends training (``STOP_KEYS``) is given anew."""
    if args.config:
        raise InvalidValueError("--config cannot be combined with --resume: the run's settings come from its "
                                "checkpoint")
    values = given_values(args)
    given_dir = values.get("output_dir")  # --output-dir or output_dir=, the same key
    default_dir = Path(given_dir or TrainingConfig().output_dir)
    checkpoint = Path(args.resume) if args.resume else RunFiles(default_dir).last
    out = Path(given_dir) if given_dir else (checkpoint.parent if args.resume else default_dir)
    trainer = CubeTrainer.from_checkpoint(checkpoint, device=values.get("device"))
    values = {**values, "output_dir": str(out)}
    config = trainer.config
    config.override(**values)  # unknown keys and bad values are errors here, as on a fresh run
    changed = sorted(k for k, v in values.items() if config.override(**{k: v}).get(k) != config.get(k))
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        raise InvalidValueError(f"cannot change {refused} when resuming {checkpoint} (the run's results depend on "
                                f"them); keys that may change on resume: {list(RESUMABLE_KEYS)}")
    trainer.config = config.override(**{k: v for k, v in values.items() if k in RESUMABLE_KEYS})
    if trainer.finished is not None and not any(k in STOP_KEYS for k in changed):
        # The run's own settings (the command that ran it, plus --resume): nothing to train, only what it lacks.
        if lacking(trainer, RunFiles(out)):  # stopped while reporting (or before floors were stored): report again
            return trainer, out, None
        return trainer, out, (f"{checkpoint} is a finished run ({trainer.finished}, after epoch {trainer.epoch}) "
                              f"and {out} holds its report, results, model and floors; nothing to do. To train it "
                              f"further on purpose, add --epochs N with N > {trainer.epoch} (the new total), or "
                              f"change what stopped it (target_similarity=null, a larger patience).")
    epochs = trainer.config.epochs
    if epochs <= trainer.epoch:
        raise InvalidValueError(f"epochs {epochs} is not more than the {trainer.epoch} epochs {checkpoint} has "
                                f"trained; with --resume, --epochs is the new total")
    if trainer.finished is not None:
        trainer.reopen()
    return trainer, out, None


def _main(args) -> int:
    if args.seeds:
        return _main_seeds(args)
    resume = args.resume is not None
    if resume and args.overwrite:
        raise InvalidValueError("--overwrite and --resume exclude each other: resume continues the run, overwrite "
                                "replaces it")
    if resume:
        trainer, out, finished = resumed_trainer(args)
        if finished:
            log.info(finished)
            return 0
        source = Path(args.resume) if args.resume else RunFiles(out).last
        # Resuming into the checkpoint's own folder continues that run; into another folder starts a copy there,
        # which must not replace a run already in it.
        mode = "resume" if source.parent.resolve() == out.resolve() else "fresh"
    else:
        trainer = CubeTrainer(config_from_args(args))
        source, mode = None, "overwrite" if args.overwrite else "fresh"
        out = Path(trainer.config.output_dir)
    return _run(trainer, out, source, mode, args.quiet)


def _run(trainer: CubeTrainer, out: Path, source: Optional[Path], mode: str, quiet: bool,
         resume_hint: Optional[str] = None) -> int:
    """Train ``trainer`` into ``out`` (a RunDirectory mode) and report; ``resume_hint``: how to continue after a
    Ctrl-C, where that is not --resume of the run's own checkpoint (a --seeds study)."""
    main_process = _rank() == 0
    config = trainer.config
    files = RunFiles(out)
    # Everything that can be checked is checked before any work or write: the lattice against the teacher once.
    dim = trainer.dim if trainer.components_initialized else trainer.teacher.dim
    config.model.check_fits(dim, what="the teacher's embeddings")
    if main_process:
        note = memory_note(config, dim, trainer.device)
        if note:
            log.warning(note)
    progress = not quiet and main_process and sys.stderr.isatty()
    if not progress:
        from transformers.utils import logging as hf_logging

        trainer.teacher.show_progress = False
        hf_logging.disable_progress_bar()
    with ExitStack() as stack:
        rundir = None
        if main_process:  # only rank 0 writes, so only it owns the folder
            # --overwrite sets the previous run aside; it goes only when this run saves its first checkpoint
            # (rundir.commit), and comes back if this run ends before that, whatever ends it.
            rundir = stack.enter_context(RunDirectory(out, mode))
            plan = _plan(trainer, out, source)
            log.info(plan)
            data = prepare_data(config.data, config.seed, trainer.teacher)  # rank 0 fills the cache ...
            trainer.use_data(data.fingerprint, config.data.source)  # a resumed run: the data it trained on
            stack.enter_context(log_to_file(files.log, append=mode == "resume", first=plan))
        _barrier()  # ... while the others wait (if it fails, in_process_group stops them with its reason)
        if not main_process:
            data = prepare_data(config.data, config.seed, trainer.teacher)  # ... the others read it
            trainer.use_data(data.fingerprint, config.data.source)
        if not trainer.components_initialized:
            trainer.initialize_components(dim=dim)  # the model, built once
        if main_process:
            config.save_yaml(files.config)
            write_metrics(files, trainer.history)
            info = trainer.model.get_info()
            log.info(f"{data.train[0].shape[0]} training pairs, {data.val[0].shape[0]} validation pairs; model: "
                     f"{info['parameters']:,} parameters, {info['active_backend']} backend, {trainer.world_size} "
                     f"process(es)")
        return _train_and_report(trainer, data, files, source, main_process, progress, rundir, resume_hint)


LARGE_BYTES = 4 * 1024 ** 3  # a model that needs more to train is said to, with what sets its size


def available_bytes(device: torch.device) -> Optional[int]:
    """The memory free for a new allocation on ``device`` (Linux MemAvailable for the CPU), or None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, IndexError):
        pass
    return None


def memory_note(config: TrainingConfig, dim: int, device: torch.device) -> Optional[str]:
    """A warning, with the estimate, when the model needs more than ``LARGE_BYTES`` or half the free memory to
    train (``EmbeddingProcessor.training_bytes``), else None."""
    need, parameters, external = EmbeddingProcessor.training_bytes(dim, config.model, config.batch_size)
    have = available_bytes(device)
    if need <= LARGE_BYTES and (have is None or 2 * need <= have):
        return None
    gib = 1024 ** 3
    return (f"this model needs about {need / gib:.1f} GiB of memory to train ({parameters:,} parameters, "
            f"{external:,} external input channels per cell, batch_size {config.batch_size})"
            f"{f'; {have / gib:.1f} GiB are free on {device}' if have is not None else ''}; its size is set by "
            f"model.global_channels, model.position_channels, model.lattice_size, model.state_size, "
            f"model.hidden_size, model.steps and batch_size")


def lacking(trainer: CubeTrainer, files: RunFiles) -> List[str]:
    """What a finished run lacks, which --resume writes: the report phase's outputs in its folder, and the trained
    floors in its checkpoint (a run stopped before it trained them, or saved before they were stored)."""
    return files.missing_outputs() + [f"the {name} floor" for name in trainer.missing_floors()]


def _plan(trainer: CubeTrainer, out: Path, source: Optional[Path]) -> str:
    """The first line a run prints: what it will do."""
    c = trainer.config
    lattice = "x".join(str(n) for n in c.model.lattice_size)
    if source is not None and trainer.finished is not None:
        missing = ", ".join(lacking(trainer, RunFiles(out)))
        what = (f"finishing {source}, trained {trainer.epoch} epochs ({trainer.finished}): writing what it lacks "
                f"({missing})")
    elif source is not None:
        what = f"resuming {source} after epoch {trainer.epoch} (step {trainer.step})"
    else:
        what = "training"
    return (f"{what}: {c.data.mode} mode on {c.data.source!r} with teacher {c.data.teacher!r}; lattice {lattice}, "
            f"state {c.model.state_size}, {c.model.steps} steps; up to {c.epochs} epochs on {trainer.device}; "
            f"writing to {out}")


def _seed_state(files: RunFiles) -> str:
    """Where one seed of a study stands: ``new`` (no run there), ``finished`` (its results written), ``started``
    (a checkpoint to resume from) or ``unsaved`` (files of a run killed before its first checkpoint)."""
    if not files.present():
        return "new"
    if files.checkpoint() is None:
        return "unsaved"
    return "finished" if files.results.is_file() else "started"


def _main_seeds(args) -> int:
    """One run per seed, each in its own folder OUTPUT_DIR/seed-N, then the mean and spread of every metric over
    the seeds.  With --resume a study stopped part-way goes on: finished seeds are kept, a seed with a checkpoint
    resumes from it, the others start; the settings must be the ones the study started with."""
    resume = args.resume is not None
    if args.resume:
        raise InvalidValueError(f"--seeds --resume continues the study in --output-dir and takes no checkpoint (got "
                                f"{args.resume}); to resume one seed's run alone, leave out --seeds")
    if resume and args.overwrite:
        raise InvalidValueError("--overwrite and --resume exclude each other: resume continues the study, "
                                "overwrite replaces it")
    if "seed" in given_values(args):
        raise InvalidValueError("give the seeds with --seeds alone, not also seed=...")
    base = config_from_args(args)  # its output_dir (--output-dir or output_dir=) is the study's folder
    study = RunFiles(base.output_dir)
    # Every seed and every seed's folder is checked before the first run starts.
    configs = {seed: base.override(seed=seed, output_dir=str(study.seed(seed).root)) for seed in args.seeds}
    check_not_foreign(study, "the --seeds study folder")
    for seed in args.seeds:
        check_not_foreign(study.seed(seed))
    states = {seed: _seed_state(study.seed(seed)) for seed in args.seeds}
    if not resume and not args.overwrite:
        used = [f"seed-{seed}" for seed in args.seeds if states[seed] != "new"]
        used += [path.name for path in (study.seeds_json, study.seeds_md) if path.exists()]
        if used:
            raise RunDirectoryError(f"{study.root} already holds a --seeds study ({', '.join(used)}): continue it "
                                    f"with the same command and --resume, replace it with --overwrite, or choose "
                                    f"another --output-dir")
    if resume:
        for seed in args.seeds:
            checkpoint = study.seed(seed).checkpoint()
            if checkpoint is None:
                continue
            saved = TrainingConfig.from_saved(load_checkpoint_file(checkpoint)["config"]).flat()
            changed = sorted(k for k, v in configs[seed].flat().items()
                             if k not in STUDY_FREE_KEYS and saved.get(k) != v)
            if changed:
                raise InvalidValueError(
                    f"{checkpoint} was trained with other {changed} than this command gives: --seeds --resume "
                    f"continues a study with the settings it started with (only {list(STUDY_FREE_KEYS)} may "
                    f"change)")
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
            trainer = CubeTrainer.from_checkpoint(checkpoint, device=configs[seed].device)
            trainer.config = trainer.config.override(**{k: configs[seed].get(k) for k in STUDY_FREE_KEYS})
            status = _run(trainer, files.root, checkpoint, "resume", args.quiet, hint)
        else:  # a new seed; with --resume, one killed before its first checkpoint starts again
            mode = "overwrite" if args.overwrite or (resume and state == "unsaved") else "fresh"
            status = _run(CubeTrainer(configs[seed]), files.root, None, mode, args.quiet, hint)
        if status != 0:
            return status
    if _rank() == 0:
        runs = {seed: json.loads(study.seed(seed).results.read_text()) for seed in args.seeds}
        summary = seed_summary(runs)
        study.mark(kind="seeds", seeds=args.seeds)
        atomic_write_text(study.seeds_json, json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))
        atomic_write_text(study.seeds_md, seed_table(summary, args.seeds) + "\n")
        log.info(seed_table(summary, args.seeds))
    return 0


def interrupted_message(files: RunFiles, epoch: int, source: Optional[Path], resume_hint: Optional[str] = None,
                        replaced: bool = False) -> str:
    """What a Ctrl-C during ``epoch`` left to resume from, read off the disk (``resume_hint``: how to continue,
    where that is not ``--resume CHECKPOINT``; ``replaced``: an --overwrite run's predecessor comes back)."""
    head = f"interrupted during epoch {epoch}"
    if files.last.is_file():
        saved = load_checkpoint_file(files.last)["epoch"]
        return (f"{head}; {files.last} holds epoch {saved} (what came after it is not saved): continue with "
                f"{resume_hint or f'--resume {files.last}'}")
    if source is not None:
        return f"{head}; nothing was saved in {files.root}: resume again from {source}, which is unchanged"
    if files.best.is_file():
        return (f"{head}; {files.root} holds no last.pt yet, but {files.best} does (epoch "
                f"{load_checkpoint_file(files.best)['epoch']}): continue with "
                f"{resume_hint or f'--resume {files.best}'}")
    kept = "the run it was to replace is kept there" if replaced else "it is left as it was before this run"
    return (f"{head}, before any checkpoint was saved in {files.root}: nothing to resume, and {kept}; start "
            f"again with {resume_hint or 'the same command'}")


def _train_and_report(trainer: CubeTrainer, data, files: RunFiles, source: Optional[Path], main_process: bool,
                      progress: bool, rundir: Optional[RunDirectory] = None, resume_hint: Optional[str] = None
                      ) -> int:
    config = trainer.config
    tracker = (TensorBoardTracker(files.tensorboard, resume_step=trainer.step)
               if main_process and config.logger == "tensorboard" else None)

    def on_step_end(t: CubeTrainer, loss: float) -> None:
        if tracker is not None:
            tracker.step(t.step, loss, t.optimizer.param_groups[0]["lr"])

    def on_epoch_end(t: CubeTrainer, record) -> None:
        if main_process:
            write_metrics(files, t.history)
            if tracker is not None:
                tracker.epoch(record)
            if t.best_epoch == t.epoch:
                t.save_checkpoint(files.best)
            if t.epoch % config.checkpoint_every == 0 or t.finished:
                t.save_checkpoint(files.last)
            if rundir is not None and files.checkpoint() is not None:
                rundir.commit()  # the folder's run is this one now

    try:
        try:
            if trainer.finished is None:  # (a --seeds study resumed after a seed's last epoch goes to its report)
                trainer.fit(data.train, data.val, on_epoch_end=on_epoch_end, on_step_end=on_step_end,
                            progress=progress)
        except KeyboardInterrupt:
            if main_process:
                log.error("\n" + interrupted_message(files, trainer.epoch + 1, source, resume_hint,
                                                      replaced=rundir is not None and rundir.backup.is_dir()))
            return 130
        if trainer.distributed:  # every rank must end with the same weights
            digests = [None] * trainer.world_size
            dist.all_gather_object(digests, trainer.weights_digest())  # every rank sees every digest
            same = len(set(digests)) == 1
            log.info(f"weights identical across {trainer.world_size} processes: {same}")
            if not same:
                log.error("error: distributed processes diverged")
                return 1
        if not main_process:  # (in_process_group keeps it until rank 0 has written the report)
            return 0
        try:
            if rundir is not None:
                rundir.commit()  # a run resumed after its last epoch saved nothing yet; _report saves last.pt
            return _report(trainer, data, files, tracker)
        except KeyboardInterrupt:
            log.error(f"\ninterrupted while writing the report of the finished run; {files.last} holds it: "
                      f"{resume_hint or f'--resume {files.last}'} writes what is missing "
                      f"({', '.join(files.missing_outputs())})")
            return 130
    finally:
        if tracker is not None:
            tracker.close()


def _report(trainer: CubeTrainer, data, files: RunFiles, tracker: Optional[TensorBoardTracker] = None) -> int:
    """Rank 0, after training: the mlp and linear floors (trained once, stored in last.pt), the evaluation against
    the floors, curves, rollout, report, results and the model folder."""
    config = trainer.config
    missing = trainer.missing_floors()
    if missing:  # (a report written again after an interruption has them in last.pt)
        log.info(f"training the {' and '.join(missing)} floor{'s' if len(missing) > 1 else ''} (mlp: as many "
                 f"parameters as the cube; linear: input + W input) with the cube's settings")
        trainer.train_floors(data.train, data.val, names=missing)
        trainer.save_checkpoint(files.last)
    results = trainer.evaluate(data.val, train_data=data.train)
    examples = None
    with trainer.weights_of("best") as scored, torch.no_grad():
        if data.val_questions:
            examples = example_predictions(trainer.predict(data.val[0]), data.val[1], data.val_questions,
                                           data.val_answers)
        # the first validation example, step by step
        rollout = trainer.model.trajectory(data.val[0][:1].to(trainer.device)).float().cpu()
    plot_curves(trainer.history, files.curves, scored_epoch=scored, floors=results)
    shown = f": {data.val_questions[0][:60]!r}" if data.val_questions else ""
    rollout_gif(rollout[:, 0], files.rollout, title=f"validation example 1{shown}", start="visible")
    where = files.best.name if files.best.is_file() else f"kept in {files.last.name}"
    note = (f"Scored: the weights of epoch {scored}, the best by {config.select_by} ({where}); training ran "
            f"{trainer.epoch} epochs ({files.last.name}).")
    atomic_write_text(files.report, markdown_report(results, trainer.get_info(), examples, note=note))
    # EmbeddingProcessor.from_pretrained(RUN_DIR/model); written whole or not at all, like every run file
    atomic_write_dir(files.model, lambda folder: trainer.save_pretrained(folder, results))
    if tracker is not None:
        tracker.finish(config.flat(), results)
    finite = {m: {k: (v if math.isfinite(v) else None) for k, v in r.items()} for m, r in results.items()}
    atomic_write_text(files.results, json.dumps(finite, indent=2))  # NaN (too few pairs) as null: valid JSON
    log.info(results_table(results))
    log.info(note)
    log.info("wrote " + ", ".join(str(p) for p in files.written()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
