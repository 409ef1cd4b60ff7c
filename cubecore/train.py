"""`python -m cubecore.train`: train the cubic core on teacher embeddings.

With no arguments: dialogue mode on the shipped chatterbot Q->A data, the shipped default teacher
(all-MiniLM-L6-v2), an 8x8x6 lattice; offline, a few minutes on a 2-core CPU.  Writes to --output-dir:
config.yaml, metrics.csv / metrics.jsonl (per epoch), last.pt (checkpoint), curves.png and report.md.
Interrupt with Ctrl-C: the last finished epoch is saved; continue with --resume.

Examples:
  python -m cubecore.train
  python -m cubecore.train --mode autoencoder --epochs 60
  python -m cubecore.train --config config/cube_training.yaml learning_rate=0.001 steps=6
  python -m cubecore.train --resume                 # continue runs/cube/last.pt
  torchrun --nproc_per_node=2 -m cubecore.train      # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Under torchrun each process trains on its share of every epoch (batch_size is per process); only rank 0
writes checkpoints, metrics and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainingConfig, parse_override
from .report import append_metrics, example_predictions, markdown_report, plot_curves, results_table
from .trainer import CubeTrainer, prepare_data


def _lattice(text: str):
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"lattice size must be XxYxZ (e.g. 8x8x6), got {text!r}")
    return [int(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cubecore.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with a 'cube_training:' section (default: built-in defaults, "
                                    "the same as config/cube_training.yaml)")
    p.add_argument("--mode", choices=["autoencoder", "dialogue", "mixed"], help="what to learn")
    p.add_argument("--data", help="named source (chatterbot, chitchat) or a data file")
    p.add_argument("--teacher", help="teacher encoder: short name, Hugging Face id or local directory")
    p.add_argument("--epochs", type=int, help="epochs to train (with --resume: the new total)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lattice-size", type=_lattice, help="XxYxZ, e.g. 8x8x6 (must fit the teacher's dim "
                                                        "unless reshaping_method=projection)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=["auto", "kernel", "reference"])
    p.add_argument("--output-dir", help="where the run's files go (default runs/cube)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue a run: a checkpoint path, or nothing for OUTPUT_DIR/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. learning_rate=1e-3")
    return p


def config_from_args(args) -> TrainingConfig:
    config = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig()
    flags = {"mode": args.mode, "data": args.data, "teacher": args.teacher, "epochs": args.epochs,
             "batch_size": args.batch_size, "lattice_size": args.lattice_size, "device": args.device,
             "backend": args.backend, "output_dir": args.output_dir}
    values = {k: v for k, v in flags.items() if v is not None}
    for item in args.overrides:
        key, value = parse_override(item)
        values[key] = value
    return config.override(**values) if values else config


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
    with distributed_session():
        return _main(argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(config.output_dir)
    if args.resume is not None:
        checkpoint = Path(args.resume) if args.resume else out / "last.pt"
        trainer = CubeTrainer.from_checkpoint(checkpoint, device=args.device)
        if args.epochs is not None:
            trainer.config = trainer.config.override(epochs=args.epochs)
        config = trainer.config
        out = Path(config.output_dir)
        print(f"resuming {checkpoint} after epoch {trainer.epoch} (step {trainer.step})")
    else:
        trainer = CubeTrainer(config)
    main_process = _rank() == 0
    if args.quiet or not main_process:
        from transformers.utils import logging as hf_logging

        trainer.teacher.show_progress = False
        hf_logging.disable_progress_bar()
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save_yaml(out / "config.yaml")
        data = prepare_data(config, trainer.teacher)  # rank 0 fills the embedding cache ...
    _barrier()
    if not main_process:
        data = prepare_data(config, trainer.teacher)  # ... the others read it
    if not trainer.components_initialized:
        trainer.initialize_components(dim=data.train[0].shape[1])
    if main_process:
        print(json.dumps({**trainer.get_info(), "processes": trainer.world_size}, default=str))
        print(f"training pairs: {data.train[0].shape[0]}, validation pairs: {data.val[0].shape[0]}")

    def on_epoch_end(t: CubeTrainer, record) -> None:
        if main_process:
            append_metrics(out, record)
            if t.epoch % config.checkpoint_every == 0:
                t.save_checkpoint(out / "last.pt")

    try:
        trainer.fit(data.train, data.val, on_epoch_end=on_epoch_end, progress=not args.quiet)
    except KeyboardInterrupt:
        if trainer.epoch > 0 and main_process:
            trainer.save_checkpoint(out / "last.pt")
        print(f"\ninterrupted after epoch {trainer.epoch}; saved {out / 'last.pt'}; continue with --resume",
              file=sys.stderr)
        return 130
    if trainer.distributed:  # every rank must end with the same weights
        digests = [None] * trainer.world_size
        dist.all_gather_object(digests, trainer.weights_digest())
        if main_process:
            same = len(set(digests)) == 1
            print(f"weights identical across {trainer.world_size} processes: {same}")
            if not same:
                print("error: distributed processes diverged", file=sys.stderr)
                return 1
    if not main_process:
        return 0
    trainer.save_checkpoint(out / "last.pt")
    results = trainer.evaluate(data.val, train_data=data.train)
    examples = None
    if data.val_questions:
        examples = example_predictions(trainer.predict(data.val[0]), data.val[1], data.val_questions,
                                       data.val_answers)
    plot_curves(trainer.history, out / "curves.png")
    (out / "report.md").write_text(markdown_report(results, trainer.get_info(), examples))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(results_table(results))
    print(f"wrote {out / 'last.pt'}, {out / 'curves.png'}, {out / 'report.md'}, {out / 'metrics.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
