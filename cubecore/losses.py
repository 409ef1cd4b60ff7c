"""The training losses, always computed in float32: cosine, MSE, in-batch InfoNCE, and their weighted sum.

InfoNCE scores each prediction against every target of its batch: the true target is the positive, the
others are negatives, except targets identical to the true one (the same answer to two questions), which
are masked out rather than counted as wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_number


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy of each prediction's true target among the batch's targets, cosine / temperature."""
    temperature = check_number("temperature", temperature, minimum=0.0, strict_minimum=True)
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    duplicate = (target[:, None, :] == target[None, :, :]).all(-1)
    duplicate.fill_diagonal_(False)
    logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))


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
