"""The training losses and the floors beside the cube: InfoNCE, the offset, mlp and linear floors, best-epoch choice."""

import pytest
import torch
import torch.nn.functional as F

from cubecore import CubeTrainer, TrainingConfig
from cubecore.training.floors import ResidualLinear, SkipMLP, offset_fit
from cubecore.training.losses import info_nce, training_loss
from cubecore.training.metrics import retrieval


def test_info_nce_masks_duplicate_targets():
    """Two questions with the same answer: the perfect prediction is not penalised for the duplicate."""
    t = F.normalize(torch.randn(6, 16), dim=-1)
    t[3] = t[1]
    assert info_nce(t, t, temperature=0.01).item() < 1e-3
    unmasked = F.cross_entropy(t @ t.T / 0.01, torch.arange(6))
    assert unmasked.item() > 0.2, "without the mask the duplicate would cost log 2 / 6 or so"


def test_info_nce_is_lower_for_the_right_pairing():
    t = F.normalize(torch.randn(8, 16), dim=-1)
    assert info_nce(t, t).item() < info_nce(t.roll(1, 0), t).item()
    with pytest.raises(ValueError, match="temperature"):
        info_nce(t, t, temperature=0.0)


def _info_nce_all_pairs(pred, target, temperature):
    """InfoNCE written out in one piece, comparing every pair of targets element by element."""
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    duplicate = (target[:, None, :] == target[None, :, :]).all(-1)
    duplicate.fill_diagonal_(False)
    return F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), torch.arange(pred.shape[0]))


@pytest.mark.parametrize("rows_at_once", [1, 3, 7, 1024])
def test_info_nce_in_row_blocks_equals_the_whole_matrix(rows_at_once):
    torch.manual_seed(0)
    target = torch.randn(7, 5, dtype=torch.float64)
    target[4] = target[1]
    target[6] = target[1]
    pred = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    got = info_nce(pred, target, 0.3, rows_at_once=rows_at_once)
    want = _info_nce_all_pairs(pred, target, 0.3)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got, pred)
    (w,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g, w)


def test_info_nce_of_a_large_validation_set_fits_in_memory():
    """12,782 chitchat validation pairs of dimension 384 as one batch once asked for 62.7 GB (every pair of
    targets compared element by element); under a 6 GiB address-space limit it must now run."""
    code = (
        "import resource, torch\n"
        "from cubecore.training.losses import info_nce\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        "t = torch.nn.functional.normalize(torch.randn(6000, 384), dim=-1)\n"
        "print(float(info_nce(t, t)))\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 1.0


def test_combined_loss_is_the_weighted_sum():
    p, t = torch.randn(5, 8), torch.randn(5, 8)
    cfg = TrainingConfig(loss_function="combined", cosine_weight=0.5, mse_weight=0.25, infonce_weight=2.0,
                         temperature=0.2)
    want = 0.5 * (1 - F.cosine_similarity(p, t).mean()) + 0.25 * F.mse_loss(p, t) + 2.0 * info_nce(p, t, 0.2)
    torch.testing.assert_close(training_loss(p, t, cfg), want)
    with pytest.raises(ValueError, match="weight"):
        TrainingConfig(loss_function="combined", cosine_weight=0.0, mse_weight=0.0)


def _planted(n, dim=16, seed=0):
    """Targets share one large common direction; what tells them apart is a small, input-dependent part."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    common = F.normalize(torch.randn(dim, generator=gen), dim=0)
    mix = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    y = F.normalize(4.0 * common + F.normalize(torch.tanh(x @ mix) @ mix, dim=-1), dim=-1)
    return x, y


def test_info_nce_beats_cosine_on_retrieval_on_a_planted_problem(tmp_path):
    x, y = _planted(400)
    train, val = (x[:300], y[:300]), (x[300:], y[300:])
    mrr = {}
    for loss in ("cosine", "infonce"):
        cfg = TrainingConfig(loss_function=loss, epochs=15, batch_size=32, learning_rate=1e-2, patience=100,
                             device="cpu", output_dir=str(tmp_path), seed=0)
        trainer = CubeTrainer(cfg, model_factory=lambda dim: SkipMLP(dim, 32))
        trainer.fit(train, val, progress=False)
        mrr[loss] = trainer.evaluate(val, baselines=False)["cube"]["mrr"]
    assert mrr["infonce"] > mrr["cosine"] + 0.05, mrr


def test_offset_floor_maximises_the_training_mean_cosine():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    y = x + 0.7 * torch.randn(50, 6, generator=gen, dtype=torch.float64) + torch.linspace(0.2, 1.0, 6)
    offset = offset_fit(x, y).double()
    m = y.mean(0)
    c = (offset / m).mean()
    torch.testing.assert_close(offset, c * m, rtol=1e-6, atol=1e-6)

    def mean_cos(cc):
        return F.cosine_similarity(x + cc * m, y).mean().item()

    assert c > 0
    for eps in (1e-2, -1e-2, 0.3, -0.3):  # a maximum: moving c either way scores less
        assert mean_cos(c) >= mean_cos(c + eps) - 1e-7
    assert mean_cos(c) > F.cosine_similarity(x, y).mean().item()  # better than the identity


def _tiny(tmp_path, **kw):
    base = dict(lattice_size=(2, 2, 3), state_size=4, hidden_size=8, steps=2, epochs=5, batch_size=8,
                learning_rate=5e-2, device="cpu", output_dir=str(tmp_path), patience=100)
    base.update(kw)
    return TrainingConfig(**base)


def test_mlp_floor_matches_the_cube_parameter_budget(tmp_path):
    x, y = _planted(60, dim=12)
    trainer = CubeTrainer(_tiny(tmp_path, epochs=2))
    trainer.fit((x[:40], y[:40]), (x[40:], y[40:]), progress=False)
    trainer.train_floors((x[:40], y[:40]), (x[40:], y[40:]))
    results = trainer.evaluate((x[40:], y[40:]), train_data=(x[:40], y[:40]))
    cube_params = sum(p.numel() for p in trainer.model.parameters())
    assert abs(results["mlp"]["parameters"] - cube_params) <= 2 * 12 + 1
    assert results["linear"]["parameters"] == 12 * 12
    assert {"identity", "mean", "offset", "ridge", "mlp", "linear"} <= set(results)


def _planted_linear(n, dim=12, seed=0):
    """Targets that are a fixed linear map of the inputs, y = x + A x: the identity is far off, and the linear
    floor's model can represent the answer exactly (W = A)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen) / dim ** 0.5
    a = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    return x, x + x @ a.T, a


def test_linear_floor_learns_a_planted_linear_map(tmp_path):
    """Trained with the run's MSE loss, the linear floor recovers the planted map (the least-squares solution,
    W = A) and scores near 1 where the identity floor does not; a floor that is not trained, or trained without
    its residual path's zero start reaching A, fails."""
    x, y, a = _planted_linear(600)
    train, val = (x[:500], y[:500]), (x[500:], y[500:])
    cfg = _tiny(tmp_path, loss_function="mse", epochs=60, batch_size=50, learning_rate=3e-2, weight_decay=0.0)
    trainer = CubeTrainer(cfg)
    trainer.fit(train, val, progress=False)
    trainer.train_floors(train, val, names=("linear",))
    assert set(trainer.trained_floors) == {"linear"}
    w = trainer.trained_floors["linear"]["model"]["linear.weight"]
    closed_form = torch.linalg.lstsq(train[0].double(), (train[1] - train[0]).double()).solution.T
    torch.testing.assert_close(closed_form.float(), a, atol=1e-4, rtol=0)  # the planted map is the closed form
    assert (w - a).abs().max().item() < 1e-3, (w - a).abs().max().item()
    results = trainer.evaluate(val, train_data=train)
    assert results["linear"]["cosine"] > 0.995, results["linear"]
    assert results["identity"]["cosine"] < 0.8, results["identity"]
    assert results["linear"]["r@1"] > results["identity"]["r@1"]


def test_linear_floor_starts_as_the_identity():
    x = torch.randn(5, 7)
    floor = ResidualLinear(7)
    assert torch.equal(floor(x), x) and floor.get_info()["parameters"] == 49


@pytest.mark.parametrize("select_by", ["val_loss", "val_cosine", "val_mrr"])
def test_best_epoch_is_chosen_by_select_by_and_its_weights_are_scored(tmp_path, select_by):
    x, y = _planted(80, dim=12, seed=3)
    train, val = (x[:60], y[:60]), (x[60:], y[60:])
    trainer = CubeTrainer(_tiny(tmp_path, select_by=select_by, learning_rate=0.3, epochs=6))
    trainer.fit(train, val, progress=False)
    pick = min if select_by == "val_loss" else max
    best = pick(trainer.history, key=lambda h: h[select_by])["epoch"]
    assert trainer.best_epoch == best and trainer.scored_epoch() == best
    scored = trainer.evaluate(val, baselines=False)["cube"]
    key = {"val_loss": None, "val_cosine": "cosine", "val_mrr": "mrr"}[select_by]
    if key is not None:  # the scored weights are the best epoch's: they reproduce its validation figure
        assert scored[key] == pytest.approx(trainer.history[best - 1][select_by], abs=1e-5)
    loaded = CubeTrainer.from_checkpoint(trainer.save_checkpoint(tmp_path / "ck.pt"))
    assert loaded.evaluate(val, baselines=False)["cube"] == scored
    last = trainer.evaluate(val, baselines=False, weights="last")["cube"]
    assert (last == scored) == (best == trainer.epoch)
