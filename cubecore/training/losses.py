"""The training losses, always computed in float32: cosine, MSE, in-batch InfoNCE, and their weighted sum.

InfoNCE scores each prediction against every target of its batch: the true target is the positive, the
others are negatives, except targets identical to the true one (the same answer to two questions), which
are masked out rather than counted as wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_number


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1,
             rows_at_once: int = 1024) -> torch.Tensor:
    """Cross-entropy of each prediction's true target among the batch's targets, cosine / temperature.

    Identical targets are found through ``torch.unique`` (N x D work) and the logits are built
    ``rows_at_once`` predictions at a time, so a whole validation set as one batch holds rows x N values, not
    the N x N x D of comparing every pair of targets element by element."""
    temperature = check_number("temperature", temperature, minimum=0.0, strict_minimum=True)
    n = pred.shape[0]
    pred, target_unit = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    _, answer = torch.unique(target, dim=0, return_inverse=True)  # equal ids: identical targets
    labels = torch.arange(n, device=pred.device)
    total = pred.new_zeros(())
    for start in range(0, n, rows_at_once):
        rows = labels[start:start + rows_at_once]
        logits = pred[rows] @ target_unit.T / temperature
        duplicate = answer[rows, None] == answer[None, :]
        duplicate[torch.arange(rows.numel(), device=pred.device), rows] = False
        logits = logits.masked_fill(duplicate, float("-inf"))
        total = total + F.cross_entropy(logits, rows, reduction="sum")
    return total / n


def training_loss(pred: torch.Tensor, target: torch.Tensor, config) -> torch.Tensor:
    """``config.loss_function`` of a TrainingConfig: one loss, or ``combined``, the sum of each loss times its
    weight (``cosine_weight``, ``mse_weight``, ``infonce_weight``)."""
    pred, target = pred.float(), target.float()
    terms = {"cosine": lambda: cosine_loss(pred, target), "mse": lambda: F.mse_loss(pred, target),
             "infonce": lambda: info_nce(pred, target, config.temperature)}
    if config.loss_function != "combined":
        return terms[config.loss_function]()
    weights = {"cosine": config.cosine_weight, "mse": config.mse_weight, "infonce": config.infonce_weight}
    return sum(w * terms[name]() for name, w in weights.items() if w > 0)
