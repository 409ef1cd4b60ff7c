"""A trained NCA's export (RUN_DIR/model, NcaModel.from_pretrained) and the models a run starts from
(nca.init_from: a run's model folder, or one of the upstream's pretrained models, converted by
cubecore.nca.artefacts)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from cubecore.errors import InvalidValueError
from cubecore.nca.__main__ import main
from cubecore.nca.config import NcaTrainingConfig
from cubecore.nca.model import NcaModel
from cubecore.nca.trainer import NcaTrainer
from cubecore.training.checkpoint import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
HOUSE_MODEL = ROOT / "tests" / "fixtures" / "artefacts_nca" / "PlainVillageHouse.pt"
TINY = ["--target", "villages_light", "--lattice", "5x5x5", "iterations=4", "checkpoint_every=2",
        "nca.batch_size=2", "nca.pool_size=4", "nca.min_steps=2", "nca.max_steps=3", "nca.hidden_channels=2",
        "eval_samples=2", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("nca") / "run"
    assert main([*TINY, "--output-dir", str(out)]) == 0
    return out


def test_a_run_writes_its_model_and_from_pretrained_loads_it(trained):
    folder = trained / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["kind"] == "blocks" and saved["config"]["lattice_size"] == [5, 5, 5] and saved["dead_air"]
    model = NcaModel.from_pretrained(folder)
    weights = load_checkpoint_file(trained / "last.pt")["model"]
    assert model.core.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.core.state_dict()[k], weights[k]) for k in weights)
    assert model.types == 4 and model.config.state_size == 4 + 1 + 2 and model.names[0] == "air"
    # it grows as the trainer does, from the same seed and fire masks
    trainer = NcaTrainer.from_checkpoint(trained / "last.pt")
    torch.manual_seed(3)
    want = trainer.grow(trainer.seeds(2), 5)
    torch.manual_seed(3)
    got = model.grow(2, steps=5)
    assert torch.equal(got, want) and model.voxels(got).shape == (2, 5, 5, 5)
    assert "| grown |" in (folder / "README.md").read_text()


def test_a_run_with_its_own_seed_state_exports_it_and_the_model_grows_from_it(tmp_path):
    import numpy as np

    seed = np.random.default_rng(0).uniform(0.0, 1.0, (5, 5, 5, 7)).astype(np.float32)
    np.save(tmp_path / "seed.npy", seed)
    out = tmp_path / "run"
    assert main([*TINY, "--output-dir", str(out), f"nca.seed_state={tmp_path / 'seed.npy'}"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["seed_state"] is True
    model = NcaModel.from_pretrained(out / "model")
    assert torch.equal(model.seed(2), torch.from_numpy(seed).expand(2, 5, 5, 5, 7))
    trainer = NcaTrainer.from_checkpoint(out / "last.pt")
    torch.manual_seed(3)
    want = trainer.grow(trainer.seeds(2), 4)
    torch.manual_seed(3)
    assert torch.equal(model.grow(2, steps=4), want)


def test_a_model_without_depthwise_perception_grows(tmp_path):
    out = tmp_path / "concat"
    assert main([*TINY, "--output-dir", str(out), "model.perception=concat"]) == 0
    model = NcaModel.from_pretrained(out / "model")
    assert model.core.perception is None and model.grow(2, steps=2).shape == (2, 5, 5, 5, 7)


def test_from_pretrained_refuses_what_is_not_an_nca_model(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="looks like a run folder: its model is"):
        NcaModel.from_pretrained(trained)
    copy = tmp_path / "model"
    shutil.copytree(trained / "model", copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a value's byte flipped
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InvalidValueError, match="corrupted"):
        NcaModel.from_pretrained(copy)
    (copy / "config.json").write_text(json.dumps({"input_dim": 3, "config": {}}))
    with pytest.raises(InvalidValueError, match="not the config of a cubecore NcaModel"):
        NcaModel.from_pretrained(copy)


def test_init_from_a_runs_model_starts_there_and_resume_does_not_read_it_again(trained, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(trained / "model", start)
    config = NcaTrainingConfig.from_yaml(trained / "config.yaml").override(**{"nca.init_from": str(start)})
    trainer = NcaTrainer(config)
    weights = load_checkpoint_file(trained / "last.pt")["model"]
    assert all(torch.equal(p, weights[name]) for name, p in trainer.core.named_parameters())
    out = tmp_path / "on"
    assert main([*TINY, "--output-dir", str(out), f"nca.init_from={start}", "iterations=2"]) == 0
    assert yaml_value(out, "init_from") == str(start)
    shutil.rmtree(start)  # a resumed run has its weights in last.pt
    assert main(["--resume", "--output-dir", str(out), "iterations=4", "--quiet"]) == 0
    assert load_checkpoint_file(out / "last.pt")["iteration"] == 4


def yaml_value(out, key):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["nca_training"]["nca"][key]


def test_relative_paths_to_a_seed_state_and_a_model_folder_are_kept_absolute(trained, tmp_path, monkeypatch):
    """A run (or --seeds study) resumed from another directory finds them: config.yaml holds absolute paths."""
    import numpy as np

    shutil.copytree(trained / "model", tmp_path / "start")
    np.save(tmp_path / "seed.npy", np.zeros((5, 5, 5, 7), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--output-dir", "out", "nca.init_from=start", "nca.seed_state=seed.npy", "iterations=2"]) == 0
    assert yaml_value(tmp_path / "out", "init_from") == str(tmp_path / "start")
    assert yaml_value(tmp_path / "out", "seed_state") == str(tmp_path / "seed.npy")


def test_init_from_a_training_checkpoint_says_what_to_give_instead(trained, tmp_path, capsys):
    assert main([*TINY, "--output-dir", str(tmp_path / "o"), f"nca.init_from={trained / 'last.pt'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a cubecore training checkpoint, not a model: give its run's model folder" in err[0]


def test_init_from_a_model_of_another_kind_of_state_is_refused(tmp_path, capsys):
    """An RGBA model whose weights happen to have a blocks run's shapes: its channels mean other things."""
    rgba = tmp_path / "rgba"
    tiny = ["--target", "tree_rgba", "--lattice", "5x7x5", *[a for a in TINY[4:] if a != "nca.hidden_channels=2"]]
    assert main([*tiny, "nca.hidden_channels=3", "--output-dir", str(rgba)]) == 0
    capsys.readouterr()
    # villages_light: 3 block types + air, the living channel, 2 hidden = 7 channels, as the RGBA model's 4 + 3
    assert main([*TINY, "--output-dir", str(tmp_path / "o"), f"nca.init_from={rgba / 'model'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the model's state is another's (rgba, living channel 3; this run's: blocks" in err[0]


def test_init_from_an_upstream_model_for_an_rgba_target_is_refused(tmp_path, capsys):
    args = ["--target", "tree_rgba", "--lattice", "5x7x5", *TINY[4:], f"nca.init_from={HOUSE_MODEL}"]
    assert main([*args, "--output-dir", str(tmp_path / "o")]) == 2
    assert "the upstream's models grow block types, this run's target is rgba" in capsys.readouterr().err


def test_init_from_the_upstream_house_model_grows_the_shipped_house():
    """The upstream's PlainVillageHouse, converted, grows the shipped plain_village_house (the same structure, its
    block types in the same order) before any training."""
    config = NcaTrainingConfig(**{"nca.target": "plain_village_house", "nca.hidden_channels": 10,
                                  "nca.init_from": str(HOUSE_MODEL), "nca.min_steps": 48, "nca.max_steps": 60,
                                  "eval_samples": 1, "device": "cpu", "nca.batch_size": 2})
    trainer = NcaTrainer(config)
    assert trainer.config.model.lattice_size == (10, 10, 10) and trainer.config.model.state_size == 21
    assert trainer.quick_metrics()["accuracy"] > 0.9  # 1.0 at seed 0


@pytest.mark.parametrize("extra, message", [
    ([f"nca.init_from={HOUSE_MODEL}"], r"nca.init_from .*PlainVillageHouse.pt: the model's state has 21 channels, "
                                       r"this run's 7 .*: set nca.hidden_channels=16"),
    ([f"nca.init_from={HOUSE_MODEL}", "nca.hidden_channels=16", "model.hidden_size=16"],
     r"does not have this run's weights .*set model.hidden_size=32 model.hidden_layers=2"),
    (["nca.init_from=nowhere.pt"], "nca.init_from not found: nowhere.pt"),
    ([f"nca.init_from={ROOT / 'tests' / 'fixtures' / 'artefacts_nca' / 'plain_village_house.yaml'}"],
     "is not a readable 3d-artefacts-nca model file"),
])
def test_a_model_that_does_not_fit_is_one_error_line(tmp_path, capsys, extra, message):
    assert main([*TINY, "--output-dir", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "run").exists()
