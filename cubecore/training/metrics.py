"""``EmbeddingMetrics``: how close predicted embeddings are to their targets, next to honest floors.

Raw cosine between unrelated sentence embeddings is high, so every report carries baselines computed on the
same split: ``identity`` (predict the input), ``mean`` (predict the mean training target), ``offset`` (the
input plus a fitted multiple of the mean training target) and ``ridge`` (a closed-form linear map fit on the
training pairs); the trainer adds ``mlp`` and ``linear`` (``cubecore.training.floors``); and retrieval: the
rank of the true target among the distinct validation targets (R@1, R@5, R@10, MRR).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..checks import check_int, check_number, check_tensor
from .floors import offset_fit
from ..errors import InvalidValueError


def cosine_stats(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    cos = F.cosine_similarity(pred.double(), target.double(), dim=-1)
    q = torch.quantile(cos, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"cosine": cos.mean().item(), "cosine_std": cos.std(unbiased=False).item(),
            "cosine_p10": q[0].item(), "cosine_p50": q[1].item(), "cosine_p90": q[2].item()}


# How retrieval is counted, in words: stored with results that are merged across runs (the learning study), so
# that figures counted another way are never put in one table with these.
RETRIEVAL_RULE = "rank of the own target among the distinct targets, ties with another target against"


def retrieval_ranks(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each prediction, the rank (1 = best, by cosine) of its own target among the distinct targets.

    This is the corpus of an information-retrieval evaluation (sentence-transformers'
    ``InformationRetrievalEvaluator`` over the distinct answers): identical target rows (one answer given to two
    questions) are one candidate, so a duplicate never counts against the prediction.  A different target with
    exactly the same score counts against it, so a prediction that scores every target alike (all zeros) ranks
    last, not first; so does a prediction or target that is not finite."""
    _check_pairs(pred, targets, "retrieval")
    distinct, own = torch.unique(targets, dim=0, return_inverse=True)
    sim = F.normalize(pred.double(), dim=-1) @ F.normalize(distinct.double(), dim=-1).T
    true = sim.gather(1, own[:, None])
    ranks = (sim >= true).sum(1)
    return torch.where(true.squeeze(1).isnan(), distinct.shape[0], ranks)


def retrieval(pred: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """R@1, R@5, R@10 and MRR of ``retrieval_ranks``."""
    ranks = retrieval_ranks(pred, targets)
    return {"r@1": (ranks <= 1).double().mean().item(), "r@5": (ranks <= 5).double().mean().item(),
            "r@10": (ranks <= 10).double().mean().item(), "mrr": (1.0 / ranks.double()).mean().item()}


def ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """W [dim_in + 1, dim_out] minimising |[X 1] W - Y|^2 + alpha |W|^2 (the bias is not penalised)."""
    X = torch.cat([inputs.double(), torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    reg = alpha * torch.eye(X.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(X.T @ X + reg, X.T @ targets.double())


def ridge_predict(weights: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    X = torch.cat([inputs.double(), torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    return (X @ weights).float()


RIDGE_ALPHAS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


DEFAULT_RIDGE_ALPHA = 1.0


def _check_pairs(inputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    check_tensor(f"{what} inputs", inputs, "[N, dim]", ndim=2)
    check_tensor(f"{what} targets", targets, "[N, dim]", ndim=2)
    if inputs.shape[0] != targets.shape[0]:
        raise InvalidValueError(f"{what} inputs and targets must have as many rows, got {inputs.shape[0]} and "
                         f"{targets.shape[0]}")


def choose_ridge_alpha(inputs: torch.Tensor, targets: torch.Tensor, alphas=RIDGE_ALPHAS, folds: int = 5,
                       seed: int = 0) -> float:
    """The regularisation with the best mean cosine in k-fold cross-validation on the training pairs only, so
    that the ridge floor is as strong as a careful user would make it without looking at validation.

    Any number n >= 2 of pairs works: the pairs split into min(folds, n) folds whose sizes differ by at most one
    (leave-one-out below ``folds`` pairs); a single pair leaves nothing to validate on and gets the default.
    scikit-learn's ``RidgeCV`` with these folds and a mean-cosine scorer picks the same alpha (coefficients equal
    to 1e-14 on chatterbot) but takes 4-5x as long, so this stays."""
    _check_pairs(inputs, targets, "choose_ridge_alpha")
    folds = check_int("folds", folds, minimum=2)
    seed = check_int("seed", seed)
    alphas = tuple(check_number("alphas", a, minimum=0.0, strict_minimum=True) for a in alphas)
    if not alphas:
        raise InvalidValueError("alphas is empty")
    n = inputs.shape[0]
    folds = min(folds, n)
    if folds < 2:
        return DEFAULT_RIDGE_ALPHA
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order.tensor_split(folds)  # exactly ``folds`` non-empty parts (chunk may give fewer)
    scores = []
    for alpha in alphas:
        total = 0.0
        for k in range(folds):
            held = parts[k]
            kept = torch.cat([parts[j] for j in range(folds) if j != k])
            pred = ridge_predict(ridge_fit(inputs[kept], targets[kept], alpha), inputs[held])
            total += F.cosine_similarity(pred.double(), targets[held].double(), dim=-1).mean().item()
        scores.append(total / folds)
    return alphas[max(range(len(alphas)), key=lambda i: scores[i])]


def semantic_preservation(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """Pearson correlation between the pairwise cosine similarities among inputs and among outputs."""
    n = inputs.shape[0]
    if n < 3:
        return float("nan")
    iu = torch.triu_indices(n, n, offset=1)
    a = F.normalize(inputs.double(), dim=-1)
    b = F.normalize(outputs.double(), dim=-1)
    sa, sb = (a @ a.T)[iu[0], iu[1]], (b @ b.T)[iu[0], iu[1]]
    return torch.corrcoef(torch.stack([sa, sb]))[0, 1].item()


class EmbeddingMetrics:
    """Scores predictions on a split; ``baselines`` fits the floors on the training pairs (the ridge's
    regularisation chosen by cross-validation on them unless ``ridge_alpha`` is given)."""

    def __init__(self, train_inputs: torch.Tensor, train_targets: torch.Tensor,
                 ridge_alpha: Optional[float] = None) -> None:
        _check_pairs(train_inputs, train_targets, "training")
        if train_inputs.shape[0] < 1:
            raise InvalidValueError("EmbeddingMetrics needs at least one training pair")
        if ridge_alpha is not None:
            ridge_alpha = check_number("ridge_alpha", ridge_alpha, minimum=0.0, strict_minimum=True)
        train_inputs, train_targets = train_inputs.detach().cpu(), train_targets.detach().cpu()
        self.mean_target = train_targets.double().mean(0)
        self.offset = offset_fit(train_inputs, train_targets)
        self.ridge_alpha = ridge_alpha if ridge_alpha is not None else choose_ridge_alpha(train_inputs, train_targets)
        self.ridge = ridge_fit(train_inputs, train_targets, self.ridge_alpha)

    @staticmethod
    def score(pred: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
              autoencoder: bool = False) -> Dict[str, float]:
        check_tensor("pred", pred, "[N, dim]", ndim=2)
        check_tensor("targets", targets, "[N, dim]", ndim=2)
        if autoencoder:
            check_tensor("inputs", inputs, "[N, dim]", ndim=2)
        pred, targets = pred.detach().float().cpu(), targets.detach().float().cpu()
        out = cosine_stats(pred, targets)
        out["mse"] = F.mse_loss(pred, targets).item()
        out.update(retrieval(pred, targets))
        if autoencoder:
            out["semantic_preservation"] = semantic_preservation(inputs.detach().cpu(), pred)
        return out

    def baselines(self, inputs: torch.Tensor, targets: torch.Tensor,
                  autoencoder: bool = False) -> Dict[str, Dict[str, float]]:
        _check_pairs(inputs, targets, "baseline")
        inputs = inputs.detach().float().cpu()
        preds = {"identity": inputs,
                 "mean": self.mean_target.float().expand(inputs.shape[0], -1),
                 "offset": inputs + self.offset,
                 "ridge": ridge_predict(self.ridge, inputs)}
        return {name: self.score(p, inputs, targets, autoencoder) for name, p in preds.items()}
