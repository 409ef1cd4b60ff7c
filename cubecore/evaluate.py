"""`python -m cubecore.evaluate CHECKPOINT [--data ...]`: the report table of a saved model on the validation
split of its data (or of --data), next to the floors: identity, mean, offset and ridge (fit on the training
split) and mlp and linear (trained by the run and stored in its checkpoint).  Nothing is trained.  The weights are those of
the run's best epoch (``--weights last`` for the last)."""

from __future__ import annotations

import logging
import sys

from .cli import CommandParser, add_weights_argument, run_command, setup_logging
from .data import prepare_data
from .training.floors import TRAINED_FLOORS
from .training.report import results_table
from .training.trainer import CubeTrainer

log = logging.getLogger("cubecore")


def main(argv=None) -> int:
    p = CommandParser(prog="python -m cubecore.evaluate", description=__doc__)
    p.add_argument("checkpoint")
    p.add_argument("--data", help="named source or file (default: the data the model was trained on)")
    p.add_argument("--device", default="cpu")
    add_weights_argument(p, "checkpoint")
    args = p.parse_args(argv)

    def body() -> int:
        setup_logging()
        trainer = CubeTrainer.from_checkpoint(args.checkpoint, device=args.device)
        config = trainer.config.override(**{"data.source": args.data}) if args.data else trainer.config
        data = prepare_data(config.data, config.seed, trainer.teacher)
        saved = trainer.data_fingerprint
        if not args.data and saved is not None and saved.get("sha256") != data.fingerprint.get("sha256"):
            log.warning(f"data {config.data.source!r} has changed since {args.checkpoint} trained on it (other "
                        f"pairs): the scores below are on the data as it is now, not on the run's validation split")
        log.info(results_table(trainer.evaluate(data.val, train_data=data.train, weights=args.weights)))
        missing = [name for name in TRAINED_FLOORS if name not in trainer.trained_floors]
        if missing:
            floors = " and ".join(missing)
            log.info(f"The {floors} floor{'s are' if len(missing) > 1 else ' is'} not stored in {args.checkpoint} "
                     f"(written before {'they were' if len(missing) > 1 else 'it was'} stored with the run); train the "
                     f"run again to have {'them' if len(missing) > 1 else 'it'}.")
        log.info(f"Scored: the weights of epoch {trainer.scored_epoch(args.weights)} of {args.checkpoint} "
                 f"({args.weights}{', by ' + trainer.config.select_by if args.weights == 'best' else ''}).")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
