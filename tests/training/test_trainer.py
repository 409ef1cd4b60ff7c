"""CubeTrainer: training in each mode, checkpoints that resume exactly, early stopping, the reshapers' fit."""

import pytest
import torch

from conftest import FakeEncoder, tiny_config
from cubecore import CubeTrainer, TrainingConfig
from cubecore.data import prepare_data


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "readout_skip"])
@pytest.mark.parametrize("mode", ["autoencoder", "dialogue", "mixed"])
def test_a_few_epochs_reduce_the_loss_in_each_mode(tmp_path, dialogue_file, mode, skip):
    data_path = dialogue_file
    if mode == "autoencoder":
        data_path = str(tmp_path / "texts.txt")
        (tmp_path / "texts.txt").write_text("\n".join(f"sentence {i}" for i in range(60)))
    cfg = tiny_config(tmp_path, mode=mode, data=data_path, epochs=12, learning_rate=3e-2, readout_skip=skip)
    data = prepare_data(cfg.data, cfg.seed, FakeEncoder())
    trainer = CubeTrainer(cfg)
    trainer.initialize_components(dim=data.train[0].shape[1])
    x, y = data.train

    def train_loss():
        return trainer.loss(trainer.predict(x), y).item()

    before = train_loss()
    trainer.fit(data.train, data.val, progress=False)
    after = train_loss()
    if skip and mode == "autoencoder":  # the skip path starts as the identity: already the answer
        assert before < 1e-6 and after < 0.05, (before, after)
    else:  # in mixed mode half the pairs map an answer to itself, which the skip path's start already solves
        assert after < (0.98 if skip and mode == "mixed" else 0.9) * before, (before, after)
    assert set(trainer.evaluate(data.val, train_data=data.train)) == {"cube", "identity", "mean", "offset", "ridge"}
    trainer.train_floors(data.train, data.val)
    results = trainer.evaluate(data.val, train_data=data.train)
    assert set(results) == {"cube", "identity", "mean", "offset", "ridge", "mlp", "linear"}
    assert ("semantic_preservation" in results["cube"]) == (mode == "autoencoder")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    trainer = CubeTrainer(tiny_config(tmp_path))
    trainer.fit((x, x), progress=False)
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    loaded = CubeTrainer.from_checkpoint(path)
    assert torch.equal(loaded.predict(x), trainer.predict(x))
    assert loaded.epoch == trainer.epoch and loaded.history == trainer.history
    assert loaded.get_info()["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_saved_before_a_key_existed_loads_as_the_model_it_trained(tmp_path):
    """Runs saved before readout_skip and global_channels existed trained without them: loading one must not
    give it today's defaults (a missing weight, or a skip path it never had)."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    trainer = CubeTrainer(tiny_config(tmp_path, readout_skip=False, global_channels=0))
    trainer.fit((x, torch.roll(x, 1, dims=1)), progress=False)
    state = load_checkpoint_file(trainer.save_checkpoint(tmp_path / "ck.pt"))
    for key in ("readout_skip", "global_channels"):
        del state["config"]["model"][key]
    save_checkpoint_file(state, tmp_path / "old.pt")
    loaded = CubeTrainer.from_checkpoint(tmp_path / "old.pt")
    assert not loaded.config.model.readout_skip and loaded.config.model.global_channels == 0
    assert torch.equal(loaded.predict(x), trainer.predict(x))



def test_trained_floors_round_trip_and_an_older_checkpoint_keeps_its_mlp(tmp_path):
    """The mlp and linear floors are stored in the checkpoint and scored from it without training; a checkpoint
    written before the linear floor existed (its mlp under the old key) loads its mlp and lacks the linear."""
    from cubecore.training.checkpoint import load_checkpoint_file, save_checkpoint_file

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    y = torch.roll(x, 1, dims=1)
    trainer = CubeTrainer(tiny_config(tmp_path))
    trainer.fit((x[:30], y[:30]), (x[30:], y[30:]), progress=False)
    trainer.train_floors((x[:30], y[:30]), (x[30:], y[30:]))
    want = trainer.evaluate((x[30:], y[30:]), train_data=(x[:30], y[:30]))
    assert want["linear"]["cosine"] > want["identity"]["cosine"]  # it trained: a zero W is the identity
    state = load_checkpoint_file(trainer.save_checkpoint(tmp_path / "ck.pt"))
    loaded = CubeTrainer.from_checkpoint(tmp_path / "ck.pt")
    assert loaded.evaluate((x[30:], y[30:]), train_data=(x[:30], y[:30])) == want
    state["mlp_floor"] = state.pop("trained_floors")["mlp"]
    save_checkpoint_file(state, tmp_path / "old.pt")
    old = CubeTrainer.from_checkpoint(tmp_path / "old.pt").evaluate((x[30:], y[30:]), train_data=(x[:30], y[:30]))
    assert "linear" not in old and old["mlp"] == want["mlp"]

def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(50, 12), dim=-1)
    y = torch.roll(x, 1, dims=1)
    straight = CubeTrainer(tiny_config(tmp_path, epochs=4))
    straight.fit((x, y), (x[:10], y[:10]), progress=False)

    first = CubeTrainer(tiny_config(tmp_path, epochs=4))
    first.fit((x, y), (x[:10], y[:10]), epochs=2, progress=False)  # "killed" after epoch 2
    first.save_checkpoint(tmp_path / "half.pt")
    del first
    resumed = CubeTrainer.from_checkpoint(tmp_path / "half.pt")
    resumed.fit((x, y), (x[:10], y[:10]), progress=False)
    assert resumed.epoch == straight.epoch == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_bad_training_data_raises(tmp_path):
    trainer = CubeTrainer(tiny_config(tmp_path))
    with pytest.raises(ValueError, match="NaN"):
        trainer.fit((torch.full((4, 12), float("nan")), torch.zeros(4, 12)), progress=False)
    with pytest.raises(ValueError, match="matching"):
        trainer.fit((torch.zeros(4, 12), torch.zeros(5, 12)), progress=False)
    with pytest.raises(ValueError, match="lattice_size"):
        CubeTrainer(tiny_config(tmp_path)).initialize_components(dim=10)


def test_target_similarity_stops_at_the_first_epoch_that_reaches_it(tmp_path):
    """A target between the first epoch's validation cosine and the best one reached: training stops at the
    first epoch at or above it, and not before."""
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 12), dim=-1)
    y = torch.roll(x, 1, dims=1)
    free = CubeTrainer(tiny_config(tmp_path, epochs=8, patience=100, learning_rate=3e-2))
    cosines = [r["val_cosine"] for r in free.fit((x, y), (x, y), progress=False)]
    target = (cosines[0] + max(cosines)) / 2
    assert cosines[0] < target, cosines
    expected = next(i for i, c in enumerate(cosines) if c >= target) + 1
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=8, patience=100, learning_rate=3e-2, target_similarity=target))
    history = trainer.fit((x, y), (x, y), progress=False)
    assert len(history) == expected and "target_similarity" in history[-1]["stopped"]


@pytest.mark.parametrize("method", ["adaptive", "semantic"])
def test_fitting_reshapers_are_fit_on_the_training_inputs_and_saved(tmp_path, method):
    """adaptive / semantic place embedding dimensions by a fit on the training inputs; the fit travels with the
    checkpoint (not the identity permutation of an unfitted reshaper)."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 3.0, 12)[torch.randperm(12, generator=gen)]
    x = torch.randn(40, 12, generator=gen) * scale
    trainer = CubeTrainer(tiny_config(tmp_path, epochs=1, reshaping_method=method))
    trainer.fit((x, x), progress=False)
    reshaper = trainer.model.reshaper
    assert reshaper.is_fitted
    assert not torch.equal(reshaper.permutation, torch.arange(12)), "the fit placed the dimensions"
    loaded = CubeTrainer.from_checkpoint(trainer.save_checkpoint(tmp_path / "ck.pt"))
    assert loaded.model.reshaper.is_fitted
    assert torch.equal(loaded.predict(x), trainer.predict(x))


def test_infonce_without_negatives_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(loss_function="infonce", batch_size=1)
    x = torch.randn(20, 12)
    same = torch.randn(1, 12).expand(20, 12).clone()
    trainer = CubeTrainer(tiny_config(tmp_path, loss_function="infonce"))
    with pytest.raises(ValueError, match="two different targets"):
        trainer.fit((x, same), progress=False)


@pytest.mark.parametrize("settings", [dict(cosine_weight=1e30, mse_weight=1e30), dict(mse_weight=1e38)])
def test_a_gradient_that_overflows_stops_the_run_naming_the_step_and_the_keys(tmp_path, settings):
    """Weights this large overflow the gradient norm in float32: the updates used to vanish and the cube stayed
    the identity without a word."""
    from cubecore.errors import TrainingDivergedError

    torch.manual_seed(0)
    trainer = CubeTrainer(tiny_config(tmp_path, **settings))
    x = torch.randn(16, 12)
    with pytest.raises(TrainingDivergedError, match=r"step 0.*cosine_weight, mse_weight"):
        trainer.fit((x, x.roll(1, 1)), progress=False)
