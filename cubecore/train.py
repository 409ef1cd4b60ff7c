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
import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_write_dir, atomic_write_text
from .cli import CommandParser, log_to_file, run_command, setup_logging
from .data import MODES, prepare_data
from .model.processor import EmbeddingProcessor
from .training.command import RunCommand, add_run_arguments, lattice_argument, write_results
from .training.config import TrainingConfig
from .training.memory import available_bytes, memory_warning
from .training.peers import barrier, in_process_group, rank, same_weights
from .training.report import COLUMNS, example_predictions, markdown_report, plot_curves, results_table, write_metrics
from .training.rundir import RunDirectory, RunFiles
from .training.tracking import TensorBoardTracker
from .training.trainer import CubeTrainer
from .training.viz import rollout_gif

log = logging.getLogger("cubecore")

COMMAND = RunCommand(
    trainer=CubeTrainer, config=TrainingConfig, defaults=lambda given: TrainingConfig(),
    # The flags, by the config key each one sets.
    flags={"mode": "data.mode", "data": "data.source", "teacher": "data.teacher", "epochs": "epochs",
           "batch_size": "batch_size", "lattice_size": "model.lattice_size", "device": "device",
           "backend": "model.backend", "output_dir": "output_dir"},
    # Keys that may change when a run is resumed: where and how it runs and when it stops, not what it computes.
    resumable=("epochs", "output_dir", "device", "model.backend", "data.cache_dir", "checkpoint_every", "patience",
               "convergence_threshold", "target_similarity", "logger"),
    # The resumable keys that decide when training ends: a finished run trains on only when one of them changes.
    stops=("epochs", "patience", "convergence_threshold", "target_similarity"),
    # Keys in which the seeds of one --seeds study may differ: where and how each ran, not what or how long.
    study_free=("output_dir", "device", "model.backend", "data.cache_dir", "checkpoint_every", "logger"),
    unit="epoch", paths=("data.source",),
    lacks=lambda trainer: [f"the {name} floor" for name in trainer.missing_floors()],
    holds="its report, results, model and floors", stop_hint="target_similarity=null, a larger patience",
    position=lambda trainer: f"epoch {trainer.epoch} (step {trainer.step})",
    seed_metrics=COLUMNS, seed_columns=COLUMNS, seed_label="model")


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
    p.add_argument("--lattice-size", type=lattice_argument(), help="XxYxZ, e.g. 8x8x6 (model.lattice_size; must fit "
                                                                   "the teacher's dim unless "
                                                                   "model.reshaping_method=projection)")
    add_run_arguments(p, output_dir="runs/cube", seeds_example="42,1,2",
                      console="progress bars and no per-epoch lines",
                      overrides_example="learning_rate=1e-3 model.steps=6 (or steps=6)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between flags

    def body() -> int:
        setup_logging(quiet=args.quiet, silent=rank() != 0)
        return COMMAND.main(args, run)

    return run_command(lambda: in_process_group(body))


def run(trainer: CubeTrainer, out: Path, source: Optional[Path], mode: str, quiet: bool,
        hint: Optional[str] = None) -> int:
    """Train ``trainer`` into ``out`` (a RunDirectory mode) and report (``RunCommand``'s run function)."""
    main_process = rank() == 0
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
            plan = COMMAND.plan(trainer, out, source, describe(trainer))
            log.info(plan)
            data = prepare_data(config.data, config.seed, trainer.teacher)  # rank 0 fills the cache ...
            trainer.use_data(data.fingerprint, config.data.source)  # a resumed run: the data it trained on
            stack.enter_context(log_to_file(files.log, append=mode == "resume", first=plan))
        barrier()  # ... while the others wait (if it fails, in_process_group stops them with its reason)
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

        def fit() -> None:
            if trainer.finished is None:  # (a --seeds study resumed after a seed's last epoch goes to its report)
                trainer.fit(data.train, data.val, on_epoch_end=on_epoch_end, on_step_end=on_step_end,
                            progress=progress)

        try:
            return COMMAND.train_and_report(trainer, files, source, rundir, fit,
                                            lambda: report(trainer, data, files, tracker), hint,
                                            check=lambda: same_weights(trainer))
        finally:
            if tracker is not None:
                tracker.close()


def describe(trainer: CubeTrainer) -> str:
    """What a run trains, for its plan."""
    c = trainer.config
    lattice = "x".join(str(n) for n in c.model.lattice_size)
    return (f"{c.data.mode} mode on {c.data.source!r} with teacher {c.data.teacher!r}; lattice {lattice}, state "
            f"{c.model.state_size}, {c.model.steps} steps; up to {c.epochs} epochs on {trainer.device}")


def memory_note(config: TrainingConfig, dim: int, device: torch.device) -> Optional[str]:
    """A warning, with the estimate, when the model needs more than ``LARGE_BYTES`` or half the free memory to
    train (``EmbeddingProcessor.training_bytes``, ``training.memory.memory_warning``), else None."""
    need, parameters, external = EmbeddingProcessor.training_bytes(dim, config.model, config.batch_size)
    return memory_warning(need, f"{parameters:,} parameters, {external:,} external input channels per cell, "
                                f"batch_size {config.batch_size}",
                          "model.global_channels, model.position_channels, model.lattice_size, model.state_size, "
                          "model.hidden_size, model.steps and batch_size", device, available_bytes(device))


def report(trainer: CubeTrainer, data, files: RunFiles, tracker: Optional[TensorBoardTracker] = None) -> int:
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
    write_results(files, results)  # NaN (too few pairs) as null: valid JSON
    log.info(results_table(results))
    log.info(note)
    log.info("wrote " + ", ".join(str(p) for p in files.written()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
