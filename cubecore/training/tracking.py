"""Experiment tracking beside the metrics files: ``logger: tensorboard`` writes TensorBoard event files.

Per optimizer step the training loss and learning rate, per epoch every number of the epoch's record
(validation loss, cosine, R@1, MRR, ...), and at the end the run's config as hyperparameters with the cube's
final metrics.  ``metrics.csv`` / ``metrics.jsonl`` are written either way (``logger: csv``, the default).
"""

from __future__ import annotations

import numbers
import os
from typing import Dict, Optional

from ..errors import UnavailableError

LOGGERS = ("csv", "tensorboard")


class TensorBoardTracker:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder`` (read it with ``tensorboard --logdir``)."""

    def __init__(self, folder: os.PathLike, resume_step: int = 0) -> None:
        """``resume_step``: the optimizer step of the checkpoint a run resumes from; events that an interrupted
        run logged after it are dropped (TensorBoard's purge_step), so no step is shown twice."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency; a broken environment says so
            raise UnavailableError(f"logger 'tensorboard' needs the tensorboard package ({exc}): pip install "
                               f"tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, record: Dict[str, object]) -> None:
        """Every number of an epoch's record, at the epoch's last optimizer step (one x-axis for all)."""
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, int(record["step"]))
        self.writer.flush()

    def finish(self, config: Dict[str, object], results: Optional[Dict[str, Dict[str, float]]] = None) -> None:
        """The config as hyperparameters (lists as text), with the cube's final metrics beside them."""
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        cube = (results or {}).get("cube", {})
        metrics = {f"final/{k}": v for k, v in cube.items() if isinstance(v, float) and v == v}
        self.writer.add_hparams(hparams, metrics or {"final/none": 0.0}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
