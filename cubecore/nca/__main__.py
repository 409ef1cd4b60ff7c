"""`python -m cubecore.nca`: train a 3D neural cellular automaton to grow a voxel structure from one cell.

With no arguments: the shipped tree (a trunk and a crown, 55 voxels) in an 8x8x8 lattice, by the recipe of the
published 3D NCAs (Sudhakaran et al. 2021, real-itu/3d-artefacts-nca); a few minutes on a 2-core CPU.
--target FILE trains on your structure (.npy block types or RGBA, MagicaVoxel .vox, Minecraft .nbt) or on a
shipped one by name (plain_village_house, villages_light, caterpillar_short, desert_village_house, ball, tree,
tree_rgba).  The run's files (config.yaml, metrics, last.pt, report.md, results.json, curves.png, grown.png,
rollout.gif, model/, train.log) go to --output-dir, with the same protections as python -m cubecore.train: a fresh run
refuses a folder that holds another run unless --overwrite (which replaces only a cubecore run, once the new run
has saved its first checkpoint), Ctrl-C or SIGTERM keep last.pt, and --resume continues from it exactly as if
never interrupted.
Settings: --config FILE (a YAML file with an 'nca_training:' section) and key=value overrides (nca.batch_size=8,
or batch_size=8 where the key names one field); see config/nca_training.yaml for every key.

Under torchrun each process trains an equal share of every batch (nca.batch_size is the whole batch) and only
rank 0 writes the run's files.

Examples:
  python -m cubecore.nca
  python -m cubecore.nca --target plain_village_house           # in its 10x10x10 cube
  python -m cubecore.nca --target house.vox nca.damage=true     # learn to regenerate too
  python -m cubecore.nca --resume                               # continue runs/nca/last.pt
  python -m cubecore.nca --seeds 0,1,2                          # one run per seed, mean and spread
  python -m cubecore.nca model.backend=reference                # the plain-PyTorch rule instead of the kernel
  torchrun --nproc_per_node=2 -m cubecore.nca                   # DistributedDataParallel (gloo on CPU, nccl on CUDA)
  python -m cubecore.nca --target plain_village_house nca.hidden_channels=10 nca.init_from=PlainVillageHouse.pt
                                                     # start from a pretrained model (a run's model/ folder too)
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Optional

from ..atomic import atomic_write_dir, atomic_write_text
from ..cli import CommandParser, log_to_file, run_command, setup_logging
from ..training.command import RunCommand, add_run_arguments, lattice_argument, write_results
from ..training.memory import available_bytes, memory_warning
from ..training.peers import in_process_group, rank, same_weights
from ..training.report import write_metrics
from ..training.rundir import RunDirectory, RunFiles
from ..training.tracking import TensorBoardTracker
from ..training.viz import rollout_gif
from .config import NcaTrainingConfig, small_run
from .report import METRIC_FIELDS, markdown_report, plot_curves, plot_voxels, results_table, shown
from .targets import VoxelTarget
from .trainer import NcaTrainer, training_bytes

log = logging.getLogger("cubecore")


def _as_trained(config: NcaTrainingConfig, state) -> NcaTrainingConfig:
    """``config`` with the model keys that the target of the checkpoint ``state`` sets (to compare with it)."""
    t = state["target"]
    target = VoxelTarget(t["voxels"], t["kind"], tuple(t["names"]), t["colours"], t["source"])
    return config.for_target(target.types, target.alive_channel, target.shape)


COMMAND = RunCommand(
    trainer=NcaTrainer, config=NcaTrainingConfig, defaults=small_run,
    flags={"target": "nca.target", "lattice": "nca.lattice", "iterations": "iterations", "device": "device",
           "backend": "model.backend", "output_dir": "output_dir"},
    # Keys that may change when a run is resumed: where and how it runs and when it stops, not what it computes.
    resumable=("iterations", "output_dir", "device", "model.backend", "checkpoint_every", "loss_threshold",
               "logger"),
    stops=("iterations", "loss_threshold"),  # a finished run trains on only when one of these changes
    study_free=("output_dir", "device", "model.backend", "checkpoint_every", "logger"),
    unit="iteration", paths=("nca.target", "nca.init_from", "nca.seed_state"),
    folders=("nca.init_from",),
    outputs=("curves", "rollout", "picture", "report", "model", "results"),  # what the report writes, results last
    holds="its report", stop_hint="loss_threshold=null or a lower one", as_trained=_as_trained,
    seed_metrics=None, seed_columns=("accuracy", "iou", "voxel_accuracy"), seed_label="structure")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m cubecore.nca", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with an 'nca_training:' section (default: config/nca_training.yaml's "
                                    "values, built in)")
    p.add_argument("--target", help="a structure file (.npy, .vox, .nbt) or a shipped structure's name "
                                    "(nca.target)")
    p.add_argument("--lattice", type=lattice_argument("lattice", "10x10x10"),
                   help="XxYxZ: the lattice the structure is placed in (nca.lattice; default the upstream's cube, "
                        "its longest side rounded up to 10; the shipped tree of the command's own settings: 8x8x8)")
    p.add_argument("--iterations", type=int, help="iterations to train (with --resume: the new total)")
    add_run_arguments(p, output_dir="runs/nca", seeds_example="0,1,2",
                      console="progress bar and no per-checkpoint lines",
                      overrides_example="nca.damage=true learning_rate=2e-3")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between flags

    def body() -> int:
        setup_logging(quiet=args.quiet, silent=rank() != 0)
        return COMMAND.main(args, run)

    return run_command(lambda: in_process_group(body))


def memory_note(trainer: NcaTrainer) -> Optional[str]:
    """A warning, with the estimate (``training_bytes``), when a run needs more than ``LARGE_BYTES`` or half the
    free memory (``training.memory.memory_warning``, as cubecore.train's), else None."""
    need, detail = training_bytes(trainer)
    keys = "nca.batch_size (the whole batch: torchrun's processes train a share each), nca.max_steps, nca.lattice, " \
           "nca.hidden_channels, model.hidden_size, nca.pool_size"
    if trainer.core.active_backend() == "reference":
        keys += " and model.backend (the reference keeps every step's activations; the kernel only its state)"
    return memory_warning(need, detail, keys, trainer.device, available_bytes(trainer.device))


def run(trainer: NcaTrainer, out: Path, source: Optional[Path], mode: str, quiet: bool,
        hint: Optional[str] = None) -> int:
    """Train ``trainer`` into ``out`` (a ``RunDirectory`` mode) and report (``RunCommand``'s run function).  Under
    torchrun every process trains its share of each batch; only rank 0 writes."""
    config, files = trainer.config, RunFiles(out)
    main_process = rank() == 0
    progress = not quiet and main_process and sys.stderr.isatty()
    with ExitStack() as stack:
        rundir = None
        if main_process:  # only rank 0 writes, so only it owns the folder
            plan = COMMAND.plan(trainer, out, source, describe(trainer))
            rundir = stack.enter_context(RunDirectory(out, mode))
            stack.enter_context(log_to_file(files.log, append=mode == "resume", first=plan))
            log.info(plan)
            note = memory_note(trainer)
            if note:
                log.warning(note)
            config.save_yaml(files.config)
            write_metrics(files, trainer.history, METRIC_FIELDS)
        tracker = (TensorBoardTracker(files.tensorboard, resume_step=trainer.iteration)
                   if main_process and config.logger == "tensorboard" else None)

        def on_record(t: NcaTrainer, record: Dict[str, float]) -> None:
            if not main_process:
                return
            write_metrics(files, t.history, METRIC_FIELDS)
            if tracker is not None:
                tracker.writer.add_scalar("train/lr", record["lr"], record["iteration"])
                tracker.epoch({**record, "step": record["iteration"]})
            t.save_checkpoint(files.last)
            rundir.commit()  # the folder's run is this one now

        try:
            return COMMAND.train_and_report(trainer, files, source, rundir,
                                            lambda: trainer.fit(on_record, progress=progress),
                                            lambda: report(trainer, files, tracker), hint,
                                            check=lambda: same_weights(trainer))
        finally:
            if tracker is not None:
                tracker.close()


def describe(trainer: NcaTrainer) -> str:
    """What a run trains, for its plan."""
    c, t = trainer.config, trainer.target
    kind = (f"{len(t.names) - 1} block types" if t.kind == "blocks" else "RGBA")
    start = f", starting from {c.nca.init_from}" if c.nca.init_from is not None else ""
    lattice = "x".join(map(str, c.model.lattice_size))
    return (f"{t.source} ({int(t.occupied.sum())} voxels, {kind}{start}) in a {lattice} "
            f"lattice, state {c.model.state_size}, {c.nca.min_steps}-{c.nca.max_steps} steps, batch "
            f"{c.nca.batch_size}; up to {c.iterations} iterations on {trainer.device} "
            f"({trainer.core.active_backend()} backend)")


def report(trainer: NcaTrainer, files: RunFiles, tracker: Optional[TensorBoardTracker] = None) -> int:
    """After training: the evaluation (growth, stability at 2x and 4x the steps, regeneration), curves, the
    voxel picture, the growth GIF, report.md, the model folder and results.json (last)."""
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
    # NcaModel.from_pretrained(RUN_DIR/model); written whole or not at all, like every run file
    atomic_write_dir(files.model, lambda folder: trainer.save_pretrained(folder, results))
    if tracker is not None:
        tracker.finish(config.flat(), {"cube": results["grown"]})
    write_results(files, results)
    log.info(results_table(results))
    log.info(note)
    log.info("wrote " + ", ".join(str(p) for p in files.written()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
