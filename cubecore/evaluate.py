"""`python -m cubecore.evaluate CHECKPOINT [--data ...]`: the report table of a saved model on the validation
split of its data (or of --data), next to the floors: identity, mean, offset and ridge (fit on the training
split) and mlp and linear (trained by the run after its last epoch and stored in its last.pt, from which the
run's best.pt takes them).  Nothing is trained.  The weights are those of the run's best epoch (``--weights
last`` for the last)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from .cli import CommandParser, add_weights_argument, run_command, setup_logging
from .data import prepare_data
from .errors import CubecoreError
from .training.report import results_table
from .training.rundir import RunFiles
from .training.trainer import CubeTrainer

log = logging.getLogger("cubecore")


def floors_of_run(trainer: CubeTrainer, checkpoint: Path, device: str) -> Optional[Path]:
    """The run's last.pt beside ``checkpoint`` (a best.pt) where it holds the same run at the same epoch or
    later: the trained floors ``trainer`` lacks are taken from it, and it is returned; else None (a last.pt that
    cannot be read, with a one-line warning: it never stops the checkpoint given from being scored)."""
    last = RunFiles(checkpoint.parent).last
    if not trainer.missing_floors() or not last.is_file() or last.resolve() == checkpoint.resolve():
        return None
    try:
        run = CubeTrainer.from_checkpoint(last, device=device)
    except (CubecoreError, OSError, ValueError) as exc:  # a neighbour's fault: the checkpoint given is scored
        log.warning(f"the trained floors are left out: {last} beside {checkpoint} cannot be read ({exc})")
        return None
    if not run.goes_on_from(trainer):
        return None
    trainer.trained_floors.update({name: run.trained_floors[name] for name in trainer.missing_floors()
                                   if name in run.trained_floors})
    return last if run.finished is not None or not trainer.missing_floors() else None


def floors_note(trainer: CubeTrainer, checkpoint: Path, last: Optional[Path]) -> Optional[str]:
    """Where the trained floors came from, or why they are not in the table: true of every checkpoint."""
    missing = trainer.missing_floors()
    if not missing:
        return f"The trained floors are those the run stored in {last}." if last is not None else None
    floors = f"The {' and '.join(missing)} floor{'s' if len(missing) > 1 else ''}"
    if last is not None:  # the run's last.pt, finished without them
        return (f"{floors} are not in the table: {last} holds the finished run without them (stopped before it "
                f"trained them, or saved before they were stored); python -m cubecore.train --resume {last} trains "
                f"and stores them (no epoch) and writes the run's report files again with them.")
    if trainer.finished is not None:
        return (f"{floors} are not in the table: {checkpoint} holds a finished run without them (stopped before it "
                f"trained them, or saved before they were stored); python -m cubecore.train --resume {checkpoint} "
                f"trains and stores them (in {RunFiles(checkpoint.parent).last}; no epoch) and writes the run's "
                f"report files again with them.")
    return (f"{floors} are not in the table: a run trains them after its last epoch and stores them in its last.pt, "
            f"and {checkpoint} was saved before that (epoch {trainer.epoch} of {trainer.config.epochs}) with no "
            f"last.pt beside it that holds them; a run that has not finished trains them when --resume takes it to "
            f"its end.")


def build_parser() -> CommandParser:
    p = CommandParser(prog="python -m cubecore.evaluate", description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data", help="named source or file (default: the data the model was trained on)")
    p.add_argument("--device", default="cpu")
    add_weights_argument(p, "checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging()
        trainer = CubeTrainer.from_checkpoint(args.checkpoint, device=args.device)
        last = floors_of_run(trainer, Path(args.checkpoint), args.device)
        config = trainer.config.override(**{"data.source": args.data}) if args.data else trainer.config
        data = prepare_data(config.data, config.seed, trainer.teacher)
        saved = trainer.data_fingerprint
        if not args.data and saved is not None and saved.get("sha256") != data.fingerprint.get("sha256"):
            log.warning(f"data {config.data.source!r} has changed since {args.checkpoint} trained on it (other "
                        f"pairs): the scores below are on the data as it is now, not on the run's validation split")
        log.info(results_table(trainer.evaluate(data.val, train_data=data.train, weights=args.weights)))
        note = floors_note(trainer, Path(args.checkpoint), last)
        if note:
            log.info(note)
        log.info(f"Scored: the weights of epoch {trainer.scored_epoch(args.weights)} of {args.checkpoint} "
                 f"({args.weights}{', by ' + trainer.config.select_by if args.weights == 'best' else ''}).")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
