"""EmbeddingMetrics on hand-computed cases, and the ridge floor recovering a planted linear map."""

import math

import numpy as np
import pytest
import torch

from cubecore import EmbeddingMetrics
from cubecore.training.metrics import (RIDGE_ALPHAS, cosine_stats, retrieval, retrieval_ranks, ridge_fit,
                                      ridge_predict, semantic_preservation)


def test_cosine_by_hand():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    stats = cosine_stats(pred, target)
    assert stats["cosine"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_retrieval_by_hand():
    targets = torch.eye(3)
    pred = torch.tensor([[1.0, 0.1, 0.0],    # own target first: rank 1
                         [1.0, 0.5, 0.0],    # target 0 beats own target 1: rank 2
                         [0.0, 1.0, 0.2]])   # own target 2 ranks behind 1 (and ties 0 at 0? no: 0 < 0.2)
    r = retrieval(pred, targets)
    assert r["r@1"] == pytest.approx(1 / 3)
    assert r["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert r["r@5"] == 1.0


def test_a_prediction_that_scores_every_target_alike_ranks_last_and_so_does_a_nan():
    targets = torch.randn(10, 4)
    targets[7] = targets[2]                                    # 9 distinct targets
    assert retrieval_ranks(torch.zeros(10, 4), targets).tolist() == [9] * 10
    pred = targets.clone()
    pred[3] = float("nan")
    assert retrieval_ranks(pred, targets).tolist() == [1, 1, 1, 9, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="as many rows, got 3 and 1"):
        retrieval_ranks(torch.randn(3, 4), torch.randn(1, 4))


def test_a_duplicate_answer_is_one_candidate_and_a_tie_between_different_answers_counts_against():
    a, b = [1.0, 0.0], [0.0, 1.0]
    targets = torch.tensor([a, a, b])          # questions 0 and 1 have the same answer
    pred = torch.tensor([a,                    # its answer first; its duplicate is not a rival: rank 1
                         [1.0, 0.2],           # the same for the other question with that answer: rank 1
                         [1.0, 1.0]])          # its answer b ties the different answer a: counted against, rank 2
    assert retrieval_ranks(pred, targets).tolist() == [1, 1, 2]
    r = retrieval(pred, targets)
    assert r["r@1"] == pytest.approx(2 / 3) and r["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)


def test_retrieval_is_sentence_transformers_information_retrieval_over_the_distinct_answers():
    """The same numbers as sentence-transformers' evaluator given the distinct answers as its corpus."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    g = torch.Generator().manual_seed(0)
    answers = torch.randn(40, 8, generator=g)
    which = torch.randint(0, 40, (120,), generator=g)            # 120 questions, many sharing an answer
    targets = answers[which]
    pred = targets + 1.5 * torch.randn(120, 8, generator=g)
    used = sorted(set(which.tolist()))

    class Precomputed:                                           # the model: a lookup of the embeddings above
        def encode_query(self, texts, **kwargs):
            return pred[[int(t) for t in texts]]

        def encode_document(self, texts, **kwargs):
            return answers[[int(t) for t in texts]]

    evaluator = InformationRetrievalEvaluator(
        {str(i): str(i) for i in range(120)}, {f"a{j}": str(j) for j in used},
        {str(i): {f"a{int(which[i])}"} for i in range(120)}, accuracy_at_k=[1, 5, 10], mrr_at_k=[10],
        score_functions={"cos": cos_sim}, write_csv=False)
    theirs = evaluator.compute_all_metrics(Precomputed())["cos"]
    ranks = retrieval_ranks(pred, targets)
    assert 0.1 < theirs["accuracy@k"][1] < 0.9                   # neither trivial nor hopeless
    for k in (1, 5, 10):
        assert (ranks <= k).double().mean().item() == pytest.approx(theirs["accuracy@k"][k], abs=1e-12), k
    ours_mrr10 = torch.where(ranks <= 10, 1.0 / ranks.double(), 0.0).mean().item()
    assert ours_mrr10 == pytest.approx(theirs["mrr@k"][10], abs=1e-12)


def test_ridge_recovers_a_planted_linear_map():
    torch.manual_seed(0)
    W = torch.randn(6, 4)
    b = torch.randn(4)
    x = torch.randn(500, 6)
    y = x @ W + b
    fitted = ridge_fit(x, y, alpha=1e-6)
    torch.testing.assert_close(fitted[:-1].float(), W, atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted[-1].float(), b, atol=1e-4, rtol=0)
    test = torch.randn(20, 6)
    torch.testing.assert_close(ridge_predict(fitted, test), test @ W + b, atol=1e-4, rtol=0)


def test_baselines_and_semantic_preservation():
    torch.manual_seed(1)
    x = torch.randn(100, 5)
    y = x @ torch.randn(5, 5)
    m = EmbeddingMetrics(x[:80], y[:80], ridge_alpha=1e-6)
    base = m.baselines(x[80:], y[80:], autoencoder=True)
    assert base["ridge"]["cosine"] > 0.999 and base["ridge"]["r@1"] == 1.0
    assert base["identity"]["cosine"] < base["ridge"]["cosine"]
    assert semantic_preservation(x, x) == pytest.approx(1.0)
    assert semantic_preservation(x, 3 * x) == pytest.approx(1.0)
    assert semantic_preservation(x, torch.randn(100, 5)) < 0.5


def test_ridge_alpha_is_chosen_on_training_data():
    from cubecore.training.metrics import choose_ridge_alpha

    torch.manual_seed(2)
    x = torch.randn(60, 40)
    clean = x @ torch.randn(40, 3) * 0.1
    noisy = clean + torch.randn(60, 3)  # few samples, many inputs, much noise: strong shrinkage wins
    assert choose_ridge_alpha(x, noisy) >= 10.0
    exact = x[:, :3] * 2.0
    assert choose_ridge_alpha(x, exact) <= 0.1


@pytest.mark.parametrize("n", list(range(1, 21)) + [23, 31, 47, 64])
def test_metrics_work_for_any_number_of_training_pairs(n):
    """k-fold cross-validation of the ridge floor on n pairs (it used to raise IndexError for 11, 12 or 16)."""
    torch.manual_seed(n)
    W = torch.randn(6, 6)
    x = torch.randn(n, 6)
    m = EmbeddingMetrics(x, x @ W)
    assert m.ridge_alpha in RIDGE_ALPHAS or (n == 1 and m.ridge_alpha == 1.0)
    assert m.ridge.shape == (7, 6) and torch.isfinite(m.ridge).all()
    vx = torch.randn(5, 6)
    base = m.baselines(vx, vx @ W, autoencoder=True)
    assert set(base) == {"identity", "mean", "offset", "ridge"}
    assert all(math.isfinite(base[k]["cosine"]) for k in base)


@pytest.mark.parametrize("n", [2, 3, 5, 11, 12, 16, 17])
def test_cross_validation_uses_every_pair_once_as_held_out(n, monkeypatch):
    """Every fold is non-empty and the folds cover the n training pairs exactly once."""
    import cubecore.training.metrics as metrics

    held_out = []
    real_predict = metrics.ridge_predict

    def spy(weights, inputs):
        held_out.append(inputs.clone())
        return real_predict(weights, inputs)

    monkeypatch.setattr(metrics, "ridge_predict", spy)
    x = torch.arange(n, dtype=torch.float64).unsqueeze(1) * torch.ones(1, 3)
    metrics.choose_ridge_alpha(x, x, alphas=(1.0,), folds=5)
    assert len(held_out) == min(5, n)
    assert all(h.shape[0] >= 1 for h in held_out)
    assert sorted(torch.cat(held_out)[:, 0].tolist()) == list(range(n))


def test_metrics_argument_checks():
    x = torch.randn(10, 4)
    with pytest.raises(TypeError, match="training inputs"):
        EmbeddingMetrics(x.tolist(), x)
    with pytest.raises(ValueError, match="rows"):
        EmbeddingMetrics(x, x[:5])
    with pytest.raises(ValueError, match="at least one"):
        EmbeddingMetrics(x[:0], x[:0])
    with pytest.raises(ValueError, match="ridge_alpha"):
        EmbeddingMetrics(x, x, ridge_alpha=0.0)
    with pytest.raises(TypeError, match="ridge_alpha"):
        EmbeddingMetrics(x, x, ridge_alpha="1")
    from cubecore.training.metrics import choose_ridge_alpha

    with pytest.raises(TypeError, match="folds"):
        choose_ridge_alpha(x, x, folds=2.5)
    with pytest.raises(ValueError, match="folds"):
        choose_ridge_alpha(x, x, folds=1)
    assert choose_ridge_alpha(x, x, folds=np.int64(3)) in RIDGE_ALPHAS
    with pytest.raises(TypeError, match="pred"):
        EmbeddingMetrics.score(None, x, x)
