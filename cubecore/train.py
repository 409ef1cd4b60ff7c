"""`python -m cubecore.train`: train the cubic core on teacher embeddings.

With no arguments: dialogue mode on the shipped chatterbot Q->A data, the shipped default teacher
(all-MiniLM-L6-v2), an 8x8x6 lattice; offline, under a minute on a 2-core CPU.  Writes to --output-dir:
config.yaml, metrics.csv / metrics.jsonl (per epoch), last.pt (checkpoint after the latest epoch), best.pt (the
best epoch by select_by), curves.png and report.md.  A run owns its output directory while it
lives; a fresh run refuses a directory that holds another run unless --overwrite.  Interrupt with Ctrl-C:
last.pt keeps the last saved epoch, and --resume continues from it exactly as if never interrupted.

Examples:
  python -m cubecore.train
  python -m cubecore.train --mode autoencoder --epochs 60
  python -m cubecore.train --config config/cube_training.yaml learning_rate=0.001 steps=6
  python -m cubecore.train --resume                 # continue runs/cube/last.pt
  python -m cubecore.train --resume --epochs 60     # train a finished run on, on purpose
  torchrun --nproc_per_node=2 -m cubecore.train      # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Under torchrun each process trains on its share of every epoch (batch_size is per process); only rank 0
writes checkpoints, metrics and reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .training.checkpoint import load_checkpoint_file
from .cli import CommandParser, run_command
from .training.config import MODES, TrainingConfig, parse_override
from .ops.front import BACKENDS
from .training.report import (append_metrics, example_predictions, markdown_report, plot_curves, results_table, seed_summary,
                     seed_table, write_metrics)
from .training.rundir import RunDirectory
from .training.tracking import TensorBoardTracker
from .training.viz import rollout_gif
from .training.trainer import CubeTrainer, prepare_data

# Keys that may change when a run is resumed: where and how it runs and when it stops, not what it computes.
RESUMABLE_KEYS = ("epochs", "output_dir", "device", "backend", "cache_dir", "checkpoint_every", "patience",
                  "convergence_threshold", "target_similarity", "logger")


def _lattice(text: str):
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"lattice size must be XxYxZ (e.g. 8x8x6), got {text!r}")
    return [int(p) for p in parts]


def _seeds(text: str):
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated ints (e.g. 42,1,2), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct comma-separated ints, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m cubecore.train", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with a 'cube_training:' section (default: built-in defaults, "
                                    "the same as config/cube_training.yaml)")
    p.add_argument("--mode", choices=MODES, help="what to learn")
    p.add_argument("--data", help="named source (chatterbot, chitchat) or a data file")
    p.add_argument("--teacher", help="teacher encoder: short name, Hugging Face id or local directory")
    p.add_argument("--epochs", type=int, help="epochs to train (with --resume: the new total)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lattice-size", type=_lattice, help="XxYxZ, e.g. 8x8x6 (must fit the teacher's dim "
                                                        "unless reshaping_method=projection)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--output-dir", help="where the run's files go (default runs/cube; with --resume CHECKPOINT, "
                                        "the checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue a run: a checkpoint path, or nothing for OUTPUT_DIR/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output-dir")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 42,1,2: one run per seed in "
                                                "OUTPUT_DIR/seed-N, then each metric's mean and spread (seeds.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. learning_rate=1e-3")
    return p


def given_values(args) -> dict:
    """The settings given on the command line (flags and key=value overrides), by config key."""
    flags = {"mode": args.mode, "data": args.data, "teacher": args.teacher, "epochs": args.epochs,
             "batch_size": args.batch_size, "lattice_size": args.lattice_size, "device": args.device,
             "backend": args.backend, "output_dir": args.output_dir}
    values = {k: v for k, v in flags.items() if v is not None}
    for item in args.overrides:
        key, value = parse_override(item)
        values[key] = value
    if isinstance(values.get("data"), str) and Path(values["data"]).is_file():
        values["data"] = str(Path(values["data"]).resolve())  # a data file by its absolute path: resumable anywhere
    return values


def config_from_args(args) -> TrainingConfig:
    config = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig()
    values = given_values(args)
    config = config.override(**values) if values else config
    if Path(config.data).is_file():  # also a path from the config file
        config = config.override(data=str(Path(config.data).resolve()))
    return config


@contextmanager
def distributed_session():
    """A process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between flags

    def body() -> int:
        with distributed_session():
            return _main(args)

    return run_command(body)


def resumed_trainer(args) -> Tuple[CubeTrainer, Path, Optional[str]]:
    """The trainer of the checkpoint that --resume names, with the settings that may change applied, the
    folder to write to (where the user points), and a message if the run is finished and nothing is asked."""
    if args.config:
        raise ValueError("--config cannot be combined with --resume: the run's settings come from its checkpoint")
    default_dir = Path(args.output_dir or TrainingConfig().output_dir)
    checkpoint = Path(args.resume) if args.resume else default_dir / "last.pt"
    out = Path(args.output_dir) if args.output_dir else (checkpoint.parent if args.resume else default_dir)
    trainer = CubeTrainer.from_checkpoint(checkpoint, device=args.device)
    values = {**given_values(args), "output_dir": str(out)}
    epochs = values.get("epochs")
    current = trainer.config.to_dict()
    trainer.config.override(**values)  # unknown keys and bad values are errors here, as on a fresh run
    refused = sorted(k for k, v in values.items()
                     if k not in RESUMABLE_KEYS and trainer.config.override(**{k: v}).to_dict()[k] != current[k])
    if refused:
        raise ValueError(f"cannot change {refused} when resuming {checkpoint} (the run's results depend on them); "
                         f"keys that may change on resume: {list(RESUMABLE_KEYS)}")
    trainer.config = trainer.config.override(**{k: v for k, v in values.items() if k in RESUMABLE_KEYS})
    if trainer.finished is not None and epochs is None:
        return trainer, out, (f"{checkpoint} is a finished run ({trainer.finished}, after epoch {trainer.epoch}); "
                              f"nothing to do. To train it further on purpose, add --epochs N with N > "
                              f"{trainer.epoch} (and target_similarity=null if that is what stopped it).")
    if epochs is not None and epochs <= trainer.epoch:
        raise ValueError(f"epochs {epochs} is not more than the {trainer.epoch} epochs {checkpoint} has trained; "
                         f"with --resume, --epochs is the new total")
    if trainer.finished is not None:
        trainer.reopen()
    return trainer, out, None


def _main(args) -> int:
    if args.seeds:
        return _main_seeds(args)
    main_process = _rank() == 0
    resume = args.resume is not None
    if resume and args.overwrite:
        raise ValueError("--overwrite and --resume exclude each other: resume continues the run, overwrite replaces it")
    if resume:
        trainer, out, finished = resumed_trainer(args)
        if finished:
            print(finished)
            return 0
        source = Path(args.resume) if args.resume else out / "last.pt"
        # Resuming into the checkpoint's own folder continues that run; into another folder starts a copy there,
        # which must not replace a run already in it.
        mode = "resume" if source.parent.resolve() == out.resolve() else "fresh"
    else:
        trainer = CubeTrainer(config_from_args(args))
        source, mode = None, "overwrite" if args.overwrite else "fresh"
        out = Path(trainer.config.output_dir)
    config = trainer.config
    # Everything that can be checked is checked before any work or write.
    if trainer.components_initialized:
        config.check_fits(trainer.dim)
    else:
        config.check_fits(trainer.teacher.dim)
    if args.quiet or not main_process:
        from transformers.utils import logging as hf_logging

        trainer.teacher.show_progress = False
        hf_logging.disable_progress_bar()
    with ExitStack() as stack:
        if main_process:  # only rank 0 writes, so only it owns the folder
            rundir = stack.enter_context(RunDirectory(out, mode))
            if resume:
                print(f"resuming {source} after epoch {trainer.epoch} (step {trainer.step}), writing to {out}")
            data = prepare_data(config, trainer.teacher)  # rank 0 fills the embedding cache ...
            rundir.clear()  # --overwrite: the previous run's files go only now that this run can start
        _barrier()
        if not main_process:
            data = prepare_data(config, trainer.teacher)  # ... the others read it
        if not trainer.components_initialized:
            trainer.initialize_components(dim=data.train[0].shape[1])
        if main_process:
            config.save_yaml(out / "config.yaml")
            write_metrics(out, trainer.history)
            print(json.dumps({**trainer.get_info(), "processes": trainer.world_size}, default=str))
            print(f"training pairs: {data.train[0].shape[0]}, validation pairs: {data.val[0].shape[0]}")
        return _train_and_report(trainer, data, out, source, main_process, args.quiet)


def _main_seeds(args) -> int:
    """One run per seed, each in its own folder, then the mean and spread of every metric over the seeds."""
    if args.resume is not None:
        raise ValueError("--seeds cannot be combined with --resume: resume each seed's folder on its own")
    if "seed" in given_values(args):
        raise ValueError("give the seeds with --seeds alone, not also seed=...")
    out = Path(args.output_dir or config_from_args(args).output_dir)
    base = config_from_args(args)
    for seed in args.seeds:  # every seed is checked before the first run starts
        base.override(seed=seed)
    for seed in args.seeds:
        run = argparse.Namespace(**{**vars(args), "seeds": None, "output_dir": str(out / f"seed-{seed}"),
                                    "overrides": [*args.overrides, f"seed={seed}"]})
        if _rank() == 0:
            print(f"== seed {seed}: {run.output_dir}")
        status = _main(run)
        if status != 0:
            return status
    if _rank() == 0:
        runs = {seed: json.loads((out / f"seed-{seed}" / "results.json").read_text()) for seed in args.seeds}
        summary = seed_summary(runs)
        (out / "seeds.json").write_text(json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))
        (out / "seeds.md").write_text(seed_table(summary, args.seeds) + "\n")
        print(seed_table(summary, args.seeds))
    return 0


def interrupted_message(out: Path, epoch: int, source: Optional[Path]) -> str:
    """What a Ctrl-C during ``epoch`` left to resume from, read off the disk."""
    head = f"interrupted during epoch {epoch}"
    last, best = out / "last.pt", out / "best.pt"
    if last.is_file():
        saved = load_checkpoint_file(last)["epoch"]
        return (f"{head}; {last} holds epoch {saved} (what came after it is not saved): continue with "
                f"--resume {last}")
    if source is not None:
        return f"{head}; nothing was saved in {out}: resume again from {source}, which is unchanged"
    if best.is_file():
        return (f"{head}; {out} holds no last.pt yet, but {best} does (epoch {load_checkpoint_file(best)['epoch']}): "
                f"continue with --resume {best}")
    return f"{head}, before any checkpoint was saved: nothing to resume; start again with --overwrite"


def _train_and_report(trainer: CubeTrainer, data, out: Path, source: Optional[Path], main_process: bool,
                      quiet: bool) -> int:
    config = trainer.config
    tracker = (TensorBoardTracker(out / "tensorboard", resume_step=trainer.step)
               if main_process and config.logger == "tensorboard" else None)
    try:
        return _train_and_report_to(trainer, data, out, source, main_process, quiet, tracker)
    finally:
        if tracker is not None:
            tracker.close()


def _train_and_report_to(trainer: CubeTrainer, data, out: Path, source: Optional[Path], main_process: bool,
                         quiet: bool, tracker: Optional[TensorBoardTracker]) -> int:
    config = trainer.config

    def on_step_end(t: CubeTrainer, loss: float) -> None:
        if tracker is not None:
            tracker.step(t.step, loss, t.optimizer.param_groups[0]["lr"])

    def on_epoch_end(t: CubeTrainer, record) -> None:
        if main_process:
            append_metrics(out, record)
            if tracker is not None:
                tracker.epoch(record)
            if t.best_epoch == t.epoch:
                t.save_checkpoint(out / "best.pt")
            if t.epoch % config.checkpoint_every == 0 or t.finished:
                t.save_checkpoint(out / "last.pt")

    try:
        trainer.fit(data.train, data.val, on_epoch_end=on_epoch_end, on_step_end=on_step_end, progress=not quiet)
    except KeyboardInterrupt:
        if main_process:
            print("\n" + interrupted_message(out, trainer.epoch + 1, source), file=sys.stderr)
        return 130
    if trainer.distributed:  # every rank must end with the same weights
        digests = [None] * trainer.world_size
        dist.all_gather_object(digests, trainer.weights_digest())  # every rank sees every digest
        same = len(set(digests)) == 1
        if main_process:
            print(f"weights identical across {trainer.world_size} processes: {same}")
            if not same:
                print("error: distributed processes diverged", file=sys.stderr)
        if not same:
            return 1
    if not main_process:
        _barrier()  # stay in the process group until rank 0 has written its report: all ranks leave together
        return 0
    try:
        return _report(trainer, data, out, tracker)
    finally:
        _barrier()


def _report(trainer: CubeTrainer, data, out: Path, tracker: Optional[TensorBoardTracker] = None) -> int:
    """Rank 0, after training: the last checkpoint, the evaluation against the floors, curves and report."""
    config = trainer.config
    trainer.save_checkpoint(out / "last.pt")
    results = trainer.evaluate(data.val, train_data=data.train)
    examples = None
    with trainer.weights_of("best") as scored, torch.no_grad():
        if data.val_questions:
            examples = example_predictions(trainer.predict(data.val[0]), data.val[1], data.val_questions,
                                           data.val_answers)
        # the first validation example, step by step
        rollout = trainer.model.trajectory(data.val[0][:1].to(trainer.device)).float().cpu()
    plot_curves(trainer.history, out / "curves.png")
    rollout_gif(rollout[:, 0], out / "rollout.gif")
    where = "best.pt" if (out / "best.pt").is_file() else "kept in last.pt"
    note = (f"Scored: the weights of epoch {scored}, the best by {config.select_by} ({where}); training ran "
            f"{trainer.epoch} epochs (last.pt).")
    (out / "report.md").write_text(markdown_report(results, trainer.get_info(), examples, note=note))
    trainer.save_pretrained(out / "model", results)  # EmbeddingProcessor.from_pretrained(out / "model")
    if tracker is not None:
        tracker.finish(config.to_dict(), results)
    finite = {m: {k: (v if math.isfinite(v) else None) for k, v in r.items()} for m, r in results.items()}
    (out / "results.json").write_text(json.dumps(finite, indent=2))  # NaN (too few pairs) as null: valid JSON
    print(results_table(results))
    print(note)
    written = [out / n for n in ("last.pt", "best.pt", "model", "curves.png", "rollout.gif", "report.md",
                                 "metrics.csv")]
    print("wrote " + ", ".join(str(p) for p in written if p.exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
